"""One guard of the pair: its role, what it holds (the control socket and lock, a listener
per guarded process, the link to its peer) and its counters; how it starts, adds or
drops a guarded process, hands its state to its next image, and decides to exit."""

from __future__ import annotations

import os
import select
import sys
import time

from procksm.guardd import log
from procksm.guardd.answering import Answerer
from procksm.guardd.endpoint import Endpoint
from procksm.guardd.isolation import (
    CGROUP_ENV,
    join_mount_namespace,
    leave_service_cgroup,
    protect_from_oom,
)
from procksm.guardd.kick import Kicker
from procksm.guardd.launch import exec_guard, format_state, guard_argv, guard_env, parse_state
from procksm.guardd.listener import hung_up
from procksm.guardd.peer import PeerLink
from procksm.guardd.syscalls import same_file
from procksm.guardd.unmerger import Unmerger


class Exit(Exception):
    """Leave the loop and exit with ``code``."""

    def __init__(self, code: int) -> None:
        self.code = code


class Target:
    """A guarded process: ``key`` "PID-START", its listener ``fd``, the ``ip`` its filter
    exempts."""

    __slots__ = ("fd", "ip", "key")

    def __init__(self, key: str, fd: int, ip: int) -> None:
        self.key, self.fd, self.ip = key, fd, ip


class Poll:
    """The fds the loop waits on. ``stale``: the role or the peer changed, the loop
    rebuilds the whole set before it waits again."""

    def __init__(self) -> None:
        self._poll = select.poll()
        self.stale = True

    def watch(self, fd: int) -> None:
        self._poll.register(fd, select.POLLIN)

    def unwatch(self, fd: int) -> None:
        try:
            self._poll.unregister(fd)
        except KeyError:
            pass  # not watched (a standby does not poll the listeners)

    def rebuild(self, fds: list[int]) -> None:
        self._poll = select.poll()
        for fd in fds:
            self.watch(fd)
        self.stale = False

    def wait(self, timeout_s: float) -> list[tuple[int, int]]:
        return self._poll.poll(timeout_s * 1000)


class Guard:
    def __init__(self, path: str, idle_exit: float) -> None:
        self.idle_exit = idle_exit
        self.role = "active"
        self.gen = 0
        # A stopped or hung active guard (SIGSTOP, a debugger) is not dead: its pidfd
        # says nothing. The standby pings it; after STALL_S without an answer it answers
        # too (a "stand-in"), until the active one answers again (procksm.guardd.pairing).
        self.stand_in = False
        # (gen, exe, pythonpath, pid of the procksm that asked)
        self.upgrading: tuple[int, str, str, int] | None = None
        self.exe, self.pythonpath = sys.executable, guard_env()["PYTHONPATH"]
        self.draining = False  # SIGTERM: exit once no guarded process is left
        self.last_activity = time.monotonic()
        self.endpoint = Endpoint(path)
        self.targets: dict[int, Target] = {}  # listener fd -> target
        self.peer = PeerLink()
        self.poll = Poll()
        self.unmerger = Unmerger()
        self.answerer = Answerer(self.unmerger)
        self.kicker = Kicker()

    @property
    def serving(self) -> bool:
        """Does this guard receive notifications and control requests?"""
        return self.role == "active" or self.stand_in

    def watched_fds(self) -> list[int]:
        """The fds of the peer, and when serving, the control socket and the listeners."""
        fds = []
        if self.peer.sock is not None:
            fds.append(self.peer.sock.fileno())
        if self.peer.pidfd >= 0:
            fds.append(self.peer.pidfd)
        if self.serving:
            fds += [self.endpoint.fileno(), *self.targets]
        return fds

    # startup

    def start_fresh(self) -> bool:
        """The first guard of a pair: own cgroup, lock, socket. False when a guard pair
        serves this socket already."""
        log(leave_service_cgroup(os.environ.get(CGROUP_ENV)))
        if not self.endpoint.claim():
            return False
        protect_from_oom()
        log(f"serving {self.endpoint.path}")
        return True

    def start_inherited(self, state: str) -> None:
        """A guard started by its peer, or re-executed by an upgrade: everything it
        needs is an inherited fd named in ``state``."""
        doc, targets = parse_state(state)
        self.role = "active" if doc["role"] == 1 else "standby"
        self.gen = doc["gen"]
        self.endpoint.adopt(doc["srv"], doc["lock"])
        for fd, key, ip in targets:
            try:
                os.set_blocking(fd, False)
            except OSError:
                log(f"{key}: listener fd {fd} was not inherited")
                continue
            self.targets[fd] = Target(key, fd, ip)
        self.answerer.handled, self.answerer.unmerged_pages = doc["handled"], doc["unmerged"]
        if doc["link"] >= 0:
            self.peer.adopt(doc["link"], doc["peer_pid"], doc["peer_pidfd"])
        inherited = [self.endpoint.lock, self.endpoint.fileno(), *self.targets, doc["link"]]
        for fd in [*inherited, self.peer.pidfd]:
            if fd >= 0:
                os.set_inheritable(fd, False)
        log(f"{self.role}, generation {self.gen}, {len(self.targets)} guarded processes")

    # the guarded processes

    def add_target(self, key: str, listener: int, ip: int) -> None:
        """Guard with ``listener`` unless a listener of the same file is held already
        (kcmp: procksm hands over the copy it made too)."""
        for held in self.targets:
            if same_file(held, listener):
                os.close(listener)
                return
        os.set_blocking(listener, False)
        t = Target(key, listener, ip)
        # The standby gets its copy first: once sendmsg returns, the kernel holds
        # the file in the message, which survives the death of either of us.
        self.peer.send("add", t.key, ip, fds=[listener])
        self.targets[listener] = t
        if self.serving:  # (an upgrade may have made it the standby meanwhile)
            self.poll.watch(listener)
        log(f"guarding pid {key.split('-')[0]}")

    def keep_target(self, key: str, listener: int, ip: int) -> None:
        """A listener the active guard sent this standby."""
        os.set_blocking(listener, False)
        self.targets[listener] = Target(key, listener, ip)
        self.last_activity = time.monotonic()

    def sweep(self) -> None:
        for fd in list(self.targets):
            if hung_up(fd):
                self.drop(fd)
        self.last_activity = max(self.last_activity, time.monotonic() - 5)

    def drop(self, fd: int) -> None:
        t = self.targets.pop(fd, None)
        self.poll.unwatch(fd)
        os.close(fd)
        if t is not None and self.role == "active":
            log(f"{t.key}: no task uses the filter any more")
        self.last_activity = time.monotonic()

    # its next image

    def argv(self, exe: str) -> list[str]:
        where = ["--socket", self.endpoint.path, "--idle-exit", str(self.idle_exit)]
        return [*guard_argv(exe), *where]

    def state(self, role: str, gen: int, link: int | None, peer_pid: int, peer_pidfd: int) -> str:
        """What the next image (a spawned peer, or this guard after execve) needs."""
        numbers = {
            "gen": gen, "lock": self.endpoint.lock, "srv": self.endpoint.fileno(),
            "link": -1 if link is None else link, "peer_pid": peer_pid,
            "peer_pidfd": peer_pidfd, "handled": self.answerer.handled,
            "unmerged": self.answerer.unmerged_pages,
        }  # fmt: skip
        return format_state(role, numbers, [(fd, t.key, t.ip) for fd, t in self.targets.items()])

    def reexec(self, gen: int, exe: str, pypath: str, nspid: int) -> None:
        """Upgrade: this process executes the (new) guard code in place, keeping every
        fd; its pid, hence the peer's pidfd on it, stays the same. ``exe`` and
        ``pypath`` are paths in the mount namespace of ``nspid``, the procksm that asked
        for the upgrade: after a pod replacement the new code is only in the new
        container's file system, so the guard joins that mount namespace first."""
        log(f"re-executing {exe} (generation {gen})")
        join_mount_namespace(nspid)
        env = guard_env(pypath)
        link = self.peer.sock.fileno() if self.peer.sock is not None else None
        state = self.state(self.role, gen, link, self.peer.pid, self.peer.pidfd)
        self.answerer.vmas.close()
        self.unmerger.close()  # it exits on EOF
        try:
            exec_guard(self.argv(exe), env, state)
        except OSError as e:
            log(f"cannot execute {exe}: {e.strerror}; keeps running the old code")
            self.poll.stale = True

    def should_exit(self) -> bool:
        if self.role != "active" or self.targets or self.upgrading:
            return False
        idle = time.monotonic() - self.last_activity
        if not self.draining and idle <= self.idle_exit:
            return False
        log("no guarded processes left: exiting")
        self.peer.send("exit")
        self.endpoint.remove()
        return True
