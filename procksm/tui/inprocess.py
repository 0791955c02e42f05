"""The live view next to a daemon in the same process (``procksm attach --live``, the end
of ``procksm demo``).

The daemon's loop moves to a thread (it does every ptrace stop in that one thread, and
its stop windows defer signals there); the main thread, which owns the terminal and the
signal handlers, runs the view. The view still only reads the daemon's published
snapshots and sends it the same requests as the control socket (``pause``, ``resume``,
``unmerge PID``) through :meth:`handle`; it never touches a process.

Whatever way the view ends (q, Ctrl-C, SIGTERM, an exception), the daemon is asked to
stop and this returns only after its loop has finished the batch in progress.
"""

from __future__ import annotations

import collections
import threading
from collections.abc import Callable
from typing import Protocol

from rich.console import Console

from procksm.snapshot import Snapshot
from procksm.tui import live
from procksm.tui.source import ControlActions


class DaemonLike(Protocol):
    stopping: threading.Event
    wake: threading.Event
    log: Callable[[str], None]

    def snapshot(self) -> Snapshot: ...

    def handle(self, line: str) -> str: ...

    def run_forever(self) -> None: ...


class HandlerActions(ControlActions):
    """The view's actions as control requests handled in-process (errors raise
    ProcksmError, as ``handle`` does for the control socket)."""

    def __init__(self, daemon: DaemonLike) -> None:
        self.daemon = daemon

    def _send(self, line: str) -> str:
        return self.daemon.handle(line)


def run_with_daemon(daemon: DaemonLike, *, interval: float = 1.0) -> int:
    """Run ``daemon.run_forever()`` in a thread and the live view (or plain lines when not
    on a terminal) in this one until either ends; the view's exit code."""
    failed: list[BaseException] = []

    def loop() -> None:
        try:
            daemon.run_forever()
        except BaseException as e:  # shown after the view has given the terminal back
            failed.append(e)
            daemon.stopping.set()

    console = Console()
    interactive = live.is_interactive(console)
    lines: collections.deque[str] = collections.deque(maxlen=1000)
    pending: list[str] = []
    lock = threading.Lock()
    old_log = daemon.log
    if interactive:
        # the daemon's log lines cannot go to the screen the view owns: keep them, show
        # the latest in the footer, print them all once the view is gone
        def log(msg: str) -> None:
            with lock:
                lines.append(msg)
                pending.append(msg)

        daemon.log = log

    def notes() -> list[str]:
        with lock:
            out = pending[:]
            pending.clear()
        return out

    thread = threading.Thread(target=loop, name="procksm-daemon", daemon=True)
    thread.start()
    try:
        return live.run(
            daemon.snapshot,
            HandlerActions(daemon),
            interval=interval,
            console=console,
            until=lambda: daemon.stopping.is_set() or not thread.is_alive(),
            notes=notes,
        )
    finally:
        daemon.stopping.set()
        daemon.wake.set()
        while thread.is_alive():
            try:
                thread.join()
            except KeyboardInterrupt:  # the batch in progress finishes first
                continue
        daemon.log = old_log
        for msg in lines:
            old_log(msg)
        if failed:
            raise failed[0]


__all__ = ["HandlerActions", "run_with_daemon"]
