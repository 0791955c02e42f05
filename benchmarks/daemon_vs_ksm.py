"""procksm attach (the daemon, at its defaults) against the kernel's KSM, on the standard
workload of merge_vs_ksm.py, in the same run.

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
  daemon  pagemap of the planted ranges, sampled (a cheap census: merged pages are present
          and file-backed, dropped zero pages absent or the zero page); confirmed at the end
          with merge_vs_ksm.census (distinct PFNs, kpageflags)
  ksmd    pages_sharing + ksm_zero_pages deltas (merge_vs_ksm.run_ksm), use_zero_pages=1
CPU: the daemon's utime+stime (/proc/PID/stat; one process) at t100;
ksmd's thread utime+stime at t100. The daemon's CPU does not include the time its injected
mmap/madvise calls run in the targets' context (charged to the targets, as a fault is).

KSM settings are machine-wide: they are restored on every exit path (ksmlib), and the
benchmark refuses to run while other processes have KSM pages. Writes
benchmarks/results/daemon_vs_ksm.json. Goal (issue 5): at equal CPU, converge >= 3x
faster than ksmd.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import ksmlib  # noqa: E402
import merge_vs_ksm as mvk  # noqa: E402

from procksm import PAGE_SIZE  # noqa: E402
from procksm.procfs import PM_FILE, PM_PFN_MASK, PM_PRESENT, PagemapFile  # noqa: E402
from procksm.scanner import kernel_zero_pfn  # noqa: E402

Json = dict[str, Any]
GOAL_SPEEDUP_EQUAL_CPU = 3.0
KSM_SLEEP_MS = 20


def quick_saving(targets: Sequence[mvk.Target], w: mvk.Workload) -> int:
    """Saved pages of the planted ranges from pagemap alone, cheap enough to sample every
    0.1 s without stealing the daemon's CPU: identical pages that map a procksm memfd page
    (present, file-backed) save (targets - 1) / targets each (one copy per content stays:
    checked with the full census at the end), zero pages absent or on the zero page save
    one each, unique pages nothing."""
    zero_pfn = np.uint64(kernel_zero_pfn())
    merged = 0
    saved_zero = 0
    for t in targets:
        with PagemapFile(t.pid) as pm:
            for r, (start, n) in t.regions.items():
                e = pm.read(start, start + n * PAGE_SIZE)
                present = (e & PM_PRESENT) != 0
                if r == "zero":
                    saved_zero += int((~present | ((e & PM_PFN_MASK) == zero_pfn)).sum())
                elif r == "identical":
                    merged += int((present & ((e & PM_FILE) != 0)).sum())
    return saved_zero + merged * (w.targets - 1) // w.targets


def run_daemon(
    targets: Sequence[mvk.Target],
    w: mvk.Workload,
    extra: Sequence[str],
    poll_s: float,
    timeout_s: float,
) -> Json:
    ideal = w.ideal_pages
    with tempfile.TemporaryDirectory() as tmp:
        sock = os.path.join(tmp, "ctl.sock")
        cmd = [
            sys.executable,
            "-m",
            "procksm",
            "attach",
            *(str(t.pid) for t in targets),
            "--control",
            sock,
            "-q",
            *extra,
        ]
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=ROOT, stderr=subprocess.PIPE, text=True)
        samples: list[list[float]] = []
        t95 = t100 = cpu95 = cpu100 = None
        t_ready = cpu_ready = None  # start-up done: Python, numpy, the eBPF observer
        try:
            while True:
                time.sleep(poll_s)
                now = time.perf_counter() - t0
                if proc.poll() is not None:
                    raise RuntimeError(
                        f"the daemon exited: {proc.stderr.read() if proc.stderr else ''}"
                    )
                cpu = ksmlib.read_thread_cpu(proc.pid).stat_s
                if t_ready is None and os.path.exists(sock):
                    t_ready, cpu_ready = now, cpu
                saved = quick_saving(targets, w)
                samples.append([now, saved, cpu])
                if t95 is None and saved >= 0.95 * ideal:
                    t95, cpu95 = now, cpu
                if saved >= ideal:
                    t100, cpu100 = now, cpu
                    break
                if now > timeout_s:
                    break
            from procksm.control import stats_json

            stats = stats_json(sock)
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    end = mvk.census(targets)
    last = samples[-1] if samples else [0.0, 0, 0.0]
    cpu_s = cpu100 if cpu100 is not None else last[2]
    t_end = t100 if t100 is not None else last[0]
    return {
        "cmd": " ".join(cmd[2:]),
        "converged": t100 is not None,
        "t95_s": t95,
        "t100_s": t100,
        "cpu_s": cpu_s,
        "cpu_s_t95": cpu95,
        # the share of a CPU while scanning (after start-up): what ksmd gets in "equal"
        "cpu_share": (
            (cpu_s - cpu_ready) / (t_end - t_ready)
            if t_ready is not None and cpu_ready is not None and t_end > t_ready
            else (cpu_s / t_end if t_end else None)
        ),
        "ready_s": t_ready,
        "cpu_s_startup": cpu_ready,
        "saved_pages_pagemap": end["saved_pages"],
        "fraction": end["saved_pages"] / ideal,
        "stats": {
            k: stats.get(k)
            for k in (
                "pages_shared",
                "pages_sharing",
                "pages_zero",
                "pages_unshared",
                "pages_volatile",
                "pages_skipped",
                "full_scans",
                "pages_to_scan",
                "sleep_ms",
                "pause_p50_ms",
                "pause_p99_ms",
                "pause_max_ms",
                "general_profit_bytes",
                "rss_bytes",
            )
        },
        "samples": mvk.thin(samples),
        "memory_check": mvk.verify_targets(targets),
    }


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
    ap.add_argument(
        "--output", type=Path, default=ROOT / "benchmarks" / "results" / "daemon_vs_ksm.json"
    )
    return ap.parse_args(argv)


def fmt(v: float | None, spec: str = ".2f") -> str:
    return "-" if v is None else format(v, spec)


def main(argv: Sequence[str] | None = None) -> int:
    a = parse_args(argv)
    if os.geteuid() != 0:
        print("daemon_vs_ksm: needs root (ptrace, pagemap PFNs, KSM sysfs)", file=sys.stderr)
        return 1
    w = mvk.Workload(a.targets, a.identical, a.zero, a.unique, a.seed)
    exe = mvk.build_planted()
    ctl = ksmlib.KsmControl() if not a.only_daemon else None
    reps: list[Json] = []
    targets: list[mvk.Target] = []
    touched_ksm = False
    with mvk.interrupts_raise():
        try:
            if ctl is not None:
                ctl.check_unused()  # refuses while others use KSM: then nothing is touched
                touched_ksm = True
                ctl.stop()
                ctl.wait_idle()
            for rep in range(a.reps):
                res: Json = {}

                def one(name: str, mergeable: bool, fn: Any, rep: int = rep) -> Json:
                    nonlocal targets
                    t0 = time.perf_counter()
                    targets = mvk.start_targets(exe, w, 0, 0, mergeable=mergeable)
                    try:
                        r: Json = fn(targets)
                    finally:
                        mvk.stop_targets(targets)
                        targets = []
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

                res["daemon"] = one(
                    "daemon",
                    False,
                    lambda ts: run_daemon(ts, w, a.daemon_arg, a.poll, a.daemon_timeout),
                )

                def ksm(pages: int, sleep_ms: int, timeout: float) -> Any:
                    return lambda ts: mvk.run_ksm(
                        ctl, ts, w.ideal_pages, w.zero > 0, pages, sleep_ms, 1, timeout, a.poll
                    )

                if ctl is None:
                    reps.append(res)
                    continue
                res["ksmd_max"] = one("ksmd max", True, ksm(100000, 0, a.ksm_timeout))
                km = res["ksmd_max"]
                cost = km["cpu_s"] / max(1, km["counters"]["pages_scanned"])
                d = res["daemon"]
                share = d["cpu_share"] or 0.25
                pages = ksm_pages_for_share(share, cost, KSM_SLEEP_MS)
                res["ksmd_equal"] = one(
                    f"ksmd equal ({pages})", True, ksm(pages, KSM_SLEEP_MS, a.ksm_timeout)
                )
                res["ksmd_equal"]["cost_per_page_s"] = cost
                res["ksmd_equal"]["target_share"] = share
                if not a.no_ksm_defaults:
                    res["ksmd_defaults"] = one(
                        "ksmd defaults", True, ksm(100, KSM_SLEEP_MS, a.ksm_defaults_timeout)
                    )
                reps.append(res)
        finally:
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            mvk.stop_targets(targets)
            if ctl is not None and touched_ksm:
                try:
                    with contextlib.suppress(ksmlib.KsmError):
                        ctl.unmerge_all()
                finally:
                    ctl.restore()
            signal.signal(signal.SIGINT, signal.default_int_handler)
            signal.signal(signal.SIGTERM, signal.SIG_DFL)

    def med(v: str, key: str) -> float | None:
        vals = [r[v][key] for r in reps if v in r and r[v].get(key) is not None]
        return float(np.median(vals)) if vals else None

    summary: Json = {}
    for v in ("daemon", "ksmd_max", "ksmd_equal", "ksmd_defaults"):
        if any(v in r for r in reps):
            t = med(v, "t100_s")
            c = med(v, "cpu_s")
            summary[v] = {
                "t100_s": t,
                "t95_s": med(v, "t95_s"),
                "cpu_s": c,
                "cpu_share": med(v, "cpu_share")
                if v == "daemon"
                else ((c / t) if (c and t) else None),
                "fraction": med(v, "fraction"),
                "converged": all(
                    r[v].get("converged", r[v].get("t100_s") is not None) for r in reps if v in r
                ),
            }
    d, ke, kd = (
        summary.get("daemon", {}),
        summary.get("ksmd_equal", {}),
        summary.get("ksmd_defaults", {}),
    )

    def ratio(x: float | None, y: float | None) -> float | None:
        return x / y if x is not None and y else None

    ratios = {
        "speedup_at_equal_cpu": ratio(ke.get("t100_s"), d.get("t100_s")),
        "speedup_vs_ksmd_defaults": ratio(kd.get("t100_s"), d.get("t100_s")),
        "cpu_s_ksmd_equal_over_daemon": ratio(ke.get("cpu_s"), d.get("cpu_s")),
        "cpu_s_ksmd_max_over_daemon": ratio(
            summary.get("ksmd_max", {}).get("cpu_s"), d.get("cpu_s")
        ),
    }
    goal_met = (ratios["speedup_at_equal_cpu"] or 0) >= GOAL_SPEEDUP_EQUAL_CPU
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
    for k, v in ratios.items():
        print(f"  {k}: {fmt(v)}")
    print(
        f"  goal: converge >= {GOAL_SPEEDUP_EQUAL_CPU:g}x faster than ksmd at equal CPU: "
        + ("MET" if goal_met else "NOT MET")
    )
    doc = {
        "machine": mvk.machine_line(),
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
