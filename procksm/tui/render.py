"""The live view as pure functions: a :class:`Snapshot` and a :class:`ViewState` in, rich
renderables out (like rich's ``examples/top_lite_simulator.py``).

Nothing here reads a clock, a terminal or a process: the same inputs always render the
same screen, which is what the tests (a captured ``Console`` at fixed widths) rely on.

Layout, top to bottom, each part degrading on narrow terminals instead of wrapping:

* header: memory saved (bytes, % of the targets' RSS), the KSM counters, scans, scan rate,
  procksm's own CPU and RSS, run state, observer (BPF or pagemap fallback);
* charts: sparklines of saved bytes and of the COW-break rate from ``Snapshot.history``;
* the targets table (sortable, one selected row, expandable into its mappings), with a
  bar per target of merged / zero-dropped / unmerged memory; or the help panel;
* a footer: key hints, a confirmation prompt, or the last action's message.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

from rich.console import Console, ConsoleOptions, Group, RenderableType, RenderResult
from rich.measure import Measurement
from rich.panel import Panel
from rich.segment import Segment
from rich.style import Style
from rich.table import Table
from rich.text import Text

from procksm import PAGE_SIZE
from procksm.snapshot import MappingSnapshot, Snapshot, TargetSnapshot
from procksm.text import fmt_bytes

# -- view state ---------------------------------------------------------------------------


class SortKey(NamedTuple):
    key: str  # the key that selects it
    name: str  # shown in the header of the sorted column and the footer
    column: str  # the column header it sorts
    descending: bool  # default order (largest first for sizes, ascending for pid/name)
    value: Callable[[TargetSnapshot], float | int | str]


def _saved_pages(t: TargetSnapshot) -> int:
    return t.pages_merged + t.pages_zero


SORT_KEYS: dict[str, SortKey] = {
    k.key: k
    for k in (
        SortKey("s", "saved", "merged", True, _saved_pages),
        SortKey("r", "rss", "RSS", True, lambda t: t.rss_bytes),
        SortKey("c", "cow", "COW/s", True, lambda t: t.cow_breaks_per_s),
        SortKey("p", "pid", "pid", False, lambda t: t.pid),
        SortKey("n", "name", "name", False, lambda t: t.name.lower()),
    )
}
SORT_BY_NAME = {k.name: k for k in SORT_KEYS.values()}

# The keys, declared once: the help panel and the footer are generated from this table.
KEYS: tuple[tuple[str, str], ...] = (
    ("q  Esc", "quit (Esc also closes this help)"),
    ("s r c p n", "sort by saved, RSS, COW breaks/s, pid, name (again: reverse)"),
    ("↑ ↓  j k", "select a target (PgUp PgDn Home End)"),
    ("Enter", "expand / collapse the selected target's mappings"),
    ("space", "pause / resume scanning (the daemon's run state)"),
    ("u", "unmerge the selected target (asks y/n)"),
    ("?", "this help"),
)


@dataclass(frozen=True)
class ViewState:
    """What the person chose: sort, selection, expansion, help, a pending confirmation.

    Immutable; the live loop replaces it (``dataclasses.replace``) on each key.
    """

    sort: str = "saved"  # a SortKey.name
    reverse: bool = False  # reverse the sort key's default order
    selected: int | None = None  # pid of the selected target
    expanded: frozenset[int] = frozenset()  # pids shown with their mappings
    help: bool = False
    confirm_unmerge: int | None = None  # pid awaiting y/n
    message: str = ""  # result of the last action, shown in the footer
    error: bool = False  # message is an error (red)


def sorted_targets(snap: Snapshot, state: ViewState) -> list[TargetSnapshot]:
    key = SORT_BY_NAME.get(state.sort, SORT_KEYS["s"])
    # pid breaks ties so that equal rows keep a stable order between refreshes
    rows = sorted(snap.targets, key=lambda t: t.pid)
    return sorted(rows, key=key.value, reverse=key.descending != state.reverse)


def selected_target(snap: Snapshot, state: ViewState) -> TargetSnapshot | None:
    """The selected target, or the first row when the selection is gone (target exited)."""
    rows = sorted_targets(snap, state)
    for t in rows:
        if t.pid == state.selected:
            return t
    return rows[0] if rows else None


def move_selection(snap: Snapshot, state: ViewState, delta: int) -> ViewState:
    """Move the selection ``delta`` rows in the current order (clamped to the table)."""
    rows = sorted_targets(snap, state)
    if not rows:
        return dataclasses.replace(state, selected=None)
    cur = selected_target(snap, state)
    i = rows.index(cur) if cur is not None else 0
    i = max(0, min(len(rows) - 1, i + delta))
    return dataclasses.replace(state, selected=rows[i].pid)


def set_sort(state: ViewState, key: str) -> ViewState:
    """Sort by the key's column; the same key again reverses the order."""
    name = SORT_KEYS[key].name
    if state.sort == name:
        return dataclasses.replace(state, reverse=not state.reverse)
    return dataclasses.replace(state, sort=name, reverse=False)


def toggle_expanded(snap: Snapshot, state: ViewState) -> ViewState:
    t = selected_target(snap, state)
    if t is None:
        return state
    return dataclasses.replace(
        state, selected=t.pid, expanded=state.expanded.symmetric_difference({t.pid})
    )


# -- small formatting helpers ------------------------------------------------------------


def human_bytes(n: float) -> str:
    """1536 -> '1.5 KiB' (the scan report's format, one unit for the whole tool)."""
    return fmt_bytes(n)


def pct(part: float, whole: float) -> str:
    return f"{100.0 * part / whole:.1f}%" if whole > 0 else "-"


def rate(x: float) -> str:
    if x >= 1000:
        return f"{x / 1000:.1f}k"
    return f"{x:.1f}" if x < 100 else f"{x:.0f}"


RUN_STATES = {0: ("stopped", "bold red"), 1: ("running", "bold green"), 2: ("unmerging", "yellow")}


def run_state(snap: Snapshot) -> Text:
    label, style = RUN_STATES.get(snap.run, (f"run={snap.run}", "yellow"))
    dot = "●" if snap.run == 1 else "‖" if snap.run == 0 else "◌"
    return Text(f"{dot} {label}", style=style)


def observer_label(snap: Snapshot) -> Text:
    if snap.observer == "bpf":
        return Text("BPF", style="green")
    return Text(f"{snap.observer} (fallback)", style="yellow")


SPARK = "▁▂▃▄▅▆▇█"


def sparkline(values: Sequence[float], width: int) -> str:
    """The last ``width`` values as block characters, scaled from 0 to their maximum.

    Zero maps to the lowest block (a flat line, not a gap), so "nothing yet" is visible.
    Fewer values than ``width`` are right-aligned: the newest is always at the right edge.
    """
    if width <= 0:
        return ""
    vals = list(values)[-width:]
    top = max(vals, default=0.0)
    if top <= 0:
        chars = SPARK[0] * len(vals)
    else:
        chars = "".join(
            SPARK[min(len(SPARK) - 1, max(0, round(v / top * (len(SPARK) - 1))))] for v in vals
        )
    return chars.rjust(width)


class MemoryBar:
    """A bar as wide as its column: merged (green), zero-dropped (cyan), the rest (dim).

    The whole is the target's RSS plus its dropped zero pages (which left the RSS), so a
    target whose memory is all merged or dropped is a full bar.
    """

    def __init__(self, merged: int, zero: int, rss: int, *, min_width: int = 6) -> None:
        self.merged = max(0, merged)
        self.zero = max(0, zero)
        self.total = max(rss + self.zero, self.merged + self.zero, 1)
        self.min_width = min_width

    def __rich_measure__(self, console: Console, options: ConsoleOptions) -> Measurement:
        return Measurement(self.min_width, max(self.min_width, options.max_width))

    def cells(self, width: int) -> tuple[int, int, int]:
        m = round(width * self.merged / self.total)
        z = min(width - m, round(width * self.zero / self.total))
        return m, z, width - m - z

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        m, z, rest = self.cells(options.max_width)
        yield Segment("█" * m, Style(color="green"))
        yield Segment("█" * z, Style(color="cyan"))
        yield Segment("░" * rest, Style(color="bright_black"))


# -- header ------------------------------------------------------------------------------


def _packed(items: Sequence[Text], width: int, sep: str = "   ") -> list[Text]:
    """Pack ``label value`` items into as few lines as fit ``width``; never split an item."""
    lines: list[Text] = []
    cur = Text()
    for item in items:
        if cur and cur.cell_len + len(sep) + item.cell_len > width:
            lines.append(cur)
            cur = Text()
        if cur:
            cur.append(sep)
        cur.append_text(item)
    if cur:
        lines.append(cur)
    for line in lines:
        line.truncate(width, overflow="ellipsis")
    return lines


def _item(label: str, value: str | Text, style: str = "bold") -> Text:
    t = Text(label + " ", style="dim") if label else Text()
    t.append_text(value if isinstance(value, Text) else Text(value, style=style))
    return t


def header_lines(snap: Snapshot, width: int) -> list[Text]:
    """The header as lines of text (the caller knows how many lines it takes)."""
    narrow = width < 60
    rss = snap.targets_rss_bytes
    # saved is relative to what the targets would use without procksm: their RSS now plus
    # what was given back (merged pages still count in each RSS, dropped zeros do not)
    before = rss + snap.pages_zero * PAGE_SIZE
    title = Text.assemble(("procksm", "bold"), "  ", run_state(snap), "  ")
    title.append_text(_item("observer", observer_label(snap)))
    if not narrow:
        title.append("  " + time.strftime("%H:%M:%S", time.localtime(snap.time)), style="dim")
    saved = Text.assemble(
        ("saved ", "bold"),
        (human_bytes(snap.saved_bytes), "bold green"),
        f" ({pct(snap.saved_bytes, before)} of {len(snap.targets)} targets' {human_bytes(before)})"
        if not narrow
        else f" {pct(snap.saved_bytes, before)}",
    )
    counters = [
        _item("shared" if narrow else "pages_shared", f"{snap.pages_shared:,}"),
        _item("sharing" if narrow else "pages_sharing", f"{snap.pages_sharing:,}"),
        _item("zero", f"{snap.pages_zero:,}"),
        _item("unshared", f"{snap.pages_unshared:,}"),
        _item("volatile", f"{snap.pages_volatile:,}"),
    ]
    if narrow:
        counters = counters[:3]
    else:
        counters.append(_item("profit", human_bytes(snap.general_profit_bytes)))
    scan_rate = f"{snap.scan_rate_pages_s:,.0f} pages/s"
    if not narrow:
        scan_rate += f" ({human_bytes(snap.scan_rate_pages_s * PAGE_SIZE)}/s)"
    work = [
        _item("full scans", f"{snap.full_scans:,}"),
        _item("scan", scan_rate),
        _item("COW breaks", f"{snap.cow_breaks:,}"),
        _item("procksm CPU", f"{snap.cpu_percent:.1f}%"),
        _item("RSS", human_bytes(snap.rss_bytes)),
    ]
    if not narrow:
        work.append(
            _item(
                "pauses p50/p99/max",
                f"{snap.pause_p50_ms:.1f}/{snap.pause_p99_ms:.1f}/{snap.pause_max_ms:.1f} ms",
            )
        )
    lines = [title]
    lines.append(saved)
    lines += _packed(counters + work, width)
    for line in lines:
        line.truncate(width, overflow="ellipsis")
    return lines


# -- charts ------------------------------------------------------------------------------


def _span(snap: Snapshot, n: int) -> str:
    pts = snap.history[-n:]
    if len(pts) < 2:
        return ""
    secs = pts[-1].time - pts[0].time
    return f"{secs / 60:.0f} min" if secs >= 120 else f"{secs:.0f} s"


def chart_lines(snap: Snapshot, width: int) -> list[Text]:
    """Saved bytes and COW-break rate over ``snap.history``: side by side when wide."""
    if not snap.history:
        return [Text("(no history yet)", style="dim")]
    saved_now = human_bytes(snap.history[-1].saved_bytes)
    cow_vals = [h.cow_breaks_per_s for h in snap.history]
    cow_now = f"{rate(cow_vals[-1])}/s max {rate(max(cow_vals))}"

    def one(label: str, values: list[float], now: str, style: str, w: int) -> Text:
        spark_w = max(4, w - len(label) - len(now) - 2)
        return Text.assemble(
            (label, "dim"), " ", (sparkline(values, spark_w), style), " ", (now, "bold")
        )

    saved_vals = [float(h.saved_bytes) for h in snap.history]
    wide = width >= 100
    w = (width - 3) // 2 if wide else width
    span = _span(snap, max(4, w - 20))
    saved_line = one(f"saved{' ' + span if span else ''}", saved_vals, saved_now, "green", w)
    cow_line = one("COW breaks", cow_vals, cow_now, "red", w)
    if wide:
        saved_line.append(" " * max(1, w - saved_line.cell_len + 3))
        saved_line.append_text(cow_line)
        lines = [saved_line]
    else:
        lines = [saved_line, cow_line]
    for line in lines:
        line.truncate(width, overflow="ellipsis")
    return lines


# -- the targets table -------------------------------------------------------------------


class _Col(NamedTuple):
    name: str
    min_width: int  # the terminal width from which the column is shown


# Columns in order, each shown from a terminal width on: a 40-column terminal keeps what
# answers "how much is saved, where, what is breaking" (pid, name, merged, COW/s).
COLUMNS: tuple[_Col, ...] = (
    _Col("pid", 0),
    _Col("name", 0),
    _Col("RSS", 60),
    _Col("PSS", 100),
    _Col("merged", 0),
    _Col("zero", 70),
    _Col("COW/s", 0),
    _Col("refused", 120),
    _Col("pause ms", 120),
    _Col("memory", 80),
)


def columns_for(width: int) -> list[str]:
    return [c.name for c in COLUMNS if width >= c.min_width]


def _target_cells(t: TargetSnapshot, cols: list[str], expanded: bool) -> list[RenderableType]:
    marker = ("▾ " if expanded else "▸ ") if t.mappings else "  "
    cells: dict[str, RenderableType] = {
        "pid": str(t.pid),
        "name": Text(marker + t.name),
        "RSS": human_bytes(t.rss_bytes),
        "PSS": human_bytes(t.pss_bytes),
        "merged": human_bytes(t.pages_merged * PAGE_SIZE),
        "zero": human_bytes(t.pages_zero * PAGE_SIZE),
        "COW/s": Text(rate(t.cow_breaks_per_s), style="red" if t.cow_breaks_per_s >= 10 else ""),
        "refused": Text(
            f"{t.pages_refused:,}" + (f" {t.top_refusal}" if t.top_refusal else ""),
            style="yellow" if t.pages_refused else "dim",
        ),
        "pause ms": f"{t.last_pause_ms:.1f}/{t.max_pause_ms:.1f}",
        "memory": MemoryBar(t.pages_merged * PAGE_SIZE, t.pages_zero * PAGE_SIZE, t.rss_bytes),
    }
    return [cells[c] for c in cols]


def _mapping_cells(m: MappingSnapshot, cols: list[str], width: int) -> list[RenderableType]:
    cells: dict[str, RenderableType] = {
        "pid": "",
        "name": Text(f"  {m.name} {m.start:#x}" if width >= 100 else f"  {m.name}"),
        "RSS": human_bytes(m.rss_pages * PAGE_SIZE),
        "PSS": "",
        "merged": human_bytes(m.merged_pages * PAGE_SIZE),
        "zero": human_bytes(m.zero_pages * PAGE_SIZE),
        "COW/s": "",
        "refused": "",
        "pause ms": "",
        "memory": MemoryBar(
            m.merged_pages * PAGE_SIZE, m.zero_pages * PAGE_SIZE, m.rss_pages * PAGE_SIZE
        ),
    }
    return [cells[c] for c in cols]


def _row_plan(
    snap: Snapshot, state: ViewState, max_rows: int | None
) -> tuple[list[tuple[TargetSnapshot, MappingSnapshot | None]], int, int]:
    """The rows to show (target rows and their mapping rows), windowed around the selection.

    Returns (rows, hidden above, hidden below).
    """
    sel = selected_target(snap, state)
    rows: list[tuple[TargetSnapshot, MappingSnapshot | None]] = []
    sel_index = 0
    for t in sorted_targets(snap, state):
        if sel is not None and t.pid == sel.pid:
            sel_index = len(rows)
        rows.append((t, None))
        if t.pid in state.expanded:
            for m in sorted(t.mappings, key=lambda m: (-m.merged_pages, -m.rss_pages, m.start)):
                rows.append((t, m))
    if max_rows is None or len(rows) <= max_rows:
        return rows, 0, 0
    max_rows = max(1, max_rows)
    # keep the selected target and as much of its expansion as fits in the window
    sel_end = sel_index + 1
    while sel_end < len(rows) and rows[sel_end][1] is not None:
        sel_end += 1
    first = max(0, min(sel_index, sel_end - max_rows))
    first = min(first, len(rows) - max_rows)
    return rows[first : first + max_rows], first, len(rows) - first - max_rows


def targets_table(
    snap: Snapshot, state: ViewState, width: int, max_rows: int | None = None
) -> Table:
    """The targets, sorted, the selected one highlighted, expanded ones with mappings."""
    cols = columns_for(width)
    sort = SORT_BY_NAME.get(state.sort, SORT_KEYS["s"])
    arrow = "▼" if sort.descending != state.reverse else "▲"
    rows, above, below = _row_plan(snap, state, max_rows)
    caption = []
    if above:
        caption.append(f"↑ {above} more")
    if below:
        caption.append(f"↓ {below} more")
    # no box: its column separators would not take the selected row's reverse style
    table = Table(
        box=None,
        pad_edge=False,
        expand=True,
        header_style="bold underline",
        caption="  ".join(caption) or None,
        caption_justify="right",
        caption_style="dim",
    )
    name_w = 28 if width >= 120 else 20 if width >= 100 else 16 if width >= 80 else 12
    for c in cols:
        header = f"{c}{arrow}" if c == sort.column else c
        if c == "name":
            table.add_column(header, no_wrap=True, overflow="ellipsis", max_width=name_w)
        elif c == "refused":
            table.add_column(header, no_wrap=True, overflow="ellipsis", max_width=22)
        elif c == "memory":
            table.add_column(header, no_wrap=True, min_width=8, ratio=1)
        else:
            table.add_column(header, justify="right", no_wrap=True)
    sel = selected_target(snap, state)
    for t, m in rows:
        if m is None:
            style = "reverse" if sel is not None and t.pid == sel.pid else ""
            table.add_row(*_target_cells(t, cols, t.pid in state.expanded), style=style)
        else:
            table.add_row(*_mapping_cells(m, cols, width), style="dim")
    return table


def help_panel(width: int) -> Panel:
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold cyan", no_wrap=True)
    grid.add_column()
    for k, what in KEYS:
        grid.add_row(k, what)
    legend = Text.assemble(
        "\nmemory bar: ",
        ("█", "green"),
        " merged  ",
        ("█", "cyan"),
        " zero pages dropped  ",
        ("░", "bright_black"),
        " not merged\npause ms: the last and the longest stop of the target's threads"
        "\nsaved = (pages_sharing + pages_zero) × 4 KiB, as kernel KSM counts it",
    )
    return Panel(
        Group(grid, legend),
        title="procksm top — keys",
        title_align="left",
        border_style="cyan",
        width=min(width, 84),
    )


def footer(snap: Snapshot | None, state: ViewState, width: int) -> Text:
    if state.confirm_unmerge is not None:
        name = next(
            (t.name for t in (snap.targets if snap else ()) if t.pid == state.confirm_unmerge), "?"
        )
        text = Text(
            f" Unmerge pid {state.confirm_unmerge} ({name})? y/n ", style="bold black on yellow"
        )
    elif state.message:
        text = Text(state.message, style="bold red" if state.error else "bold")
    else:
        pause = "resume" if snap is not None and snap.run != 1 else "pause"
        hints = [
            ("q", "quit"),
            ("?", "help"),
            ("s/r/c/p/n", "sort"),
            ("↑↓", "select"),
            ("⏎", "expand"),
            ("space", pause),
            ("u", "unmerge"),
        ]
        text = Text()
        for k, what in hints:
            item = Text.assemble((k, "bold cyan"), " ", what)
            if text and text.cell_len + 2 + item.cell_len > width:
                break
            if text:
                text.append("  ")
            text.append_text(item)
    text.truncate(width, overflow="ellipsis")
    return text


# -- the whole screen --------------------------------------------------------------------


def view(
    snap: Snapshot | None, state: ViewState, width: int, height: int | None = None
) -> RenderableType:
    """The whole live view for a terminal of ``width`` × ``height`` (None: no limit)."""
    if snap is None:
        return Group(
            Text("procksm — waiting for the first snapshot…", style="bold"),
            footer(None, state, width),
        )
    head = header_lines(snap, width)
    charts = chart_lines(snap, width)
    if height is not None:
        # short terminal: the table matters more than the charts and the counters
        if height - len(head) - len(charts) - 2 < 6:
            charts = []
        if height - len(head) - 2 < 6:
            head = head[:2]
    top: list[RenderableType] = [*head, *charts]
    used = len(head) + len(charts) + 1 + 1  # + blank line before the footer, the footer
    if state.help:
        body: RenderableType = help_panel(width)
    elif not snap.targets:
        body = Text("\nno targets: attach processes with procksm attach PID…", style="dim")
    else:
        # table: the header row; one caption line when rows are hidden
        max_rows = None if height is None else max(1, height - used - 2)
        body = targets_table(snap, state, width, max_rows)
    return Group(*top, body, Text(""), footer(snap, state, width))


# -- the plain line (stdout not a terminal) ---------------------------------------------

PLAIN_HEADER = (
    f"{'TIME':<8} {'SAVED':>10} {'%RSS':>6} {'SHARED':>9} {'SHARING':>9} {'ZERO':>9} "
    f"{'SCANS':>6} {'COW/s':>7} {'TARGETS':>7} {'CPU%':>5} STATE"
)


def plain_line(snap: Snapshot) -> str:
    """One line per interval when stdout is not a terminal (bcc-style, under PLAIN_HEADER)."""
    before = snap.targets_rss_bytes + snap.pages_zero * PAGE_SIZE
    cow = sum(t.cow_breaks_per_s for t in snap.targets)
    state = RUN_STATES.get(snap.run, (f"run={snap.run}", ""))[0]
    return (
        f"{time.strftime('%H:%M:%S', time.localtime(snap.time)):<8} "
        f"{human_bytes(snap.saved_bytes).replace(' ', ''):>10} {pct(snap.saved_bytes, before):>6} "
        f"{snap.pages_shared:>9} {snap.pages_sharing:>9} {snap.pages_zero:>9} "
        f"{snap.full_scans:>6} {cow:>7.1f} {len(snap.targets):>7} {snap.cpu_percent:>5.1f} "
        f"{state}/{snap.observer}"
    )


__all__ = [
    "KEYS",
    "PLAIN_HEADER",
    "SORT_KEYS",
    "MemoryBar",
    "ViewState",
    "chart_lines",
    "columns_for",
    "footer",
    "header_lines",
    "help_panel",
    "human_bytes",
    "move_selection",
    "plain_line",
    "selected_target",
    "set_sort",
    "sorted_targets",
    "sparkline",
    "targets_table",
    "toggle_expanded",
    "view",
]
