"""The live view's pure rendering: hand-built Snapshots into a captured rich Console at
fixed widths (like rich's tests/test_live.py). No terminal, no process, no clock."""

from __future__ import annotations

import dataclasses
import re

import pytest
from rich.console import Console, RenderableType

from procksm import PAGE_SIZE
from procksm.snapshot import HistoryPoint, MappingSnapshot, Snapshot, TargetSnapshot
from procksm.tui import render
from procksm.tui.render import MemoryBar, ViewState
from procksm.tui.sample import demo_like_snapshot

WIDTHS = (120, 80, 40)
MIB = 1 << 20


def text_of(r: RenderableType, width: int, *, styles: bool = False) -> str:
    c = Console(
        record=True,
        force_terminal=True,
        width=width,
        color_system="standard" if styles else None,
        legacy_windows=False,
    )
    c.print(r)
    return c.export_text(styles=styles)


def screen(
    snap: Snapshot | None, width: int, height: int | None = None, state: ViewState | None = None
) -> str:
    return text_of(render.view(snap, state or ViewState(), width, height), width)


def target(pid: int, name: str, **kw: object) -> TargetSnapshot:
    d: dict[str, object] = dict(
        rss_bytes=100 * MIB,
        pss_bytes=60 * MIB,
        pages_merged=0,
        pages_zero=0,
        cow_breaks=0,
        cow_breaks_per_s=0.0,
        pages_refused=0,
        top_refusal=None,
        last_pause_ms=0.0,
        max_pause_ms=0.0,
    )
    d.update(kw)
    return TargetSnapshot(pid=pid, name=name, **d)  # type: ignore[arg-type]


def snapshot(*targets: TargetSnapshot, **kw: object) -> Snapshot:
    d: dict[str, object] = dict(
        time=1_750_000_000.0,
        run=1,
        observer="bpf",
        pages_shared=0,
        pages_sharing=0,
        pages_unshared=0,
        pages_volatile=0,
        pages_skipped=0,
        pages_zero=0,
        full_scans=0,
        cow_breaks=0,
        general_profit_bytes=0,
        scan_rate_pages_s=0.0,
        cpu_percent=0.0,
        rss_bytes=0,
    )
    d.update(kw)
    return Snapshot(targets=targets, **d)  # type: ignore[arg-type]


# Three targets whose orders differ by every sort key.
THREE = snapshot(
    target(300, "bravo", rss_bytes=50 * MIB, pages_merged=1000, cow_breaks_per_s=7.0),
    target(100, "charlie", rss_bytes=300 * MIB, pages_merged=10, cow_breaks_per_s=1.0),
    target(200, "Alpha", rss_bytes=10 * MIB, pages_merged=5000, cow_breaks_per_s=30.0),
    pages_sharing=6000,
    pages_zero=10,
)


def pid_order(text: str) -> list[int]:
    return [int(m) for m in re.findall(r"^\s*(\d+)\s+[▸▾ ] ?\S", text, re.M) if int(m) >= 100]


# -- numbers -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("n", "text"),
    [
        (0, "0 B"),
        (1023, "1023 B"),
        (1536, "1.5 KiB"),
        (256 * MIB, "256.0 MiB"),
        (5 << 30, "5.0 GiB"),
        (3 << 40, "3.0 TiB"),
    ],
)
def test_human_bytes(n: int, text: str) -> None:
    assert render.human_bytes(n) == text


@pytest.mark.parametrize("width", WIDTHS)
def test_demo_like_view_fits_and_shows_the_numbers(width: int) -> None:
    snap = demo_like_snapshot(20)
    out = screen(snap, width, 40)
    lines = out.splitlines()
    assert max(len(line) for line in lines) <= width
    assert len(lines) <= 40
    saved = render.human_bytes(snap.saved_bytes)
    assert saved == "170.6 MiB"  # (3 x 10,922 sharing + 4 x 2,730 zero) pages
    assert f"saved {saved}" in out
    assert "running" in out and "BPF" in out
    for t in snap.targets:
        assert str(t.pid) in out
    assert "q quit" in out
    if width >= 60:
        assert "38.8% of 4 targets' 440.0 MiB" in out  # RSS + dropped zeros = 440 MiB
        assert "full scans 6" in out and "procksm CPU 3.2%" in out
    else:
        assert "38.8%" in out


def test_header_counters_use_kernel_ksm_names() -> None:
    out = screen(demo_like_snapshot(20), 120)
    for name in ("pages_shared 10,922", "pages_sharing 32,766", "zero 10,920", "volatile"):
        assert name in out
    assert "scan 25,600 pages/s (100.0 MiB/s)" in out
    assert "RSS 48.0 MiB" in out  # procksm's own
    assert "pauses p50/p99/max 0.4/1.9/2.3 ms" in out


def test_run_states_and_observer_modes() -> None:
    assert "stopped" in screen(demo_like_snapshot(5, run=0), 80)
    assert "unmerging" in screen(demo_like_snapshot(5, run=2), 80)
    out = screen(demo_like_snapshot(5, observer="pagemap"), 80)
    assert "pagemap (fallback)" in out and "BPF" not in out


@pytest.mark.parametrize(
    ("width", "present", "absent"),
    [
        (120, ["RSS", "PSS", "merged", "zero", "COW/s", "refused", "pause ms", "memory"], []),
        (80, ["RSS", "merged", "zero", "COW/s", "memory"], ["PSS", "refused", "pause ms"]),
        (40, ["merged", "COW/s"], ["RSS", "PSS", "zero", "memory", "refused"]),
    ],
)
def test_columns_degrade_with_width(width: int, present: list[str], absent: list[str]) -> None:
    table_header = next(
        line for line in screen(demo_like_snapshot(20), width).splitlines() if "pid" in line
    )
    for col in present:
        assert col in table_header, col
    for col in absent:
        assert col not in table_header.replace("merged", ""), col


def test_target_row_numbers() -> None:
    out = screen(demo_like_snapshot(20), 120)
    row = next(line for line in out.splitlines() if line.lstrip().startswith("4242"))
    # RSS 110 MiB - 10.7 MiB dropped zeros; PSS pays 1/4 of the merged pages
    for cell in ("99.3 MiB", "67.3 MiB", "42.7 MiB", "10.7 MiB", "12 stack", "0.3/1.1"):
        assert cell in row, (cell, row)


def test_refusal_reason_and_cow_rate_shown() -> None:
    snap = snapshot(
        target(7, "svc", pages_refused=2048, top_refusal="mlocked (VmLck)", cow_breaks_per_s=1234)
    )
    out = screen(snap, 120)
    assert "2,048 mlocked (VmLck)" in out
    assert "1.2k" in out


def test_names_are_not_markup() -> None:
    out = screen(snapshot(target(7, "[bold]evil[/bold] [red]")), 120)
    assert "[bold]evil[/bold]" in out


# -- sorting and selection ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "order", "header"),
    [
        ("s", [200, 300, 100], "merged▼"),
        ("r", [100, 300, 200], "RSS▼"),
        ("c", [200, 300, 100], "COW/s▼"),
        ("p", [100, 200, 300], "pid▲"),
        ("n", [200, 300, 100], "name▲"),  # case-insensitive: Alpha, bravo, charlie
    ],
)
def test_sort_keys(key: str, order: list[int], header: str) -> None:
    st = render.set_sort(ViewState(sort="cow" if key != "c" else "pid"), key)
    assert [t.pid for t in render.sorted_targets(THREE, st)] == order
    out = screen(THREE, 120, state=st)
    assert pid_order(out) == order
    assert header in out
    again = render.set_sort(st, key)  # the same key reverses
    assert [t.pid for t in render.sorted_targets(THREE, again)] == order[::-1]


def test_default_sort_is_saved_descending() -> None:
    assert pid_order(screen(THREE, 80)) == [200, 300, 100]


def test_selection_moves_in_sorted_order_and_clamps() -> None:
    st = ViewState(sort="pid")
    assert render.selected_target(THREE, st).pid == 100  # type: ignore[union-attr]
    st = render.move_selection(THREE, st, 1)
    assert st.selected == 200
    st = render.move_selection(THREE, st, 5)
    assert st.selected == 300
    st = render.move_selection(THREE, st, -99)
    assert st.selected == 100
    # the selection follows the pid when the order changes
    st = dataclasses.replace(st, selected=300)
    assert render.move_selection(THREE, render.set_sort(st, "n"), 1).selected == 100


def test_selected_row_is_highlighted() -> None:
    st = ViewState(sort="pid", selected=200)
    out = text_of(render.view(THREE, st, 120, None), 120, styles=True)
    line = next(line for line in out.splitlines() if "Alpha" in line)
    assert "\x1b[7m" in line  # reverse video
    other = next(line for line in out.splitlines() if "charlie" in line)
    assert "\x1b[7m" not in other


def test_a_vanished_selection_falls_back_to_the_first_row() -> None:
    st = ViewState(sort="pid", selected=999)
    assert render.selected_target(THREE, st).pid == 100  # type: ignore[union-attr]


def test_expanded_target_lists_its_mappings_by_merged_pages() -> None:
    snap = demo_like_snapshot(20)
    st = render.toggle_expanded(snap, ViewState(selected=4245))
    assert st.expanded == {4245}
    out = screen(snap, 120, state=st)
    i = out.index("4245")
    assert i < out.index("[anon] model") < out.index("[heap]") < out.index("4248")
    assert "[anon] model 0x7f3b" in out  # the start address at wide widths
    assert "▾ python3" in out and "▸ python3" in out
    assert out.count("[anon] model") == 1  # only the expanded one
    collapsed = render.toggle_expanded(snap, st)
    assert "[anon] model" not in screen(snap, 120, state=collapsed)


def test_expansion_at_narrow_width_drops_the_address() -> None:
    snap = demo_like_snapshot(20)
    st = ViewState(selected=4245, expanded=frozenset({4245}))
    out = screen(snap, 40, state=st)
    assert "[anon] mo" in out and "0x7f" not in out


# -- long tables, short terminals ----------------------------------------------------------


def many(n: int) -> Snapshot:
    return snapshot(
        *(target(1000 + i, f"w{i}", pages_merged=10 * (n - i)) for i in range(n)),
        history=(HistoryPoint(1.0, 0, 0.0), HistoryPoint(2.0, MIB, 1.0)),
    )


@pytest.mark.parametrize("width", WIDTHS)
def test_long_table_is_windowed_around_the_selection(width: int) -> None:
    snap = many(50)
    out = screen(snap, width, 24)
    assert len(out.splitlines()) <= 24
    assert "↓" in out and "more" in out
    assert "q quit" in out.splitlines()[-1]  # the footer stays on screen
    st = ViewState(selected=1049)  # the last row
    out = screen(snap, width, 24, st)
    assert "1049" in out and "↑" in out and "1000 " not in out


def test_short_terminal_drops_charts_then_counters_but_keeps_table() -> None:
    snap = demo_like_snapshot(20)
    out = screen(snap, 80, 14)
    assert len(out.splitlines()) <= 14
    assert "pages_shared" in out and "COW breaks █" not in out
    assert "4242" in out and "q quit" in out
    out = screen(snap, 80, 10)
    assert len(out.splitlines()) <= 10
    assert "saved 170.6 MiB" in out and "pages_shared" not in out
    assert "4242" in out and "q quit" in out


# -- charts ----------------------------------------------------------------------------


def test_sparkline_scales_and_right_aligns() -> None:
    assert render.sparkline([0, 1, 2, 3, 4, 5, 6, 7], 8) == "▁▂▃▄▅▆▇█"
    assert render.sparkline([1, 2], 5) == "   ▅█"
    assert render.sparkline([0, 0, 0], 3) == "▁▁▁"
    assert render.sparkline(list(range(100)), 10) == render.sparkline(list(range(90, 100)), 10)
    assert render.sparkline([], 4) == "    "
    assert render.sparkline([5], 0) == ""


def test_charts_show_history_side_by_side_when_wide() -> None:
    snap = demo_like_snapshot(20)
    wide = render.chart_lines(snap, 120)
    assert len(wide) == 1 and "saved" in wide[0].plain and "COW breaks" in wide[0].plain
    narrow = render.chart_lines(snap, 80)
    assert len(narrow) == 2
    assert narrow[0].plain.endswith(render.human_bytes(snap.history[-1].saved_bytes))
    spark = narrow[0].plain.split()[-3]
    assert spark[-1] == "█" and spark == "".join(sorted(spark))  # savings grow
    assert "max 41.8" in narrow[1].plain
    assert all(line.cell_len <= 80 for line in narrow)


def test_memory_bar_parts() -> None:
    bar = MemoryBar(merged=50 * MIB, zero=25 * MIB, rss=75 * MIB)
    assert bar.cells(20) == (10, 5, 5)
    assert MemoryBar(0, 0, 0).cells(10) == (0, 0, 10)
    assert MemoryBar(10 * MIB, 0, 5 * MIB).cells(10) == (10, 0, 0)  # never overflows
    out = text_of(bar, 20)
    assert out.strip() == "█" * 15 + "░" * 5


# -- help, footer, empty -----------------------------------------------------------------


@pytest.mark.parametrize("width", WIDTHS)
def test_help_replaces_the_table(width: int) -> None:
    out = screen(demo_like_snapshot(20), width, 60, ViewState(help=True))
    assert "keys" in out and "unmerge the selected" in out
    assert "4242" not in out
    assert max(len(line) for line in out.splitlines()) <= width


def test_footer_confirm_and_messages() -> None:
    snap = demo_like_snapshot(20)
    st = ViewState(confirm_unmerge=4245)
    assert "Unmerge pid 4245 (python3 -m procksm.demo_worker)? y/n" in screen(snap, 120, None, st)
    assert "scanning paused" in screen(snap, 80, None, ViewState(message="scanning paused"))
    assert "space resume" in screen(demo_like_snapshot(3, run=0), 120)
    narrow = render.footer(snap, ViewState(), 20).plain
    assert narrow.startswith("q quit") and len(narrow) <= 20


@pytest.mark.parametrize("width", (*WIDTHS, 20))
def test_empty_snapshot_and_no_snapshot_do_not_crash(width: int) -> None:
    out = screen(snapshot(), width, 24)
    assert "saved 0 B" in out and "no targets" in out and "(no history yet)" in out
    assert max(len(line) for line in out.splitlines()) <= width
    assert "waiting" in screen(None, width, 24)
    st = render.move_selection(snapshot(), ViewState(), 1)
    assert st.selected is None
    assert render.toggle_expanded(snapshot(), st) == st


def test_target_without_mappings_and_zero_rss() -> None:
    snap = snapshot(target(5, "tiny", rss_bytes=0, pss_bytes=0))
    out = screen(snap, 120, None, ViewState(expanded=frozenset({5})))
    assert "tiny" in out and "0 B" in out


# -- plain lines -----------------------------------------------------------------------


def test_plain_line_matches_its_header() -> None:
    snap = demo_like_snapshot(20)
    line = render.plain_line(snap)
    fields = line.split()
    heads = render.PLAIN_HEADER.split()
    assert len(fields) == len(heads)
    row = dict(zip(heads, fields, strict=True))
    assert row["SAVED"] == "170.6MiB" and row["%RSS"] == "38.8%"
    assert row["SHARING"] == "32766" and row["TARGETS"] == "4"
    assert row["STATE"] == "running/bpf"
    assert "\x1b" not in line


def test_snapshot_json_round_trip_renders_the_same() -> None:
    snap = demo_like_snapshot(20)
    again = Snapshot.from_json(snap.as_json())
    assert screen(again, 120) == screen(snap, 120)


def test_mapping_rows_count_pages() -> None:
    m = MappingSnapshot("[heap]", 0x1000, 0x5000, rss_pages=4, merged_pages=2, zero_pages=1)
    snap = snapshot(target(9, "one", mappings=(m,)))
    out = screen(snap, 120, None, ViewState(expanded=frozenset({9})))
    row = next(line for line in out.splitlines() if "[heap]" in line)
    assert render.human_bytes(4 * PAGE_SIZE) in row and render.human_bytes(2 * PAGE_SIZE) in row
