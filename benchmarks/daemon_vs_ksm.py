"""procksm attach (the daemon, at its defaults) against the kernel's KSM, on the standard
workload of merge_vs_ksm.py (harness.workloads.Planted), in the same run.

    .venv/bin/python benchmarks/daemon_vs_ksm.py [--reps 1] [--ksm-defaults-timeout 240]

Variants, each on fresh planted targets (4 x: 256 MiB identical across targets, 64 MiB
zero-filled, 64 MiB unique), in this order per repetition:

  daemon          `procksm attach PID...` with its default settings (incl. its CPU cap)
  ksmd max        pages_to_scan=100000, sleep_millisecs=0: KSM's cost per scanned page
                  (CPU seconds / pages_scanned), which sizes the next run
  ksmd equal      sleep_millisecs=20 and the pages_to_scan that makes ksmd use the share
                  of a CPU the daemon used while converging (cpu_s / t100): equal budget
  ksmd defaults   pages_to_scan=100, sleep_millisecs=20, bounded by --ksm-defaults-timeout

Convergence ("t100") is the first sample (every --poll s) at which the saving reaches the
ideal, distinct frames - distinct non-zero contents of the planted pages:
  daemon  the targets' RssAnon drop minus procksm's memfd pages, confirmed by pagemap
          (harness.runners.run_daemon, the same runner as suite.py's; harness.truth.census:
          distinct PFNs, kpageflags)
  ksmd    pages_sharing + ksm_zero_pages deltas (harness.runners.run_ksm), use_zero_pages=1
CPU: utime+stime of the daemon's process tree (the supervisor and its worker) at t100;
ksmd's thread utime+stime at t100. The daemon's CPU does not include the time its injected
mmap/madvise calls run in the targets' context (charged to the targets, as a fault is).

KSM settings are machine-wide: they are restored on every exit path (harness.ksm), and the
benchmark refuses to run while other processes have KSM pages. Writes
benchmarks/results/daemon_vs_ksm.json. Goal (issue 5): at equal CPU, converge >= 3x
faster than ksmd.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this checkout's procksm

from benchmarks.harness.common import RESULTS, Json
from benchmarks.harness.ksm import KsmControl
from benchmarks.harness.report import fmt, machine_line
from benchmarks.harness.runners import ksm_guarded, run_daemon, run_ksm
from benchmarks.harness.targets import Target, build_planted, fresh_targets
from benchmarks.harness.workloads import Planted

GOAL_SPEEDUP_EQUAL_CPU = 3.0
KSM_SLEEP_MS = 20
VARIANTS = ("daemon", "ksmd_max", "ksmd_equal", "ksmd_defaults")
Run = Callable[[list[Target]], Json]


def ksm_pages_for_share(share: float, cost_per_page_s: float, sleep_ms: int) -> int:
    """pages_to_scan that makes ksmd busy ``share`` of the time with sleep_ms sleeps:
    share = b / (b + sleep), b = pages * cost."""
    share = min(max(share, 0.001), 0.95)
    pages = share * (sleep_ms / 1000.0) / ((1 - share) * cost_per_page_s)
    return max(1, round(pages))


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--reps", type=int, default=1)
    ap.add_argument("--targets", type=int, default=4)
    ap.add_argument("--identical", type=int, default=65536)
    ap.add_argument("--zero", type=int, default=16384)
    ap.add_argument("--unique", type=int, default=16384)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--poll", type=float, default=0.1)
    ap.add_argument("--daemon-timeout", type=float, default=180.0)
    ap.add_argument("--ksm-timeout", type=float, default=300.0)
    ap.add_argument("--ksm-defaults-timeout", type=float, default=240.0)
    ap.add_argument("--no-ksm-defaults", action="store_true", help="skip ksmd at defaults")
    ap.add_argument(
        "--only-daemon", action="store_true", help="only the daemon (KSM is not touched)"
    )
    ap.add_argument(
        "--daemon-arg",
        action="append",
        default=[],
        help="extra argument for procksm attach (repeatable)",
    )
    ap.add_argument("--output", type=Path, default=RESULTS / "daemon_vs_ksm.json")
    return ap.parse_args(argv)


def one_run(
    name: str, rep: int, w: Planted, exe: Path, ctl: KsmControl | None, fn: Run, mergeable: bool
) -> Json:
    """``fn`` on fresh targets (opted in to KSM if ``mergeable``, and then unmerged after)."""
    t0 = time.perf_counter()
    try:
        with fresh_targets(lambda: w.start(exe, 0, 0, mergeable=mergeable)) as targets:
            r = fn(targets)
    finally:
        if mergeable and ctl is not None:
            ctl.unmerge_all()
            ctl.wait_idle()
    print(
        f"rep {rep + 1} {name:14s} t100 {fmt(r.get('t100_s'))} s, CPU "
        f"{fmt(r.get('cpu_s'))} s, saved {r.get('fraction', 0):.1%} "
        f"({time.perf_counter() - t0:.0f} s)",
        flush=True,
    )
    return r


def run_rep(rep: int, w: Planted, exe: Path, ctl: KsmControl | None, a: argparse.Namespace) -> Json:
    """The daemon; then (unless --only-daemon) ksmd at max speed, at the daemon's CPU share
    (sized by ksmd's cost per page at max speed) and at its defaults."""

    def daemon(ts: list[Target]) -> Json:
        procksm = [sys.executable, "-m", "procksm"]
        return run_daemon(
            ts, w.ideal_pages, procksm, poll_s=a.poll, bound_s=a.daemon_timeout, extra=a.daemon_arg
        )

    def ksm(pages: int, sleep_ms: int, timeout: float) -> Run:
        assert ctl is not None
        return lambda ts: run_ksm(
            ctl, ts, w.ideal_pages, w.zero > 0, pages, sleep_ms, 1, timeout, a.poll
        )

    res: Json = {"daemon": one_run("daemon", rep, w, exe, ctl, daemon, False)}
    if ctl is None:
        return res
    km = res["ksmd_max"] = one_run(
        "ksmd max", rep, w, exe, ctl, ksm(100000, 0, a.ksm_timeout), True
    )
    cost = km["cpu_s"] / max(1, km["counters"]["pages_scanned"])
    share = res["daemon"]["cpu_share"] or 0.25
    pages = ksm_pages_for_share(share, cost, KSM_SLEEP_MS)
    equal = ksm(pages, KSM_SLEEP_MS, a.ksm_timeout)
    res["ksmd_equal"] = one_run(f"ksmd equal ({pages})", rep, w, exe, ctl, equal, True)
    res["ksmd_equal"]["cost_per_page_s"] = cost
    res["ksmd_equal"]["target_share"] = share
    if not a.no_ksm_defaults:
        defaults = ksm(100, KSM_SLEEP_MS, a.ksm_defaults_timeout)
        res["ksmd_defaults"] = one_run("ksmd defaults", rep, w, exe, ctl, defaults, True)
    return res


def summarize(reps: Sequence[Json]) -> Json:
    """Per variant: medians over the repetitions, and whether every one converged."""

    def med(v: str, key: str) -> float | None:
        vals = [r[v][key] for r in reps if v in r and r[v].get(key) is not None]
        return float(np.median(vals)) if vals else None

    summary: Json = {}
    for v in VARIANTS:
        if not any(v in r for r in reps):
            continue
        t, c = med(v, "t100_s"), med(v, "cpu_s")
        summary[v] = {
            "t100_s": t,
            "t95_s": med(v, "t95_s"),
            "cpu_s": c,
            "cpu_share": med(v, "cpu_share") if v == "daemon" else ((c / t) if (c and t) else None),
            "fraction": med(v, "fraction"),
            "converged": all(
                r[v].get("converged", r[v].get("t100_s") is not None) for r in reps if v in r
            ),
        }
    return summary


def ratios_of(summary: Json) -> dict[str, float | None]:
    d, ke = summary.get("daemon", {}), summary.get("ksmd_equal", {})
    kd, km = summary.get("ksmd_defaults", {}), summary.get("ksmd_max", {})

    def ratio(x: float | None, y: float | None) -> float | None:
        return x / y if x is not None and y else None

    return {
        "speedup_at_equal_cpu": ratio(ke.get("t100_s"), d.get("t100_s")),
        "speedup_vs_ksmd_defaults": ratio(kd.get("t100_s"), d.get("t100_s")),
        "cpu_s_ksmd_equal_over_daemon": ratio(ke.get("cpu_s"), d.get("cpu_s")),
        "cpu_s_ksmd_max_over_daemon": ratio(km.get("cpu_s"), d.get("cpu_s")),
    }


def print_summary(
    w: Planted, summary: Json, ratios: dict[str, float | None], goal_met: bool
) -> None:
    print()
    print(
        f"workload: {w.targets} targets x ({w.identical} identical + {w.zero} zero + "
        f"{w.unique} unique pages); ideal saving {w.ideal_pages} pages"
    )
    for v, s in summary.items():
        print(
            f"  {v:14s} t100 {fmt(s['t100_s'])} s  t95 {fmt(s['t95_s'])} s  CPU "
            f"{fmt(s['cpu_s'])} s ({fmt((s['cpu_share'] or 0) * 100, '.1f')} % of a CPU)  "
            f"saved {fmt((s['fraction'] or 0) * 100, '.1f')} %"
            + ("" if s["converged"] else "  (did not converge)")
        )
    for name, value in ratios.items():
        print(f"  {name}: {fmt(value)}")
    print(
        f"  goal: converge >= {GOAL_SPEEDUP_EQUAL_CPU:g}x faster than ksmd at equal CPU: "
        + ("MET" if goal_met else "NOT MET")
    )


def main(argv: Sequence[str] | None = None) -> int:
    a = parse_args(argv)
    if os.geteuid() != 0:
        print("daemon_vs_ksm: needs root (ptrace, pagemap PFNs, KSM sysfs)", file=sys.stderr)
        return 1
    w = Planted(a.targets, a.identical, a.zero, a.unique, a.seed)
    exe = build_planted()
    ctl = KsmControl() if not a.only_daemon else None
    with ksm_guarded(ctl):  # refuses while others use KSM: then nothing is touched
        reps = [run_rep(rep, w, exe, ctl, a) for rep in range(a.reps)]
    summary = summarize(reps)
    ratios = ratios_of(summary)
    goal_met = (ratios["speedup_at_equal_cpu"] or 0) >= GOAL_SPEEDUP_EQUAL_CPU
    print_summary(w, summary, ratios, goal_met)
    doc = {
        "machine": machine_line(),
        "workload": w.as_json(),
        "ideal_saved_pages": w.ideal_pages,
        "options": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(a).items()},
        "ksm_settings_found": ctl.found if ctl is not None else None,
        "summary": summary,
        "ratios": ratios,
        "goal_speedup_at_equal_cpu": GOAL_SPEEDUP_EQUAL_CPU,
        "goal_met": goal_met,
        "reps": reps,
    }
    a.output.parent.mkdir(parents=True, exist_ok=True)
    a.output.write_text(json.dumps(doc, indent=1, default=str) + "\n")
    print(f"wrote {a.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
