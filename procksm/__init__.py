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
# procksm never calls BLAS, so numpy's OpenBLAS gets one thread, i.e. none started:
# starting one per CPU cost every procksm process ~0.07 CPU s (import numpy: 0.16 CPU s
# against 0.07, measured on this 2-CPU VM), ~5 % of a `procksm merge` of the first row.
# Only for the import: processes procksm starts keep the environment they had.
# The madvise guard (procksm.guardd) is resident and must stay small: it never imports
# numpy, and says so with PROCKSM_GUARD_LEAN=1.
_DEFERRED = {_signal.SIGINT, _signal.SIGTERM, _signal.SIGHUP, _signal.SIGQUIT}
_LEAN = _os.environ.get("PROCKSM_GUARD_LEAN") == "1"
_BLAS_THREADS = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")
if not _LEAN and _threading.current_thread() is _threading.main_thread():
    _old_mask = _signal.pthread_sigmask(_signal.SIG_BLOCK, _DEFERRED)
    _env_before = {k: _os.environ.get(k) for k in _BLAS_THREADS}
    try:
        for _k in _BLAS_THREADS:
            _os.environ.setdefault(_k, "1")
        import numpy as _numpy  # noqa: F401
    finally:
        for _k, _v in _env_before.items():
            if _v is None:
                _os.environ.pop(_k, None)
            else:
                _os.environ[_k] = _v
        _signal.pthread_sigmask(_signal.SIG_SETMASK, _old_mask)
