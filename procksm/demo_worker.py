"""A sample worker for ``procksm demo``: what a model-serving or web worker holds.

Run as ``python -m procksm.demo_worker --shared-mib 64 ...``. It builds, in its own private
anonymous memory:

* ``shared``  : a deterministic "model"/lookup table, identical in every worker
                (numpy, seed fixed): what procksm should merge across processes;
* ``zeros``   : a pre-touched, zero-filled buffer (like a JVM heap with AlwaysPreTouch,
                or an arena that was memset): procksm drops these pages;
* ``unique``  : per-worker random data (a cache of this worker's requests): nothing to merge;
* ``volatile``: a buffer a thread keeps rewriting (a hot counter table): must not be merged.

It prints ``READY pid=...`` and then answers ``check`` on stdin with ``OK`` when its
shared data still hashes to the value it computed at start (its own corruption check).
It exits when stdin closes or its parent dies (PR_SET_PDEATHSIG), so a killed demo leaves
nothing behind.
"""

from __future__ import annotations

import argparse
import ctypes
import hashlib
import signal
import sys
import threading
import time

import numpy as np

MiB = 1 << 20
PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    except OSError:
        pass


def build(
    shared_mib: int, zero_mib: int, unique_mib: int, volatile_mib: int, seed: int
) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    shared = rng.integers(0, 2**63, size=shared_mib * MiB // 8, dtype=np.int64)
    zeros = np.ones(zero_mib * MiB // 8, dtype=np.int64)  # written: real pages...
    zeros[:] = 0  # ...then zeroed, like a pre-touched heap
    unique = np.random.default_rng().integers(0, 2**63, size=unique_mib * MiB // 8, dtype=np.int64)
    volatile = np.zeros(volatile_mib * MiB // 8, dtype=np.int64)
    return {"shared": shared, "zeros": zeros, "unique": unique, "volatile": volatile}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--shared-mib", type=int, default=64)
    ap.add_argument("--zero-mib", type=int, default=16)
    ap.add_argument("--unique-mib", type=int, default=16)
    ap.add_argument("--volatile-mib", type=int, default=4)
    ap.add_argument("--seed", type=int, default=2008)
    a = ap.parse_args()
    _die_with_parent()
    data = build(a.shared_mib, a.zero_mib, a.unique_mib, a.volatile_mib, a.seed)
    digest = hashlib.sha256(data["shared"].tobytes()).hexdigest()
    stop = threading.Event()

    def churn() -> None:
        v = data["volatile"]
        i = 0
        while not stop.is_set():
            v[::512] += 1  # one word per page of the hot table, every 20 ms
            i += 1
            time.sleep(0.02)

    threading.Thread(target=churn, daemon=True).start()
    print(
        f"READY pid={__import__('os').getpid()} "
        + " ".join(f"{k}={v.ctypes.data:#x} {k}_bytes={v.nbytes}" for k, v in data.items()),
        flush=True,
    )
    for line in sys.stdin:
        cmd = line.strip()
        if cmd == "check":
            ok = hashlib.sha256(data["shared"].tobytes()).hexdigest() == digest
            ok = ok and not data["zeros"].any()
            print("OK" if ok else "CORRUPT", flush=True)
        elif cmd == "quit":
            break
    stop.set()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
