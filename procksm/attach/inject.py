"""Thin ctypes layer over ptrace(2), wait(2) and process_vm_readv/writev(2).

What is x86_64's (the register structure, system call numbers, instruction patterns)
comes from :mod:`procksm.arch.x86_64`.

Everything here is mechanism; the policy (which threads, in which order, what to do
with each kind of stop) lives in :mod:`procksm.attach.session` and the parts it names. The
functions raise :class:`OSError` with the errno; those translate them into procksm
errors.

python-ptrace (``ptrace.binding``) has the same calls, but it raises its own error type
(the ptrace boundary here decides on ``OSError.errno``), attaches main threads only and
has no injection helper; the ten calls needed here are simpler to own than to adapt
(docs/dependencies.md). Its system call table names calls in messages
(``procksm.arch.x86_64.syscall_name``).
"""

from __future__ import annotations

import ctypes
import enum
import errno
import os
import re
import signal
import time
from collections.abc import Sequence
from dataclasses import dataclass

from procksm import procfs
from procksm.arch.x86_64 import (
    NT_X86_XSTATE,
    PTRACE_GETREGS,
    PTRACE_SETREGS,
    RESTORE_RT,
    WRAPPER_PATTERN,
    WRAPPER_SYSCALL_OFFSET,
    XSTATE_MAX,
    Registers,
    SYS_futex,
    SYS_madvise,
    SYS_mremap,
    SYS_tgkill,
)

# ptrace requests (linux/ptrace.h).
PTRACE_CONT = 7
PTRACE_DETACH = 17
PTRACE_SYSCALL = 24
PTRACE_GETEVENTMSG = 0x4201
PTRACE_GETSIGINFO = 0x4202
PTRACE_SETSIGINFO = 0x4203
PTRACE_GETREGSET = 0x4204
PTRACE_SEIZE = 0x4206
PTRACE_INTERRUPT = 0x4207
PTRACE_GETSIGMASK = 0x420A
PTRACE_SETSIGMASK = 0x420B
PTRACE_GET_RSEQ_CONFIGURATION = 0x420F

PTRACE_O_TRACESYSGOOD = 0x01
PTRACE_O_TRACECLONE = 0x08
PTRACE_O_TRACEEXEC = 0x10

PTRACE_EVENT_CLONE = 3
PTRACE_EVENT_EXEC = 4
PTRACE_EVENT_STOP = 128

WALL = 0x40000000  # __WALL: wait for clone children (threads) too

SIGINFO_SIZE = 128
STOP_SIGNALS = frozenset({signal.SIGSTOP, signal.SIGTSTP, signal.SIGTTIN, signal.SIGTTOU})

_libc = ctypes.CDLL(None, use_errno=True)
_libc.ptrace.argtypes = [ctypes.c_long, ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p]
_libc.ptrace.restype = ctypes.c_long
_libc.syscall.restype = ctypes.c_long


class _IOVec(ctypes.Structure):
    _fields_ = [("iov_base", ctypes.c_void_p), ("iov_len", ctypes.c_size_t)]


_libc.process_vm_readv.argtypes = [
    ctypes.c_int, ctypes.POINTER(_IOVec), ctypes.c_ulong,
    ctypes.POINTER(_IOVec), ctypes.c_ulong, ctypes.c_ulong,
]  # fmt: skip
_libc.process_vm_readv.restype = ctypes.c_ssize_t
_libc.process_vm_writev.argtypes = _libc.process_vm_readv.argtypes
_libc.process_vm_writev.restype = ctypes.c_ssize_t


def ptrace(request: int, tid: int, addr: int = 0, data: int = 0) -> int:
    """ptrace(2); raises OSError(errno) on failure."""
    ctypes.set_errno(0)
    result: int = _libc.ptrace(request, tid, addr, data)
    if result == -1:
        err = ctypes.get_errno()
        if err:
            raise OSError(err, f"ptrace({request:#x}, {tid}): {os.strerror(err)}")
    return result


def get_regs(tid: int) -> Registers:
    regs = Registers()
    ptrace(PTRACE_GETREGS, tid, 0, ctypes.addressof(regs))
    return regs


def set_regs(tid: int, regs: Registers) -> None:
    ptrace(PTRACE_SETREGS, tid, 0, ctypes.addressof(regs))


def get_xstate(tid: int) -> bytes:
    """The thread's XSAVE image (PTRACE_GETREGSET NT_X86_XSTATE, standard format)."""
    buf = bytearray(XSTATE_MAX)
    iov = _IOVec(_address_of(buf), XSTATE_MAX)
    ptrace(PTRACE_GETREGSET, tid, NT_X86_XSTATE, ctypes.addressof(iov))
    return bytes(memoryview(buf)[: iov.iov_len])  # only the image's bytes


def get_sigmask(tid: int) -> int:
    """The thread's signal mask; while a ppoll/pselect/sigsuspend-style call has
    replaced it, the kernel reports the mask the thread gets back (saved_sigmask)."""
    mask = ctypes.c_uint64()
    ptrace(PTRACE_GETSIGMASK, tid, 8, ctypes.addressof(mask))
    return mask.value


def set_sigmask(tid: int, mask: int) -> None:
    """Set the thread's signal mask (SIGKILL/SIGSTOP stay unblocked; the kernel drops a
    pending restore of a call's temporary mask)."""
    value = ctypes.c_uint64(mask)
    ptrace(PTRACE_SETSIGMASK, tid, 8, ctypes.addressof(value))


def get_rseq_area(tid: int) -> int:
    """Address of the thread's registered struct rseq, or 0 (PTRACE_GET_RSEQ_CONFIGURATION)."""
    conf = (ctypes.c_uint64 * 3)()  # rseq_abi_pointer, rseq_abi_size|signature, flags
    try:
        ptrace(PTRACE_GET_RSEQ_CONFIGURATION, tid, ctypes.sizeof(conf), ctypes.addressof(conf))
    except OSError as e:
        if e.errno in (errno.EIO, errno.EINVAL):  # kernel without rseq
            return 0
        raise
    return int(conf[0])


def get_event_msg(tid: int) -> int:
    msg = ctypes.c_ulong()
    ptrace(PTRACE_GETEVENTMSG, tid, 0, ctypes.addressof(msg))
    return msg.value


def get_siginfo(tid: int) -> bytes:
    buf = ctypes.create_string_buffer(SIGINFO_SIZE)
    ptrace(PTRACE_GETSIGINFO, tid, 0, ctypes.addressof(buf))
    return buf.raw


def set_siginfo(tid: int, siginfo: bytes) -> None:
    buf = ctypes.create_string_buffer(siginfo, SIGINFO_SIZE)
    ptrace(PTRACE_SETSIGINFO, tid, 0, ctypes.addressof(buf))


def tgkill(tgid: int, tid: int, sig: int) -> None:
    # os has no tgkill (signal.pthread_kill only reaches threads of this process).
    if _libc.syscall(SYS_tgkill, tgid, tid, sig) == -1:
        err = ctypes.get_errno()
        raise OSError(err, f"tgkill({tgid}, {tid}, {sig}): {os.strerror(err)}")


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


_FUTEX_WAIT = 0  # not private: the word is in memory procksm shares with a target


def futex_wait(addr: int, expected: int, timeout_s: float) -> None:
    """Sleep until the 32-bit word at ``addr`` (in a MAP_SHARED mapping of procksm's) is
    woken by anyone mapping the same memory, no longer holds ``expected``, a signal
    comes, or ``timeout_s`` passes; which of them, the caller reads from the word."""
    ts = _Timespec(int(timeout_s), int(timeout_s % 1 * 1e9))
    _libc.syscall(
        ctypes.c_long(SYS_futex), ctypes.c_void_p(addr), ctypes.c_int(_FUTEX_WAIT),
        ctypes.c_uint(expected), ctypes.byref(ts), None, ctypes.c_uint(0),
    )  # fmt: skip


class StopKind(enum.Enum):
    EXITED = "exited"  # the thread is gone (exit or fatal signal); nothing to resume
    SIGNAL = "signal"  # signal-delivery-stop: resuming with `sig` delivers it
    INTERRUPT = "interrupt"  # PTRACE_EVENT_STOP from PTRACE_INTERRUPT or a new thread
    GROUP_STOP = "group-stop"  # PTRACE_EVENT_STOP of a SIGSTOP-style group stop
    CLONE = "clone"  # PTRACE_EVENT_CLONE: the new thread id is in the event message
    EXEC = "exec"  # PTRACE_EVENT_EXEC: the process now runs another program
    SYSCALL = "syscall"  # syscall-entry/exit-stop (TRACESYSGOOD: sig = SIGTRAP|0x80)
    OTHER = "other"  # another PTRACE_EVENT_* we did not ask for


@dataclass(frozen=True)
class Stop:
    tid: int
    kind: StopKind
    sig: int  # the stop's signal (SIGNAL, GROUP_STOP) or 0
    status: int  # raw wait status, for messages

    def __str__(self) -> str:
        return f"{self.kind.value}(tid={self.tid}, sig={self.sig}, status={self.status:#x})"


def classify(tid: int, status: int) -> Stop:
    """Turn a wait status of a PTRACE_SEIZEd thread into a Stop (ptrace(2) "Stopped states")."""
    if os.WIFEXITED(status) or os.WIFSIGNALED(status):
        return Stop(tid, StopKind.EXITED, 0, status)
    sig = os.WSTOPSIG(status)
    event = status >> 16
    if event == PTRACE_EVENT_STOP:
        if sig in STOP_SIGNALS:
            return Stop(tid, StopKind.GROUP_STOP, sig, status)
        return Stop(tid, StopKind.INTERRUPT, 0, status)
    if event == PTRACE_EVENT_CLONE:
        return Stop(tid, StopKind.CLONE, 0, status)
    if event == PTRACE_EVENT_EXEC:
        return Stop(tid, StopKind.EXEC, 0, status)
    if event:
        return Stop(tid, StopKind.OTHER, 0, status)
    if sig == signal.SIGTRAP | 0x80:
        return Stop(tid, StopKind.SYSCALL, 0, status)
    return Stop(tid, StopKind.SIGNAL, sig, status)


# Waiting. A ptrace stop is reported through wait(2) only; there is no fd to poll for it
# (a pidfd reports exit, not stops). A blocking waitpid cannot time out, and the SIGCHLD +
# sigtimedwait alternative changes the whole tool's signal disposition. So: waitpid
# WNOHANG, first with sched_yield between polls (measured fastest: when the tool shares
# the tracee's CPU the yield lets the tracee run to its stop at once; 15-30 us per
# injected syscall), then sleeps growing to 1 ms so that a slow stop costs no CPU.
_SPIN_SECONDS = 200e-6
_MAX_SLEEP = 1e-3


def poll_stop(tid: int) -> Stop | None:
    """One non-blocking wait for `tid`; None if it has nothing to report."""
    try:
        reported, status = os.waitpid(tid, WALL | os.WNOHANG)
    except ChildProcessError:
        # Not (or no longer) our tracee: it exited and was reaped, or was never attached.
        return Stop(tid, StopKind.EXITED, 0, 0)
    if reported == 0:
        return None
    return classify(tid, status)


class Backoff:
    """Yield-then-sleep pacing for polling loops; see the comment above. ``spin``: how
    long to yield before sleeping; ``steady``: how long the sleeps stay at their first,
    short length before they grow (procksm.attach.call_batch: waiting for a thread that
    may share procksm's CPU)."""

    def __init__(self, spin: float = _SPIN_SECONDS, steady: float = 0.0) -> None:
        self.start = time.monotonic()
        self.sleep = 20e-6
        self.spin = spin
        self.steady = spin + steady

    def pause(self) -> None:
        waited = time.monotonic() - self.start
        if waited < self.spin:
            os.sched_yield()
            return
        time.sleep(self.sleep)
        if waited >= self.steady:
            self.sleep = min(self.sleep * 2, _MAX_SLEEP)


PR_SET_TIMERSLACK = 29


def own_cpu() -> int:
    """The CPU the calling thread runs on now (sched_getcpu: ~0.1 us, from rseq or vDSO)."""
    return int(_libc.sched_getcpu())


def set_timer_slack(ns: int) -> None:
    """How late the calling thread's sleeps may end (prctl PR_SET_TIMERSLACK; 50 us by
    default, which would make every short sleep of a polling loop ~70 us)."""
    _libc.prctl(PR_SET_TIMERSLACK, ns, 0, 0, 0)


def wait_stop(tid: int, deadline: float, *, pacing: Backoff | None = None) -> Stop | None:
    """Wait until `tid` reports a stop or exit; None when `deadline` (monotonic) passes."""
    backoff = pacing or Backoff()
    while True:
        stop = poll_stop(tid)
        if stop is not None:
            return stop
        if time.monotonic() >= deadline:
            return None
        backoff.pause()


# Memory of the target.


def _address_of(buffer: bytes | bytearray) -> int:
    """Where `buffer`'s bytes are, for a system call that reads (bytes) or writes
    (bytearray) them while the caller holds `buffer`. Not a ctypes array: ``c_char * n``
    makes (and caches, for good) a new type for every new length, ~7 us each, and
    windows' tables and reads have a new length nearly every time (measured: 9 % of a
    merge's CPU in create_string_buffer)."""
    if isinstance(buffer, bytes):
        return ctypes.cast(ctypes.c_char_p(buffer), ctypes.c_void_p).value or 0
    return ctypes.addressof(ctypes.c_char.from_buffer(buffer)) if buffer else 0


def read_memory(pid: int, addr: int, size: int) -> bytes:
    """process_vm_readv; OSError on failure, short result if the range ends early.

    `pid` may be any live thread id of the target (a leader that exited has no memory).
    """
    buf = bytearray(size)
    local = _IOVec(_address_of(buf), size)
    remote = _IOVec(addr, size)
    n = _libc.process_vm_readv(pid, ctypes.byref(local), 1, ctypes.byref(remote), 1, 0)
    if n < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"process_vm_readv(pid {pid}, {addr:#x}, {size}): {os.strerror(err)}")
    return bytes(memoryview(buf)[:n])


def read_memories(pid: int, ranges: Sequence[tuple[int, int]]) -> list[bytes]:
    """Several (address, size) ranges in one process_vm_readv (one system call instead
    of one each: frames of a gated window, ~8 us per thread saved on a JVM). The kernel
    stops at the first range it cannot read: that range and the ones after come back
    short (b"")."""
    if not ranges:
        return []
    total = sum(size for _, size in ranges)
    buf = bytearray(total)
    local = (_IOVec * 1)(_IOVec(_address_of(buf), total))
    remote = (_IOVec * len(ranges))(*(_IOVec(addr, size) for addr, size in ranges))
    n = _libc.process_vm_readv(pid, local, 1, remote, len(ranges), 0)
    if n < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"process_vm_readv(pid {pid}, {len(ranges)} ranges): {os.strerror(err)}")
    out, at, view = [], 0, memoryview(buf)
    for _, size in ranges:
        got = min(size, max(0, n - at))
        out.append(bytes(view[at : at + size]) if got == size else b"")
        at += size
    return out


def write_memories(pid: int, pieces: Sequence[tuple[int, bytes]]) -> None:
    """Several (address, data) pieces in one process_vm_writev, all of each or OSError
    (naming the first piece not written whole; the ones before it are written)."""
    if not pieces:
        return
    data = b"".join(d for _, d in pieces)
    local = (_IOVec * 1)(_IOVec(_address_of(data), len(data)))
    remote = (_IOVec * len(pieces))(*(_IOVec(addr, len(d)) for addr, d in pieces))
    n = _libc.process_vm_writev(pid, local, 1, remote, len(pieces), 0)
    if n == len(data):
        return
    err = ctypes.get_errno() if n < 0 else errno.EFAULT
    at = 0
    for addr, d in pieces:
        if at + len(d) > max(n, 0):
            raise OSError(err, f"process_vm_writev(pid {pid}, {addr:#x}): {os.strerror(err)}")
        at += len(d)


def write_memory(pid: int, addr: int, data: bytes) -> None:
    """process_vm_writev of all of `data` (the target range must be mapped writable)."""
    local = _IOVec(_address_of(data), len(data))
    remote = _IOVec(addr, len(data))
    n = _libc.process_vm_writev(pid, ctypes.byref(local), 1, ctypes.byref(remote), 1, 0)
    if n < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"process_vm_writev(pid {pid}, {addr:#x}): {os.strerror(err)}")
    if n != len(data):
        raise OSError(errno.EFAULT, f"process_vm_writev(pid {pid}, {addr:#x}): short write {n}")


@dataclass(frozen=True)
class Gadgets:
    """Instructions of the target's own code that injected system calls run through."""

    syscall: int  # a `syscall` followed by `ret` (0f 05 c3)
    sigreturn: int  # the sigreturn trampoline: `mov rax, 15; syscall`


# `mov eax, imm32` before `syscall; ret`: a libc wrapper (getpid, getuid, sched_yield...).
# Its immediate must not be a call the madvise guard catches: the guard exempts this
# instruction's address (the target reaches it only with its own immediate in eax).
_WRAPPER = re.compile(WRAPPER_PATTERN, re.DOTALL)
_GUARDED_NUMBERS = frozenset({SYS_madvise, SYS_mremap})


def find_gadgets(pid: int, tid: int, mem_fd: int) -> Gadgets | None:
    """A `syscall; ret` and the sigreturn trampoline in the target's file-backed,
    read-only executable mappings (libc, the dynamic loader first), or None.

    The bytes are read from the mapped files (/proc/PID/map_files, else the path under
    /proc/PID/root), not through the target's memory: reading a library through
    /proc/PID/mem maps every page of it into the target (measured: +82 MB of RSS in
    three numpy workers). `mem_fd` is the fallback for files that cannot be opened.
    `tid` must be a live thread (an exited leader has no maps). Writable or anonymous
    code (a JIT) could change under us.
    """
    mappings = []
    for v in procfs.executable_file_vmas(tid):
        if v.perms[1] == "w" or not v.name.startswith("/"):
            continue  # writable code; [vdso] (no `syscall; ret`, kernel-specific)
        mappings.append((v.start, v.end, v.offset, v.name))
    # libc and the loader first: they have both, and the choice stays the same run after
    # run (the madvise guard's filter exempts the address procksm found the first time)
    mappings.sort(key=lambda m: not any(n in m[3] for n in ("/libc.", "/libc-", "/ld-")))
    syscall = sigreturn = 0
    for start, end, offset, path in mappings:
        code = _mapped_code(pid, tid, mem_fd, start, end, offset, path)
        if not syscall:
            for m in _WRAPPER.finditer(code):
                if m.group(1)[0] not in _GUARDED_NUMBERS:
                    syscall = start + m.start() + WRAPPER_SYSCALL_OFFSET
                    break
        if not sigreturn:
            found = code.find(RESTORE_RT)
            if found >= 0:
                sigreturn = start + found
        if syscall and sigreturn:
            return Gadgets(syscall, sigreturn)
    return None


def _mapped_code(
    pid: int, tid: int, mem_fd: int, start: int, end: int, offset: int, path: str
) -> bytes:
    fd = procfs.open_mapped_file(pid, start, end, path)
    if fd is not None:
        try:
            return os.pread(fd, end - start, offset)
        except OSError:
            pass
        finally:
            os.close(fd)
    try:
        return os.pread(mem_fd, end - start, start)
    except OSError:
        return b""
