"""How soon procksm's eBPF observer reports what happens to a target (as root).

    .venv/bin/python benchmarks/observe_latency.py [--reps 20]

Two planted targets (tests/targets/planted.c) whose identical regions are merged with
each other, watched by one CowObserver (eBPF). Per repetition, from the target's answer
to a command to the event's arrival in poll(): a user write to a merged page (CowBreak),
a fork (Lifecycle "fork"); at the end, the exit of a target. (A brk was measured too
until the observer stopped watching memory calls: docs/design.md §11.)
And the pagemap reconcile: a write through /proc/PID/mem (get_user_pages, no fault
event) found by poll() with reconcile_interval_s=0.5.

Goals (they were assertions of tests/test_observe.py; they are benchmark goals): a COW
break within 2 s, lifecycle events within 1 s, a reconciled GUP write within 1.5 s.
Writes benchmarks/results/observe_latency.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this checkout's procksm

from benchmarks.harness.common import RESULTS
from procksm import PAGE_SIZE
from procksm.merge import MergeOptions, merge
from procksm.observe import CowBreak, CowObserver, Event, Lifecycle
from procksm.scanner import AddressRange, ScanOptions
from procksm.unmerge import merged_ranges
from tests.conftest import Target, build_c_target

GOALS_S = {"cow_break": 2.0, "fork": 1.0, "exit": 1.0, "reconcile_gup": 1.5}
N = 96
Latencies = dict[str, list[float]]


def wait(obs: CowObserver, done: Callable[[Event], bool], since: float) -> float:
    """Seconds from ``since`` until poll() returns an event ``done`` accepts."""
    while time.perf_counter() - since < 10:
        if any(done(e) for e in obs.poll(0.001)):
            return time.perf_counter() - since
    raise TimeoutError("no event within 10 s")


def lifecycle(pid: int, kind: str) -> Callable[[Event], bool]:
    return lambda e: isinstance(e, Lifecycle) and e.kind == kind and e.pid == pid


def gup_write(pid: int, addr: int) -> float:
    """Write a page through /proc/PID/mem (get_user_pages, no fault event): the same byte,
    so the page is copied and its content (the target's check) unchanged. Returns when."""
    fd = os.open(f"/proc/{pid}/mem", os.O_RDWR)
    try:
        same = os.pread(fd, 1, addr)
        t0 = time.perf_counter()
        os.pwrite(fd, same, addr)
    finally:
        os.close(fd)
    return t0


def one_rep(obs: CowObserver, a: Target, i: int, region: int, latencies: Latencies) -> None:
    """A COW break, a fork and a reconciled GUP write of target ``a``."""

    def broke(e: Event) -> bool:
        return isinstance(e, CowBreak) and e.pid == a.pid

    def reconciled(e: Event) -> bool:
        return isinstance(e, CowBreak) and e.pid == a.pid and e.reconciled

    t0 = time.perf_counter()
    assert a.command(f"write identical {i}") == "OK"
    latencies["cow_break"].append(wait(obs, broke, t0))
    t0 = time.perf_counter()
    assert a.command("fork").startswith("CHILD exit=0")
    latencies["fork"].append(wait(obs, lifecycle(a.pid, "fork"), t0))
    t0 = gup_write(a.pid, region + (N // 2 + i) * PAGE_SIZE)
    latencies["reconcile_gup"].append(wait(obs, reconciled, t0))


def observe(targets: list[Target], reps: int, latencies: Latencies) -> int:
    """Merge the targets, watch the first one; every repetition, then its exit."""
    regions = [(t.int("identical"), t.int("identical") + N * PAGE_SIZE) for t in targets]
    opts = ScanOptions(ranges=[AddressRange(*r) for r in regions])
    merge([t.pid for t in targets], MergeOptions(selection=opts))
    a = targets[0]
    with CowObserver(use_bpf=True, reconcile_interval_s=0.5) as obs:
        if obs.mode != "bpf":
            print(f"eBPF unavailable: {obs.fallback_reason}", file=sys.stderr)
            return 1
        obs.set_ranges(a.pid, [(v.start, v.end) for v in merged_ranges(a.pid)])
        for i in range(reps):
            one_rep(obs, a, i, regions[0][0], latencies)
        reply = a.command("check")
        if not reply.startswith("OK"):
            print(f"target {a.pid}: {reply}", file=sys.stderr)
            return 1
        t0 = time.perf_counter()
        assert a.proc.stdin is not None
        a.proc.stdin.write("quit\n")
        a.proc.stdin.flush()
        latencies["exit"].append(wait(obs, lifecycle(a.pid, "exit"), t0))
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=20)
    args = ap.parse_args()
    exe = str(build_c_target("planted"))
    reps = min(args.reps, N // 2 - 1)
    targets = [Target([exe, "--identical", str(N), "--seed", "23"]) for _ in range(2)]
    latencies: Latencies = {k: [] for k in GOALS_S}
    try:
        if observe(targets, reps, latencies):
            return 1
    finally:
        for t in targets:
            t.kill()
    medians = {k: statistics.median(v) for k, v in latencies.items()}
    print(f"{'event':16} {'median':>10} {'max':>10}  goal")
    for k, v in latencies.items():
        verdict = "met" if max(v) < GOALS_S[k] else "MISSED"
        print(
            f"{k:16} {medians[k] * 1e3:8.1f} ms {max(v) * 1e3:8.1f} ms  < {GOALS_S[k]} s: {verdict}"
        )
    results = RESULTS / "observe_latency.json"
    results.parent.mkdir(parents=True, exist_ok=True)
    doc = {"latencies_s": latencies, "medians_s": medians, "goals_s": GOALS_S,
           "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}  # fmt: skip
    results.write_text(json.dumps(doc, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
