"""Everything procksm knows about x86_64, in one place (like CRIU's compel/arch/x86).

* system call numbers: those procksm injects or recognises in a stopped thread, and the
  i386 numbers the madvise guard's filter also catches (int 0x80 from a 64-bit process);
* ``struct user_regs_struct`` (:class:`Registers`), the argument registers of the
  system call convention, the register-state requests of ptrace;
* the instruction patterns injected calls run through (``syscall; ret``, a libc
  wrapper's ``mov eax, imm32``, the sigreturn trampoline);
* the signal frames that make every instant of an injection safe to die at.

It imports nothing heavier than ctypes, mmap and struct: the resident madvise guard
(procksm.guardd) imports it and must stay small.

Signal frames
-------------
x86_64 signal frames: the return path of every injected system call (docs/design.md §6).

When a tracer dies, the kernel detaches its tracees and they run with whatever
registers they hold at that instant (kernel/ptrace.c ``exit_ptrace``). An injected
system call therefore never runs with registers that lead nowhere: procksm first writes
an ``rt_sigframe`` holding the thread's own state below its stack's red zone, then
points the thread at a ``syscall; ret`` instruction pair with ``rsp`` at the frame's
``pretcode``, which is the address of the target's own sigreturn trampoline
(``__restore_rt``: ``mov rax, 15; syscall``). A thread released at any instant runs at
most the injected system call, then ``ret`` → trampoline → ``rt_sigreturn`` into
exactly its own registers, FPU/AVX state and signal mask. Frames chain: a frame whose
registers are another ``syscall; ret`` with ``rsp`` at a second frame runs a second
system call first (the futex gate's wake-up, procksm.attach.return_frames).

Layouts are the kernel's (arch/x86/include/uapi/asm/sigcontext.h, ucontext.h,
arch/x86/include/asm/sigframe.h); ``rt_sigreturn`` reads the frame at ``rsp - 8``
(arch/x86/kernel/signal_64.c) once ``ret`` has popped ``pretcode``.

The FPU part is the thread's XSAVE image as PTRACE_GETREGSET(NT_X86_XSTATE) returns it
(standard, uncompacted format), with the software-reserved bytes a signal frame carries
(``struct _fpx_sw_bytes``: FP_XSTATE_MAGIC1, sizes, features) and FP_XSTATE_MAGIC2
after it. Without them the kernel restores only the legacy FXSAVE area and resets
AVX/AVX-512/PKRU (measured: ymm upper halves changed). ``xstate_size`` must not exceed
the task's own ``fpstate->user_size``, which is smaller than the CPU's maximum when the
task has no AMX permission, so the size is that of the features the image actually
holds, computed from CPUID leaf 0xD (the same offsets the kernel uses).
"""

from __future__ import annotations

import ctypes
import functools
import mmap
import os
import struct

# asm-generic/mman-common.h, mman.h, linux/mman.h, memfd.h (the values x86_64 uses)
PROT_READ, PROT_WRITE, PROT_EXEC = 0x1, 0x2, 0x4
MAP_SHARED, MAP_PRIVATE, MAP_FIXED, MAP_ANONYMOUS, MAP_NORESERVE = 0x01, 0x02, 0x10, 0x20, 0x4000
MREMAP_MAYMOVE, MREMAP_FIXED, MREMAP_DONTUNMAP = 1, 2, 4
MADV_RANDOM = 1
MADV_SEQUENTIAL = 2
MADV_DONTNEED = 4
MADV_DONTFORK = 10
MADV_HUGEPAGE = 14
MADV_NOHUGEPAGE = 15
MADV_DONTDUMP = 16
MADV_POPULATE_READ = 22
MFD_CLOEXEC = 0x1

# x86_64 system call numbers this package injects or recognises in a stopped thread.
SYS_close = 3
SYS_fstat = 5
SYS_mmap = 9
SYS_mprotect = 10
SYS_munmap = 11
SYS_rt_sigreturn = 15
SYS_mremap = 25
SYS_madvise = 28
SYS_ftruncate = 77
SYS_futex = 202
SYS_ppoll = 271
SYS_memfd_create = 319
SYS_getpid = 39
SYS_prctl = 157
SYS_gettid = 186
SYS_tgkill = 234
SYS_restart_syscall = 219
SYS_epoll_wait = 232
SYS_epoll_pwait = 281
SYS_epoll_pwait2 = 441
SYS_socket = 41
SYS_openat = 257
SYS_recvmsg = 47
SYS_bind = 49
SYS_kcmp = 312
SYS_seccomp = 317
SYS_pidfd_open = 434
SYS_pidfd_getfd = 438
# and two procksm makes itself: the observer's BPF objects and tracepoint probes
SYS_perf_event_open = 298
SYS_bpf = 321

# include/uapi/linux/audit.h: seccomp_data.arch of a 64-bit call and of an int 0x80 one
AUDIT_ARCH_X86_64 = 0xC000003E
AUDIT_ARCH_I386 = 0x40000003
X32_SYSCALL_BIT = 0x40000000
# x86_64 and i386 numbers of the calls the madvise guard catches
NR_MADVISE = {AUDIT_ARCH_X86_64: SYS_madvise, AUDIT_ARCH_I386: 219}
NR_MREMAP = {AUDIT_ARCH_X86_64: SYS_mremap, AUDIT_ARCH_I386: 163}

# Kernel-internal restart codes a thread shows in rax when stopped inside a blocking
# syscall (include/linux/errno.h). They never reach user space when the kernel finishes
# its signal-return path; docs/design.md §2.7.
ERESTARTSYS = 512
ERESTARTNOINTR = 513
ERESTARTNOHAND = 514
ERESTART_RESTARTBLOCK = 516
RESTART_CODES = frozenset({ERESTARTSYS, ERESTARTNOINTR, ERESTARTNOHAND, ERESTART_RESTARTBLOCK})

# ptrace requests and regsets of the register state (linux/ptrace.h, elf.h on x86_64)
PTRACE_GETREGS = 12
PTRACE_SETREGS = 13
NT_X86_XSTATE = 0x202
XSTATE_MAX = 16384  # > 11,008, the largest XSAVE image of today's CPUs (AVX-512 + AMX)

# fmt: off
_REG_NAMES = (
    "r15", "r14", "r13", "r12", "rbp", "rbx", "r11", "r10", "r9", "r8", "rax", "rcx", "rdx",
    "rsi", "rdi", "orig_rax", "rip", "cs", "eflags", "rsp", "ss", "fs_base", "gs_base", "ds",
    "es", "fs", "gs",
)
# fmt: on


class Registers(ctypes.Structure):
    """``struct user_regs_struct`` of x86_64 (sys/user.h), as PTRACE_GETREGS fills it."""

    _fields_ = [(name, ctypes.c_ulong) for name in _REG_NAMES]
    r15: int
    r14: int
    r13: int
    r12: int
    rbp: int
    rbx: int
    r11: int
    r10: int
    r9: int
    r8: int
    rax: int
    rcx: int
    rdx: int
    rsi: int
    rdi: int
    orig_rax: int
    rip: int
    cs: int
    eflags: int
    rsp: int
    ss: int
    fs_base: int
    gs_base: int
    ds: int
    es: int
    fs: int
    gs: int

    def copy(self) -> Registers:
        return Registers.from_buffer_copy(self)

    def as_dict(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in _REG_NAMES}

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Registers) and bytes(self) == bytes(other)

    __hash__ = None  # type: ignore[assignment]


def signed(value: int) -> int:
    """A 64-bit register value as a signed integer (rax carries -errno)."""
    return value - (1 << 64) if value >= 1 << 63 else value


def unsigned(value: int) -> int:
    return value & ((1 << 64) - 1)


def syscall_name(nr: int) -> str:
    """The name of x86_64 system call ``nr`` for messages ("futex"), from python-ptrace's
    table (``ptrace.syscall.linux.x86_64``), imported on first use: only error paths
    need it (~30 ms), and the resident guard never does. "syscall N" when unknown."""
    try:
        from ptrace.syscall.linux.x86_64 import SYSCALL_NAMES
    except ImportError:  # a message must not fail for want of a name
        return f"syscall {nr}"
    name = SYSCALL_NAMES.get(nr)
    return name if isinstance(name, str) else f"syscall {nr}"


# The system call convention: number in rax, arguments in these, result in rax.
ARGUMENT_REGISTERS = ("rdi", "rsi", "rdx", "r10", "r8", "r9")


def load_syscall(regs: Registers, nr: int, *args: int, pc: int, sp: int) -> None:
    """Make ``regs`` run system call ``nr`` with ``args`` from instruction ``pc`` (a
    `syscall; ret`) with the stack pointer at ``sp``: the number in rax, the arguments
    in the convention's registers; the other registers are left as they are."""
    regs.rip, regs.rsp, regs.rax = pc, sp, nr
    for name, value in zip(ARGUMENT_REGISTERS, args, strict=False):
        setattr(regs, name, unsigned(value))


def require_x86_64() -> None:
    from procksm.errors import Unsupported

    machine = os.uname().machine
    if machine != "x86_64":
        raise Unsupported(
            f"procksm injects system calls with x86_64 registers; this machine is {machine}"
        )


# Instruction patterns searched in the target's executable file mappings.
SYSCALL_RET = b"\x0f\x05\xc3"  # `syscall; ret`: what every injected system call runs
SYSCALL_INSN_LEN = 2  # rip after the `syscall`, as a seccomp filter sees it, is +2
# `mov eax, imm32; syscall; ret`: a libc wrapper of a harmless call (getpid & co.). The
# target itself reaches that `syscall` only with its own immediate in eax, so the madvise
# guard may exempt its address (procksm.guard) without exempting the target's madvise.
# Group 1 is the low byte of the immediate; the `syscall` is WRAPPER_SYSCALL_OFFSET in.
WRAPPER_PATTERN = rb"\xb8([\x00-\xff])\x00\x00\x00\x0f\x05\xc3"
WRAPPER_SYSCALL_OFFSET = 5
RESTORE_RT = b"\x48\xc7\xc0\x0f\x00\x00\x00\x0f\x05"  # glibc/musl __restore_rt

RED_ZONE = 128  # bytes below rsp the System V ABI lets leaf code use
FRAME_SIZE = 440  # pretcode 8 + ucontext 304 + siginfo 128
FRAME_STRIDE = 448  # FRAME_SIZE rounded to 64: frames and the XSAVE image stay aligned
UC_MCONTEXT = 8 + 40  # ucontext: uc_flags 8, uc_link 8, uc_stack 24
UC_SIGMASK = 8 + 296
UC_FP_XSTATE = 0x1
UC_SIGCONTEXT_SS = 0x2
UC_STRICT_RESTORE_SS = 0x4

FXSAVE_SIZE = 512
XSAVE_HEADER_SIZE = 64
SW_RESERVED_OFFSET = 464  # struct _fpx_sw_bytes inside the FXSAVE area
FP_XSTATE_MAGIC1 = 0x46505853
FP_XSTATE_MAGIC2 = 0x46505845
XFEATURES_FP_SSE = 0x3

# struct sigcontext_64 (the frame's uc_mcontext), in order.
_SIGCONTEXT_REGS = (
    "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15", "rdi", "rsi", "rbp", "rbx",
    "rdx", "rax", "rcx", "rsp", "rip", "eflags",
)  # fmt: skip


def _cpuid_function() -> ctypes._CFuncPtr:  # type: ignore[name-defined]
    """cpuid(leaf, subleaf, out[4]) as a few bytes of machine code in an executable page.

    Python has no CPUID; the kernel exposes the XSAVE layout nowhere else.
    """
    code = bytes.fromhex(
        "53"  # push rbx
        "4989d0"  # mov r8, rdx (out)
        "89f8"  # mov eax, edi (leaf)
        "89f1"  # mov ecx, esi (subleaf)
        "0fa2"  # cpuid
        "418900"  # mov [r8], eax
        "41895804"  # mov [r8+4], ebx
        "41894808"  # mov [r8+8], ecx
        "4189500c"  # mov [r8+12], edx
        "5b"  # pop rbx
        "c3"  # ret
    )
    page = mmap.mmap(-1, mmap.PAGESIZE, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
    page.write(code)
    address = ctypes.addressof(ctypes.c_char.from_buffer(page))
    fn = ctypes.CFUNCTYPE(None, ctypes.c_uint32, ctypes.c_uint32, ctypes.POINTER(ctypes.c_uint32))(
        address
    )
    fn._page = page  # type: ignore[attr-defined]  # keep the code mapped
    return fn


@functools.cache
def _cpuid(leaf: int, subleaf: int) -> tuple[int, int, int, int]:
    out = (ctypes.c_uint32 * 4)()
    _cpuid_function()(leaf, subleaf, out)
    return out[0], out[1], out[2], out[3]


@functools.cache
def xfeature_end(feature: int) -> int:
    """End offset of XSAVE feature `feature` (>= 2) in the standard format (CPUID 0xD)."""
    size, offset, _, _ = _cpuid(0xD, feature)
    return offset + size if size else 0


@functools.lru_cache(maxsize=64)  # a process's threads use a handful of feature sets
def xstate_size_for(xfeatures: int) -> int:
    """Bytes of a standard-format XSAVE image that holds `xfeatures`."""
    end = FXSAVE_SIZE + XSAVE_HEADER_SIZE
    for bit in range(2, 64):
        if xfeatures >> bit & 1:
            end = max(end, xfeature_end(bit))
    return end


def signal_xstate(image: bytes) -> bytes:
    """The XSAVE image of PTRACE_GETREGSET(NT_X86_XSTATE) as a signal frame's fpstate.

    The frame lists exactly the features in the image's XSTATE_BV (x87 and SSE always):
    ``rt_sigreturn`` restores those and puts the others in their initial state, which is
    what XSTATE_BV says they are in.
    """
    (xstate_bv,) = struct.unpack_from("<Q", image, FXSAVE_SIZE)
    xfeatures = xstate_bv | XFEATURES_FP_SSE
    size = xstate_size_for(xfeatures)
    if len(image) < size:
        raise ValueError(f"XSAVE image of {len(image)} bytes, features need {size}")
    body = bytearray(image[:size])
    struct.pack_into("<QQ", body, FXSAVE_SIZE, xstate_bv, 0)  # xcomp_bv 0: standard format
    # struct _fpx_sw_bytes: magic1, extended_size, xfeatures, xstate_size
    struct.pack_into("<IIQI", body, SW_RESERVED_OFFSET, FP_XSTATE_MAGIC1, size + 4, xfeatures, size)
    return bytes(body) + struct.pack("<I", FP_XSTATE_MAGIC2)


def restarted_call(code_before: bytes) -> int | None:
    """The number of the system call a thread sleeping in restart_syscall first made,
    from the instruction right before its `syscall` (the last 7 bytes of
    `code_before`, which ends at the `syscall`): glibc's wrappers load it there with
    `mov eax, imm32` (b8 ..) or `xor eax, eax` (31 c0). None if it is not one of those."""
    if len(code_before) >= 5 and code_before[-5] == 0xB8:
        return int.from_bytes(code_before[-4:], "little")
    if code_before[-2:] == b"\x31\xc0":
        return 0
    return None


SYSCALL_INSN = b"\x0f\x05"
# own_state's view of the code: from 9 bytes before rip (a `mov eax, imm32` and the
# `syscall` a thread stopped inside a call has just run) to 2 bytes after (the `syscall`
# a thread stopped after the kernel's restart fix-up is about to run).
CODE_BEFORE_RIP, CODE_AFTER_RIP = 9, 2


def needs_code(regs: Registers) -> bool:
    """own_state needs the code around rip (:data:`CODE_BEFORE_RIP`..:data:`CODE_AFTER_RIP`):
    the thread may be on its way into restart_syscall."""
    return SYS_restart_syscall in (regs.orig_rax, regs.rax)


def own_state(regs: Registers, code: bytes = b"") -> Registers:
    """The registers a thread stopped in or around a system call resumes with through an
    rt_sigframe (``code``: the bytes around rip when :func:`needs_code`).

    A blocking call interrupted by PTRACE_INTERRUPT shows rax = -ERESTART*; with no
    signal to deliver the kernel would restart it (rax = orig_rax, rip -= 2). The frame
    does the same by hand: ``rt_sigreturn`` sets orig_rax = -1, so no restart logic
    runs after it. ERESTART_RESTARTBLOCK (nanosleep, poll with a timeout) is re-issued
    with its original arguments, not through restart_syscall, whose restart block
    ``rt_sigreturn`` clears: the call sleeps its whole timeout again instead of
    returning EINTR (a longer sleep, which those calls allow).

    A thread can also stop after the kernel applied that fix-up and before the
    ``syscall`` runs: released by one window, it met the next window's PTRACE_INTERRUPT
    in the same pass of its way back to user space (measured here: 28 % of back-to-back
    stops of a thread in poll). Its rip is then at the ``syscall`` with rax =
    restart_syscall, which after an rt_sigreturn would return EINTR: the call it
    restarts is re-issued instead, as above.
    """
    out = regs.copy()
    in_call = signed(regs.orig_rax) >= 0 and -signed(regs.rax) in RESTART_CODES
    if in_call:
        out.rax = regs.orig_rax
        out.rip = regs.rip - 2
        before_syscall = code[: CODE_BEFORE_RIP - 2]
    elif regs.rax == SYS_restart_syscall and code[CODE_BEFORE_RIP:] == SYSCALL_INSN:
        if signed(regs.orig_rax) >= 0:
            out.rax = regs.orig_rax  # the call the kernel was returning from: restarted
        before_syscall = code[2:CODE_BEFORE_RIP]
    else:
        return out
    if out.rax == SYS_restart_syscall:
        # A call the kernel restarted once already sleeps in restart_syscall, whose
        # restart block rt_sigreturn clears: re-issue the call it restarted instead.
        nr = restarted_call(before_syscall)
        if nr is None:
            raise ValueError("sleeps in restart_syscall and its first call is unknown")
        out.rax = nr
    return out


def restarts_through_block(regs: Registers) -> bool:
    """The thread was stopped in a call the kernel restarts through its restart block."""
    return signed(regs.orig_rax) >= 0 and -signed(regs.rax) == ERESTART_RESTARTBLOCK


class Frame:
    """An rt_sigframe image and where it goes: ``rsp`` for a thread returning into it.

    (A plain class: the resident guard imports this module, and dataclasses would cost it
    ``inspect`` and ``re``.)"""

    __slots__ = ("address", "data")

    def __init__(self, address: int, data: bytes) -> None:
        self.address = address  # of pretcode; a thread whose `ret` pops it enters rt_sigreturn
        self.data = data

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Frame) and (self.address, self.data) == (other.address, other.data)

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"Frame({self.address:#x}, {len(self.data)} bytes)"


def build_frame(
    address: int,
    regs: Registers,
    sigmask: int,
    *,
    pretcode: int,
    fpstate: int = 0,
) -> Frame:
    """An rt_sigframe at `address` that rt_sigreturns into `regs` with `sigmask`.

    `fpstate` 0: the FPU state is reset to its initial values (a frame that is only a
    step of a chain, whose last frame carries the real state).
    """
    buf = bytearray(FRAME_SIZE)
    struct.pack_into("<Q", buf, 0, pretcode)
    flags = UC_SIGCONTEXT_SS | UC_STRICT_RESTORE_SS | (UC_FP_XSTATE if fpstate else 0)
    struct.pack_into("<Q", buf, 8, flags)
    # uc_link 0; uc_stack all zero: restore_altstack() then fails with ENOMEM (size 0 <
    # MINSIGSTKSZ) or EPERM (on the altstack) and leaves the thread's altstack as it is.
    values = [getattr(regs, name) for name in _SIGCONTEXT_REGS]  # c_uint64 fields
    struct.pack_into("<18Q", buf, UC_MCONTEXT, *values)
    # cs, gs, fs, ss (the kernel forces CPL 3); err, trapno, oldmask, cr2; fpstate
    struct.pack_into(
        "<HHHHQQQQQ", buf, UC_MCONTEXT + 144, regs.cs, 0, 0, regs.ss, 0, 0, 0, 0, fpstate
    )
    struct.pack_into("<Q", buf, UC_SIGMASK, sigmask)
    return Frame(address, bytes(buf))


def frame_below(rsp: int, xstate_len: int, chained: int) -> tuple[int, int, int]:
    """Where a thread's frames go on its stack: (lowest address, own frame, fpstate).

    Below the red zone, like a signal frame: ``chained`` extra frames first (lowest),
    then the frame of the thread's own state, then its XSAVE image (64-byte aligned, as
    XRSTOR requires).
    """
    fpstate = (rsp - RED_ZONE - xstate_len) & ~63
    own = fpstate - FRAME_STRIDE
    return own - chained * FRAME_STRIDE, own, fpstate
