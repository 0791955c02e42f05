"""The benchmark suite of issue 8: procksm against the kernel's KSM, one command.

    make bench                                   # = .venv/bin/python benchmarks/suite.py
    .venv/bin/python benchmarks/suite.py --quick [--only W1]   # small sizes, 1 rep

Workloads, each started as real processes (fresh ones for every run, killed afterwards):

  W1 workers     planted: N x (identical + zero + unique) pages
  W2 scattered   planted --alternate: every other page duplicated across processes
  W3 volatile    planted --identical I --churn I: half the identical pages are stored
                 to every ~10 ms (content identical across processes, changing once a
                 second): merging them only buys copy-on-write breaks
  W4 zero-heavy  planted, mostly zero-filled pages (a heap pre-touched like a JVM with
                 AlwaysPreTouch) plus a little shared and unique data
  W5 numpy       Python interpreters holding the same numpy array (numpy's defaults: THP advice)
  W5 redis       redis-server instances with the same dataset (DEBUG POPULATE)

Each workload runs, in the same run, alternating the order per repetition, under

  merge          `procksm merge PID... --json` (one shot: procksm at full speed)
  ksmd_max       the kernel's KSM, pages_to_scan=100000, sleep_millisecs=0
  daemon         `procksm attach PID...` at its defaults (cpu_limit 25 %), bounded time
  ksmd_defaults  the kernel's KSM at its defaults (100 pages / 20 ms), bounded time
  daemon_eqcpu   W1 only, right after ksmd_defaults: `procksm attach --cpu-limit P` with P
                 the share of a CPU ksmd used in that ksmd_defaults run (equal CPU budget)

The kernel's KSM runs with use_zero_pages=1. Its targets opt in: planted with --mergeable
(MADV_MERGEABLE on the planted regions), the real programs through a wrapper that calls
prctl(PR_SET_MEMORY_MERGE, 1) and execs them (inherited across exec). procksm's targets
do not opt in.

Then the scaling runs (merge and ksmd_max; W1's shape): 1, 4, 16, 64 targets at a fixed
total, and 0.25 -> 8 GiB of target memory over 4 targets. Then the runtimes (runtimes.py:
JVMs, node, numpy workers, redis under `procksm attach` and ksmd for a fixed time each).

Truth sources (see benchmarks/README.md, "suite.py"):
  saving reached   pagemap of the targets (planted regions, or the private anonymous VMAs
                   the real programs had at start): pages - distinct frames, for both
                   tools; /proc/meminfo (AnonPages drop - Shmem growth) alongside
  time to 95/100 % procksm: targets' RssAnon drop - pages of the memfds procksm holds,
                   sampled every --poll s (merge: 100 % = its exit if pagemap then shows
                   the ideal); ksmd: pages_sharing + ksm_zero_pages, same sampling
  CPU s            merge: the child's rusage; daemon: utime+stime of its process at the
                   100 % sample (or at the timeout); ksmd: utime+stime of ksmd, same
  pauses           procksm's own JSON (merge --json, stats --json); ksmd stops no target
  RSS              merge: ru_maxrss; daemon: VmHWM; per GiB of the targets' RssAnon
  thrash (W3)      minor faults of the churn threads (/proc/PID/task/TID/stat): those
                   threads only store to pages they faulted in long ago, so each minor
                   fault is a copy-on-write break of a merged page, whoever merged it

KSM settings are machine-wide: the harness (benchmarks/harness/ksm.py) restores the
values found at start on every exit path (also SIGINT/SIGTERM/SIGHUP); the suite refuses
to start while other processes have KSM pages. Writes benchmarks/results/suite.json
(suite-quick.json with --quick, or --output) and saving_over_time.svg next to it.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this checkout's procksm

from benchmarks.harness.common import PROCKSM, RESULTS, Json
from benchmarks.harness.goals import goals_of
from benchmarks.harness.ksm import KsmControl, run_script
from benchmarks.harness.report import (
    fmt,
    git_state,
    machine_line,
    markdown,
    print_goals,
    print_table,
    runtimes_markdown,
)
from benchmarks.harness.runners import ksm_guarded
from benchmarks.harness.runtimes import ROWS, run_runtimes
from benchmarks.harness.suite_runs import SuiteRun, run_scaling, run_workload
from benchmarks.harness.svg import svg_path, write_svg
from benchmarks.harness.targets import build_planted
from benchmarks.harness.workloads import FULL, QUICK, WORKLOADS, make_workloads


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--quick", action="store_true", help="small sizes, 1 rep (development)")
    ap.add_argument("--reps", type=int, help="repetitions (default 3; --quick 1)")
    ap.add_argument(
        "--only",
        action="append",
        choices=(*WORKLOADS, "W5", "scaling", "runtimes"),
        help="run only these parts (repeatable); default: all workloads, scaling and (not "
        "with --quick) runtimes",
    )
    ap.add_argument("--no-scaling", action="store_true")
    ap.add_argument("--scaling-reps", type=int, default=1)
    ap.add_argument("--poll", type=float, default=0.05, help="sampling period, s")
    ap.add_argument(
        "--poll-runtimes", type=float, default=0.5, help="sampling period of the runtimes, s"
    )
    ap.add_argument("--bounded", type=float, help="bound on daemon / ksmd defaults runs, s")
    ap.add_argument("--scaling-gib", type=float, nargs="+", help="override the size series")
    ap.add_argument("--scaling-targets", type=int, nargs="+", help="override the target series")
    ap.add_argument("--procksm", default=str(PROCKSM))
    ap.add_argument("--output", type=Path)
    ap.add_argument(
        "--markdown", type=Path, metavar="JSON", help="print the README tables of a results file"
    )
    ap.add_argument("--replot", type=Path, metavar="JSON", help="redraw a results file's SVG")
    a = ap.parse_args(argv)
    sizes = QUICK if a.quick else FULL
    if a.reps:
        sizes = sizes.replace(reps=a.reps)
    if a.bounded:
        sizes = sizes.replace(bounded_s=a.bounded, w1_bounded_s=a.bounded)
    if a.scaling_gib:
        sizes = sizes.replace(scaling_gib=tuple(a.scaling_gib))
    if a.scaling_targets:
        sizes = sizes.replace(scaling_targets=tuple(a.scaling_targets))
    a.sizes = sizes
    # the runtimes take ~22 min (8 with --quick): part of `make bench`, not of bench-quick
    only = set(a.only or [*WORKLOADS, "scaling", *([] if a.quick else ["runtimes"])])
    if "W5" in only:
        only |= {"W5numpy", "W5redis"}
    if a.no_scaling:
        only.discard("scaling")
    a.parts = only
    if a.output is None:
        name = "suite-quick" if a.quick else ("suite" if a.only is None else "suite-partial")
        a.output = RESULTS / f"{name}.json"
    return a


def run_suite(a: argparse.Namespace, machine: str) -> Json:
    """Every workload and the scaling runs asked for; KSM restored on every exit path."""
    exe = build_planted()
    print(f"machine {machine}\nsizes {'quick' if a.quick else 'full'}: {a.sizes}", flush=True)
    ctl = KsmControl()
    tmp = Path(tempfile.mkdtemp(prefix="procksm-bench-"))
    Path("/run/procksm").mkdir(parents=True, exist_ok=True)
    workloads = make_workloads(exe, a.sizes, tmp)
    res: Json = {
        "machine": machine,
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "quick": a.quick,
        "sizes": asdict(a.sizes),
        "ksm_settings_found": ctl.found,
        "git": git_state(),
        "workloads": {},
    }
    s = SuiteRun(ctl, [a.procksm], a.sizes, a.poll, a.scaling_reps)
    t_start = time.perf_counter()
    try:
        with ksm_guarded(ctl):
            for wname in WORKLOADS:
                if wname in a.parts:
                    res["workloads"][wname] = run_workload(s, workloads[wname])
            if "scaling" in a.parts:
                print("\nscaling (merge and ksmd max, W1's shape 4:1:1)", flush=True)
                res["scaling"] = run_scaling(s, exe)
            if "runtimes" in a.parts:
                print("\nruntimes (procksm attach and ksmd, fixed time)", flush=True)
                res["runtimes"] = run_runtimes(ctl, [a.procksm], a.quick, ROWS, a.poll_runtimes)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    res["elapsed_s"] = time.perf_counter() - t_start
    return res


def report_suite(res: Json, a: argparse.Namespace, machine: str) -> None:
    """The table, the goals, the JSON file and the plot."""
    print(f"\nmachine {machine}; medians of {a.sizes.reps} reps\n")
    res["table"] = print_table(res, a.sizes)
    if "runtimes" in res:
        print(runtimes_markdown(res["runtimes"]))
    if "scaling" in res:
        sc = res["scaling"]
        print(
            f"peak RSS slope over the size series: merge "
            f"{fmt(sc['merge_rss_bytes_per_page_slope'], '.1f')}, daemon "
            f"{fmt(sc['daemon_rss_bytes_per_page_slope'], '.1f')} bytes per page"
        )
    res["goals"] = goals_of(res, a.sizes)
    print_goals(res["goals"])
    a.output.parent.mkdir(parents=True, exist_ok=True)
    a.output.write_text(json.dumps(res, indent=1, default=str) + "\n")
    svg = svg_path(a.output)
    write_svg(res, svg)
    print(f"\nwrote {a.output} and {svg} ({res['elapsed_s'] / 60:.1f} min)")


def main(argv: Sequence[str] | None = None) -> int:
    a = parse_args(argv)
    if a.markdown:
        print(markdown(json.loads(a.markdown.read_text())), end="")
        return 0
    if a.replot:
        svg = svg_path(a.replot)
        write_svg(json.loads(a.replot.read_text()), svg)
        print(f"wrote {svg}")
        return 0
    if os.geteuid() != 0:
        print("suite: needs root (ptrace, pagemap PFNs, KSM sysfs)", file=sys.stderr)
        return 1
    machine = machine_line()
    report_suite(run_suite(a, machine), a, machine)
    return 0


if __name__ == "__main__":
    run_script("suite", main)
