"""What the madvise guard costs a target (procksm.guard), measured in one run.

    .venv/bin/python benchmarks/guard_overhead.py [--calls 2000] [--reps 3]

Two identical Python targets hold 64 MiB of equal data plus a private scratch area.
In target A, per repetition, a loop of CALLS iterations (write one scratch page, then
madvise(MADV_DONTNEED) it — jemalloc's purge pattern) and a loop of mremap(shrink, then
grow back) of a private 4-page mapping are timed:

  unguarded      before any merge (no filter in the process)
  guarded        after `procksm merge A B` (the filter sends these calls to the guard;
                 the ranges hold no merged page: the fast path, CONTINUE)
  merged pages   MADV_DONTNEED of one merged page per call (the guard stops the target,
                 unmerges the page, and the call restarts): the slow path
  other calls    getpid() before and after the merge (the filter runs on every system
                 call; this is its cost for calls it lets through)

Prints microseconds per call (median over repetitions) and the added time; writes
benchmarks/results/guard_overhead.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import textwrap
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this checkout's procksm

from benchmarks.harness.common import RESULTS, ROOT, Json

TARGET = textwrap.dedent(
    r"""
    import ctypes, mmap, sys, time
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    libc.mremap.restype = ctypes.c_void_p
    libc.mremap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t, ctypes.c_int]
    libc.syscall.restype = ctypes.c_long
    P = 4096
    PRIV = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS  # Python's default is MAP_SHARED
    shared = mmap.mmap(-1, 64 << 20, flags=PRIV)
    for i in range(0, 64 << 20, P):
        shared[i:i + 8] = (i // P).to_bytes(8, "little")
    scratch = mmap.mmap(-1, 64 * P, flags=PRIV)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                          ctypes.c_int, ctypes.c_long]
    area = libc.mmap(None, 4 * P, 3, PRIV, -1, 0)
    saddr = ctypes.addressof(ctypes.c_char.from_buffer(scratch))
    baddr = ctypes.addressof(ctypes.c_char.from_buffer(shared))
    print("READY", flush=True)
    for line in sys.stdin:
        what, n = line.split()
        n = int(n)
        t = time.perf_counter()
        if what == "dontneed":
            for i in range(n):
                a = saddr + (i % 64) * P
                ctypes.memset(a, 1, 1)
                libc.madvise(a, P, 4)
        elif what == "merged":
            for i in range(n):
                libc.madvise(baddr + (i % 16384) * P, P, 4)
        elif what == "mremap":
            for i in range(n):
                libc.mremap(area, 4 * P, 2 * P, 0)  # shrink in place
                libc.mremap(area, 2 * P, 4 * P, 0)  # and grow back (the space is free)
        elif what == "getpid":
            for i in range(n):
                libc.syscall(39)
        print((time.perf_counter() - t) / n * 1e6, flush=True)
    """
)


class PythonTarget:
    """One TARGET process: it runs a loop of calls on request and answers us per call."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", TARGET], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )

    def ready(self) -> None:
        assert self.proc.stdout is not None and self.proc.stdout.readline().strip() == "READY"

    def run(self, what: str, n: int) -> float:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(f"{what} {n}\n")
        self.proc.stdin.flush()
        return float(self.proc.stdout.readline())

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait()


def measure(calls: int, reps: int) -> Json:
    """Each loop in target A before and after `procksm merge A B`, and the slow path."""
    targets = [PythonTarget() for _ in range(2)]
    try:
        for t in targets:
            t.ready()
        a = targets[0]
        counts = {"dontneed": calls, "mremap": calls, "getpid": 20 * calls}

        def timed(what: str, n: int) -> float:
            return statistics.median(a.run(what, n) for _ in range(reps))

        before = {w: timed(w, n) for w, n in counts.items()}
        pids = [str(t.proc.pid) for t in targets]
        merged = subprocess.run(
            [sys.executable, "-m", "procksm", "merge", "--json", *pids],
            capture_output=True, text=True, cwd=ROOT, env=dict(os.environ), check=True,
        )  # fmt: skip
        after = {w: timed(w, n) for w, n in counts.items()}
        slow = a.run("merged", min(calls, 500))
    finally:
        for t in targets:
            t.kill()
    saved = json.loads(merged.stdout)["totals"]["saved_bytes"]
    return {"before": before, "after": after, "slow": slow, "saved_bytes": saved}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--calls", type=int, default=2000)
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()
    m = measure(args.calls, args.reps)
    before, after, slow = m["before"], m["after"], m["slow"]
    rows = {
        "madvise(DONTNEED), no merged page": (before["dontneed"], after["dontneed"]),
        "mremap shrink+grow, no merged page": (before["mremap"], after["mremap"]),
        "getpid (let through by the filter)": (before["getpid"], after["getpid"]),
    }
    print(f"{'call':<38} {'unguarded':>10} {'guarded':>10} {'added':>10}  (us per call)")
    for name, (b, g) in rows.items():
        print(f"{name:<38} {b:>10.2f} {g:>10.2f} {g - b:>+10.2f}")
    print(f"{'madvise(DONTNEED) of a merged page':<38} {'':>10} {slow:>10.2f}  (unmerge first)")
    out = {
        "machine": {"kernel": platform.release(), "cpus": os.cpu_count()},
        "calls": args.calls,
        "reps": args.reps,
        "us_per_call": {k: {"unguarded": b, "guarded": g} for k, (b, g) in rows.items()},
        "dontneed_merged_page_us": slow,
        "merge_saved_bytes": m["saved_bytes"],
    }
    results = RESULTS / "guard_overhead.json"
    results.parent.mkdir(parents=True, exist_ok=True)
    results.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {results.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
