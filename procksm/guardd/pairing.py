"""The pair as one guard lives it: the messages of its peer, the peer's death (take over,
restart the calls it left waiting, spawn a new standby), its silence (stand in), and
the upgrade hand-over (the standby runs the new code first, then takes the active role).

The link's messages (words; the on-wire format between guards of different versions):
``add KEY IP`` + a listener fd, ``ping``, ``pong``, ``hello PID GEN``, ``takeover``,
``reexec GEN EXE PYTHONPATH PID``, ``exit``."""

from __future__ import annotations

import os
import signal
import socket
import time

from procksm.guardd import TEST_OFF, log
from procksm.guardd.guard import Exit, Guard
from procksm.guardd.kick import waiting_tasks
from procksm.guardd.launch import exec_guard, guard_env

PING_S, STALL_S = 0.5, 2.0  # the standby's ping of the active guard; no answer: stand in


class Pairing:
    def __init__(self, guard: Guard) -> None:
        self.guard = guard
        self.last_pong = time.monotonic()
        self.ping_at = 0.0
        self.respawn_at = 0.0
        self.respawn_delay = 0.0
        self.pair_at_start = False  # a fresh guard: a standby before any target (once)

    def greet(self) -> None:
        """An inherited guard says hello to its peer, or takes over if it is dead."""
        g = self.guard
        if g.peer.sock is not None:
            g.peer.send("hello", os.getpid(), g.gen)
        if g.peer.pidfd >= 0 and g.peer.dead():
            self.peer_died()  # it died before we could watch it

    def on_link(self) -> None:
        for words, fds in self.guard.peer.receive():
            self._message(words, fds)

    def _message(self, words: list[str], fds: list[int]) -> None:
        g = self.guard
        cmd = words[0] if words else ""
        if cmd == "add" and len(fds) == 1 and len(words) == 3:
            g.keep_target(words[1], fds[0], int(words[2]))
            return
        for fd in fds:
            os.close(fd)
        if cmd == "ping":
            g.peer.send("pong")
        elif cmd == "pong":
            self.last_pong = time.monotonic()
            if g.stand_in:
                log(f"active guard {g.peer.pid} answers again: standby only")
                g.stand_in = False
                g.poll.stale = True
        elif cmd == "hello":
            g.peer.gen, g.peer.ready = int(words[2]), True
            self.last_pong = time.monotonic()
            if g.upgrading and g.role == "active" and g.peer.gen >= g.upgrading[0]:
                self._hand_over()
        elif cmd == "takeover":
            self._become("active")
        elif cmd == "reexec" and len(words) == 5:
            g.reexec(int(words[1]), words[2], words[3], int(words[4]))
        elif cmd == "exit":
            log("the active guard exits: so does its standby")
            raise Exit(0)

    def _hand_over(self) -> None:
        """The standby runs the new code: it takes the active role, then this guard
        re-executes itself as the standby. Calls arriving in between wait (they are not
        lost: the listener is held throughout)."""
        g = self.guard
        assert g.upgrading is not None
        gen, exe, pypath, nspid = g.upgrading
        g.upgrading = None
        g.peer.send("takeover")
        self._become("standby")
        g.reexec(gen, exe, pypath, nspid)

    def _become(self, role: str) -> None:
        g = self.guard
        if role != g.role or g.stand_in:
            log(f"{g.role} -> {role}")
            g.role, g.stand_in = role, False
            self.last_pong = time.monotonic()
            g.poll.stale = True

    def peer_died(self) -> None:
        """The peer is gone (SIGKILL, OOM, crash). Its listener copies closed with it;
        ours keep every filter answered."""
        g = self.guard
        if g.peer.sock is not None:
            self.on_link()  # what it sent before dying (fds in flight live in the socket)
        pid, was_up = g.peer.pid, g.peer.ready
        g.peer.forget()
        log(f"peer {pid} is gone")
        g.upgrading = None
        self._become("active")
        g.poll.stale = True
        # Calls it had received and not answered wait for ever otherwise.
        if TEST_OFF != "kick":
            g.kicker.kick(waiting_tasks())
        g.sweep()
        # A new standby at once: until its fork the survivor is the only holder. But a
        # peer that died before it said hello (broken code after an upgrade, a crash at
        # start) is not respawned in a tight loop: 0.5 s, doubling up to 30 s.
        if was_up:
            self.respawn_delay = 0.0
        else:
            self.respawn_delay = min(30.0, max(0.5, self.respawn_delay * 2))
        self.respawn_at = time.monotonic() + self.respawn_delay

    def watch_active(self, now: float) -> None:
        """A standby pings the active guard; without an answer for STALL_S, it stands in."""
        g = self.guard
        if now >= self.ping_at:
            g.peer.send("ping")
            self.ping_at = now + PING_S
        if not g.stand_in and now - self.last_pong > STALL_S:
            log(f"active guard {g.peer.pid} does not answer for {STALL_S:.0f} s: "
                "answering too")  # fmt: skip
            g.stand_in = True
            g.poll.stale = True
            # calls it received before it stopped wait until it runs again: restart
            # them (as after a death), so that they reach this guard
            g.kicker.kick(waiting_tasks())

    def may_spawn(self, now: float) -> bool:
        """Guarded processes (or a fresh guard's first standby), no peer, and not too
        soon after one that died at start."""
        g = self.guard
        wanted = bool(g.targets) or self.pair_at_start
        return wanted and g.peer.sock is None and now >= self.respawn_at

    def spawn_peer(self) -> None:
        """A new standby that inherits every fd; a child of this guard, hence in its
        cgroup. Its pidfd is opened before anyone could reap it (pid reuse impossible);
        it gets ours inherited."""
        g = self.guard
        self.pair_at_start = False
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        me = os.pidfd_open(os.getpid())
        state = g.state("standby", g.gen, theirs.fileno(), os.getpid(), me)
        argv, env = g.argv(g.exe), guard_env(g.pythonpath)
        pid = os.fork()
        if pid == 0:  # pragma: no cover - child
            try:
                # ignored until the new image installs its handler (an ignored
                # disposition survives execve): a SIGTERM in its first milliseconds
                # must not end it
                signal.signal(signal.SIGTERM, signal.SIG_IGN)
                exec_guard(argv, env, state)
            finally:
                os._exit(127)
        os.close(me)
        theirs.close()
        g.peer.attach(mine, pid)
        g.poll.stale = True
        log(f"started standby {pid} (monotonic {time.monotonic():.6f})")  # (for benchmarks)
