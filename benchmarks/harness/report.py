"""Formatting the results: numbers, ratios and verdicts shared by the scripts, and
suite.py's lines, table and README markdown."""

from __future__ import annotations

import os
import platform
import subprocess
from collections.abc import Sequence

from benchmarks.harness.common import MIB_PAGES, ROOT, Json
from benchmarks.harness.truth import meminfo
from benchmarks.harness.workloads import Sizes


def fmt(v: float | None, spec: str = ".2f", unit: str = "") -> str:
    return "-" if v is None else f"{v:{spec}}{unit}"


def verdict(met: bool | None, missed: str = "MISSED") -> str:
    return "n/a" if met is None else ("met" if met else missed)


def machine_line() -> str:
    model = ""
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    mem = meminfo()["MemTotal"] / MIB_PAGES / 1024
    return (
        f"{platform.node()}: Linux {platform.release()} {platform.machine()}, "
        f"{os.cpu_count()} CPUs ({model}), {mem:.1f} GiB RAM"
    )


def git_state() -> Json:
    """The commit measured, and the files that differed from it (a shared checkout)."""

    def git(*args: str) -> str:
        out = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True)
        return out.stdout.strip()

    return {"commit": git("rev-parse", "HEAD"), "dirty": git("status", "--short").splitlines()}


# --------------------------------------------------------------------------------------
# Ratios (suite.py)
# --------------------------------------------------------------------------------------


def ratio(
    slow: Json, fast: Json, key: str, bound: float | None, fast_bound: float | None = None
) -> tuple[float | None, str]:
    """slow[key] / fast[key], for times: when one side never got there within its time
    limit, a bound on the ratio: (bound / fast, ">") when slow did not, (slow / fast_bound,
    "<") when fast did not; (None, "") when neither, or the side has no limit, or no data."""
    f, sl = fast.get(key), slow.get(key)
    if not fast.get("reps") or not slow.get("reps"):
        return None, ""
    if f is None and sl is None:
        return None, ""
    if f is None:  # (sl is not None: both None returned above)
        return (sl / fast_bound, "<") if fast_bound and sl is not None else (None, "")
    if f <= 0:
        return None, ""
    if sl is None:
        return (bound / f, ">") if bound else (None, "")
    return sl / f, ""


def fmt_ratio(rv: tuple[float | None, str]) -> str:
    v, bound = rv
    return "-" if v is None else f"{bound}{v:.2f}x"


def cell(s: Json, key: str, spec: str) -> str:
    """A median as shown in a table: ``spec`` "%" shows a fraction in percent."""
    v = s.get(key)
    if v is None:
        return "-"
    return f"{100 * v:.1f}" if spec == "%" else f"{v:{spec}}"


def _pair_ratio(
    kind: str, ksm: Json, tool: Json, key: str, bound: float, tool_bound: float | None
) -> str:
    if kind == "time":
        return fmt_ratio(ratio(ksm, tool, key, bound, tool_bound))
    if kind == "cpu":
        return fmt_ratio(ratio(ksm, tool, key, None))
    if kind == "saving":
        return fmt_ratio(ratio(tool, ksm, key, None))
    return ""


# --------------------------------------------------------------------------------------
# suite.py: progress lines
# --------------------------------------------------------------------------------------


def one_line(wname: str, rep: int, v: str, r: Json, took: float) -> str:
    """One run, as the suite prints it when it ends."""
    if "error" in r:
        return f"{wname} rep {rep + 1} {v:14} ERROR: {str(r['error'])[-300:]}  ({took:.0f} s)"
    p = r.get("pauses") or {}
    th = r.get("thrash")
    extra = f" thrash {fmt(th['breaks_per_merged_page_per_min'], '.3f')}" if th else ""
    frac = r.get("fraction_pagemap")
    ideal = f" ideal {r['ideal_pages']:,}" if "content_census" in r else ""
    return (
        f"{wname} rep {rep + 1} {v:14} t95 {fmt(r.get('t95_s'))} t100 {fmt(r.get('t100_s'))} s "
        f"CPU {fmt(r.get('cpu_s'))} s saving {fmt(None if frac is None else 100 * frac, '.1f')} % "
        f"p99 {fmt(p.get('p99_ms'), '.2f')} ms{extra} check {r.get('memory_check')} "
        f"{ideal} ({took:.0f} s)"
    )


def scaling_line(row: Json) -> str:
    """One scaling point, as the suite prints it when it ends."""
    m, k, d = row.get("merge", {}), row.get("ksmd_max", {}), row.get("daemon")
    line = (
        f"scaling {row['series']:7} {row['targets']:3} targets {row['gib']:6.2f} GiB: merge "
        f"{fmt(m.get('s_per_gib'))} s/GiB {fmt(m.get('cpu_s_per_gib'))} CPU s/GiB "
        f"RSS {fmt(m.get('max_rss_mib'), '.0f')} MiB | ksmd {fmt(k.get('s_per_gib'))} s/GiB "
        f"{fmt(k.get('cpu_s_per_gib'))} CPU s/GiB"
    )
    if d is not None:
        line += (
            f" | daemon {fmt(d.get('s_per_gib'))} s/GiB {fmt(d.get('cpu_s_per_gib'))} CPU s/GiB"
            f" VmHWM {fmt(d.get('max_rss_mib'), '.0f')} MiB"
        )
    return line


# --------------------------------------------------------------------------------------
# suite.py: the table of medians and the README's markdown
# --------------------------------------------------------------------------------------

ROWS = (
    # label, key, format, ratio: "time" (ksmd / procksm, lower bound at the time limit),
    # "cpu" (ksmd / procksm), "saving" (procksm / ksmd), "" (none)
    ("time to 95 % (s)", "t95_s", ".2f", "time"),
    ("time to 100 % (s)", "t100_s", ".2f", "time"),
    ("saving reached (% ideal, pagemap)", "fraction", "%", "saving"),
    ("CPU s (to 100 % or the bound)", "cpu_s", ".2f", "cpu"),
    ("pause p50 (ms)", "p50_ms", ".3f", ""),
    ("pause p99 (ms)", "p99_ms", ".3f", ""),
    ("pause max (ms)", "max_ms", ".3f", ""),
    ("procksm RSS (MiB per GiB of targets)", "rss_mib_per_gib", ".1f", ""),
)
W3_ROWS = (
    ("thrash (COW breaks/merged page/min)", "thrash", ".4f"),
    ("COW breaks per minute (churn)", "cow_breaks_per_min", ".0f"),
    ("churn pages merged (mean, pagemap)", "churn_saved_pages_mean", ".0f"),
)


def _workload_rows(wname: str, sizes: Sizes, md: Json) -> list[tuple[str, str, list[str]]]:
    """(label, key, cells) per row of one workload: merge, ksmd max, ratio, daemon, ksmd
    defaults, ratio."""
    m, k, d, kd = (md.get(v, {}) for v in ("merge", "ksmd_max", "daemon", "ksmd_defaults"))
    rows = [(label, key, spec, kind) for label, key, spec, kind in ROWS]
    if wname == "W3":
        rows += [(label, key, spec, "") for label, key, spec in W3_ROWS]
    out = []
    for label, key, spec, kind in rows:
        r1 = _pair_ratio(kind, k, m, key, sizes.max_timeout_s, None)
        b = sizes.bound_of(wname)
        r2 = _pair_ratio(kind, kd, d, key, b, b)
        cells = [cell(m, key, spec), cell(k, key, spec), r1]
        cells += [cell(d, key, spec), cell(kd, key, spec), r2]
        out.append((label, key, cells))
    return out


def print_table(res: Json, sizes: Sizes) -> list[str]:
    """The medians of every workload, printed; returns the lines (kept in the JSON)."""
    lines = [
        f"{'':9}{'':38}{'merge':>10}{'ksmd max':>10}{'ratio':>10}"
        f"{'daemon':>10}{'ksmd dflt':>10}{'ratio':>10}"
    ]
    for wname, wd in res["workloads"].items():
        md = wd.get("medians", {})
        for label, _key, cells in _workload_rows(wname, sizes, md):
            lines.append(f"{wname:9}{label:38}" + "".join(f"{c:>10}" for c in cells))
        eq = md.get("daemon_eqcpu")
        if eq:
            kd = md.get("ksmd_defaults", {})
            lines.append(
                f"{wname:9}{'daemon at ksmd dflt CPU share':38}t95 {fmt(eq.get('t95_s'))} s, "
                f"t100 {fmt(eq.get('t100_s'))} s, CPU {fmt(eq.get('cpu_s'))} s, saving "
                f"{cell(eq, 'fraction', '%')} % (ksmd dflt used "
                f"{fmt(kd.get('cpu_share_pct'), '.1f')} % of a CPU)"
            )
        lines.append("")
    lines.append(
        "ratio: ksmd / procksm for times and CPU ('>' = ksmd had not got there when stopped), "
        "procksm / ksmd for the saving"
    )
    for line in lines:
        print(line)
    return lines


def _markdown_workloads(res: Json, sizes: Sizes) -> list[str]:
    out = [
        "| workload | number | merge | ksmd max | ksmd max / merge | daemon | ksmd defaults "
        "| ksmd defaults / daemon |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for wname, wd in res["workloads"].items():
        md = wd.get("medians", {})
        for label, key, cells in _workload_rows(wname, sizes, md):
            if key in ("p50_ms", "max_ms", "rss_mib_per_gib") and wname not in ("W1", "W2"):
                continue
            out.append(f"| {wname} | {label} | " + " | ".join(c or "" for c in cells) + " |")
        eq = md.get("daemon_eqcpu")
        if eq:
            kd = md.get("ksmd_defaults", {})
            out.append(
                f"| {wname} | daemon at ksmd defaults' CPU share "
                f"({fmt(kd.get('cpu_share_pct'), '.1f')} %) | | | | "
                f"t95 {fmt(eq.get('t95_s'))} s, saving {cell(eq, 'fraction', '%')} %, "
                f"CPU {fmt(eq.get('cpu_s'))} s | | |"
            )
    return out


def _markdown_scaling(rows: Sequence[Json]) -> list[str]:
    out = [
        "",
        "| series | targets | GiB | merge s/GiB | merge CPU s/GiB | merge peak RSS MiB "
        "| ksmd max s/GiB | ksmd CPU s/GiB | daemon s/GiB | daemon CPU s/GiB "
        "| daemon peak RSS MiB |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in rows:
        mm, kk, dd = row.get("merge", {}), row.get("ksmd_max", {}), row.get("daemon", {})
        out.append(
            f"| {row['series']} | {row['targets']} | {row['gib']:.2f} | "
            f"{fmt(mm.get('s_per_gib'))} | {fmt(mm.get('cpu_s_per_gib'))} | "
            f"{fmt(mm.get('max_rss_mib'), '.0f')} | {fmt(kk.get('s_per_gib'))} | "
            f"{fmt(kk.get('cpu_s_per_gib'))} | {fmt(dd.get('s_per_gib'))} | "
            f"{fmt(dd.get('cpu_s_per_gib'))} | {fmt(dd.get('max_rss_mib'), '.0f')} |"
        )
    return out


def markdown(res: Json) -> str:
    """The README's tables from a results file (suite.py --markdown FILE)."""
    # files written before w1_bounded_s existed bounded W1 like the others
    sizes = Sizes(**{"w1_bounded_s": res["sizes"]["bounded_s"], **res["sizes"]})
    out = _markdown_workloads(res, sizes)
    if res.get("scaling"):
        out += _markdown_scaling(res["scaling"]["rows"])
    if res.get("runtimes"):
        out += ["", runtimes_markdown(res["runtimes"]).rstrip("\n")]
    out += ["", "| goal | value | verdict |", "| --- | --- | --- |"]
    for g in res.get("goals", {}).values():
        out.append(f"| {g['goal']} | {g['shown']} | {verdict(g['met'], '**MISSED**')} |")
    return "\n".join(out) + "\n"


def print_goals(goals: Json) -> None:
    print("\ngoals:")
    for name, g in goals.items():
        print(f"  {name:16} {verdict(g['met']):7} {g['shown']:44} {g['goal']}")


# --------------------------------------------------------------------------------------
# Runtimes (runtimes.py, suite.py --only runtimes)
# --------------------------------------------------------------------------------------


def _mib(pages: float | None) -> str:
    return "-" if pages is None else f"{pages / MIB_PAGES:.0f}"


def _mib_bytes(n: float | None) -> str:
    return "-" if n is None else f"{n / 2**20:.0f}"


def _at_both(r: Json, key: str) -> str:
    """A measure at the early mark / at the end of a runtimes run."""
    return f"{_mib(r.get('early', {}).get(key))} / {_mib(r.get('end', {}).get(key))}"


def _procksm_runtime_row(name: str, row: Json) -> str:
    r, none = row["procksm"], row.get("none", {})
    ideal = _mib(r.get("content_ideal", {}).get("ideal_pages"))
    alone = _at_both(none, "frames_freed")
    if "error" in r:
        return f"| {name} | {ideal} | {alone} | error: {r['error'][:80]} | | | | | |"
    p = r.get("pauses", {})
    pauses = " / ".join(fmt(p.get(k), ".1f") for k in ("p50_ms", "p99_ms", "max_ms"))
    return (
        f"| {name} | {ideal} | {alone} | {_at_both(r, 'saved')} "
        f"| {fmt(r.get('cpu_share_pct_second_half'), '.1f')} "
        f"| {_mib_bytes(r.get('private_anonymous_bytes'))} / "
        f"{_mib_bytes(r.get('private_file_backed_bytes'))} "
        f"| {_mib(r.get('net_pages'))} | {pauses} | {r.get('memory_check')} |"
    )


def _ksmd_runtime_cells(r: Json) -> str:
    if "error" in r:
        return f"error: {r['error'][:60]} | |"
    return f"{_at_both(r, 'saved')} | {fmt(r.get('cpu_share_pct_second_half'), '.1f')}"


def runtimes_markdown(out: Json) -> str:
    """The tables of a runtimes run: procksm's, then the kernel's KSM's (harness/runtimes.py
    says what each number is)."""
    s = out["sizes"]
    early, end, half = f"{s['early_s']:.0f} s", f"{s['run_s']:.0f} s", f"{s['run_s'] / 2:.0f} s"
    lines = [
        f"| runtime | ideal at start (MiB) | no tool: frames the programs freed at {early} / "
        f"{end} (MiB) | procksm: saved at {early} / {end} (MiB) | procksm CPU, last {half} "
        "(% of a CPU) | procksm private anonymous / file-backed (MiB) | net for the machine "
        "(MiB) | pauses p50 / p99 / max (ms) | targets' own checks |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    rows = out["rows"]
    lines += [_procksm_runtime_row(name, row) for name, row in rows.items()]
    lines += [
        "",
        f"| runtime | ksmd defaults: saved at {early} / {end} (MiB) | ksmd CPU, last {half} (%) "
        f"| ksmd max: saved at {early} / {end} (MiB) | ksmd CPU, last {half} (%) "
        "| opted in (ksm_merge_any) | targets' own checks (these and the run without a tool) |",
        "| --- | ---: | ---: | ---: | ---: | --- | --- |",
    ]
    for name, row in rows.items():
        d, m = row["ksmd_defaults"], row["ksmd_max"]
        merge_any = sorted({str(x) for r in (d, m) for x in r.get("merge_any", [])})
        checks = sorted({str(r.get("memory_check")) for r in (d, m, row.get("none", {}))})
        lines.append(
            f"| {name} | {_ksmd_runtime_cells(d)} | {_ksmd_runtime_cells(m)} "
            f"| {', '.join(merge_any)} | {'; '.join(checks)} |"
        )
    return "\n".join(lines) + "\n"
