"""suite.py's runs: each workload under each tool, repetitions, medians, scaling.

A run of the suite is the harness's runner (``runners``) plus what the suite adds around
it: the saving judged by pagemap over what the workload counts (``saved_truth``), W3's
thrash window, procksm's memory per GiB of targets.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.harness import report
from benchmarks.harness.common import GIB_PAGES, MIB_PAGES, Json, swap_pairs
from benchmarks.harness.ksm import KsmControl
from benchmarks.harness.runners import run_daemon as run_attach
from benchmarks.harness.runners import run_ksm, run_procksm
from benchmarks.harness.targets import Target, fresh_targets
from benchmarks.harness.truth import (
    census,
    churn_threads,
    content_ideal,
    ksm_stat,
    minflt,
    region_saved,
    rss_anon_pages,
)
from benchmarks.harness.workloads import Sizes, Workload, scaling_workload

BASE_VARIANTS = ("merge", "ksmd_max", "daemon", "ksmd_defaults")
RUN_ERRORS = (RuntimeError, OSError, subprocess.SubprocessError)


@dataclass
class SuiteRun:
    """What every run of one suite invocation shares."""

    ctl: KsmControl
    procksm: Sequence[str]
    sizes: Sizes
    poll_s: float
    scaling_reps: int = 1


def order_for(rep: int, wname: str) -> list[str]:
    """The variants of one repetition: pairwise swapped in odd ones; W1 adds daemon_eqcpu
    right after ksmd_defaults (it takes that run's CPU share)."""
    base = list(BASE_VARIANTS) if rep % 2 == 0 else swap_pairs(BASE_VARIANTS)
    if wname == "W1":
        base.insert(base.index("ksmd_defaults") + 1, "daemon_eqcpu")
    return base


# --------------------------------------------------------------------------------------
# One run
# --------------------------------------------------------------------------------------


def thrash_window(w: Workload, targets: Sequence[Target], window_s: float, r: Json) -> None:
    """W3: with the tool still at work (or after a one-shot merge), count the copy-on-write
    breaks in the churn region for window_s: minor faults of the churn threads."""
    assert w.volatile_region is not None
    ths = r["churn_threads"]
    f0 = sum(minflt(p, t) for p, t in ths)
    t0 = time.perf_counter()
    merged: list[int] = []
    while time.perf_counter() - t0 < window_s:
        merged.append(region_saved(census(targets), [w.volatile_region]))
        time.sleep(0.5)
    f1 = sum(minflt(p, t) for p, t in ths)
    elapsed = time.perf_counter() - t0
    end = census(targets)
    saved_end = end["saved_pages"]
    breaks = f1 - f0
    r["thrash"] = {
        "window_s": elapsed,
        "cow_breaks": breaks,
        "cow_breaks_since_start": f1 - r["churn_minflt_start"],
        "cow_breaks_per_min": breaks / elapsed * 60,
        "churn_saved_pages_mean": statistics.mean(merged) if merged else 0,
        "saved_pages_end": saved_end,
        "stable_saved_pages_end": region_saved(end, w.stable_regions),
        # the unit: COW breaks per merged page per minute
        "breaks_per_merged_page_per_min": breaks / elapsed * 60 / max(saved_end, 1),
    }


def _prepare(w: Workload, targets: Sequence[Target]) -> Json:
    r: Json = {"targets_rss_anon_pages": sum(rss_anon_pages(t.pid) for t in targets)}
    if w.volatile_region:
        r["churn_threads"] = churn_threads(targets)
        r["churn_minflt_start"] = sum(minflt(p, t) for p, t in r["churn_threads"])
    return r


def saved_truth(w: Workload, before: Json, after: Json) -> int:
    """Pages saved by pagemap: planted pages - distinct frames (W3: the stable regions
    only); real programs: frames freed (their VMAs also hold non-present pages)."""
    if w.real:
        return int(before["distinct_frames"] - after["distinct_frames"])
    if w.stable_regions:
        return region_saved(after, w.stable_regions)
    return int(after["saved_pages"])


def _finish(w: Workload, r: Json) -> Json:
    """Pagemap decides the saving reached, for every tool."""
    after = r.get("census_after")
    if after is not None:
        saved = saved_truth(w, r["census_before"], after)
        r["saved_pages_truth"] = saved
        r["fraction_pagemap"] = saved / w.ideal_pages if w.ideal_pages else None
    gib = r.get("targets_rss_anon_pages", 0) / GIB_PAGES
    if r.get("max_rss_mib") is not None and gib:
        r["rss_mib_per_gib"] = r["max_rss_mib"] / gib
    if w.real:  # per-VMA census detail of real programs: not worth the JSON size
        for k in ("census_before", "census_after"):
            if k in r:
                r[k].pop("regions", None)
    return r


def run_merge(s: SuiteRun, w: Workload, targets: Sequence[Target]) -> Json:
    pre = _prepare(w, targets)
    r = run_procksm(s.procksm, targets, w.ideal_pages, s.poll_s)
    r.update(pre)
    if "error" not in r and w.volatile_region:
        thrash_window(w, targets, s.sizes.thrash_window_s, r)
    r = _finish(w, r)
    if w.real and "error" not in r:  # 100 %: the exit, if the frames freed reach the ideal
        r["t100_s"] = r["wall_s"] if r["saved_pages_truth"] >= w.ideal_pages else None
    return r


def run_ksmd(s: SuiteRun, w: Workload, targets: Sequence[Target], fast: bool) -> Json:
    pre = _prepare(w, targets)
    r = run_ksm(
        s.ctl,
        targets,
        w.ideal_pages,
        w.has_zero_pages,
        pages_to_scan=100000 if fast else 100,
        sleep_ms=0 if fast else 20,
        use_zero_pages=1,
        timeout_s=s.sizes.max_timeout_s if fast else s.sizes.bound_of(w.name),
        poll_s=s.poll_s,
    )
    r.update(pre)
    r["cpu_share_pct"] = 100 * r["cpu_s_until_stopped"] / max(r["stopped_at_s"], 1e-9)
    if w.real:
        r["merge_any"] = [ksm_stat(t.pid).get("ksm_merge_any") for t in targets]
    if w.volatile_region:
        s.ctl.start()  # ksmd goes on at the same speed (run=0 kept everything merged)
        try:
            thrash_window(w, targets, s.sizes.thrash_window_s, r)
        finally:
            s.ctl.stop()
    return _finish(w, r)


def run_daemon(
    s: SuiteRun,
    w: Workload,
    targets: Sequence[Target],
    extra: Sequence[str] = (),
    bound_s: float | None = None,
) -> Json:
    """`procksm attach` until the ideal (RssAnon drop - its memfd pages, confirmed by
    pagemap) or the bound (runners.run_daemon); W3: the thrash window before it stops."""

    def thrash(r: Json) -> None:
        thrash_window(w, targets, s.sizes.thrash_window_s, r)

    r = run_attach(
        targets,
        w.ideal_pages,
        s.procksm,
        poll_s=s.poll_s,
        bound_s=s.sizes.bound_of(w.name) if bound_s is None else bound_s,
        extra=extra,
        saved_truth=lambda before, after: saved_truth(w, before, after),
        before_stop=thrash if w.volatile_region else None,
        into=_prepare(w, targets),
    )
    return _finish(w, r)


def _run_tool(s: SuiteRun, w: Workload, v: str, targets: Sequence[Target], done: Json) -> Json:
    """Variant ``v`` on started targets; ``done``: the repetition's runs so far."""
    if v == "merge":
        r = run_merge(s, w, targets)
    elif v == "daemon":
        r = run_daemon(s, w, targets)
    elif v == "daemon_eqcpu":
        share = done.get("ksmd_defaults", {}).get("cpu_share_pct")
        pct = max(0.5, round(share or 2.0, 1))
        r = run_daemon(s, w, targets, ["--cpu-limit", str(pct)])
        r["cpu_limit_pct"] = pct
    else:
        r = run_ksmd(s, w, targets, v == "ksmd_max")
    return r


def run_variant(s: SuiteRun, w: Workload, v: str, done: Json) -> Json:
    """One run on fresh targets (they opt in to KSM for ksmd), stopped afterwards; a
    ksmd run then unmerges everything and waits for ksmd to be idle."""
    is_ksm = v.startswith("ksmd")
    r: Json
    ideal_info = None
    try:
        with fresh_targets(lambda: w.start(is_ksm)) as targets:
            time.sleep(0.3 if not w.real else 1.0)
            if w.real:  # real programs: the ideal of these very processes
                ideal_info = content_ideal(targets)
                w.ideal_pages = ideal_info["ideal_pages"]
            r = _run_tool(s, w, v, targets, done)
    except RUN_ERRORS as exc:
        r = {"error": f"{type(exc).__name__}: {exc}"}
    finally:
        if is_ksm:
            s.ctl.unmerge_all()
            s.ctl.wait_idle()
    r["ideal_pages"] = w.ideal_pages
    r["loadavg_after"] = os.getloadavg()  # the machine is shared
    if ideal_info is not None:
        r["content_census"] = ideal_info
    return r


def run_workload(s: SuiteRun, w: Workload) -> Json:
    """Every repetition of every variant on one workload: its medians and raw runs."""
    print(
        f"\n{w.name}: {w.description}; ideal {w.ideal_pages:,} pages "
        f"({w.ideal_pages / MIB_PAGES:.0f} MiB, {w.ideal_source})",
        flush=True,
    )
    reps: list[Json] = []
    for rep in range(s.sizes.reps):
        results: Json = {}
        for v in order_for(rep, w.name):
            t0 = time.perf_counter()
            results[v] = r = run_variant(s, w, v, results)
            print(report.one_line(w.name, rep, v, r, time.perf_counter() - t0), flush=True)
        reps.append(results)
    meds = {v: summarize([r[v] for r in reps if v in r]) for v in reps[0]}
    return {
        "description": w.description,
        "ideal_pages": statistics.median(
            r[v]["ideal_pages"] for r in reps for v in r if "ideal_pages" in r[v]
        ),
        "ideal_source": w.ideal_source,
        "medians": meds,
        "reps": reps,
    }


# --------------------------------------------------------------------------------------
# Medians
# --------------------------------------------------------------------------------------


def _get(r: Json, path: str) -> Any:
    cur: Any = r
    for part in path.split("."):
        if not isinstance(cur, dict) or part not in cur:
            return None
        cur = cur[part]
    return cur


KEYS = {
    "t95_s": "t95_s",
    "t100_s": "t100_s",
    "cpu_s": "cpu_s",
    "targets_cpu_s": "targets_cpu_s",  # the targets' own CPU during the run
    "guards_cpu_s": "guards_cpu_s",  # the madvise guards' CPU during a merge
    "fraction": "fraction_pagemap",
    "saved_pages_meminfo": "saved_pages_meminfo",
    "p50_ms": "pauses.p50_ms",
    "p99_ms": "pauses.p99_ms",
    "max_ms": "pauses.max_ms",
    "max_rss_mib": "max_rss_mib",
    "rss_mib_per_gib": "rss_mib_per_gib",
    "thrash": "thrash.breaks_per_merged_page_per_min",
    "cow_breaks_per_min": "thrash.cow_breaks_per_min",
    "churn_saved_pages_mean": "thrash.churn_saved_pages_mean",
    "cpu_share_pct": "cpu_share_pct",
    "stopped_at_s": "stopped_at_s",
}


def summarize(runs: Sequence[Json]) -> Json:
    ok = [r for r in runs if "error" not in r]
    s: Json = {"reps": len(runs), "failed": len(runs) - len(ok)}
    for name, path in KEYS.items():
        vals = [v for r in ok if (v := _get(r, path)) is not None]
        s[name] = statistics.median(vals) if vals else None
    s["reached_95_in"] = sum(r.get("t95_s") is not None for r in ok)
    s["reached_100_in"] = sum(r.get("t100_s") is not None for r in ok)
    s["checks"] = sorted({str(r.get("memory_check")) for r in ok})
    return s


# --------------------------------------------------------------------------------------
# Scaling
# --------------------------------------------------------------------------------------


def _scaling_run(s: SuiteRun, tool: str, sw: Workload) -> Json:
    """One scaling run of ``tool`` on fresh targets, without its bulky detail."""
    r: Json
    try:
        with fresh_targets(lambda: sw.start(tool == "ksmd_max")) as targets:
            if tool == "merge":
                r = run_procksm(s.procksm, targets, sw.ideal_pages, s.poll_s)
            elif tool == "daemon":
                bound = s.sizes.scaling_daemon_bound_s
                r = run_daemon(s, sw, targets, ["--cpu-limit", "0"], bound)
            else:
                zero = sw.has_zero_pages
                r = run_ksm(s.ctl, targets, sw.ideal_pages, zero, 100000, 0, 1, 300.0, s.poll_s)
    except RUN_ERRORS as exc:
        r = {"error": f"{type(exc).__name__}: {exc}"}
    finally:
        if tool == "ksmd_max":
            s.ctl.unmerge_all()
            s.ctl.wait_idle()
    for k in ("census_before", "census_after", "samples", "totals", "stats"):
        r.pop(k, None)
    return r


def _scaling_medians(runs: Sequence[Json], gib: float, planted_pages: int) -> Json:
    ok = [r for r in runs if "error" not in r]
    med: Json = {"reps": len(runs), "failed": len(runs) - len(ok)}
    for k in ("t100_s", "t95_s", "cpu_s", "fraction", "max_rss_mib", "wall_s"):
        vals = [r[k] for r in ok if r.get(k) is not None]
        med[k] = statistics.median(vals) if vals else None
    t = med["t100_s"]
    med["s_per_gib"] = None if t is None else t / gib
    med["cpu_s_per_gib"] = None if med["cpu_s"] is None else med["cpu_s"] / gib
    if med.get("max_rss_mib") is not None:
        med["rss_bytes_per_page"] = med["max_rss_mib"] * 2**20 / planted_pages
    return med


def _rss_slope(rows: Sequence[Json], tool: str) -> float | None:
    """procksm's memory per page: the slope of its peak RSS over the size series (what
    grows with the pages, without the interpreter's fixed ~40-70 MiB)."""
    size_rows = [r for r in rows if r["series"] == "size" and r.get(tool, {}).get("max_rss_mib")]
    if len(size_rows) < 2:
        return None
    lo, hi = size_rows[0], size_rows[-1]
    dp = hi["pages"] - lo["pages"]
    if dp <= 0:
        return None
    return float((hi[tool]["max_rss_mib"] - lo[tool]["max_rss_mib"]) * 2**20 / dp)


def run_scaling(s: SuiteRun, exe: Path) -> Json:
    """merge and ksmd max at every point; the daemon (no CPU cap) on the size series, for
    its memory per page (it keeps per-page state between scans, merge does not)."""
    rows = []
    for series, n, per in s.sizes.scaling_points():
        shape, sw = scaling_workload(exe, n, per)
        row: Json = {"series": series, "targets": n, "pages": shape.planted_pages}
        row["gib"] = shape.planted_pages / GIB_PAGES
        row["ideal_pages"] = shape.ideal_pages
        tools = ["merge", "ksmd_max"] + (["daemon"] if series == "size" else [])
        for tool in tools:
            runs = [_scaling_run(s, tool, sw) for _ in range(s.scaling_reps)]
            row[tool] = _scaling_medians(runs, row["gib"], shape.planted_pages)
            row[f"{tool}_runs"] = runs
        print(report.scaling_line(row), flush=True)
        rows.append(row)
    out: Json = {"rows": rows}
    for tool in ("merge", "daemon"):
        out[f"{tool}_rss_bytes_per_page_slope"] = _rss_slope(rows, tool)
    return out
