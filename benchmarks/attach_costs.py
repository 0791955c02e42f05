"""What one stop window and one injected system call cost a target (as root).

    .venv/bin/python benchmarks/attach_costs.py [--windows 50] [--calls 300]

A `tests/targets/blockers.c` target with 1 thread, 8 sleeping threads and 8 spinning
threads in turn: the median pause of --windows empty stop windows (every thread stopped
with PTRACE_SEIZE + PTRACE_INTERRUPT and resumed; `PtraceSession.pauses`), and, on the
8-sleeper target, the median round trip of --calls injected getpid() calls with procksm
pinned to the target's CPU and not (docs/design.md §2.8). One target at a time: 8
spinners on 2 CPUs would slow every other measurement.

Goals (these were assertions of tests/test_attach.py; they are benchmark goals, judged on
a quiet machine): pause of a 1-thread target < 5 ms, 8 sleeping < 10 ms, 8 spinning
< 100 ms; an injected call, pinned, < 2 ms. Writes benchmarks/results/attach_costs.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "benchmarks" / "results" / "attach_costs.json"

GOALS_S = {
    "pause 1 thread": 0.005,
    "pause 8 sleeping": 0.010,
    "pause 8 spinning": 0.100,
    "injected syscall, pinned": 0.002,
}


def median_pause(pid: int, windows: int) -> float:
    from procksm.attach import PtraceSession

    with PtraceSession(pid) as session:
        for _ in range(windows):
            with session.stopped():
                pass
            time.sleep(0.001)
    return statistics.median(session.pauses)


def median_injection(pid: int, pin: bool, calls: int) -> float:
    from procksm.arch.x86_64 import SYS_getpid
    from procksm.attach import PtraceSession

    with PtraceSession(pid, pin_cpu=pin) as session, session.stopped() as stopped:
        stopped.syscall(SYS_getpid)
        times = []
        for _ in range(calls):
            t0 = time.perf_counter()
            stopped.syscall(SYS_getpid)
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--windows", type=int, default=50)
    ap.add_argument("--calls", type=int, default=300)
    args = ap.parse_args()
    from tests.conftest import Target, build_c_target

    exe = build_c_target("blockers")
    results: dict[str, float] = {}
    for label, extra in [("1 thread", ()), ("8 sleeping", ("--sleepers", "8")),
                         ("8 spinning", ("--spinners", "8"))]:  # fmt: skip
        target = Target([str(exe), "--bare", *extra])
        try:
            results[f"pause {label}"] = median_pause(target.pid, args.windows)
            if label == "8 sleeping":
                results["injected syscall, pinned"] = median_injection(target.pid, True, args.calls)
                results["injected syscall, not pinned"] = median_injection(
                    target.pid, False, args.calls
                )
            errors = target.command("errors")
        finally:
            target.kill()
        if errors != "ERRORS 0":
            print(f"target ({label}) reported {errors}", file=sys.stderr)
            return 1
    print(f"{'':32} {'median':>10}  goal")
    for name, seconds in results.items():
        goal = GOALS_S.get(name)
        verdict = "" if goal is None else ("met" if seconds < goal else "MISSED")
        limit = "" if goal is None else f"< {goal * 1e3:g} ms: {verdict}"
        print(f"{name:32} {seconds * 1e6:8.1f} us  {limit}")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(
        json.dumps(
            {
                "medians_s": results,
                "goals_s": GOALS_S,
                "windows": args.windows,
                "calls": args.calls,
                "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            },
            indent=2,
        )
        + "\n"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
