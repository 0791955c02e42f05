"""One procksm at a time per target: an flock on /run/procksm/<pid>-<start time>.lock.

Stop windows of two procksm processes could otherwise interleave on one target (each
window seizes and releases the target), and their merges and unmerges would race. The
lock file names the process by pid *and* start time, so a reused pid is another target.
The kernel drops an flock when its holder dies, so a killed procksm never leaves a stale
lock behind.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import time
from collections.abc import Iterator, Sequence

from procksm.errors import NoSuchProcess, TargetBusy
from procksm.procfs import start_time


def lock_dir() -> str:
    """/run/procksm for root; a per-user directory otherwise (a user's procksm can only
    work on that user's processes, and must not be able to block root's)."""
    if "PROCKSM_LOCK_DIR" in os.environ:
        return os.environ["PROCKSM_LOCK_DIR"]
    if os.geteuid() == 0:
        return "/run/procksm"
    base = os.environ.get("XDG_RUNTIME_DIR") or f"/tmp/procksm-{os.geteuid()}"
    return os.path.join(base, "procksm") if base.startswith("/run/user") else base


def remove_stale_files(directory: str, prefix: str, suffix: str) -> int:
    """Delete ``{prefix}{pid}-{start time}{suffix}`` files of processes that no longer
    exist (pid gone or reused); returns how many. A live target's file is never touched;
    a procksm still holding the flock of a deleted lock file loses nothing (its target
    is gone)."""
    removed = 0
    try:
        names = os.listdir(directory)
    except OSError:
        return 0
    for name in names:
        if not (name.startswith(prefix) and name.endswith(suffix)):
            continue
        stem = name[len(prefix) : len(name) - len(suffix)]
        pid_text, _, start = stem.partition("-")
        if not pid_text.isdigit() or not start.isdigit():
            continue
        try:
            alive = start_time(int(pid_text)) == start
        except NoSuchProcess:
            alive = False
        if not alive:
            with contextlib.suppress(OSError):
                os.unlink(os.path.join(directory, name))
                removed += 1
    return removed


def remove_stale_locks(directory: str) -> int:
    """Lock files of targets that no longer exist."""
    return remove_stale_files(directory, "", ".lock") + remove_stale_files(directory, "", ".window")


@contextlib.contextmanager
def target_locks(pids: Sequence[int]) -> Iterator[None]:
    """Hold the lock of every pid (sorted, so two procksm never deadlock) or raise
    TargetBusy naming the procksm that holds one."""
    directory = lock_dir()
    os.makedirs(directory, mode=0o700, exist_ok=True)
    remove_stale_locks(directory)
    held: list[int] = []
    try:
        for pid in sorted(set(pids)):
            path = os.path.join(directory, f"{pid}-{start_time(pid)}.lock")
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
                os.close(fd)
                if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                    raise TargetBusy(
                        pid,
                        f"another procksm (pid {holder}) is working on pid {pid}; wait for "
                        "it to finish or stop it",
                    ) from None
                raise
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            held.append(fd)
        yield
    finally:
        for fd in held:
            os.close(fd)


class WindowLock:
    """Serialises the stop windows of different procksm processes on one target.

    The merge engine and the madvise guard (procksm.guard) both seize a target for
    short windows; PTRACE_SEIZE of a thread another tracer holds fails with EPERM, so
    each window takes this flock first (``<pid>-<start>.window`` next to the target
    locks). Windows last milliseconds, so a waiter polls instead of blocking forever.
    """

    def __init__(self, pid: int) -> None:
        self._fd: int | None = None
        directory = lock_dir()
        try:
            os.makedirs(directory, mode=0o700, exist_ok=True)
            path = os.path.join(directory, f"{pid}-{start_time(pid)}.window")
            self._fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError:
            # a directory this user may not write: only processes of this user can
            # hold the target's windows then, and none of them can take this lock either
            self._fd = None

    def acquire(self, timeout: float) -> None:
        if self._fd is None:
            return
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise TargetBusy(
                        0, "another procksm kept the target stopped for too long"
                    ) from None
                time.sleep(0.0002)

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
