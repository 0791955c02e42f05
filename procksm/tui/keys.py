"""Keyboard input for the live view: a small termios reader in cbreak mode.

rich renders but reads no keys (rich issue #3248 answers "consider Textual"). We read keys
ourselves with termios instead of moving the view to Textual because:

* no new dependency: procksm runs as root next to production services, and rich is
  already there; Textual would bring its own event loop, widgets and drivers;
* it works the same in any terminal, over ssh and under tmux/screen (the tests drive it in
  tmux): cbreak mode needs nothing but a tty, no mouse or keyboard-protocol negotiation;
* we own the terminal state, so we can restore it on *every* exit path, including
  Ctrl-Z/fg and SIGTERM, which is where terminal UIs usually break (py-spy #368/#557).

cbreak, not raw: ICANON and ECHO are off (keys arrive one by one, unechoed) but ISIG stays
on, so Ctrl-C still raises SIGINT and Ctrl-Z still sends SIGTSTP; the loop handles both.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import termios
from types import TracebackType
from typing import Any

# Escape sequences of the keys the view uses (xterm, tmux, linux console; both the normal
# "CSI" and the application-cursor "SS3" forms of the arrows).
SEQUENCES: dict[str, str] = {
    "\x1b[A": "up",
    "\x1b[B": "down",
    "\x1b[C": "right",
    "\x1b[D": "left",
    "\x1bOA": "up",
    "\x1bOB": "down",
    "\x1bOC": "right",
    "\x1bOD": "left",
    "\x1b[5~": "pgup",
    "\x1b[6~": "pgdn",
    "\x1b[H": "home",
    "\x1b[F": "end",
    "\x1bOH": "home",
    "\x1bOF": "end",
    "\x1b[1~": "home",
    "\x1b[4~": "end",
}
SINGLE: dict[str, str] = {"\r": "enter", "\n": "enter", " ": "space", "\x7f": "backspace"}
ESC_WAIT_S = 0.03  # a lone ESC is the Esc key if nothing follows within this time


def parse_keys(data: str) -> list[str]:
    """Split what the terminal sent into key names: ``"up"``, ``"enter"``, ``"q"``, ...

    An escape sequence we do not know is dropped whole (up to its final byte), so an
    unknown key never turns into a burst of letters that would trigger commands.
    """
    keys: list[str] = []
    i = 0
    while i < len(data):
        ch = data[i]
        if ch != "\x1b":
            keys.append(SINGLE.get(ch, ch))
            i += 1
            continue
        for seq, name in SEQUENCES.items():
            if data.startswith(seq, i):
                keys.append(name)
                i += len(seq)
                break
        else:
            nxt = data[i + 1 : i + 2]
            if nxt in ("[", "O"):
                # unknown CSI/SS3 sequence: skip parameters up to the final byte
                j = i + 2
                while j < len(data) and not ("@" <= data[j] <= "~"):
                    j += 1
                i = j + 1
            else:
                keys.append("esc")  # Esc, or Alt+key (ESC then the key: reported as both)
                i += 1
    return keys


class KeyReader:
    """cbreak mode on ``fd`` while entered; :meth:`read` waits for keys.

    :meth:`restore` and :meth:`enter` can be called again (Ctrl-Z then fg); both are
    idempotent, and restoring always puts back the attributes saved the first time.
    """

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self._saved: list[Any] | None = None
        self._active = False

    def enter(self) -> None:
        if self._saved is None:
            self._saved = termios.tcgetattr(self.fd)
        mode = termios.tcgetattr(self.fd)
        mode[3] &= ~(termios.ECHO | termios.ICANON)  # lflag; ISIG stays on
        mode[6][termios.VMIN] = 1
        mode[6][termios.VTIME] = 0
        termios.tcsetattr(self.fd, termios.TCSANOW, mode)
        self._active = True

    def restore(self) -> None:
        if self._saved is not None and self._active:
            self._active = False
            # Restoring must work even if the shell already took the terminal back (a
            # view continued in the background, or a parent stopped first): from a
            # background process group tcsetattr raises SIGTTOU, which would stop us
            # before the modes are back. Entering cbreak again keeps the default, so a
            # view continued in the background stops until it is brought to the front.
            old = signal.signal(signal.SIGTTOU, signal.SIG_IGN)
            try:
                with contextlib.suppress(termios.error):
                    termios.tcsetattr(self.fd, termios.TCSADRAIN, self._saved)
            finally:
                signal.signal(signal.SIGTTOU, old)

    def __enter__(self) -> KeyReader:
        self.enter()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.restore()

    def read(self, timeout: float, wake_fd: int | None = None) -> list[str]:
        """Keys typed within ``timeout`` seconds ([] on timeout or when ``wake_fd`` is
        readable: the caller drains it). Never blocks longer than ``timeout``."""
        fds = [self.fd] if wake_fd is None else [self.fd, wake_fd]
        try:
            ready, _, _ = select.select(fds, [], [], max(0.0, timeout))
        except InterruptedError:  # pragma: no cover - PEP 475 retries; kept for safety
            return []
        if self.fd not in ready:
            return []
        data = os.read(self.fd, 1024)
        if not data:
            raise EOFError("terminal closed")
        if data.endswith(b"\x1b") or data.endswith(b"\x1b[") or data.endswith(b"\x1bO"):
            # maybe the start of a sequence split across reads: wait briefly for the rest
            more, _, _ = select.select([self.fd], [], [], ESC_WAIT_S)
            if more:
                data += os.read(self.fd, 1024)
        return parse_keys(data.decode("utf-8", errors="replace"))


__all__ = ["KeyReader", "parse_keys"]
