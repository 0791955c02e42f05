"""The signal frames of procksm.arch.x86_64: layouts and rules, without a target (pure)."""

from __future__ import annotations

import struct

import pytest

from procksm.arch import x86_64
from procksm.arch.x86_64 import Registers, unsigned


def regs(**values: int) -> Registers:
    r = Registers()
    r.cs, r.ss = 0x33, 0x2B
    for name, value in values.items():
        setattr(r, name, unsigned(value))
    return r


def test_own_state_applies_the_restart_fixup() -> None:
    # read() interrupted: ERESTARTSYS -> the call again
    out = x86_64.own_state(regs(rax=-512, orig_rax=0, rip=0x1002))
    assert (out.rax, out.rip) == (0, 0x1000)
    # nanosleep the first time: ERESTART_RESTARTBLOCK -> the call itself, not restart_syscall
    out = x86_64.own_state(regs(rax=-516, orig_rax=230, rip=0x2002))
    assert (out.rax, out.rip) == (230, 0x2000)
    # not in a call, or a call that finished: untouched
    for r in (regs(rax=-512, orig_rax=-1, rip=5), regs(rax=-4, orig_rax=0, rip=5)):
        out = x86_64.own_state(r)
        assert out == r


def test_a_restarted_call_is_reissued_by_its_own_number() -> None:
    code = bytes.fromhex("89c08b74240c8b3c24b8e60000000f05")[-9:-2]  # ... mov eax, 230
    assert x86_64.restarted_call(code) == 230
    assert x86_64.restarted_call(bytes.fromhex("8b7c240831c0")[-7:] + b"") == 0  # xor eax,eax
    assert x86_64.restarted_call(bytes(7)) is None
    # stopped inside restart_syscall: the code ends 2 bytes after rip
    around = bytes.fromhex("41b807000000") + bytes.fromhex("b8070000000f05") + b"\x48\x3d"
    assert len(around) == x86_64.CODE_BEFORE_RIP + x86_64.CODE_AFTER_RIP + 4
    inside = around[4:]  # [rip - 9, rip + 2) with rip right after the syscall
    r = regs(rax=-516, orig_rax=219, rip=0x3002)
    assert x86_64.needs_code(r)
    out = x86_64.own_state(r, inside)
    assert (out.rax, out.rip) == (7, 0x3000)
    with pytest.raises(ValueError, match="restart_syscall"):
        x86_64.own_state(r)
    with pytest.raises(ValueError, match="restart_syscall"):
        x86_64.own_state(r, bytes(11))


def test_a_thread_stopped_after_the_kernels_fixup_reissues_the_call_not_restart_syscall() -> None:
    """Released by one window and stopped by the next on the same way back to user
    space: rip at the `syscall`, rax = restart_syscall (orig_rax either the call or
    restart_syscall). rt_sigreturn clears the restart block, so the frame re-issues poll."""
    before = bytes.fromhex("8b7c24") + bytes.fromhex("b807000000")  # ..., mov eax, 7
    at_syscall = before[-7:] + bytes.fromhex("0f05")
    for orig in (7, 219):
        r = regs(rax=219, orig_rax=orig, rip=0x4000)
        assert x86_64.needs_code(r)
        code = bytes(2) + at_syscall  # [rip - 9, rip + 2)
        out = x86_64.own_state(r, code)
        assert (out.rax, out.rip, out.orig_rax) == (7, 0x4000, orig)
    # orig_rax says which call the fix-up restarts; if that is restart_syscall itself,
    # only the code before the syscall can tell
    r = regs(rax=219, orig_rax=7, rip=0x4000)
    assert x86_64.own_state(r, bytes(9) + bytes.fromhex("0f05")).rax == 7
    r = regs(rax=219, orig_rax=219, rip=0x4000)
    with pytest.raises(ValueError, match="restart_syscall"):
        x86_64.own_state(r, bytes(9) + bytes.fromhex("0f05"))
    # rax holds 219 but the thread is not at a syscall: a value like any other
    r = regs(rax=219, orig_rax=-1, rip=0x4000)
    assert x86_64.own_state(r, bytes(11)) == r


def test_frame_layout_matches_the_kernels() -> None:
    r = regs(rip=0x401000, rsp=0x7FFC0000, rax=1, rdi=2, r15=3, eflags=0x246)
    f = x86_64.build_frame(0x7000, r, 0xFFFF, pretcode=0x1234, fpstate=0x8000)
    assert len(f.data) == x86_64.FRAME_SIZE == 440
    assert struct.unpack_from("<Q", f.data, 0)[0] == 0x1234  # pretcode
    flags = struct.unpack_from("<Q", f.data, 8)[0]
    assert flags == x86_64.UC_FP_XSTATE | x86_64.UC_SIGCONTEXT_SS | x86_64.UC_STRICT_RESTORE_SS
    assert f.data[16:40] == bytes(24)  # uc_stack zero: the altstack is left alone
    mc = x86_64.UC_MCONTEXT
    r8, _r9, _r10, _r11, _r12, _r13, _r14, r15, rdi = struct.unpack_from("<9Q", f.data, mc)
    assert (r8, r15, rdi) == (0, 3, 2)
    rax, _rcx, rsp, rip, eflags = struct.unpack_from("<5Q", f.data, mc + 13 * 8)
    assert (rax, rsp, rip, eflags) == (1, 0x7FFC0000, 0x401000, 0x246)
    cs, _gs, _fs, ss = struct.unpack_from("<4H", f.data, mc + 144)
    assert (cs, ss) == (0x33, 0x2B)
    assert struct.unpack_from("<Q", f.data, mc + 184)[0] == 0x8000  # fpstate
    assert struct.unpack_from("<Q", f.data, x86_64.UC_SIGMASK)[0] == 0xFFFF
    # a chain step has no fpstate: its FPU is reset, the next frame restores it
    step = x86_64.build_frame(0x7000, r, 0, pretcode=0x1234)
    assert struct.unpack_from("<Q", step.data, 8)[0] & x86_64.UC_FP_XSTATE == 0


def test_frames_sit_below_the_red_zone_aligned() -> None:
    low, own, fp = x86_64.frame_below(0x7FFF_0000_1008, 2700, 3)
    assert fp % 64 == 0 and fp + 2700 <= 0x7FFF_0000_1008 - x86_64.RED_ZONE
    assert own == fp - x86_64.FRAME_STRIDE
    assert low == own - 3 * x86_64.FRAME_STRIDE


def test_signal_xstate_carries_the_magics_and_the_features_it_holds() -> None:
    image = bytearray(4096)
    struct.pack_into("<Q", image, 512, 0b111)  # XSTATE_BV: x87, SSE, AVX
    out = x86_64.signal_xstate(bytes(image))
    size = x86_64.xstate_size_for(0b111)
    assert size == x86_64.xfeature_end(2) and size >= 576 + 256
    magic1, extended, xfeatures, xsize = struct.unpack_from("<IIQI", out, 464)
    assert (magic1, extended, xfeatures, xsize) == (
        x86_64.FP_XSTATE_MAGIC1, size + 4, 0b111, size,
    )  # fmt: skip
    assert struct.unpack_from("<I", out, size)[0] == x86_64.FP_XSTATE_MAGIC2
    assert len(out) == size + 4
    # only x87/SSE in use: the legacy area and the header, nothing more
    struct.pack_into("<Q", image, 512, 0b11)
    assert len(x86_64.signal_xstate(bytes(image))) == 576 + 4


def test_syscall_names_come_from_python_ptrace() -> None:
    """python-ptrace's table names the calls procksm's messages mention."""
    assert x86_64.syscall_name(x86_64.SYS_futex) == "futex"
    assert x86_64.syscall_name(x86_64.SYS_mmap) == "mmap"
    assert x86_64.syscall_name(x86_64.SYS_pidfd_getfd) == "pidfd_getfd"
    assert x86_64.syscall_name(100000) == "syscall 100000"


def test_load_syscall_puts_the_number_and_arguments_in_the_convention_registers() -> None:
    r = regs(rbx=7, orig_rax=3)
    x86_64.load_syscall(r, x86_64.SYS_futex, 0x1000, 128, 0, -1, pc=0x4000, sp=0x7000)
    assert (r.rip, r.rsp, r.rax) == (0x4000, 0x7000, x86_64.SYS_futex)
    assert (r.rdi, r.rsi, r.rdx, r.r10) == (0x1000, 128, 0, (1 << 64) - 1)
    assert (r.rbx, r.orig_rax, r.r8, r.r9) == (7, 3, 0, 0)  # the others left alone


def test_signals_are_deferred_until_the_outermost_window_ends() -> None:
    """A window's gate and batch defer signals inside the window's own deferral: the
    mask is set once and restored only when the window ends."""
    import signal

    from procksm.attach.deferred_signals import DEFERRED_SIGNALS, signals_deferred

    before = signal.pthread_sigmask(signal.SIG_BLOCK, [])
    with signals_deferred():
        with signals_deferred():
            assert signal.pthread_sigmask(signal.SIG_BLOCK, []) >= DEFERRED_SIGNALS
        assert signal.pthread_sigmask(signal.SIG_BLOCK, []) >= DEFERRED_SIGNALS
    assert signal.pthread_sigmask(signal.SIG_BLOCK, []) == before
