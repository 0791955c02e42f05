"""The daemon's control socket: a sysfs-like line protocol over a unix socket.

The 2008 KSM review asked for a sysfs interface instead of ioctls; procksm's equivalent is
one text line per connection (answered, then the connection is closed)::

    set pages_to_scan=N sleep_ms=N max_pages_to_merge=N run=0|1|2 cpu_limit=PCT
    register PID START-END|START+LEN|NAME|all
    unregister PID START-END|START+LEN|NAME|all
    stats              # text, one "name value" per line
    stats --json       # one JSON document: procksm.snapshot.Snapshot.as_json()

Answers are ``ok ...`` or one line ``error: ...``; the daemon is unaffected by a bad
request. ``stats --json`` answers with the JSON document and EOF, nothing else: the live
view (procksm.tui.source) and ``procksm stats`` read it that way.

Root only: the socket is created 0600 in a 0700 directory, and every connection's
SO_PEERCRED uid must be root's (or the daemon's own), so a misconfigured mode does not
open it to other users.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import stat
import struct
import threading
from collections.abc import Callable, Sequence
from typing import Protocol

from procksm.errors import ProcksmError, UsageError
from procksm.snapshot import Snapshot
from procksm.text import stats_text

DEFAULT_CONTROL = "/run/procksm/control.sock"
MAX_LINE = 4096  # bytes of one request; longer is refused
_TIMEOUT_S = 5.0

Handler = Callable[[str], str]


def default_control_path() -> str:
    return os.environ.get("PROCKSM_CONTROL", DEFAULT_CONTROL)


class ControlServer:
    """Accepts connections in a thread; each request line goes to ``handler``, whose
    return value is the answer (a ProcksmError becomes ``error: ...``)."""

    def __init__(self, path: str, handler: Handler) -> None:
        self.path = path
        self.handler = handler
        self._sock: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._closing = threading.Event()
        self.requests = 0
        self.errors = 0

    def start(self) -> None:
        directory = os.path.dirname(self.path) or "."
        os.makedirs(directory, mode=0o700, exist_ok=True)
        if os.path.lexists(self.path):
            if _answers(self.path):
                raise ProcksmError(
                    f"another procksm daemon listens on {self.path}; give this one "
                    "another --control SOCKET"
                )
            if not stat.S_ISSOCK(os.lstat(self.path).st_mode):
                raise ProcksmError(f"{self.path} exists and is not a socket; not replacing it")
            os.unlink(self.path)  # a dead daemon's socket
        sock = bind_owner_only(self.path)
        sock.listen(16)
        self._sock = sock
        self._thread = threading.Thread(target=self._serve, name="procksm-control", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._closing.set()
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.shutdown(socket.SHUT_RDWR)
            self._sock.close()
            self._sock = None
        with contextlib.suppress(OSError):
            os.unlink(self.path)
        if self._thread is not None:
            self._thread.join(timeout=2)

    def __enter__(self) -> ControlServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _serve(self) -> None:
        assert self._sock is not None
        while not self._closing.is_set():
            try:
                conn, _ = self._sock.accept()
            except OSError:
                if self._closing.is_set():
                    return
                continue
            # one client at a time: requests are short, and a slow client is cut at 5 s
            with conn, contextlib.suppress(OSError):  # OSError: the client went away
                self._one(conn)

    def _one(self, conn: socket.socket) -> None:
        conn.settimeout(_TIMEOUT_S)
        self.requests += 1
        uid = peer_uid(conn)
        if uid not in (0, os.geteuid()):
            self.errors += 1
            msg = f"error: permission denied: uid {uid} may not control procksm (root only)\n"
            conn.sendall(msg.encode())
            return
        try:
            line = _read_line(conn)
        except UsageError as e:
            self.errors += 1
            conn.sendall(f"error: {e.message}\n".encode())
            _drain(conn)
            return
        try:
            answer = self.handler(line)
        except ProcksmError as e:
            self.errors += 1
            answer = f"error: {e.message}\n"
        except Exception as e:  # the daemon must survive any request
            self.errors += 1
            answer = f"error: internal error: {e!r}\n"
        conn.sendall(answer.encode())


def bind_owner_only(path: str) -> socket.socket:
    """A unix stream socket bound at ``path`` with mode 0600 from the start (umask, not
    chmod after bind: no window in which others could connect)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    old = os.umask(0o177)
    try:
        sock.bind(path)
    except OSError:
        sock.close()
        raise
    finally:
        os.umask(old)
    return sock


def peer_uid(conn: socket.socket) -> int:
    creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _pid, uid, _gid = struct.unpack("3i", creds)
    return int(uid)


def _read_line(conn: socket.socket) -> str:
    buf = b""
    while b"\n" not in buf:
        try:
            chunk = conn.recv(MAX_LINE + 1 - len(buf))
        except TimeoutError:
            raise UsageError(f"no complete request line within {_TIMEOUT_S:g} s") from None
        if not chunk:
            break
        buf += chunk
        if len(buf) > MAX_LINE:
            raise UsageError(f"request longer than {MAX_LINE} bytes")
    line, _, _ = buf.partition(b"\n")
    try:
        text = line.decode("utf-8").strip()
    except UnicodeDecodeError:
        raise UsageError("request is not UTF-8 text") from None
    if not text:
        raise UsageError("empty request; commands: set, register, unregister, stats")
    if any(ord(c) < 32 and c != "\t" for c in text):
        raise UsageError("request contains control characters")
    return text


def _drain(conn: socket.socket, limit: int = 1 << 20) -> None:
    """Read what a client still sends (up to ``limit``, 1 s) before closing: closing with
    unread data makes the kernel reset the connection, and the client would lose the
    error line."""
    conn.settimeout(1.0)
    with contextlib.suppress(OSError):
        conn.shutdown(socket.SHUT_WR)
        got = 0
        while got < limit:
            b = conn.recv(65536)
            if not b:
                break
            got += len(b)


def _answers(path: str) -> bool:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    s.settimeout(1.0)
    try:
        s.connect(path)
        return True
    except OSError:
        return False
    finally:
        s.close()


def request(path: str, line: str, timeout: float = 60.0) -> str:
    """Send one request line, return the whole answer (read until EOF)."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    s.settimeout(timeout)
    try:
        try:
            s.connect(path)
        except FileNotFoundError:
            raise ProcksmError(
                f"no procksm daemon at {path} (start one with 'procksm attach PID...', or "
                "pass --control SOCKET)"
            ) from None
        except PermissionError:
            raise ProcksmError(
                f"permission denied: the control socket {path} is root-only (run as root)"
            ) from None
        except ConnectionRefusedError:
            raise ProcksmError(f"no procksm daemon listens on {path} (a stale socket)") from None
        s.sendall(line.rstrip("\n").encode() + b"\n")
        chunks = []
        while True:
            b = s.recv(1 << 16)
            if not b:
                break
            chunks.append(b)
        return b"".join(chunks).decode(errors="replace")
    except TimeoutError:
        raise ProcksmError(f"the daemon at {path} did not answer within {timeout:g} s") from None
    finally:
        s.close()


def check_answer(answer: str) -> str:
    """An ``error: ...`` answer raised as ProcksmError; otherwise the answer."""
    if answer.startswith("error:"):
        raise ProcksmError(answer[len("error:") :].strip())
    return answer


def stats_json(path: str) -> dict[str, object]:
    answer = check_answer(request(path, "stats --json"))
    try:
        doc = json.loads(answer)
    except ValueError:
        raise ProcksmError(f"the daemon at {path} sent no JSON: {answer[:200]!r}") from None
    if not isinstance(doc, dict):
        raise ProcksmError(f"the daemon at {path} sent unexpected JSON")
    return doc


__all__ = [
    "DEFAULT_CONTROL",
    "MAX_LINE",
    "ControlServer",
    "check_answer",
    "default_control_path",
    "request",
    "stats_json",
]


class Controlled(Protocol):
    """What the protocol asks of a daemon (procksm.daemon.Daemon)."""

    def set(self, assignments: Sequence[str]) -> str: ...
    def register(self, pid: int, region: str) -> str: ...
    def unregister(self, pid: int, region: str) -> str: ...
    def unmerge_pid(self, pid: int) -> str: ...
    def snapshot(self) -> Snapshot: ...


def handle_request(daemon: Controlled, line: str) -> str:
    """Answer one request line (see the module docstring); a ProcksmError propagates
    and the server answers it as ``error: ...``."""
    words = line.split()
    cmd, args = words[0], words[1:]
    if cmd == "set":
        return f"ok {daemon.set(args)}\n"
    if cmd in ("register", "unregister"):
        if len(args) != 2 or not args[0].isdigit():
            raise UsageError(f"{cmd}: use '{cmd} PID START-END|START+LEN|NAME|all'")
        fn = daemon.register if cmd == "register" else daemon.unregister
        return f"ok {fn(int(args[0]), args[1])}\n"
    if cmd == "stats":
        if args == ["--json"]:
            return json.dumps(daemon.snapshot().as_json()) + "\n"
        if args:
            raise UsageError("stats: the only option is --json")
        return stats_text(daemon.snapshot())
    # the live view's keys (procksm.tui.source): pause, resume, unmerge PID
    if cmd in ("pause", "resume") and not args:
        return f"ok {daemon.set(['run=0' if cmd == 'pause' else 'run=1'])}\n"
    if cmd == "unmerge" and len(args) == 1 and args[0].isdigit():
        return f"ok {daemon.unmerge_pid(int(args[0]))}\n"
    raise UsageError(
        f"unknown command {cmd[:40]!r} (commands: set, register, unregister, stats, "
        "pause, resume, unmerge)"
    )
