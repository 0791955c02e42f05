"""procksm merge against the kernel's KSM, on the same planted workload, in the same run.

    .venv/bin/python benchmarks/merge_vs_ksm.py [--reps 3]
        [--ksm-defaults [--ksm-defaults-timeout 180]] [--busy-threads 7] [--only ksmd]

Workload: --targets (4) planted processes, each with --identical (65536 = 256 MiB) pages
equal across processes, --zero (16384 = 64 MiB) zero-filled pages, and --unique (16384)
pages nobody else has. Every run starts fresh targets and kills them afterwards. Per
repetition, alternating the order (procksm first in repetitions 1, 3, ...):

  procksm          `procksm merge PID... --json`, one shot, to completion
  ksmd max         kernel KSM at pages_to_scan=100000, sleep_millisecs=0, until 100 %
  procksm busy     procksm again, with --busy-targets (1) of the targets running
                   --busy-threads (7) spinning threads + main = 8 threads, for the pause goal
                   (the busy targets' own pauses, from procksm's per-process JSON);
                   --busy-threads 0 skips it. All 4 targets busy = 28 spinning threads on
                   2 CPUs: procksm then gets ~1/15 of a CPU and one run takes minutes
  ksmd defaults    only with --ksm-defaults: pages_to_scan=100, sleep_millisecs=20, bounded
                   by --ksm-defaults-timeout (it needs minutes)

The kernel's KSM runs with use_zero_pages=1 (its counterpart of dropping zero pages); the
targets opt in with planted --mergeable (MADV_MERGEABLE on the planted regions only).

Truth sources (each printed number says which):
  ideal saving   from the workload: distinct frames - distinct non-zero contents
                 = T*(I+Z+U) - (I + T*U) pages; the distinct frames are checked in pagemap
  pagemap        for both tools: planted pages - distinct PFNs mapped over the planted
                 ranges of all targets (/proc/PID/pagemap; the zero page, found with
                 KPF_ZERO_PAGE in /proc/kpageflags, and non-present pages cost no frame).
                 Exact and blind to other processes: it decides "saving reached"
  procksm        also (AnonPages_before - AnonPages_now) - (Shmem_now - Shmem_before) from
                 /proc/meminfo: machine-wide, so other processes' allocations show in it
  ksmd           saving = delta of pages_sharing + ksm_zero_pages in /sys/kernel/mm/ksm;
                 cross-checked with the same pagemap count, KPF_KSM in /proc/kpageflags,
                 general_profit and MemFree
  times          procksm: wall time of the child (100 %: if pagemap then shows the ideal)
                 and the first sample (every --poll s) where the targets' RssAnon drop
                 minus the pages of the memfds procksm holds is >= 95 % (the machine-wide
                 meminfo saving is sampled too, in the JSON); ksmd: first counter sample
                 (every --poll s after run=1 is written) at >= 95 % / 100 %
  CPU            procksm: the child's rusage (os.wait4), its JSON cpu_s alongside;
                 ksmd: utime+stime of the ksmd thread (/proc/PID/stat) up to the 100 % sample
  pauses         procksm's own measurement (JSON "pauses"); ksmd never stops a target

KSM settings are machine-wide: the ones written are restored to the values found at start
on every exit path (also SIGINT/SIGTERM/SIGHUP); the benchmark refuses to run while other
processes have KSM pages. Writes benchmarks/results/merge_vs_ksm.json (raw reps, medians).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this checkout's procksm

from benchmarks.harness.common import MIB_PAGES, PROCKSM, RESULTS, Json, swap_pairs
from benchmarks.harness.ksm import KsmControl
from benchmarks.harness.report import fmt, machine_line, verdict
from benchmarks.harness.runners import ksm_guarded, run_ksm, run_procksm
from benchmarks.harness.targets import build_planted, fresh_targets
from benchmarks.harness.workloads import Planted

# Goals of issue 3.
GOAL_SPEEDUP = 3.0  # ksmd (max speed) time to 100 % / procksm's
GOAL_SAVING = 0.99  # of the ideal saving
GOAL_P99_MS = 1.0
GOAL_MAX_MS = 5.0
TRUTH_SOURCES = {
    "saving_reached": "pagemap: planted pages - distinct PFNs over the planted ranges "
    "(zero page excluded via kpageflags), both tools",
    "procksm_saving_meminfo": "/proc/meminfo (AnonPages drop - Shmem growth), "
    "machine-wide: other processes' allocations show in it",
    "ksmd_saving_counters": "/sys/kernel/mm/ksm pages_sharing + ksm_zero_pages (deltas);"
    " also general_profit, MemFree, KPF_KSM frames in the census",
    "ksmd_fraction": "counters (they agree with pagemap when nobody else uses KSM)",
    "procksm_cpu": "rusage of the child from os.wait4 (ru_utime + ru_stime)",
    "ksmd_cpu": "utime+stime of ksmd in /proc/PID/stat, at the first sample >= 100 %",
    "procksm_times": "child wall time (100 %, if pagemap shows the ideal), first "
    "sample >= 95 % of targets' RssAnon drop - pages of memfds procksm holds",
    "ksmd_times": "first counter sample >= 95 % / 100 % after run=1 was written",
    "pauses": "procksm's own JSON 'pauses'",
}


# --------------------------------------------------------------------------------------
# Statistics and goals
# --------------------------------------------------------------------------------------


def med(runs: Sequence[Json], key: Callable[[Json], float | None]) -> float | None:
    values = [v for r in runs if "error" not in r and (v := key(r)) is not None]
    return statistics.median(values) if values else None


def summarize(runs: Sequence[Json], kind: str, pauses: str = "pauses") -> Json:
    ok = [r for r in runs if "error" not in r]
    s: Json = {"reps": len(runs), "failed": len(runs) - len(ok)}
    if not ok:
        return s
    s["t95_s"] = med(ok, lambda r: r["t95_s"])
    s["t100_s"] = med(ok, lambda r: r["t100_s"])
    s["reached_100_in"] = sum(r["t100_s"] is not None for r in ok)
    s["cpu_s"] = med(ok, lambda r: r["cpu_s"])
    s["targets_cpu_s"] = med(ok, lambda r: r.get("targets_cpu_s"))
    s["guards_cpu_s"] = med(ok, lambda r: r.get("guards_cpu_s"))
    s["fraction"] = med(ok, lambda r: r["fraction"])
    s["wall_s"] = med(ok, lambda r: r.get("wall_s"))
    s["checks"] = sorted({r["memory_check"] for r in ok})
    if kind == "procksm":
        s["saved_pages_meminfo"] = med(ok, lambda r: r["saved_pages_meminfo"])
        s["saved_pages_pagemap"] = med(ok, lambda r: r["saved_pages_pagemap"])
        s["cpu_s_procksm_json"] = med(ok, lambda r: r["cpu_s_procksm_json"])
        s["target_cpu_s_procksm_json"] = med(ok, lambda r: r.get("target_cpu_s_procksm_json"))
        for k in ("p50_ms", "p99_ms", "max_ms"):
            s[k] = med(ok, _pause_getter(pauses, k))
        s["worst_max_ms"] = max(r[pauses].get("max_ms", 0.0) for r in ok)
        s["pause_count"] = med(ok, _pause_getter(pauses, "count"))
        s["pauses_from"] = pauses
        if pauses == "busy_pauses":
            s["threads"] = max(r[pauses].get("threads", 1) for r in ok)
        s["max_rss_mib"] = med(ok, lambda r: r["max_rss_mib"])
    else:
        s["saved_pages_counters"] = med(ok, lambda r: r["saved_pages_counters"])
        s["saved_pages_pagemap"] = med(ok, lambda r: r["saved_pages_pagemap"])
        s["cpu_s_until_stopped"] = med(ok, lambda r: r["cpu_s_until_stopped"])
        s["converged_in"] = sum(r["converged"] for r in ok)
    return s


def _with_targets(s: Json) -> float | None:
    """procksm's CPU time, what its targets spent while it ran and what the madvise
    guards spent answering the guarded calls of its batches."""
    if s.get("cpu_s") is None:
        return None
    extra = float(s.get("targets_cpu_s") or 0.0) + float(s.get("guards_cpu_s") or 0.0)
    return float(s["cpu_s"]) + extra


def _pause_getter(field: str, key: str) -> Callable[[Json], float | None]:
    return lambda r: r[field].get(key)


def ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b == 0 else a / b


def evaluate(meds: Json, w: Planted) -> Json:
    p, k = meds.get("procksm", {}), meds.get("ksmd_max", {})
    busy = meds.get("procksm_busy", {})
    goals: Json = {}
    p_time = p.get("t100_s")
    speedup = ratio(k.get("t100_s"), p_time)
    goals["speed"] = {
        "goal": f"ksmd max time to 100 % / procksm's >= {GOAL_SPEEDUP:.0f}",
        "value": speedup,
        "shown": fmt(speedup, ".2f", "x"),
        "met": None if speedup is None else speedup >= GOAL_SPEEDUP,
    }
    # procksm's calls run in the targets' threads (the mmaps and populates ksmd makes
    # in its own time): their CPU time during the run counts with procksm's
    cpu = ratio(_with_targets(p), k.get("cpu_s"))
    goals["cpu"] = {
        "goal": "(procksm CPU s + its targets' and guards' during it) / ksmd CPU s (to 100 %) <= 1",
        "value": cpu,
        "shown": fmt(cpu, ".2f", "x"),
        "met": None if cpu is None else cpu <= 1.0,
    }
    frac = p.get("fraction")
    goals["saving"] = {
        "goal": f"procksm saving >= {GOAL_SAVING:.0%} of the ideal (pagemap)",
        "value": frac,
        "shown": "-" if frac is None else f"{100 * frac:.2f} %",
        "met": None if frac is None else frac >= GOAL_SAVING,
    }
    for name, s in (("pauses", p), ("pauses_busy", busy)):
        p99, mx = s.get("p99_ms"), s.get("max_ms")
        who = "main run" if name == "pauses" else f"busy target, {s.get('threads', '?')} threads"
        goals[name] = {
            "goal": f"p99 <= {GOAL_P99_MS:g} ms, max <= {GOAL_MAX_MS:g} ms ({who})",
            "value": {"p99_ms": p99, "max_ms": mx, "worst_max_ms": s.get("worst_max_ms")},
            "shown": f"p99 {fmt(p99, '.2f')} max {fmt(mx, '.2f')} "
            f"(worst {fmt(s.get('worst_max_ms'), '.2f')}) ms",
            "met": None if p99 is None or mx is None else p99 <= GOAL_P99_MS and mx <= GOAL_MAX_MS,
        }
    return goals


# --------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------


def _print_header(machine: str, w: Planted, a: argparse.Namespace) -> None:
    ideal = w.ideal_pages
    print(f"\nmachine   {machine}")
    print(
        f"workload  {w.targets} targets x ({w.identical / MIB_PAGES:.0f} MiB identical + "
        f"{w.zero / MIB_PAGES:.0f} MiB zero + {w.unique / MIB_PAGES:.0f} MiB unique) = "
        f"{w.planted_pages / MIB_PAGES:.0f} MiB planted"
    )
    print(
        f"ideal     {ideal:,} pages = {ideal / MIB_PAGES:.0f} MiB saved (distinct frames "
        f"{w.planted_pages:,} - distinct non-zero contents {w.distinct_contents:,})"
    )
    print(f"medians of {a.reps} reps; ksmd with use_zero_pages={a.use_zero_pages}\n")


def _print_table(w: Planted, meds: Json, a: argparse.Namespace) -> None:
    """procksm, ksmd max (and ksmd defaults), with the ratios to procksm."""
    p, k, d = meds.get("procksm", {}), meds.get("ksmd_max", {}), meds.get("ksmd_defaults")
    dd: Json = d or {}
    cols = ["procksm", "ksmd max", "ksmd/procksm"]
    if d is not None:
        cols += ["ksmd defaults", "defaults/procksm"]
    print(f"{'':34}" + "".join(f"{c:>17}" for c in cols))

    def row(label: str, pv: float | None, kv: float | None, dv: float | None, spec: str) -> None:
        cells = [fmt(pv, spec), fmt(kv, spec), fmt(ratio(kv, pv), ".2f", "x")]
        if d is not None:
            cells += [fmt(dv, spec), fmt(ratio(dv, pv), ".2f", "x")]
        print(f"{label:34}" + "".join(f"{c:>17}" for c in cells))

    row("time to 95 % (s)", p.get("t95_s"), k.get("t95_s"), dd.get("t95_s"), ".2f")
    row("time to 100 % (s)", p.get("t100_s"), k.get("t100_s"), dd.get("t100_s"), ".2f")
    row("CPU s (rusage / ksmd stat)", p.get("cpu_s"), k.get("cpu_s"), dd.get("cpu_s"), ".2f")
    tp, tk, td = (s.get("targets_cpu_s") for s in (p, k, dd))
    row("targets' CPU s during the run", tp, tk, td, ".2f")
    gp, gk, gd = (s.get("guards_cpu_s") for s in (p, k, dd))
    row("madvise guards' CPU s during it", gp, gk, gd, ".2f")
    pr, kr, dr = (
        None if s.get("t100_s") is None else w.ideal_pages / MIB_PAGES / s["t100_s"]
        for s in (p, k, dd)
    )
    row("saving rate to 100 % (MiB/s)", pr, kr, dr, ".0f")
    pf, kf, df = (None if s.get("fraction") is None else 100 * s["fraction"] for s in (p, k, dd))
    row("saving reached (% of ideal)", pf, kf, df, ".2f")
    print(
        f"{'pauses p50/p99/max (ms)':34}{fmt(p.get('p50_ms'), '.3f')}/{fmt(p.get('p99_ms'), '.3f')}"
        f"/{fmt(p.get('max_ms'), '.3f')}   (ksmd stops no target)"
    )
    if d is not None and dd.get("reps") and dd.get("converged_in", 0) < dd["reps"]:
        print(
            f"  ksmd defaults: not converged in {a.ksm_defaults_timeout:.0f} s in "
            f"{dd['reps'] - dd.get('converged_in', 0)} of {dd['reps']} reps; reached "
            f"{fmt(100 * (dd.get('fraction') or 0), '.1f')} % (median)"
        )


def _print_busy(w: Planted, busy: Json, a: argparse.Namespace) -> None:
    print(
        f"\nprocksm with {a.busy_targets} of {w.targets} targets running "
        f"{a.busy_threads + 1} threads ({a.busy_threads} spinning): wall "
        f"{fmt(busy.get('wall_s'))} s, CPU {fmt(busy.get('cpu_s'))} s, saving "
        f"{fmt(100 * (busy.get('fraction') or 0), '.2f')} %;\n  the busy targets' pauses "
        f"p50/p99/max {fmt(busy.get('p50_ms'), '.3f')}/{fmt(busy.get('p99_ms'), '.3f')}/"
        f"{fmt(busy.get('max_ms'), '.3f')} ms "
        f"(worst max of {busy.get('reps')} reps {fmt(busy.get('worst_max_ms'), '.3f')})"
    )


def _print_sources() -> None:
    print("\nsources (procksm | ksmd):")
    print(
        "  time to 100 %   child wall time, if pagemap then shows the ideal | first 50-ms "
        "sample of /sys/kernel/mm/ksm pages_sharing + ksm_zero_pages >= ideal"
    )
    print(
        "  time to 95 %    first 50-ms sample of the targets' RssAnon drop (/proc/PID/status) "
        "- pages of procksm's memfds | same KSM counters"
    )
    print(
        "  CPU s           child's rusage (os.wait4) | ksmd's utime+stime "
        "(/proc/PID/stat) at the 100 % sample"
    )
    print(
        "  saving reached  pagemap: planted pages - distinct PFNs (zero page excluded) | "
        "KSM counters"
    )
    print("  pauses          procksm's own JSON | - (ksmd stops no target)")


def _print_cross_checks(meds: Json) -> None:
    p, k = meds.get("procksm", {}), meds.get("ksmd_max", {})
    print("cross-checks:")
    if p:
        print(
            f"  procksm  saving: pagemap {fmt(p.get('saved_pages_pagemap'), ',.0f')}, "
            f"/proc/meminfo {fmt(p.get('saved_pages_meminfo'), ',.0f')} (machine-wide) "
            f"pages; CPU: rusage {fmt(p.get('cpu_s'))} s, its JSON cpu_s "
            f"{fmt(p.get('cpu_s_procksm_json'))} s, in the targets (its JSON) "
            f"{fmt(p.get('target_cpu_s_procksm_json'))} s; "
            f"max RSS {fmt(p.get('max_rss_mib'), '.0f')} MiB"
        )
    if k:
        print(
            f"  ksmd     saving: counters {fmt(k.get('saved_pages_counters'), ',.0f')}, pagemap "
            f"{fmt(k.get('saved_pages_pagemap'), ',.0f')} pages; CPU until run=0 "
            f"{fmt(k.get('cpu_s_until_stopped'))} s"
        )
    checks = {name: s.get("checks") for name, s in meds.items()}
    print(f"  targets' own memory check after merging: {checks}")
    failed = {name: s["failed"] for name, s in meds.items() if s.get("failed")}
    if failed:
        print(f"  FAILED runs: {failed} (see the JSON file for the errors)")


def print_report(machine: str, w: Planted, meds: Json, goals: Json, a: argparse.Namespace) -> None:
    _print_header(machine, w, a)
    _print_table(w, meds, a)
    busy = meds.get("procksm_busy")
    if busy:
        _print_busy(w, busy, a)
    _print_sources()
    _print_cross_checks(meds)
    print("\ngoals:")
    for name, g in goals.items():
        print(f"  {name:12} {verdict(g['met']):7} {g['shown']:38} {g['goal']}")


# --------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--targets", type=int, default=4)
    ap.add_argument("--identical", type=int, default=65536, help="pages (65536 = 256 MiB)")
    ap.add_argument("--zero", type=int, default=16384, help="pages")
    ap.add_argument("--unique", type=int, default=16384, help="pages")
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument(
        "--busy-threads",
        type=int,
        default=7,
        help="spinning threads per busy target in the extra procksm run (0: skip that run)",
    )
    ap.add_argument("--busy-targets", type=int, default=1, help="how many targets spin in that run")
    ap.add_argument("--ksm-timeout", type=float, default=120.0, help="bound on a ksmd max run")
    ap.add_argument("--ksm-defaults", action="store_true", help="also run ksmd at its defaults")
    ap.add_argument("--ksm-defaults-timeout", type=float, default=180.0)
    ap.add_argument("--use-zero-pages", type=int, choices=(0, 1), default=1)
    ap.add_argument("--poll", type=float, default=0.05, help="sampling period, s")
    ap.add_argument("--only", choices=("all", "procksm", "ksmd"), default="all")
    ap.add_argument(
        "--procksm",
        default=str(PROCKSM),
        help="the procksm executable (extra arguments for merge: --procksm-arg)",
    )
    ap.add_argument("--procksm-arg", action="append", default=[], help="passed to merge")
    ap.add_argument("--output", type=Path, default=RESULTS / "merge_vs_ksm.json")
    a = ap.parse_args(argv)
    if a.reps < 1 or a.targets < 2:
        ap.error("--reps >= 1 and --targets >= 2")
    return a


def variants_of(a: argparse.Namespace) -> list[str]:
    variants: list[str] = []
    if a.only in ("all", "procksm"):
        variants.append("procksm")
    if a.only in ("all", "ksmd"):
        variants.append("ksmd_max")
    if a.only in ("all", "procksm") and a.busy_threads > 0:
        variants.append("procksm_busy")
    if a.only in ("all", "ksmd") and a.ksm_defaults:
        variants.append("ksmd_defaults")
    return variants


def run_variant(
    v: str, w: Planted, exe: Path, ctl: KsmControl | None, a: argparse.Namespace
) -> Json:
    """One run on fresh targets; after a ksmd run, what is left is unmerged (stale stable
    nodes too) and ksmd stopped, so that the next run starts from an empty, idle KSM."""
    kind = "ksmd" if v.startswith("ksmd") else "procksm"
    busy = a.busy_targets if v == "procksm_busy" else 0
    try:
        start = partial(w.start, exe, busy, a.busy_threads, mergeable=kind == "ksmd")
        with fresh_targets(start) as targets:
            if kind == "procksm":
                return run_procksm([a.procksm, *a.procksm_arg], targets, w.ideal_pages, a.poll)
            assert ctl is not None
            fast = v == "ksmd_max"
            return run_ksm(
                ctl,
                targets,
                w.ideal_pages,
                w.zero > 0,
                pages_to_scan=100000 if fast else 100,
                sleep_ms=0 if fast else 20,
                use_zero_pages=a.use_zero_pages,
                timeout_s=a.ksm_timeout if fast else a.ksm_defaults_timeout,
                poll_s=a.poll,
            )
    finally:
        if ctl and kind == "ksmd":
            ctl.unmerge_all()
            ctl.wait_idle()


def run_reps(
    w: Planted, exe: Path, ctl: KsmControl | None, variants: list[str], a: argparse.Namespace
) -> list[Json]:
    reps: list[Json] = []
    with ksm_guarded(ctl):
        for rep in range(a.reps):
            # alternate which tool goes first, so neither always gets the cooler machine
            order = variants if rep % 2 == 0 else swap_pairs(variants)
            results: Json = {}
            for v in order:
                t0 = time.perf_counter()
                results[v] = r = run_variant(v, w, exe, ctl, a)
                print(_one_line(rep, v, r, time.perf_counter() - t0), flush=True)
            reps.append(results)
    return reps


def main(argv: Sequence[str] | None = None) -> int:
    a = parse_args(argv)
    if os.geteuid() != 0:
        print("merge_vs_ksm: needs root (ptrace, pagemap PFNs, KSM sysfs)", file=sys.stderr)
        return 1
    w = Planted(a.targets, a.identical, a.zero, a.unique, a.seed)
    exe = build_planted()
    machine = machine_line()
    variants = variants_of(a)
    ctl = KsmControl() if any(v.startswith("ksmd") for v in variants) else None
    reps = run_reps(w, exe, ctl, variants, a)
    meds = {
        v: summarize(
            [r[v] for r in reps],
            "ksmd" if v.startswith("ksmd") else "procksm",
            "busy_pauses" if v == "procksm_busy" else "pauses",
        )
        for v in variants
    }
    goals = evaluate(meds, w)
    print_report(machine, w, meds, goals, a)
    doc = {
        "machine": machine,
        "workload": {**w.as_json(), "planted_pages": w.planted_pages},
        "ideal_saved_pages": w.ideal_pages,
        "ideal_formula": "targets*(identical+zero+unique) - (identical + targets*unique)",
        "options": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(a).items()},
        "ksm_settings_found": ctl.found if ctl else None,
        "truth_sources": TRUTH_SOURCES,
        "medians": meds,
        "goals": goals,
        "reps": reps,
    }
    a.output.parent.mkdir(parents=True, exist_ok=True)
    a.output.write_text(json.dumps(doc, indent=1) + "\n")
    print(f"\nwrote {a.output}")
    return 0


def _one_line(rep: int, variant: str, r: Json, took: float) -> str:
    if "error" in r:
        return f"rep {rep + 1} {variant:14} ERROR (exit {r.get('exit_code')}): {r['error'][-300:]}"
    if "counters" in r:
        extra = f" full_scans {r['counters']['full_scans']}"
    else:
        pauses = r.get("busy_pauses") or r.get("pauses") or {}
        who = "busy target" if r.get("busy_pauses") else "pauses"
        extra = f" {who} p99 {pauses.get('p99_ms')} max {pauses.get('max_ms')} ms"
    return (
        f"rep {rep + 1} {variant:14} t95 {fmt(r['t95_s'])} s  t100 {fmt(r['t100_s'])} s  "
        f"CPU {fmt(r['cpu_s'])} s  saving {100 * r['fraction']:.2f} %{extra}  "
        f"check {r['memory_check']}  ({took:.0f} s)"
    )


if __name__ == "__main__":
    try:
        raise SystemExit(main())
    except KeyboardInterrupt:
        print("merge_vs_ksm: interrupted; targets killed, KSM settings restored", file=sys.stderr)
        raise SystemExit(130) from None
