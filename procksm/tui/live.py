"""The live loop: poll a snapshot source, draw it, react to keys and signals.

The loop is given two things and touches nothing else, so tests drive it with a scripted
source and a recording ``actions`` object:

* ``source()`` returns the current :class:`Snapshot` (the daemon's control socket in
  ``procksm top``); it may raise :class:`ProcksmError`, shown in the footer, retried;
* ``actions`` pauses/resumes scanning and unmerges a pid (:class:`Actions`).

On a terminal it draws with ``rich.live.Live(screen=True, auto_refresh=False)`` in the
alternate screen and reads keys in cbreak mode (:mod:`procksm.tui.keys`). The terminal is
restored on every exit path (modes, cursor, main screen):

* ``q``/Esc: normal return (exit code 0);
* Ctrl-C: SIGINT → KeyboardInterrupt, unwound through the context managers (130);
* SIGTERM: the handler raises :class:`Terminated`, unwound the same way (143);
* an exception: the context managers restore before the traceback is printed;
* Ctrl-Z: SIGTSTP is caught, the terminal restored, then the process stops itself with
  SIGSTOP (like bpytop); on ``fg`` (SIGCONT) cbreak and the alternate screen come back and
  the view is redrawn;
* SIGWINCH: redrawn at the new size.

Signal handlers only write the signal number into a pipe that the key wait also watches
(the self-pipe trick), so drawing never runs inside a signal handler.

When stdout or stdin is not a terminal it prints one plain line per interval instead
(bcc-style), or one JSON document per line with ``json_lines``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import os
import signal
import sys
import time
from collections.abc import Callable, Iterator
from types import FrameType
from typing import Protocol, TextIO

from rich.console import Console, RenderableType
from rich.live import Live

from procksm.errors import EXIT_INTERRUPTED, ProcksmError
from procksm.snapshot import Snapshot
from procksm.tui import render
from procksm.tui.keys import KeyReader
from procksm.tui.render import ViewState

Source = Callable[[], Snapshot]
EXIT_TERMINATED = 128 + signal.SIGTERM


class Actions(Protocol):
    """What the view may ask the daemon to do; each returns a message for the footer and
    raises :class:`ProcksmError` when it cannot."""

    def pause(self) -> str: ...

    def resume(self) -> str: ...

    def unmerge(self, pid: int) -> str: ...


class ReadOnlyActions:
    """For a view of snapshots that nobody can act on (a recording, a test)."""

    def pause(self) -> str:
        raise ProcksmError("read-only view: cannot pause scanning")

    def resume(self) -> str:
        raise ProcksmError("read-only view: cannot resume scanning")

    def unmerge(self, pid: int) -> str:
        raise ProcksmError(f"read-only view: cannot unmerge pid {pid}")


class Terminated(Exception):
    """SIGTERM arrived: unwind (restoring the terminal) and exit 143."""


@contextlib.contextmanager
def _sigterm_raises() -> Iterator[None]:
    raised = False

    def on_term(signum: int, frame: FrameType | None) -> None:
        nonlocal raised
        if not raised:  # a second SIGTERM must not interrupt the restoring
            raised = True
            raise Terminated

    old = signal.signal(signal.SIGTERM, on_term)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


# -- not a terminal: one line per interval ----------------------------------------------


def run_plain(
    source: Source,
    *,
    interval: float = 1.0,
    count: int | None = None,
    json_lines: bool = False,
    out: TextIO | None = None,
    until: Callable[[], bool] | None = None,
) -> int:
    """Print one line (or one JSON document) per interval until ``count``, Ctrl-C,
    SIGTERM or ``until()``."""
    out = out or sys.stdout
    n = 0
    try:
        with _sigterm_raises():
            if not json_lines:
                print(render.PLAIN_HEADER, file=out, flush=True)
            next_t = time.monotonic()
            while True:
                snap = source()
                if json_lines:
                    print(json.dumps(snap.as_json(), separators=(",", ":")), file=out, flush=True)
                else:
                    print(render.plain_line(snap), file=out, flush=True)
                n += 1
                if count is not None and n >= count:
                    return 0
                next_t += interval
                while (left := next_t - time.monotonic()) > 0:
                    if until is not None and until():
                        return 0
                    time.sleep(min(left, 0.1))
                if until is not None and until():
                    return 0
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except Terminated:
        return EXIT_TERMINATED


# -- a terminal: the live view ----------------------------------------------------------

_WAKE_SIGNALS = (signal.SIGWINCH, signal.SIGTSTP, signal.SIGCONT)


class LiveView:
    """The interactive view. ``run()`` owns the terminal until it returns."""

    def __init__(
        self,
        source: Source,
        actions: Actions,
        *,
        interval: float = 1.0,
        console: Console | None = None,
        fd: int | None = None,
        until: Callable[[], bool] | None = None,
        notes: Callable[[], list[str]] | None = None,
    ) -> None:
        """``until()``: quit when it returns True (the daemon behind the view stopped);
        ``notes()``: new log lines of whatever runs alongside, the latest one is shown in
        the footer (they cannot be printed while the view owns the screen)."""
        self.source = source
        self.until = until
        self.notes = notes
        self.actions = actions
        self.interval = interval
        self.console = console or Console()
        self.fd = fd  # the keyboard; stdin when None (looked up in run())
        self.state = ViewState()
        self.snap: Snapshot | None = None
        self.poll_now = True
        self._source_error = ""

    # -- state changes (no terminal needed: the tests call these directly) --------------

    def poll(self) -> None:
        """Fetch a snapshot; on failure keep the last one and say why in the footer."""
        self.poll_now = False
        try:
            snap = self.source()
        except (ProcksmError, OSError) as e:
            msg = e.message if isinstance(e, ProcksmError) else str(e)
            self._source_error = f"no new snapshot: {msg}"
            self.state = dataclasses.replace(self.state, message=self._source_error, error=True)
            return
        if self._source_error and self.state.message == self._source_error:
            self.state = dataclasses.replace(self.state, message="", error=False)
        self._source_error = ""
        self.snap = snap
        news = self.notes() if self.notes is not None else []
        if news and self.state.confirm_unmerge is None:
            self.state = dataclasses.replace(self.state, message=news[-1], error=False)
        sel = render.selected_target(snap, self.state)
        if sel is not None and sel.pid != self.state.selected:
            self.state = dataclasses.replace(self.state, selected=sel.pid)

    def _act(self, what: Callable[[], str]) -> None:
        try:
            msg, err = what(), False
        except (ProcksmError, OSError) as e:
            msg, err = (e.message if isinstance(e, ProcksmError) else str(e)), True
        self.state = dataclasses.replace(self.state, message=msg, error=err)
        self.poll_now = True  # show the effect (run state, merged pages) right away

    def on_key(self, key: str) -> bool:
        """Apply one key; True means quit."""
        st = dataclasses.replace(self.state, message="", error=False)
        snap = self.snap
        if st.confirm_unmerge is not None:
            pid = st.confirm_unmerge
            self.state = dataclasses.replace(st, confirm_unmerge=None)
            if key in ("y", "Y"):
                self._act(lambda: self.actions.unmerge(pid))
            else:
                self.state = dataclasses.replace(self.state, message=f"unmerge of {pid} cancelled")
            return False
        if key in ("q", "Q"):
            return True
        if key == "esc":
            if st.help:
                self.state = dataclasses.replace(st, help=False)
                return False
            return True
        if key in ("?", "h"):
            self.state = dataclasses.replace(st, help=not st.help)
            return False
        self.state = st
        if snap is None:
            return False
        if key in render.SORT_KEYS:
            self.state = render.set_sort(st, key)
        elif key in ("up", "k", "down", "j", "pgup", "pgdn", "home", "end"):
            page = max(1, self.console.size.height // 2)
            delta = {
                "up": -1,
                "k": -1,
                "down": 1,
                "j": 1,
                "pgup": -page,
                "pgdn": page,
                "home": -(1 << 30),
                "end": 1 << 30,
            }[key]
            self.state = render.move_selection(snap, st, delta)
        elif key in ("enter", "right", "left"):
            self.state = render.toggle_expanded(snap, st)
        elif key == "space":
            self._act(self.actions.pause if snap.run == 1 else self.actions.resume)
        elif key == "u":
            t = render.selected_target(snap, st)
            if t is None:
                self.state = dataclasses.replace(st, message="no target selected")
            else:
                self.state = dataclasses.replace(st, selected=t.pid, confirm_unmerge=t.pid)
        return False

    def fit_terminal(self) -> None:
        """Use the terminal's real size: rich prefers $COLUMNS/$LINES, which an
        interactive shell may have exported at the size the terminal had back then."""
        with contextlib.suppress(OSError, ValueError, AttributeError):
            self.console.size = os.get_terminal_size(self.console.file.fileno())

    def renderable(self) -> RenderableType:
        w, h = self.console.size
        return render.view(self.snap, self.state, w, h)

    # -- the terminal -------------------------------------------------------------------

    def run(self) -> int:
        wake_r, wake_w = os.pipe()
        for fd in (wake_r, wake_w):
            fl = fcntl.fcntl(fd, fcntl.F_GETFL)
            fcntl.fcntl(fd, fcntl.F_SETFL, fl | os.O_NONBLOCK)

        def on_signal(signum: int, frame: FrameType | None) -> None:
            with contextlib.suppress(BlockingIOError):
                os.write(wake_w, bytes([signum]))

        old = {s: signal.signal(s, on_signal) for s in _WAKE_SIGNALS}
        # Ctrl-C quits the view even when the caller handles SIGINT itself (a daemon
        # that stops on SIGINT): the caller's handler is back once the view is gone.
        old[signal.SIGINT] = signal.signal(signal.SIGINT, signal.default_int_handler)
        live = Live(
            console=self.console,
            screen=True,
            auto_refresh=False,
            redirect_stdout=False,
            redirect_stderr=False,
        )
        try:
            fd = sys.stdin.fileno() if self.fd is None else self.fd
            with _sigterm_raises(), KeyReader(fd) as keys:
                live.start()
                try:
                    self._loop(keys, live, wake_r)
                finally:
                    live.stop()
            return 0
        except KeyboardInterrupt:
            return EXIT_INTERRUPTED
        except Terminated:
            return EXIT_TERMINATED
        finally:
            for s, h in old.items():
                signal.signal(s, h)
            os.close(wake_r)
            os.close(wake_w)

    def _loop(self, keys: KeyReader, live: Live, wake_r: int) -> None:
        next_poll = 0.0
        dirty = True
        while self.until is None or not self.until():
            now = time.monotonic()
            if self.poll_now or now >= next_poll:
                self.poll()
                next_poll = now + self.interval
                dirty = True
            if dirty:
                self.fit_terminal()
                live.update(self.renderable(), refresh=True)
                dirty = False
            wait = next_poll - time.monotonic()
            if self.until is not None:
                wait = min(wait, 0.25)
            for key in keys.read(wait, wake_r):
                if self.on_key(key):
                    return
                dirty = True
            for signum in self._drain(wake_r):
                if signum == signal.SIGTSTP:
                    self._suspend(keys, live)
                elif signum == signal.SIGCONT:
                    keys.enter()  # the shell may have reset the modes while we were stopped
                    live.start()
                dirty = True

    @staticmethod
    def _drain(wake_r: int) -> list[int]:
        try:
            return list(os.read(wake_r, 64))
        except BlockingIOError:
            return []

    def _suspend(self, keys: KeyReader, live: Live) -> None:
        """Ctrl-Z: give the terminal back as we found it, stop; continue on fg."""
        live.stop()  # main screen, cursor shown
        keys.restore()  # echo, canonical mode
        self.console.file.flush()
        os.kill(os.getpid(), signal.SIGSTOP)
        # continued (fg / SIGCONT)
        keys.enter()
        live.start()


def is_interactive(console: Console, fd: int | None = None) -> bool:
    try:
        fd = sys.stdin.fileno() if fd is None else fd
        return console.is_terminal and os.isatty(fd)
    except (OSError, ValueError):
        return False


def run(
    source: Source,
    actions: Actions | None = None,
    *,
    interval: float = 1.0,
    count: int | None = None,
    json_lines: bool = False,
    console: Console | None = None,
    until: Callable[[], bool] | None = None,
    notes: Callable[[], list[str]] | None = None,
) -> int:
    """The live view on a terminal; plain lines (or JSON lines) otherwise."""
    console = console or Console()
    if json_lines or count is not None or not is_interactive(console):
        return run_plain(source, interval=interval, count=count, json_lines=json_lines, until=until)
    view = LiveView(
        source,
        actions or ReadOnlyActions(),
        interval=interval,
        console=console,
        until=until,
        notes=notes,
    )
    return view.run()


__all__ = ["Actions", "LiveView", "ReadOnlyActions", "Terminated", "run", "run_plain"]
