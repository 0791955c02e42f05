"""Pure tests of the counting and rendering (no processes involved)."""

from __future__ import annotations

import json

import numpy as np
from rich.console import Console

from procksm.analysis import (
    CONTENT_VOLATILE,
    CONTENT_ZERO,
    MappingRef,
    PageTable,
    ProcessIdentity,
    ScanInput,
    analyse,
)
from procksm.report import scan_json, scan_view


def make_scan(rows: list[tuple[int, int, int]], nproc: int = 2) -> ScanInput:
    """rows: (process, content, pfn); one mapping per process; hash derived from content."""
    rows = sorted(rows, key=lambda r: r[0])
    t = PageTable.empty(len(rows))
    mapping_rows = np.zeros(nproc + 1, np.int64)
    for i, (_p, c, pfn) in enumerate(rows):
        t.content[i] = c
        t.hash[i] = (
            np.uint64((c * 0x9E3779B97F4A7C15) % (1 << 64)) if c >= 0 else np.uint64(c & 0xFFFF)
        )
        t.pfn[i] = pfn
        t.off[i] = i
    for p in range(nproc):
        mapping_rows[p + 1] = sum(1 for r in rows if r[0] <= p)
    return ScanInput(
        processes=[ProcessIdentity(100 + p, f"w{p}", 0) for p in range(nproc)],
        mappings=[
            MappingRef(p, 0x1000_0000 * (p + 1), 0x1000_0000 * (p + 2), "[anon]", "rw-p")
            for p in range(nproc)
        ],
        pages=t,
        mapping_rows=mapping_rows,
    )


def test_ideal_saving_is_frames_minus_nonzero_contents() -> None:
    rows = [
        (0, 10, 1),
        (0, 10, 2),
        (0, 11, 3),
        (0, CONTENT_ZERO, 4),  # p0: A A B 0
        (1, 10, 5),
        (1, 12, 6),
        (1, CONTENT_ZERO, 7),
        (1, CONTENT_VOLATILE, 8),  # p1: A C 0 v
    ]
    rep = analyse(make_scan(rows))
    # frames 8; non-zero non-volatile contents A B C = 3; volatile frame saves nothing
    assert rep.distinct_frames == 8
    assert rep.distinct_contents == 3
    assert rep.totals.ideal_savings_pages == 8 - 3 - 1
    assert rep.totals.pages_zero == 2 and rep.totals.pages_volatile == 1
    p0, p1 = rep.processes
    assert p0.counts.pages_dup_within == 2 and p1.counts.pages_dup_within == 0
    assert p0.counts.pages_dup_across == 2 and p1.counts.pages_dup_across == 1
    # keeper of A is p0's first frame: p0 saves its 2nd A and its zero, p1 its A and zero
    assert p0.counts.ideal_savings_pages == 2 and p1.counts.ideal_savings_pages == 2
    assert rep.matrix == [[2, 2], [1, 0]]
    assert rep.top[0].frames == 3 and rep.top[0].pids == [100, 101]


def test_shared_frames_save_nothing() -> None:
    rows = [(0, 10, 1), (0, 11, 2), (1, 10, 1), (1, 11, 2)]  # after fork: same PFNs
    rep = analyse(make_scan(rows))
    assert rep.totals.pages_shared_frame == 4
    assert rep.totals.pages_dup_across == 4
    assert rep.totals.ideal_savings_pages == 0
    assert rep.processes[1].counts.frames == 0  # frames belong to where first seen


def test_many_buckets_add_up() -> None:
    """Enough rows for several hash buckets: totals equal the closed formula."""
    rng = np.random.default_rng(1)
    n = 70_000
    contents = rng.integers(0, 5000, n)
    rows = [(int(i % 3), int(c), int(i) + 1) for i, c in enumerate(contents)]
    rep = analyse(make_scan(rows, nproc=3))
    assert rep.distinct_frames == n
    assert rep.distinct_contents == len(set(contents.tolist()))
    assert rep.totals.ideal_savings_pages == n - len(set(contents.tolist()))
    assert (
        sum(p.counts.ideal_savings_pages for p in rep.processes) == rep.totals.ideal_savings_pages
    )


def render(rep: object, width: int) -> str:
    con = Console(width=width, record=True, force_terminal=True, color_system=None)
    con.print(scan_view(rep, width=width))  # type: ignore[arg-type]
    return con.export_text()


def test_render_wide_and_narrow() -> None:
    rows = [(0, 10, 1), (0, 10, 2), (1, 10, 3), (1, CONTENT_ZERO, 4)]
    rep = analyse(make_scan(rows))
    wide = render(rep, 160)
    assert "shared frame" in wide and "volatile" in wide and "[anon]" in wide
    narrow = render(rep, 80)
    assert "volatile" not in narrow.split("Processes")[1].split("\n")[2]
    assert all(len(line) <= 80 for line in narrow.splitlines())
    assert "Ideal saving 12.0 KiB" in narrow
    doc = scan_json(rep)
    json.dumps(doc)
    assert doc["totals"]["ideal_savings_pages"] == 3
    assert doc["processes"][0]["mappings"][0]["name"] == "[anon]"
