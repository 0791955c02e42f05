"""The guard's one thread: a poll over the control socket and the listeners (when
serving), the link to the peer and the peer's pidfd, handing each event to its part."""

from __future__ import annotations

import time

from procksm.guardd import TEST_OFF
from procksm.guardd.control import ControlServer
from procksm.guardd.guard import Exit, Guard
from procksm.guardd.intake import ListenerIntake
from procksm.guardd.pairing import PING_S, Pairing


class Loop:
    def __init__(self, guard: Guard) -> None:
        self.guard = guard
        self.pairing = Pairing(guard)
        self.intake = ListenerIntake(guard)
        self.control = ControlServer(guard, self.intake)

    def start(self, state: str | None) -> bool:
        """Start from inherited ``state``, or as the first guard of a pair; False when a
        guard pair serves this socket already."""
        if not state:
            started = self.guard.start_fresh()
            # its standby at once, not when the first listener arrives: the procksm that
            # started this guard is about to merge, and the standby's start (~0.06 CPU s
            # of Python) overlaps that procksm's scan instead of its first target's stop
            # windows (measured on 2 CPUs: those windows took 2.7-6.2 ms, not ~0.9)
            self.pairing.pair_at_start = started
            return started
        self.guard.start_inherited(state)
        self.pairing.greet()
        return True

    def run(self) -> int:
        g = self.guard
        try:
            self._on_time(time.monotonic())  # a fresh guard's standby, before any wait
            while True:
                if g.poll.stale:
                    g.poll.rebuild([*g.watched_fds(), *self.intake.expecting])
                timeout = PING_S if g.role == "standby" else 1.0
                if g.answerer.pending or g.kicker.pending:
                    timeout = 0.05
                for fd, ev in g.poll.wait(timeout):
                    self._dispatch(fd, ev)
                g.answerer.retry_pending(g.targets)
                g.kicker.retry()
                if g.should_exit():
                    return 0
                self._on_time(time.monotonic())
        except Exit as e:
            return e.code

    def _dispatch(self, fd: int, ev: int) -> None:
        g = self.guard
        if g.endpoint.srv is not None and fd == g.endpoint.srv.fileno():
            self.control.accept()
        elif fd == g.peer.pidfd:
            self.pairing.peer_died()
        elif g.peer.sock is not None and fd == g.peer.sock.fileno():
            self.pairing.on_link()
        elif fd in g.targets and g.serving:
            if g.answerer.on_listener(fd, ev):
                g.drop(fd)
        elif fd in self.intake.expecting:
            self.intake.on_expect(fd)

    def _on_time(self, now: float) -> None:
        g = self.guard
        if self.pairing.may_spawn(now) and TEST_OFF != "standby":
            self.pairing.spawn_peer()
        if g.role == "standby" and now - g.last_activity > 10:
            g.sweep()  # a standby does not poll the listeners: drop the hung-up ones
        if g.role == "standby" and g.peer.ready and TEST_OFF != "stall":
            self.pairing.watch_active(now)
