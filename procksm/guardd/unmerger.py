"""The unmerge helper: the guard's child that unmerges (procksm.guard_unmerge), so that the
guard itself never imports numpy."""

from __future__ import annotations

import errno
import os
import select
import signal
import sys
import time

from procksm.guardd.launch import LEAN_ENV, STATE_ENV, procksm_root


class Unmerger:
    """A ``python -m procksm.guard_unmerge`` child, started on the first unmerge and
    kept until it has been idle for a while (it exits on its own): merging code imports
    numpy (~20 MiB), which the resident guard must not carry."""

    def __init__(self) -> None:
        self.pid = 0
        self.to: int | None = None
        self.frm: int | None = None
        self.buf = b""

    def _start(self) -> None:
        r1, w1 = os.pipe()
        r2, w2 = os.pipe()
        env = dict(os.environ)
        env.pop(LEAN_ENV, None)
        env.pop(STATE_ENV, None)
        env["PYTHONPATH"] = procksm_root()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - child
            try:
                os.dup2(r1, 0)
                os.dup2(w2, 1)
                for sig in (signal.SIGCHLD, signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                    signal.signal(sig, signal.SIG_DFL)  # ignored dispositions survive execve
                os.execve(sys.executable, [sys.executable, "-m", "procksm.guard_unmerge"], env)
            finally:
                os._exit(127)
        os.close(r1)
        os.close(w2)
        self.pid, self.to, self.frm, self.buf = pid, w1, r2, b""
        os.set_inheritable(w1, False)
        os.set_inheritable(r2, False)

    def close(self) -> None:
        for fd in (self.to, self.frm):
            if fd is not None:
                os.close(fd)
        self.to = self.frm = None

    def request(self, line: str, timeout: float = 60.0) -> str:
        """One request, one answer line ("ok N" or "error ..."); raises OSError when the
        helper cannot be reached (then the next request starts a new one)."""
        for attempt in range(2):
            if self.to is None:
                self._start()
            assert self.to is not None and self.frm is not None
            try:
                os.write(self.to, line.encode() + b"\n")
            except BrokenPipeError:
                self.close()  # it exited (idle): start another
                if attempt:
                    raise
                continue
            deadline = time.monotonic() + timeout
            while b"\n" not in self.buf:
                left = deadline - time.monotonic()
                r, _, _ = select.select([self.frm], [], [], max(0.0, left))
                chunk = os.read(self.frm, 4096) if r else b""
                if not chunk:
                    self.close()
                    if r and attempt == 0 and not self.buf:
                        break  # exited between its idle check and our request
                    raise OSError(errno.EPIPE, "the unmerge helper died or hung")
                self.buf += chunk
            else:
                answer, _, self.buf = self.buf.partition(b"\n")
                return answer.decode(errors="replace")
        raise OSError(errno.EPIPE, "the unmerge helper died")
