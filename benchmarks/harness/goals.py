"""suite.py's goals (issue 8), judged on the medians of the same run.

Each goal is ``{"goal": what is asked, "value": the number, "shown": how it is printed,
"met": True, False or None (undecided)}``.
"""

from __future__ import annotations

from typing import Any

from benchmarks.harness.common import Json
from benchmarks.harness.report import cell, fmt, fmt_ratio, ratio
from benchmarks.harness.workloads import Sizes

GOAL_SPEEDUP = 3.0
GOAL_SAVING = 0.99
GOAL_P99_MS = 1.0
GOAL_BYTES_PER_PAGE = 32.0


def _goal(goal: str, value: Any, shown: str, met: bool | None) -> Json:
    return {"goal": goal, "value": value, "shown": shown, "met": met}


def _speed_met(rv: tuple[float | None, str]) -> bool | None:
    """>= GOAL_SPEEDUP; undecided when only a bound on the wrong side of it is known."""
    v, bound = rv
    if v is None or (bound == ">" and v < GOAL_SPEEDUP) or (bound == "<" and v >= GOAL_SPEEDUP):
        return None
    return v >= GOAL_SPEEDUP


def _speed_max(w1: Json, sizes: Sizes) -> Json:
    m, km = w1.get("merge", {}), w1.get("ksmd_max", {})
    sp = ratio(km, m, "t100_s", sizes.max_timeout_s) if m and km else (None, "")
    goal = "W1: ksmd max time to 100 % / procksm merge's >= 3"
    return _goal(goal, sp[0], fmt_ratio(sp), _speed_met(sp))


def _cpu_max(w1: Json) -> Json:
    """procksm's calls run in its targets' threads (the mmaps and populates ksmd makes in
    its own time): what the targets spent during the merge counts with procksm's CPU, and
    what the madvise guards spent answering those calls."""
    m, km = w1.get("merge", {}), w1.get("ksmd_max", {})
    own = m.get("cpu_s")
    in_targets = (m.get("targets_cpu_s") or 0.0) + (m.get("guards_cpu_s") or 0.0)
    whole = {**m, "cpu_s": None if own is None else own + in_targets}
    cpu = ratio(whole, km, "cpu_s", None) if m and km else (None, "")
    return _goal(
        "W1: procksm merge CPU s, its targets' and the madvise guards' during it included, "
        "<= ksmd max CPU s (to 100 %)",
        cpu[0],
        fmt_ratio(cpu) + f" (procksm {fmt(own)} + targets and guards {fmt(in_targets)} s / ksmd "
        f"{fmt(km.get('cpu_s'))} s)",
        None if cpu[0] is None else cpu[0] <= 1.0,
    )


def _speed_equal_cpu(w1: Json, sizes: Sizes) -> Json:
    """Met only at the CPU actually spent (the daemon's whole process tree, to its
    95 %, start-up included): a daemon asked for ksmd's share that spends more is not
    "at equal CPU", however fast (issue 16: 'met 6.68x' was printed for 0.69 CPU s
    against ksmd's 0.05)."""
    kd, de = w1.get("ksmd_defaults", {}), w1.get("daemon_eqcpu", {})
    b1 = sizes.bound_of("W1")
    eq = ratio(kd, de, "t95_s", b1, b1) if kd and de else (None, "")
    met = _speed_met(eq)
    cpu_d, cpu_k = de.get("cpu_s"), kd.get("cpu_s")
    if met and cpu_d is not None and cpu_k is not None and cpu_d > cpu_k:
        met = False
    shown = f"{fmt_ratio(eq)} (CPU s {fmt(cpu_d)} vs {fmt(cpu_k)})"
    if eq[0] is None and de.get("fraction") is not None and kd.get("fraction") is not None:
        # neither reached 95 % within the bound: compare what each had saved by then
        shown = (
            f"neither at 95 % in {b1:.0f} s; saved {cell(de, 'fraction', '%')} "
            f"vs ksmd {cell(kd, 'fraction', '%')} % (CPU s {fmt(de.get('cpu_s'))} vs "
            f"{fmt(kd.get('cpu_s'))})"
        )
        met = False if de["fraction"] < kd["fraction"] else None
    goal = (
        "W1: at ksmd defaults' CPU share, ksmd time to 95 % / procksm daemon's >= 3, "
        "spending no more CPU than ksmd"
    )
    return _goal(goal, eq[0], shown, met)


def _saving_w1(w1: Json) -> Json:
    fr = [w1.get(v, {}).get("fraction") for v in ("merge", "daemon")]
    return _goal(
        "W1: procksm saving >= 99 % of the ideal (pagemap), merge and daemon",
        fr,
        " / ".join("-" if f is None else f"{100 * f:.2f} %" for f in fr),
        None if None in fr else all(f >= GOAL_SAVING for f in fr if f is not None),
    )


def _w3_volatile(w3: Json) -> Json:
    d3 = w3.get("daemon", {})
    ks = [w3.get(k, {}) for k in ("ksmd_max", "ksmd_defaults")]
    oks: list[bool | None] = []
    for k in ks:
        if d3.get("fraction") is None or k.get("fraction") is None:
            oks.append(None)
            continue
        more = d3["fraction"] > k["fraction"]
        th_d, th_k = d3.get("thrash"), k.get("thrash")
        less = th_d is not None and th_k is not None and th_d < th_k
        oks.append(more and less)
    return _goal(
        "W3: procksm daemon saves more than ksmd (max and defaults) with less thrash",
        oks,
        "saving "
        + " vs ".join(f"{cell(x, 'fraction', '%')} %" for x in (d3, *ks))
        + ", thrash "
        + " vs ".join(fmt(x.get("thrash"), ".3f") for x in (d3, *ks)),
        None if None in oks else all(oks),
    )


def _pause_p99(workloads: Json) -> Json:
    worst = None
    where = ""
    for wname, wd in workloads.items():
        for v in ("merge", "daemon"):
            p99 = wd.get("medians", {}).get(v, {}).get("p99_ms")
            if p99 is not None and (worst is None or p99 > worst):
                worst, where = p99, f"{wname} {v}"
    return _goal(
        "pause p99 <= 1 ms (worst median over workloads, merge and daemon)",
        worst,
        f"{fmt(worst, '.2f')} ms ({where})",
        None if worst is None else worst <= GOAL_P99_MS,
    )


def _memory_per_page(scaling: Json) -> Json:
    slopes = [scaling.get(f"{t}_rss_bytes_per_page_slope") for t in ("merge", "daemon")]
    return _goal(
        "procksm memory <= 32 bytes per scanned page (slope of peak RSS over the size series; "
        "merge / daemon)",
        slopes,
        " / ".join(f"{fmt(x, '.1f')}" for x in slopes) + " B/page",
        None if None in slopes else all(x <= GOAL_BYTES_PER_PAGE for x in slopes if x is not None),
    )


def goals_of(res: Json, sizes: Sizes) -> Json:
    """Every goal of issue 8 on a results document (W3's only when W3 ran)."""
    wl = res["workloads"]
    w1 = wl.get("W1", {}).get("medians", {})
    g: Json = {
        "speed_max": _speed_max(w1, sizes),
        "cpu_max": _cpu_max(w1),
        "speed_equal_cpu": _speed_equal_cpu(w1, sizes),
        "saving_W1": _saving_w1(w1),
    }
    w3 = wl.get("W3", {}).get("medians", {})
    if w3:
        g["W3_volatile"] = _w3_volatile(w3)
    g["pause_p99"] = _pause_p99(wl)
    g["memory_per_page"] = _memory_per_page(res.get("scaling", {}))
    return g
