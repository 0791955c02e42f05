"""How a target's seccomp listener reaches the guard when procksm may die at any
instruction: procksm says ``expect`` before it injects seccomp(), then ``take`` (the
guard copies the listener out of the target) or ``cancel``; if it dies in between, the
guard takes the listener from the target's fd table itself."""

from __future__ import annotations

import errno
import os
import socket

from procksm.guardd import TEST_OFF, log
from procksm.guardd.guard import Guard
from procksm.guardd.settle import settle_seccomp
from procksm.guardd.syscalls import pidfd_getfd


class ListenerIntake:
    def __init__(self, guard: Guard) -> None:
        self.guard = guard
        # connection fd -> (the connection, pid, its start tick, its fds that were
        # listeners before)
        self.expecting: dict[int, tuple[socket.socket, int, str, set[int], int, int]] = {}

    def expect(self, conn: socket.socket, words: list[str]) -> str:
        """``expect PID START OWN``: procksm is about to inject seccomp() into PID, whose
        listener fd will then sit in PID's fd table only. The connection stays open
        until procksm says ``take FD IP`` (the guard copies the fd out with
        pidfd_getfd) or ``cancel``; if it closes without either, procksm died in
        between, and the guard takes every seccomp listener from PID's fd table
        itself, except the listeners it had before (OWN: fd numbers, "-" for none;
        the process is stopped meanwhile, its fd table changes only by procksm's
        seccomp()). Without that, PID's guarded calls would wait for ever on a listener
        nobody reads."""
        pid, start = int(words[1]), words[2]
        own = {int(x) for x in words[3].split(",") if x.isdigit()}
        # TID IP (procksm since the settle): the thread and address of the seccomp()
        tid, ip = (int(words[4]), int(words[5])) if len(words) == 6 else (0, 0)
        conn.setblocking(False)
        self.expecting[conn.fileno()] = (conn, pid, start, own, tid, ip)
        self.guard.poll.watch(conn.fileno())
        return "ok"

    def on_expect(self, fd: int) -> None:
        conn, pid, start, own, tid, ip = self.expecting.pop(fd)
        self.guard.poll.unwatch(fd)
        try:
            conn.setblocking(True)
            conn.settimeout(5)
            words = conn.recv(256).decode(errors="replace").split()
        except OSError:
            words = []
        try:
            if words[:1] == ["cancel"]:
                return
            if len(words) == 3 and words[0] == "take":
                reply = self.take(pid, start, int(words[1]), int(words[2]))
                try:
                    conn.sendall(reply.encode() + b"\n")
                except OSError:
                    pass  # it died after asking: the listener is ours all the same
                return
            # EOF: procksm died between "expect" and "take"
            if tid and TEST_OFF != "settle":
                settle_seccomp(tid, ip)  # the seccomp() it loaded is made, or never will be
            taken = 0 if TEST_OFF == "rescue" else self._rescue(pid, start, own)
            log(f"pid {pid}: procksm died while installing the filter; took {taken} "
                "listener(s) from the process's fd table (they stay open there)")  # fmt: skip
        finally:
            conn.close()

    def take(self, pid: int, start: str, fd: int, ip: int) -> str:
        """Copy fd ``fd`` of ``pid`` (a seccomp listener) and guard with it."""
        try:
            got = _copy_fd(pid, start, fd)
        except OSError as e:
            return f"error: pid {pid} fd {fd}: {e.strerror}"
        if os.readlink(f"/proc/self/fd/{got}") != "anon_inode:seccomp notify":
            os.close(got)
            return f"error: pid {pid} fd {fd} is no seccomp listener"
        self.guard.add_target(f"{pid}-{start}", got, ip)
        return "ok"

    def _rescue(self, pid: int, start: str, own: set[int]) -> int:
        n = 0
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            return 0
        for name in fds:
            if int(name) in own:
                continue
            try:
                link = os.readlink(f"/proc/{pid}/fd/{name}")
            except OSError:
                continue
            if link == "anon_inode:seccomp notify" and self.take(pid, start, int(name), 0) == "ok":
                n += 1
        return n


def _copy_fd(pid: int, start: str, fd: int) -> int:
    """A copy of ``pid``'s fd ``fd``; ESRCH when ``pid`` is not the process started at
    tick ``start`` any more."""
    pidfd = os.pidfd_open(pid)
    try:
        with open(f"/proc/{pid}/stat") as f:
            if f.read().rsplit(")", 1)[1].split()[19] != start:
                raise OSError(errno.ESRCH, os.strerror(errno.ESRCH))
        return pidfd_getfd(pidfd, fd)
    finally:
        os.close(pidfd)
