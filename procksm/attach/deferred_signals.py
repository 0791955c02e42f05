"""procksm's own signals held back while target threads are stopped.

Signals that would end or interrupt procksm in the middle of a stop window are blocked
in the calling thread and delivered when the target's threads run again (a window is
milliseconds). The stop signals too: a Ctrl-Z (or a background write to the terminal)
in a window would stop procksm with every target thread held, for as long as procksm
stays stopped. The mask is per thread: procksm/__init__.py imports numpy with the
first four blocked, so that its helper threads inherit the block and never take one.
"""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Iterator

DEFERRED_SIGNALS = {
    signal.SIGINT,
    signal.SIGTERM,
    signal.SIGHUP,
    signal.SIGQUIT,
    signal.SIGTSTP,
    signal.SIGTTIN,
    signal.SIGTTOU,
}


@contextlib.contextmanager
def signals_deferred() -> Iterator[None]:
    """Block SIGINT/SIGTERM/... in this thread; pending ones arrive when unblocked."""
    old = signal.pthread_sigmask(signal.SIG_BLOCK, DEFERRED_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)
