"""The control socket's path, its listening socket, and the lock that allows one guard
pair per socket (both guards hold both)."""

from __future__ import annotations

import fcntl
import os
import socket


class Endpoint:
    def __init__(self, path: str) -> None:
        self.path = path
        self.srv: socket.socket | None = None
        self.lock = -1

    def claim(self) -> bool:
        """Take the lock and listen on the path; False when a guard pair serves this
        socket already."""
        os.makedirs(os.path.dirname(self.path), mode=0o700, exist_ok=True)
        # One guard pair per socket: the flock belongs to the open file, which both
        # guards hold (inherited), so it is held while either lives.
        self.lock = os.open(self.path + ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(self.lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        self.remove()
        srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        old = os.umask(0o177)  # 0600 from the start: root's (or this user's) procksm only
        try:
            srv.bind(self.path)
        finally:
            os.umask(old)
        srv.listen(16)
        srv.setblocking(False)
        self.srv = srv
        return True

    def adopt(self, srv: int, lock: int) -> None:
        """The listening socket and the lock, inherited as these fds."""
        self.srv = socket.socket(fileno=srv)
        self.srv.setblocking(False)
        self.lock = lock

    def fileno(self) -> int:
        assert self.srv is not None
        return self.srv.fileno()

    def remove(self) -> None:
        """Unlink the socket's path: no procksm reaches this pair any more."""
        try:
            os.unlink(self.path)
        except OSError:
            pass  # gone already
