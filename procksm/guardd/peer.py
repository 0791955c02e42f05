"""The other guard of the pair as this one sees it: a SOCK_SEQPACKET link to it (messages
of words, some with fds), its pid, and a pidfd on it that reports its death."""

from __future__ import annotations

import os
import select
import socket
from collections.abc import Iterator

from procksm.guardd import log
from procksm.guardd.wire import recv_fds


class PeerLink:
    def __init__(self) -> None:
        self.sock: socket.socket | None = None
        self.pid = 0
        self.pidfd = -1
        self.gen = 0
        self.ready = False  # its "hello" arrived: it runs its loop

    def adopt(self, link: int, pid: int, pidfd: int) -> None:
        """The link and pidfd, inherited as these fds."""
        self.sock = socket.socket(fileno=link)
        self.pid, self.pidfd = pid, pidfd
        self.ready = True  # it started us, or ran before our execve

    def attach(self, sock: socket.socket, pid: int) -> None:
        """A standby this guard just forked (its pidfd is opened before anyone could reap
        it: pid reuse impossible)."""
        self.sock, self.pid, self.pidfd = sock, pid, os.pidfd_open(pid)

    def send(self, *words: object, fds: list[int] | None = None) -> bool:
        if self.sock is None:
            return False
        msg = " ".join(str(w) for w in words).encode()
        try:
            if fds:
                socket.send_fds(self.sock, [msg], fds)
            else:
                self.sock.send(msg)
            return True
        except OSError as e:
            log(f"peer link: {e.strerror}")
            return False

    def receive(self) -> Iterator[tuple[list[str], list[int]]]:
        """The messages waiting on the link, one at a time (a message may execve this
        guard: the ones after it stay in the socket for the next image)."""
        assert self.sock is not None
        while True:
            try:
                msg, fds = recv_fds(self.sock, socket.MSG_DONTWAIT)
            except BlockingIOError:
                return
            except OSError:
                msg, fds = b"", []
            if not msg:
                return  # EOF: the peer's death is seen on its pidfd
            yield msg.decode(errors="replace").split(), fds

    def dead(self) -> bool:
        p = select.poll()
        p.register(self.pidfd, select.POLLIN)
        return bool(p.poll(0))

    def forget(self) -> None:
        """Close the link and the pidfd of a peer that is gone; no peer now."""
        if self.sock is not None:
            self.sock.close()
            self.sock = None
        if self.pidfd >= 0:
            os.close(self.pidfd)
        try:
            os.waitpid(self.pid, os.WNOHANG)
        except ChildProcessError:
            pass  # reaped by the kernel (SIGCHLD ignored)
        self.pid, self.pidfd, self.ready = 0, -1, False
