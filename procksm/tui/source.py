"""Where the live view's snapshots come from: the daemon's control socket.

The one place that knows the control protocol on the view's side (the daemon's side is
procksm.control + Daemon.handle): connect to the unix socket, send one request line, read
the whole reply until EOF.

* ``stats --json\\n`` -> one JSON document, :meth:`Snapshot.as_json`;
* ``pause\\n`` / ``resume\\n`` / ``unmerge PID\\n`` -> ``ok ...`` (shown in the footer
  without the ``ok``) or ``error: ...``.
"""

from __future__ import annotations

import json
import socket
from collections.abc import Callable

from procksm.errors import EXIT_PERMISSION, ProcksmError
from procksm.snapshot import Snapshot

# The daemon's side is procksm.control (ControlServer, Daemon.handle); its default path
# is procksm.control.default_control_path() ($PROCKSM_CONTROL or this).
DEFAULT_CONTROL = "/run/procksm/control.sock"
TIMEOUT_S = 5.0
MAX_REPLY = 64 << 20  # a snapshot with every mapping of many targets stays far below


def request(path: str, line: str, *, timeout: float = TIMEOUT_S) -> bytes:
    """Send one command line to the control socket and return the whole reply."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.settimeout(timeout)
        try:
            s.connect(path)
        except (FileNotFoundError, ConnectionRefusedError) as e:
            raise ProcksmError(
                f"no procksm daemon listening on {path} ({e.strerror}): start one with "
                "'procksm attach PID...' or pass its socket with --control"
            ) from None
        except PermissionError:
            raise ProcksmError(
                f"not allowed to connect to {path}: run as the daemon's user (root?)",
                exit_code=EXIT_PERMISSION,
            ) from None
        s.sendall(line.encode() + b"\n")
        chunks: list[bytes] = []
        size = 0
        while True:
            chunk = s.recv(1 << 16)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
            if size > MAX_REPLY:
                raise ProcksmError(f"reply of {path} to {line!r} is larger than {MAX_REPLY}")
        return b"".join(chunks)
    except TimeoutError:
        raise ProcksmError(
            f"the daemon at {path} did not answer {line!r} within {timeout:.0f} s"
        ) from None
    except OSError as e:
        raise ProcksmError(f"control socket {path}: {e.strerror or e}") from None
    finally:
        s.close()


def socket_source(path: str = DEFAULT_CONTROL) -> Callable[[], Snapshot]:
    """A snapshot source for the live view: each call asks the daemon for one snapshot."""

    def source() -> Snapshot:
        data = request(path, "stats --json")
        if data.startswith(b"error:"):
            raise ProcksmError(data[6:].decode(errors="replace").strip())
        try:
            return Snapshot.from_json(json.loads(data))
        except (ValueError, TypeError, KeyError) as e:
            head = data[:80].decode(errors="replace").strip()
            raise ProcksmError(
                f"the daemon at {path} sent no snapshot ({type(e).__name__}: {e}); "
                f"reply began {head!r}"
            ) from None

    return source


class ControlActions:
    """Pause/resume/unmerge as control requests (the view never touches a process);
    subclasses say how a request line reaches the daemon."""

    def _send(self, line: str) -> str:
        raise NotImplementedError

    def _ask(self, line: str) -> str:
        reply = self._send(line).strip()
        if reply == "ok" or reply.startswith("ok "):
            reply = reply[2:].strip()
        return reply or f"{line}: done"

    def pause(self) -> str:
        return self._ask("pause")

    def resume(self) -> str:
        return self._ask("resume")

    def unmerge(self, pid: int) -> str:
        return self._ask(f"unmerge {pid}")


class SocketActions(ControlActions):
    """The actions over the daemon's control socket."""

    def __init__(self, path: str = DEFAULT_CONTROL) -> None:
        self.path = path

    def _send(self, line: str) -> str:
        reply = request(self.path, line).decode(errors="replace").strip()
        if reply.startswith("error:"):
            raise ProcksmError(reply.removeprefix("error:").strip())
        return reply


__all__ = ["DEFAULT_CONTROL", "ControlActions", "SocketActions", "request", "socket_source"]
