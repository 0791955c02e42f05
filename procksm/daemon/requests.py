"""Requests from the control socket's threads, run in the scan loop's thread between
batches (registrations and unmerges touch what the loop owns)."""

from __future__ import annotations

import collections
import threading
from collections.abc import Callable

from procksm.errors import ProcksmError


class _Reply:
    def __init__(self) -> None:
        self.done = threading.Event()
        self.value = ""
        self.error: ProcksmError | None = None


class RequestQueue:
    def __init__(self, wake: threading.Event) -> None:
        self._wake = wake  # ends the loop's sleep
        self._queue: collections.deque[tuple[Callable[[], str], _Reply]] = collections.deque()

    def submit(self, fn: Callable[[], str], timeout: float = 30.0) -> str:
        """Queue ``fn`` for the loop's thread and wait for its result or error."""
        reply = _Reply()
        self._queue.append((fn, reply))
        self._wake.set()
        if not reply.done.wait(timeout):
            raise ProcksmError("the daemon did not answer in time (a long batch?)")
        if reply.error is not None:
            raise reply.error
        return reply.value

    def run(self) -> None:
        """In the loop's thread: answer every queued request."""
        while self._queue:
            fn, reply = self._queue.popleft()
            try:
                reply.value = fn()
            except ProcksmError as e:
                reply.error = e
            except Exception as e:  # a bug must not kill the daemon; the client hears it
                reply.error = ProcksmError(f"internal error: {e!r}")
            reply.done.set()
