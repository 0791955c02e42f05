"""Refusing a target whose seccomp filters would kill, trap or fail a call procksm
injects (a container profile, a sandbox), before anything is injected.

Each thread's filters (PTRACE_SECCOMP_GET_FILTER) are run through the classic-BPF
interpreter of :mod:`procksm.attach.seccomp_bpf` on every call procksm may inject into it, with
procksm's instruction pointer and arguments like its own (docs/kill-safety.md).
"""

from __future__ import annotations

import ctypes
import errno

from procksm import PAGE_SIZE
from procksm.arch.x86_64 import (
    MADV_DONTFORK,
    MADV_DONTNEED,
    MADV_POPULATE_READ,
    MAP_ANONYMOUS,
    MAP_FIXED,
    MAP_PRIVATE,
    MFD_CLOEXEC,
    PROT_EXEC,
    PROT_READ,
    PROT_WRITE,
    SYSCALL_INSN_LEN,
    SYS_bind,
    SYS_close,
    SYS_fstat,
    SYS_ftruncate,
    SYS_futex,
    SYS_madvise,
    SYS_memfd_create,
    SYS_mmap,
    SYS_mprotect,
    SYS_mremap,
    SYS_munmap,
    SYS_pidfd_getfd,
    SYS_pidfd_open,
    SYS_ppoll,
    SYS_prctl,
    SYS_recvmsg,
    SYS_rt_sigreturn,
    SYS_seccomp,
    SYS_socket,
)
from procksm.arch.x86_64_batch import CALL_INSN, PARK_INSN, WAKE_INSN
from procksm.attach.diagnose import AttachStatus
from procksm.attach.inject import ptrace
from procksm.attach.scratch_layout import (
    FUTEX_OP_SET_1,
    FUTEX_WAIT_PRIVATE,
    FUTEX_WAKE,
    FUTEX_WAKE_OP_PRIVATE,
    SCRATCH_BYTES,
)
from procksm.attach.seccomp_bpf import ACTION_NAMES, RUNS, SECCOMP_RET_ERRNO, verdict
from procksm.attach.tracees import StoppedThreads
from procksm.errors import PtraceError, Unsupported

PTRACE_SECCOMP_GET_FILTER = 0x420C

# (name, number, arguments like procksm's, essential): what a seccomp filter is asked.
# Not essential: calls procksm does without when they fail (the pidfd hand-over falls
# back to SCM_RIGHTS, the guard's refusal is reported); killing or trapping still counts.
_RW, _PRIV, _FIX, _ANON = PROT_READ | PROT_WRITE, MAP_PRIVATE, MAP_FIXED, MAP_ANONYMOUS
_INJECTED_CALLS: tuple[tuple[str, int, tuple[int, ...], bool], ...] = (
    ("memfd_create", SYS_memfd_create, (0, MFD_CLOEXEC), True),
    ("ftruncate", SYS_ftruncate, (3, 2 * PAGE_SIZE), True),
    ("mmap", SYS_mmap, (0, SCRATCH_BYTES, _RW, _PRIV, 3, 0), True),
    ("mmap", SYS_mmap, (1 << 30, PAGE_SIZE, _RW, _PRIV | _FIX, 3, 0), True),
    ("mmap", SYS_mmap, (1 << 30, PAGE_SIZE, _RW, _PRIV | _FIX | _ANON, (1 << 64) - 1, 0), True),
    ("mprotect", SYS_mprotect, (1 << 30, PAGE_SIZE, PROT_READ), True),
    ("mremap", SYS_mremap, (1 << 30, PAGE_SIZE, PAGE_SIZE, 7, 1 << 31), True),
    ("munmap", SYS_munmap, (1 << 30, PAGE_SIZE), True),
    ("madvise", SYS_madvise, (1 << 30, PAGE_SIZE, MADV_DONTNEED), True),
    ("madvise", SYS_madvise, (1 << 30, PAGE_SIZE, MADV_POPULATE_READ), True),
    ("madvise", SYS_madvise, (1 << 30, SCRATCH_BYTES, MADV_DONTFORK), True),
    ("close", SYS_close, (3,), True),
    (
        "futex",
        SYS_futex,
        (1 << 30, FUTEX_WAKE_OP_PRIVATE, 0x7FFFFFFF, 0, 1 << 30, FUTEX_OP_SET_1),
        True,
    ),
    ("rt_sigreturn", SYS_rt_sigreturn, (), True),
    ("mmap", SYS_mmap, (1 << 30, PAGE_SIZE, PROT_READ | PROT_EXEC, _PRIV | _FIX, 3, 0), True),
    ("pidfd_open", SYS_pidfd_open, (1, 0), False),
    ("pidfd_getfd", SYS_pidfd_getfd, (3, 3, 0), False),
    ("socket", SYS_socket, (1, 2 | 0o2000000, 0), False),  # AF_UNIX, SOCK_DGRAM|SOCK_CLOEXEC
    ("bind", SYS_bind, (3, 1 << 30, 40), False),
    ("recvmsg", SYS_recvmsg, (3, 1 << 30, 0), False),
    ("seccomp", SYS_seccomp, (1, 0, 1 << 30), False),
    ("prctl", SYS_prctl, (38, 1, 0, 0, 0), False),  # PR_SET_NO_NEW_PRIVS
)
# What procksm's call routine runs in the injecting thread (procksm.attach.call_batch),
# at its own instruction pointers: a merge window's calls, then the park.
_ROUTINE_CALLS: tuple[tuple[str, int, tuple[int, ...], bool], ...] = (
    ("mmap", SYS_mmap, (1 << 30, PAGE_SIZE, _RW, _PRIV | _FIX, 3, 0), True),
    ("madvise", SYS_madvise, (1 << 30, PAGE_SIZE, MADV_DONTNEED), True),
    ("madvise", SYS_madvise, (1 << 30, PAGE_SIZE, MADV_POPULATE_READ), True),
    # a long run compared by the target: its slots mapped read-only in the staging
    # range, which is then given back as anonymous memory (procksm.merge.target)
    ("mmap", SYS_mmap, (1 << 30, PAGE_SIZE, PROT_READ, _PRIV | _FIX, 3, 0), True),
    ("mmap", SYS_mmap, (1 << 30, PAGE_SIZE, _RW, _PRIV | _FIX | _ANON, (1 << 64) - 1, 0), True),
    ("madvise", SYS_madvise, (1 << 30, PAGE_SIZE, MADV_DONTFORK), True),
    ("close", SYS_close, (3,), True),
    ("fstat", SYS_fstat, (3, 1 << 30), True),
    ("pidfd_open", SYS_pidfd_open, (1, 0), False),
    ("pidfd_getfd", SYS_pidfd_getfd, (3, 3, 0), False),
)
_ROUTINE_PARK = ("ppoll", SYS_ppoll, (0, 0, 1 << 30, 0, 8), True)
# the routine's wake-up of procksm at the table's end: a refusal (ERRNO) only makes
# procksm notice the end by polling (procksm.attach.call_batch)
_ROUTINE_WAKE = ("futex", SYS_futex, (1 << 30, FUTEX_WAKE, 1), False)
# What a gated thread runs (procksm.attach.return_frames): the wait, then its way back.
_GATED_CALLS: tuple[tuple[str, int, tuple[int, ...], bool], ...] = (
    ("futex", SYS_futex, (1 << 30, FUTEX_WAIT_PRIVATE, 0, 1 << 30), True),
    ("rt_sigreturn", SYS_rt_sigreturn, (), True),
)


def _seccomp_filters(tid: int) -> list[bytes]:
    """The thread's seccomp filters as classic BPF, newest first (root only)."""
    filters: list[bytes] = []
    for index in range(512):
        try:
            count = ptrace(PTRACE_SECCOMP_GET_FILTER, tid, index, 0)
            buf = ctypes.create_string_buffer(8 * count)
            ptrace(PTRACE_SECCOMP_GET_FILTER, tid, index, ctypes.addressof(buf))
        except OSError as e:
            if e.errno == errno.ENOENT:
                return filters  # past the oldest filter
            raise PtraceError(
                f"cannot read the seccomp filters of thread {tid} ({e.strerror}): procksm "
                "checks them before it injects anything (needs CAP_SYS_ADMIN)"
            ) from None
        filters.append(buf.raw)
    return filters


class SeccompPrecheck:
    """The check, made once per session, before its first injected call."""

    def __init__(self, status: AttachStatus) -> None:
        self.status = status
        self.done = False
        self.routine_done = False
        # the routine's FUTEX_WAKE at its table's end runs (a filter may refuse it with
        # an errno: procksm then polls for the end instead, procksm.attach.call_batch)
        self.routine_wakes = True

    def ensure(self, threads: StoppedThreads, syscall_insn: int) -> None:
        """Check the filters of every stopped thread (unless done already): the calls
        procksm injects in the injecting thread, the gate's wait in the others."""
        if self.done:
            return
        status, pid = self.status, threads.pid
        if status.seccomp == 1:
            raise Unsupported(
                f"pid {pid} ({status.name}) runs in strict seccomp mode: it may make "
                "no system call procksm needs"
            )
        if status.seccomp != 2:
            self.done = True
            return
        ip = syscall_insn + SYSCALL_INSN_LEN
        injector = threads.injector().tid
        for tracee in threads.tracees.values():
            filters = _seccomp_filters(tracee.tid)
            calls = _INJECTED_CALLS if tracee.tid == injector else _GATED_CALLS
            self._check(filters, [(c, ip) for c in calls])
        self.done = True

    def ensure_routine(self, threads: StoppedThreads, routine: int) -> None:
        """Check the injecting thread's filters on the calls of procksm's call routine
        (mapped at `routine`), at the routine's own instruction pointers."""
        if self.routine_done:
            return
        if self.status.seccomp == 2:
            filters = _seccomp_filters(threads.injector().tid)
            call_ip = routine + CALL_INSN + SYSCALL_INSN_LEN
            park_ip = routine + PARK_INSN + SYSCALL_INSN_LEN
            wake_ip = routine + WAKE_INSN + SYSCALL_INSN_LEN
            checks = [(c, call_ip) for c in _ROUTINE_CALLS]
            checks += [(_ROUTINE_WAKE, wake_ip), (_ROUTINE_PARK, park_ip)]
            self._check(filters, checks)
            _name, nr, args, _essential = _ROUTINE_WAKE
            self.routine_wakes = verdict(filters, nr, wake_ip, args) in RUNS
        self.routine_done = True

    def _check(
        self, filters: list[bytes], calls: list[tuple[tuple[str, int, tuple[int, ...], bool], int]]
    ) -> None:
        status = self.status
        for (name, nr, args, essential), ip in calls:
            action = verdict(filters, nr, ip, args)
            if action in RUNS:
                continue
            if action == SECCOMP_RET_ERRNO and not essential:
                continue  # procksm falls back (e.g. SCM_RIGHTS when pidfd_open fails)
            what = ACTION_NAMES.get(action, f"answers {action:#x} to")
            raise Unsupported(
                f"pid {status.pid} ({status.name}): its seccomp filter {what} {name}(), "
                "which procksm injects; not touched"
            )
