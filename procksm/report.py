"""Presentation of a scan: pure functions from a ScanReport to rich renderables or JSON.

Nothing here touches a process; the tests render into a captured Console.
"""

from __future__ import annotations

from typing import Any

from rich import box
from rich.console import Group, RenderableType
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from procksm import PAGE_SIZE
from procksm.analysis import Counts, ProcessReport, ScanReport
from procksm.text import fmt_bytes


def fmt_pages(p: int) -> str:
    return f"{p:,} ({fmt_bytes(p * PAGE_SIZE)})"


def preview_text(data: bytes) -> str:
    hexpart = data[:16].hex(" ")
    asc = "".join(chr(b) if 32 <= b < 127 else "." for b in data[:16])
    return f"{hexpart}  |{asc}|"


def _pct(part: int, whole: int) -> str:
    return f"{100.0 * part / whole:.1f}%" if whole else "-"


def scan_json(rep: ScanReport, *, elapsed_s: float | None = None) -> dict[str, Any]:
    """The ``--json`` twin of the scan view (keys documented in the README)."""
    totals: dict[str, Any] = rep.totals.as_dict()
    totals.update(
        distinct_frames=rep.distinct_frames,
        distinct_contents=rep.distinct_contents,
        pages_excluded=rep.pages_excluded,
        pages_zero_mapped=sum(p.pages_zero_mapped for p in rep.processes),
        page_size=PAGE_SIZE,
    )
    out: dict[str, Any] = {
        "totals": totals,
        "excluded_by_reason": rep.excluded_by_reason,
        "processes": [_process_json(p) for p in rep.processes],
        "top": [
            {
                "pages": c.pages,
                "frames": c.frames,
                "savings_pages": c.savings_pages,
                "pids": c.pids,
                "preview_hex": c.preview.hex(),
            }
            for c in rep.top
        ],
        "matrix": {
            "pids": [p.pid for p in rep.processes[: len(rep.matrix)]],
            "pages": rep.matrix,
        },
    }
    if elapsed_s is not None:
        out["elapsed_s"] = round(elapsed_s, 4)
    return out


def _process_json(p: ProcessReport) -> dict[str, Any]:
    return {
        "pid": p.pid,
        "name": p.name,
        "uid": p.uid,
        **p.counts.as_dict(),
        "pages_zero_mapped": p.pages_zero_mapped,
        "pages_excluded": p.pages_excluded,
        "mappings": [
            {
                "start": hex(m.start),
                "end": hex(m.end),
                "name": m.name,
                "perms": m.perms,
                **m.counts.as_dict(),
            }
            for m in p.mappings
            if m.counts.pages_scanned
        ],
        "excluded": [
            {
                "start": hex(e.start),
                "end": hex(e.end),
                "name": e.name,
                "reason": e.reason,
                "rss_pages": e.rss_pages,
            }
            for e in p.excluded
        ],
    }


def _counts_row(c: Counts, wide: bool) -> list[str]:
    row = [
        f"{c.pages_scanned:,}",
        f"{c.pages_zero:,}",
        f"{c.pages_dup_within:,}",
        f"{c.pages_dup_across:,}",
    ]
    if wide:
        row += [f"{c.pages_shared_frame:,}", f"{c.pages_volatile:,}"]
    return [*row, fmt_bytes(c.ideal_savings_bytes), _pct(c.ideal_savings_pages, c.pages_scanned)]


def _count_headers(wide: bool) -> list[str]:
    extra = ["shared frame", "volatile"] if wide else []
    return ["pages", "zero", "dup in", "across", *extra, "saving", "%"]


# Below this width the "shared frame" and "volatile" columns are left out (they are
# in --json); the table must stay readable on an 80-column terminal.
WIDE_COLUMNS = 120


def scan_view(rep: ScanReport, *, show_mappings: bool = True, width: int = 160) -> RenderableType:
    """The scan result as a rich renderable: summary, per process/mapping, top, matrix."""
    t = rep.totals
    wide = width >= WIDE_COLUMNS
    summary = Text.assemble(
        ("Ideal saving ", "bold"),
        (fmt_bytes(t.ideal_savings_bytes), "bold green"),
        f" of {fmt_bytes(t.pages_scanned * PAGE_SIZE)} scanned "
        f"({_pct(t.ideal_savings_pages, t.pages_scanned)}): ",
        f"{t.pages_scanned:,} pages in {rep.distinct_frames:,} frames, "
        f"{t.pages_zero:,} zero, {rep.distinct_contents:,} distinct non-zero contents",
    )
    parts: list[RenderableType] = [summary, _processes_table(rep, show_mappings, wide)]
    if rep.excluded_by_reason:
        parts.append(_excluded_table(rep))
    if rep.top:
        parts.append(_top_table(rep))
    if len(rep.matrix) > 1:
        parts.append(_matrix_table(rep))
    return Group(*parts)


def _processes_table(rep: ScanReport, show_mappings: bool, wide: bool) -> Table:
    procs = Table(
        box=box.SIMPLE_HEAD,
        title="Processes",
        title_justify="left",
        pad_edge=False,
        caption=None if wide else "(wider terminal: shared-frame and volatile columns)",
    )
    procs.add_column("pid", justify="right", no_wrap=True)
    procs.add_column(
        "process / mapping", overflow="ellipsis", no_wrap=True, max_width=40 if wide else 17
    )
    for h in _count_headers(wide):
        procs.add_column(h, justify="right", no_wrap=True)
    for p in rep.processes:
        procs.add_row(str(p.pid), f"[b]{escape(p.name)}[/b]", *_counts_row(p.counts, wide))
        if show_mappings:
            for m in sorted(p.mappings, key=lambda m: -m.counts.ideal_savings_pages):
                if m.counts.pages_scanned == 0:
                    continue
                procs.add_row(
                    "", escape(f" {m.name} {m.start:#x}"), *_counts_row(m.counts, wide), style="dim"
                )
    procs.add_row("", "[b]total[/b]", *_counts_row(rep.totals, wide), end_section=True)
    return procs


def _excluded_table(rep: ScanReport) -> Table:
    ex = Table(box=box.SIMPLE_HEAD, title="Not eligible (resident pages)", title_justify="left")
    ex.add_column("reason")
    ex.add_column("pages", justify="right")
    for reason, pages in rep.excluded_by_reason.items():
        if pages:
            ex.add_row(escape(reason), fmt_pages(pages))
    return ex


def _top_table(rep: ScanReport) -> Table:
    top = Table(box=box.SIMPLE_HEAD, title="Top duplicated contents", title_justify="left")
    for h in ("frames", "pages", "saving"):
        top.add_column(h, justify="right", no_wrap=True)
    top.add_column("pids", overflow="ellipsis", no_wrap=True, max_width=24)
    top.add_column("preview", overflow="ellipsis", no_wrap=True)
    for c in rep.top:
        pid_list = ",".join(map(str, c.pids[:6])) + ("…" if len(c.pids) > 6 else "")
        top.add_row(
            f"{c.frames:,}",
            f"{c.pages:,}",
            fmt_bytes(c.savings_pages * PAGE_SIZE),
            pid_list,
            escape(preview_text(c.preview)),
        )
    return top


def _matrix_table(rep: ScanReport) -> Table:
    mx = Table(
        box=box.SIMPLE_HEAD,
        title="Shared content (pages of row also present in column)",
        title_justify="left",
    )
    mx.add_column("pid")
    pids = [p.pid for p in rep.processes[: len(rep.matrix)]]
    for pid in pids:
        mx.add_column(str(pid), justify="right")
    for pid, row in zip(pids, rep.matrix, strict=True):
        mx.add_row(str(pid), *(f"{v:,}" for v in row))
    return mx
