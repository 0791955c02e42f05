"""Waiting out a seccomp() that a procksm which died had loaded into a thread.

procksm loads the call's registers into the thread (rip at a `syscall` instruction, rax
the call number) and then lets it run. If it dies in between, the thread, released,
makes the call a moment later: a guard that looked for the new listener at once
(when procksm's connection closed) found none, and the process's guarded calls then
waited for ever on a listener nobody read (found by the kill sweep,
tests/test_kill_steps.py). So the guard stops the thread first (PTRACE_SEIZE +
PTRACE_INTERRUPT: no signal, transparent to the program), and if the call is still
loaded and not made, runs the thread through it (PTRACE_SYSCALL to its exit) before it
detaches. Then the call has been made or never will be: the listener is there or
never comes."""

from __future__ import annotations

import ctypes
import errno
import os
import time

from procksm.arch.x86_64 import PTRACE_GETREGS, Registers, SYS_seccomp
from procksm.guardd import log
from procksm.guardd.kick import _WALL, PTRACE_DETACH, PTRACE_INTERRUPT, PTRACE_SEIZE
from procksm.guardd.syscalls import libc, ptrace

PTRACE_SYSCALL = 24
STOP_TIMEOUT_S = 2.0


def _wait_stop(tid: int, deadline: float) -> bool:
    while time.monotonic() < deadline:
        try:
            got, status = os.waitpid(tid, os.WNOHANG | _WALL)
        except ChildProcessError:
            return False  # gone
        if got:
            return os.WIFSTOPPED(status)
        time.sleep(0.0005)
    return False


def _registers(tid: int) -> Registers | None:
    regs = Registers()
    if libc.ptrace(PTRACE_GETREGS, tid, None, ctypes.byref(regs)) < 0:
        return None
    return regs


def settle_seccomp(tid: int, ip: int) -> None:
    """Return once thread ``tid`` has made the seccomp() loaded at ``ip``, or cannot
    make it any more (its registers are elsewhere)."""
    deadline = time.monotonic() + STOP_TIMEOUT_S
    while True:
        try:
            ptrace(PTRACE_SEIZE, tid)
            break
        except OSError as e:
            # EPERM: still traced by the procksm whose death closed the connection (its
            # fds close before its tracees are released; seen in CI)
            if e.errno != errno.EPERM or time.monotonic() > deadline:
                log(f"thread {tid}: cannot stop it to settle its seccomp(): {e.strerror}")
                return
            time.sleep(0.001)
    try:
        ptrace(PTRACE_INTERRUPT, tid)
        if not _wait_stop(tid, deadline):
            return
        regs = _registers(tid)
        if regs is not None and regs.rip == ip and regs.rax == SYS_seccomp:
            # loaded, not made: through its entry stop to its exit stop
            for _ in range(2):
                ptrace(PTRACE_SYSCALL, tid)
                if not _wait_stop(tid, deadline):
                    return
    except OSError:
        return
    finally:
        try:
            ptrace(PTRACE_DETACH, tid)
        except OSError:
            pass  # gone, or not in a stop: it detaches at its next one (we exit the call)
