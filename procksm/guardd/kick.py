"""Restarting the calls a guard received and will never answer (it is gone, or stopped):
each waiting task is stopped for an instant, so that its call notifies anew."""

from __future__ import annotations

import errno
import os
import time

from procksm.arch.x86_64 import NR_MADVISE, NR_MREMAP
from procksm.guardd import log
from procksm.guardd.syscalls import ptrace

# include/uapi/linux/ptrace.h, wait.h
PTRACE_DETACH = 17
PTRACE_SEIZE = 0x4206
PTRACE_INTERRUPT = 0x4207
_WALL = 0x40000000


def _task_syscall(path: str) -> int | None:
    """The system call a task is blocked in (/proc/TID/syscall), None if none."""
    try:
        with open(path, "rb") as f:
            first = f.read(64).split(b" ", 1)[0]
    except OSError:
        return None
    return int(first) if first.isdigit() else None


def _in_notification(task: str) -> bool:
    """Is the task asleep in a seccomp user notification (its wchan), rather than, say,
    stopped by a tracer at an injected madvise or running a long one?"""
    try:
        with open(f"{task}/wchan", "rb") as f:
            return f.read(64).startswith(b"seccomp_do_user_notification")
    except OSError:
        return False


def waiting_tasks() -> list[int]:
    """Tasks of seccomp-filtered processes waiting in a notification of madvise or mremap
    (x86_64 numbers, and the i386 ones a compat caller shows): every call a guard could
    have received and not answered. Only those are kicked: a kick seizes the task for an
    instant, which a task in any other state does not need (measured: /proc/TID/wchan
    reads `seccomp_do_user_notification.isra.0` for a task waiting for its answer)."""
    wanted = set(NR_MADVISE.values()) | set(NR_MREMAP.values())
    out = []
    me = os.getpid()
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) == me:
            continue
        try:
            tids = os.listdir(f"/proc/{pid}/task")
        except OSError:
            continue
        hits = [
            int(t)
            for t in tids
            if _task_syscall(f"/proc/{pid}/task/{t}/syscall") in wanted
            and _in_notification(f"/proc/{pid}/task/{t}")
        ]
        if hits and _seccomp_mode(pid) == "2":
            out += hits
    return out


def _seccomp_mode(pid: str) -> str:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("Seccomp:"):
                    return line.split()[1]
    except OSError:
        pass
    return ""


def kick(tids: list[int], timeout: float = 0.2) -> list[int]:
    """Stop each task for an instant and let it go: a call waiting in a notification
    (received by a guard that is gone, so never answered) returns -ERESTARTSYS to the
    interrupt and is restarted by the kernel when the task resumes, notifying anew.
    Transparent to the program (PTRACE_INTERRUPT is no signal; the restart is the
    kernel's own). Returns the tasks that could not be kicked now (traced by someone
    else: EPERM), to try again."""
    seized = []
    busy = []
    for tid in tids:
        try:
            ptrace(PTRACE_SEIZE, tid)
            ptrace(PTRACE_INTERRUPT, tid)
            seized.append(tid)
        except OSError as e:
            if e.errno == errno.EPERM:
                busy.append(tid)
    deadline = time.monotonic() + timeout
    for tid in seized:
        while True:
            try:
                got, _status = os.waitpid(tid, os.WNOHANG | _WALL)
            except ChildProcessError:
                break  # gone
            if got:
                break
            if time.monotonic() > deadline:
                break  # not stopped yet: it is in no notification wait; detach below
            time.sleep(0.0005)
        try:
            ptrace(PTRACE_DETACH, tid)
        except OSError:
            # ESRCH: not in a stop yet (an uninterruptible sleep); it stops on its way
            # out, and a tracer that is gone detaches it then: wait for that stop
            try:
                os.waitpid(tid, _WALL)
                ptrace(PTRACE_DETACH, tid)
            except OSError:
                pass  # gone
    return busy


class Kicker:
    """Kicks waiting tasks, and kicks again for 5 s those another tracer held."""

    def __init__(self) -> None:
        self.kicked = 0  # calls restarted
        self._again: list[int] = []
        self._until = 0.0

    @property
    def pending(self) -> bool:
        return bool(self._again)

    def kick(self, tids: list[int]) -> None:
        if tids:
            busy = kick(tids)
            self.kicked += len(tids) - len(busy)
            log(f"restarted {len(tids) - len(busy)} waiting calls; {len(busy)} to retry")
            self._again = busy
            self._until = time.monotonic() + 5

    def retry(self) -> None:
        if self._again:
            if time.monotonic() > self._until:
                self._again = []
                return
            waiting = set(waiting_tasks())
            tids = [t for t in self._again if t in waiting]
            self._again = kick(tids)
            if len(tids) > len(self._again):
                done = len(tids) - len(self._again)
                self.kicked += done
                log(f"restarted {done} waiting calls (their tracer let go)")
