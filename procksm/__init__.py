"""procksm: Kernel Samepage Merging from user space."""

from __future__ import annotations

import os as _os
import signal as _signal
import threading as _threading

__version__ = "0.1.0"
PAGE_SIZE = 4096

# numpy's BLAS starts helper threads when it is imported. A process-directed signal
# (kill -TERM) goes to any thread that does not block it, so a BLAS thread would take
# SIGTERM and end procksm in the middle of a stop window, whose signal deferral
# (procksm.attach.deferred_signals) only covers the calling thread. Import numpy here with
# those signals blocked: its threads inherit the block and never receive them.
# The madvise guard (procksm.guardd) is resident and must stay small: it never imports
# numpy, and says so with PROCKSM_GUARD_LEAN=1.
_DEFERRED = {_signal.SIGINT, _signal.SIGTERM, _signal.SIGHUP, _signal.SIGQUIT}
_LEAN = _os.environ.get("PROCKSM_GUARD_LEAN") == "1"
if not _LEAN and _threading.current_thread() is _threading.main_thread():
    _old_mask = _signal.pthread_sigmask(_signal.SIG_BLOCK, _DEFERRED)
    try:
        import numpy as _numpy  # noqa: F401
    finally:
        _signal.pthread_sigmask(_signal.SIG_SETMASK, _old_mask)
