"""The control socket (active guard): one request per connection from root's (or this
user's) procksm, one reply line. Requests (the on-wire format procksm.guard speaks):
``list``, ``stats``, ``guard PID START IP`` + a listener fd, ``expect PID START OWN``
and ``take PID START FD IP`` (procksm.guardd.intake), ``upgrade GEN EXE PYTHONPATH``,
``stop``."""

from __future__ import annotations

import os
import socket
import struct
import time

from procksm.guardd import TEST_OFF, log
from procksm.guardd.guard import Exit, Guard
from procksm.guardd.intake import ListenerIntake
from procksm.guardd.wire import recv_fds, to_json


class ControlServer:
    def __init__(self, guard: Guard, intake: ListenerIntake) -> None:
        self.guard = guard
        self.intake = intake
        self._stopping = False

    def accept(self) -> None:
        assert self.guard.endpoint.srv is not None
        try:
            conn, _ = self.guard.endpoint.srv.accept()
        except BlockingIOError:
            return
        self.guard.last_activity = time.monotonic()
        keep = False
        try:
            conn.settimeout(5)
            creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12)
            client_pid, uid, _gid = struct.unpack("3i", creds)
            try:
                msg, fds = recv_fds(conn, 0)
            except OSError:
                return
            line = msg.decode(errors="replace").strip()
            try:
                if uid not in (0, os.geteuid()):
                    reply = "error: permission denied"
                elif line.startswith("expect ") and len(line.split()) in (4, 6) and not fds:
                    reply = self.intake.expect(conn, line.split())
                    keep = reply == "ok"
                else:
                    reply = self._request(line, fds, client_pid)
                    fds = []  # taken
            finally:
                for fd in fds:
                    os.close(fd)
            try:
                conn.sendall(reply.encode() + b"\n")
            except OSError:
                pass  # the client went away
        finally:
            if not keep:
                conn.close()
        if self._stopping:
            raise Exit(0)

    def _request(self, line: str, fds: list[int], client_pid: int = 0) -> str:
        g = self.guard
        words = line.split()
        if words[:1] in (["list"], ["stats"]) and len(words) == 1:
            for fd in fds:
                os.close(fd)
            return self._report(words[0])
        if len(words) == 4 and words[0] == "guard" and len(fds) == 1:
            g.add_target(f"{words[1]}-{words[2]}", fds[0], int(words[3]))
            return "ok"
        for fd in fds:
            os.close(fd)
        if len(words) == 5 and words[0] == "take":  # a retry of an expect's take
            return self.intake.take(int(words[1]), words[2], int(words[3]), int(words[4]))
        if len(words) == 4 and words[0] == "upgrade":
            gen, exe, pypath = int(words[1]), words[2], words[3]
            if g.peer.sock is None:
                g.reexec(gen, exe, pypath, client_pid)  # alone: calls wait meanwhile
                return "error: cannot execute the new guard (see guard.log)"
            g.upgrading = (gen, exe, pypath, client_pid)
            g.peer.send("reexec", gen, exe, pypath, client_pid)
            return "ok"
        if words == ["stop"]:
            return self._stop()
        return f"error: unknown request {line[:60]!r}"

    def _report(self, what: str) -> str:
        """``list``: the guarded processes' keys; ``stats``: those and this pair's state."""
        g = self.guard
        g.sweep()
        keys = sorted(t.key for t in g.targets.values())
        if what == "list":
            return "ok " + to_json(keys)
        return "ok " + to_json({
            "pid": os.getpid(), "peer": g.peer.pid or None, "role": g.role,
            "gen": g.gen, "peer_gen": g.peer.gen if g.peer.pid else None,
            "peer_ready": g.peer.ready and bool(g.peer.pid),
            "guarded": keys, "notifications": g.answerer.handled,
            "pages_unmerged": g.answerer.unmerged_pages, "calls_restarted": g.kicker.kicked,
        })  # fmt: skip

    def _stop(self) -> str:
        """``procksm guard --stop``: unmerge every guarded process, then both guards
        exit. Their filters stay (seccomp filters cannot be removed): from then on
        their guarded calls fail with ENOSYS, on memory that is all anonymous again."""
        g = self.guard
        pages, failed = 0, []
        for t in [] if TEST_OFF == "stop" else list(g.targets.values()):
            pid = int(t.key.split("-")[0])
            try:
                answer = g.unmerger.request(f"all {pid}")
            except OSError as e:
                answer = f"error {e.strerror}"
            if answer.startswith("ok"):
                pages += int(answer.split()[1])
            else:
                failed.append(f"{pid}: {answer[6:]}")
        if failed:
            return f"error: not stopped: cannot unmerge {'; '.join(failed)}"
        log(f"stop: unmerged {pages} pages of {len(g.targets)} processes; exiting")
        g.peer.send("exit")
        g.endpoint.remove()
        self._stopping = True
        return f"ok {pages}"
