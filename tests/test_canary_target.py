"""planted --canaries (the kill tests' witness) is clean when left alone and can fail.

Without procksm: a canary target stays intact, delivers every SIGUSR1 of "signal N", keeps
its counters pages identical to another target's most of the time, and reports a tracer
that changes r12 (while the register canary holds it) or MXCSR of its canary thread.
"""

from __future__ import annotations

import ctypes
import os
import time
from collections.abc import Callable

from tests.conftest import (
    Target,
    assert_target_intact,
    skip_or_fail,
    spawn_canary_targets,
    thread_states,
)

PTRACE_GETREGS, PTRACE_SETREGS, PTRACE_GETFPREGS, PTRACE_SETFPREGS = 12, 13, 14, 15
PTRACE_DETACH, PTRACE_SEIZE, PTRACE_INTERRUPT = 17, 0x4206, 0x4207
WALL = 0x40000000
R13, R12 = 2, 3  # struct user_regs_struct: r15 r14 r13 r12 rbp rbx ...
MXCSR = 24  # byte offset in struct user_fpregs_struct (the FXSAVE area)
LOW40 = (1 << 40) - 1

_libc = ctypes.CDLL(None, use_errno=True)
_libc.ptrace.restype = ctypes.c_long
_libc.ptrace.argtypes = [ctypes.c_long, ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p]


def _ptrace(req: int, tid: int, data: object = None) -> None:
    if _libc.ptrace(req, tid, None, data) == -1:
        err = ctypes.get_errno()
        raise OSError(err, f"ptrace({req:#x}, {tid}): {os.strerror(err)}")


Edit = Callable[[ctypes.Array[ctypes.c_ulong]], bool]


def _tamper(tid: int, get: int, put: int, size: int, edit: Edit) -> bool:
    """Stop thread ``tid`` (SEIZE + INTERRUPT), read its registers with ``get``, write them
    back with ``put`` if ``edit`` changed them (returns True), detach either way."""
    _ptrace(PTRACE_SEIZE, tid)
    try:
        _ptrace(PTRACE_INTERRUPT, tid)
        _, status = os.waitpid(tid, WALL)
        assert os.WIFSTOPPED(status), status
        regs = (ctypes.c_ulong * (size // 8))()
        _ptrace(get, tid, ctypes.addressof(regs))
        changed = edit(regs)
        if changed:
            _ptrace(put, tid, ctypes.addressof(regs))
        return changed
    finally:
        _ptrace(PTRACE_DETACH, tid)


def _canaries(t: Target, more_than: int, timeout: float = 3.0) -> tuple[int, str]:
    deadline = time.monotonic() + timeout
    while True:
        reply = t.command("canaries")
        n = int(reply.split()[1])
        if n > more_than or time.monotonic() > deadline:
            return n, reply
        time.sleep(0.02)


def test_canary_target_left_alone_is_intact_and_delivers_signals(spawn) -> None:  # type: ignore[no-untyped-def]
    t, u = spawn_canary_targets(spawn, 2, 256, 11)
    assert t.int("counters_pages") == 64 and t.int("writers") == 2 and t.int("blockers") == 1
    assert t.int("canary_tid") in thread_states(t.pid)
    time.sleep(1.0)
    assert_target_intact(t)
    assert t.command("signal 3") == "OK"
    assert t.command("signals") == "SIGNALS delivered=3"
    # counters pages: identical across targets with the same seed except ~1 ms in 64
    size = t.int("counters_pages") * 4096
    with open(f"/proc/{t.pid}/mem", "rb") as a, open(f"/proc/{u.pid}/mem", "rb") as b:
        a.seek(t.int("counters"))
        b.seek(u.int("counters"))
        pa, pb = a.read(size), b.read(size)
    same = sum(pa[i : i + 4096] == pb[i : i + 4096] for i in range(0, size, 4096))
    assert same >= 48, f"only {same} of 64 counters pages identical"
    assert_target_intact(t)
    assert_target_intact(u)


def test_canary_target_reports_a_changed_register_and_mxcsr(spawn) -> None:  # type: ignore[no-untyped-def]
    (t,) = spawn_canary_targets(spawn, 1, 64, 5)
    tid = t.int("canary_tid")

    def flip_r12(regs: ctypes.Array[ctypes.c_ulong]) -> bool:
        # only while the asm holds the canary values (elsewhere r12 is the compiler's)
        r12, r13 = regs[R12], regs[R13]
        if r12 >> 40 != 0xC0DE02 or r13 >> 40 != 0xC0DE03 or (r12 ^ r13) & LOW40:
            return False
        regs[R12] = r12 ^ (1 << 20)
        return True

    def default_mxcsr(regs: ctypes.Array[ctypes.c_ulong]) -> bool:
        word = MXCSR // 8  # mxcsr is the low half of this 64-bit word
        regs[word] = (regs[word] & ~0xFFFFFFFF) | 0x1F80
        return True

    try:
        _tamper(tid, PTRACE_GETREGS, PTRACE_SETREGS, 27 * 8, lambda r: False)
    except PermissionError as e:
        skip_or_fail(f"cannot ptrace the target: {e}")
    assert t.command("canaries") == "CANARIES 0 -"  # a stop alone changes nothing
    for _ in range(500):
        if _tamper(tid, PTRACE_GETREGS, PTRACE_SETREGS, 27 * 8, flip_r12):
            break
        time.sleep(0.002)
    else:
        raise AssertionError("never stopped the canary thread inside its register window")
    n, reply = _canaries(t, 0)
    assert n >= 1 and "register r12" in reply, reply
    _tamper(tid, PTRACE_GETFPREGS, PTRACE_SETFPREGS, 512, default_mxcsr)
    m, reply = _canaries(t, n)
    assert m > n, reply
    assert t.alive()
    assert all(tracer == "0" for _, tracer in thread_states(t.pid).values())
    assert t.command("check").startswith("OK")
    assert t.command("errors") == "ERRORS 0"
