"""Merge planning: from a verified page table to slots and extents (pure, no syscalls).

* A **slot** is one page of a sealed memfd segment holding a content that at least two
  frames share. Slots are numbered in the order their content is first met in row order
  (process, mapping, address), so the slots of a run of duplicates in the first process
  are contiguous, and the same run in another process maps the same contiguous slots.
* An **extent** is a run of adjacent pages of one mapping whose slots are consecutive
  and inside one segment: one ``mmap`` in the target, one VMA (docs/design.md §3.3).
* A **zero extent** is a run of adjacent all-zero pages: one ``MADV_DONTNEED``, no memfd,
  no VMA split (§2.4).

Each extent may split the target's anonymous VMA in up to two more, so the per-target
VMA budget counts 2 per extent; when a target has more extents than its budget allows,
the largest are kept and the refused pages are counted.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np

from procksm import PAGE_SIZE
from procksm.analysis import CONTENT_ZERO, PageTable, ScanInput
from procksm.runs import split_runs


@dataclass(frozen=True, slots=True)
class Extent:
    addr: int
    npages: int
    slot: int  # first slot; slots slot..slot+npages-1 (one segment)
    prot_write: bool = True

    @property
    def end(self) -> int:
        return self.addr + self.npages * PAGE_SIZE


@dataclass(frozen=True, slots=True)
class ZeroExtent:
    addr: int
    npages: int


@dataclass(slots=True)
class TargetPlan:
    pid: int
    extents: list[Extent] = field(default_factory=list)
    zero_extents: list[ZeroExtent] = field(default_factory=list)
    pages_refused_budget: int = 0
    extents_refused_budget: int = 0
    # (start, end, advice) of the target's scanned VMAs that carry advice (MappingRef)
    advised: list[tuple[int, int, tuple[int, ...]]] = field(default_factory=list)

    def advice_at(self, addr: int) -> tuple[int, ...]:
        """The madvise values a replacement mapping at ``addr`` is given again."""
        for start, end, advice in self.advised:
            if start <= addr < end:
                return advice
        return ()

    @property
    def pages(self) -> int:
        return sum(e.npages for e in self.extents)

    @property
    def zero_pages(self) -> int:
        return sum(z.npages for z in self.zero_extents)


@dataclass(slots=True)
class MergePlan:
    """What to write into the slot store and what to map where."""

    slot_rows: np.ndarray  # int64: for slot s, the row of its reference page
    targets: list[TargetPlan]
    segment_pages: int
    # Slots are stored in pieces, one memfd each: piece i holds slots
    # piece_starts[i] .. piece_starts[i+1]-1. Every extent ends at the end of a piece
    # (see split_at_extent_ends), so the file continues after it only with a hole.
    piece_starts: np.ndarray = field(default_factory=lambda: np.zeros(1, np.int64))

    @property
    def nslots(self) -> int:
        return int(self.slot_rows.size)


def vma_budget(max_map_count: int, current_vmas: int, cap: int = 8192) -> int:
    """New VMAs procksm may cause in one target: far below vm.max_map_count.

    At max_map_count the target's own mmap/mprotect fail with ENOMEM (docs/design.md §3.3); an
    eighth of the limit, minus what the target already uses, and never above ``cap``.
    """
    return max(0, min(cap, max_map_count // 8, (max_map_count - current_vmas) // 4))


def plan_merge(
    scan: ScanInput,
    mergeable: np.ndarray,
    *,
    segment_pages: int,
    budgets: dict[int, int],
    zero_pages: bool = True,
    cut_at_extent_ends: bool = True,
) -> MergePlan:
    """Plan slots and extents for the rows where ``mergeable`` is True.

    ``cut_at_extent_ends``: end a memfd wherever an extent ends (split_at_extent_ends);
    not needed where the madvise guard unmerges a merged range before mremap grows it.

    Rows with a content id shared by at least two distinct frames become slot users;
    zero rows become zero extents (when ``zero_pages``). ``budgets`` maps a pid to its
    VMA budget (see :func:`vma_budget`).
    """
    t = scan.pages
    n = len(t)
    candidates = np.flatnonzero(mergeable[:n] & (t.content >= 0))
    rows, slot_of_row, slot_rows = _number_slots(t, candidates)
    starts = np.array([m.start for m in scan.mappings] or [0], dtype=np.int64)
    targets = {p.pid: TargetPlan(p.pid) for p in scan.processes}
    for m in scan.mappings:
        if m.advice:
            targets[scan.processes[m.proc].pid].advised.append((m.start, m.end, m.advice))
    _add_extents(scan, starts, rows, slot_of_row, segment_pages, targets)
    if zero_pages:
        zrows = np.flatnonzero(mergeable[:n] & (t.content == CONTENT_ZERO))
        _add_zero_extents(scan, starts, zrows, targets)

    for tp in targets.values():
        apply_budget(tp, budgets.get(tp.pid, 0))
    piece_starts = split_at_extent_ends(
        list(targets.values()), slot_rows.size, segment_pages, at_extent_ends=cut_at_extent_ends
    )
    for tp in targets.values():
        apply_budget(tp, budgets.get(tp.pid, 0))  # splitting may have added extents
    return MergePlan(
        slot_rows=slot_rows,
        targets=list(targets.values()),
        segment_pages=segment_pages,
        piece_starts=piece_starts,
    )


def _number_slots(t: PageTable, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Of the candidate ``rows``, those whose content at least two distinct frames
    share; each one's slot, and each slot's reference row."""
    # contents shared by >= 2 distinct frames
    c = t.content[rows].astype(np.int64)
    uc, nframes = np.unique(_distinct_pairs(c, t.pfn[rows].astype(np.int64)), return_counts=True)
    shared = uc[nframes > 1]
    rows = rows[np.isin(c, shared)]
    c = t.content[rows].astype(np.int64)
    # slot numbering: order of first occurrence (rows are ascending)
    _, first, inv = np.unique(c, return_index=True, return_inverse=True)
    order = np.argsort(first, kind="stable")
    rank = np.empty(order.size, np.int64)
    rank[order] = np.arange(order.size)
    slot_of_row = rank[inv]
    slot_rows = rows[first[order]]
    return rows, slot_of_row, slot_rows


def _distinct_pairs(c: np.ndarray, pfn: np.ndarray) -> np.ndarray:
    """The content of each distinct (content, frame) pair, in content order. One key per
    pair when both fit in 63 bits: np.unique(axis=0) on the two columns sorted rows as
    opaque records, 0.15 s of the first row's 0.17 s of planning (196 K rows)."""
    if c.size == 0:
        return c
    bits = max(int(pfn.max()), 1).bit_length()
    if int(c.min()) >= 0 and int(pfn.min()) >= 0 and int(c.max()).bit_length() + bits <= 63:
        key = np.unique((c << bits) | pfn)
        return key >> bits
    order = np.lexsort((pfn, c))
    c, pfn = c[order], pfn[order]
    first = np.ones(c.size, bool)
    first[1:] = (c[1:] != c[:-1]) | (pfn[1:] != pfn[:-1])
    return c[first]


def _add_extents(
    scan: ScanInput,
    starts: np.ndarray,
    rows: np.ndarray,
    slot_of_row: np.ndarray,
    segment_pages: int,
    targets: dict[int, TargetPlan],
) -> None:
    """Runs of adjacent pages of one mapping with consecutive slots in one segment."""
    t = scan.pages
    mapping_of = scan.mapping_of(rows)
    addr = starts[mapping_of] + t.off[rows].astype(np.int64) * PAGE_SIZE
    if rows.size:
        new_run = (
            (np.diff(mapping_of) != 0)
            | (np.diff(addr) != PAGE_SIZE)
            | (np.diff(slot_of_row) != 1)
            | ((slot_of_row[1:] % segment_pages) == 0)
        )
        for a, b in split_runs(new_run, rows.size):
            pid = scan.processes[scan.mappings[int(mapping_of[a])].proc].pid
            targets[pid].extents.append(Extent(int(addr[a]), b - a, int(slot_of_row[a])))


def _add_zero_extents(
    scan: ScanInput, starts: np.ndarray, zrows: np.ndarray, targets: dict[int, TargetPlan]
) -> None:
    """Runs of adjacent zero pages (rows ``zrows``) of one mapping."""
    t = scan.pages
    if zrows.size:
        zm = scan.mapping_of(zrows)
        za = starts[zm] + t.off[zrows].astype(np.int64) * PAGE_SIZE
        new_run = (np.diff(zm) != 0) | (np.diff(za) != PAGE_SIZE)
        for a, b in split_runs(new_run, zrows.size):
            pid = scan.processes[scan.mappings[int(zm[a])].proc].pid
            targets[pid].zero_extents.append(ZeroExtent(int(za[a]), b - a))


def apply_budget(tp: TargetPlan, budget: int) -> None:
    limit = budget // 2  # an extent may cost two VMAs
    if len(tp.extents) > limit:
        keep = sorted(tp.extents, key=lambda e: -e.npages)[:limit]
        refused_pages = tp.pages - sum(e.npages for e in keep)
        tp.pages_refused_budget += refused_pages
        tp.extents_refused_budget += len(tp.extents) - len(keep)
        tp.extents = sorted(keep, key=lambda e: e.addr)


def split_at_extent_ends(
    targets: list[TargetPlan], nslots: int, segment_pages: int, *, at_extent_ends: bool = True
) -> np.ndarray:
    """Cut the slots into pieces that end wherever any target's extent ends (with
    ``at_extent_ends``; always every ``segment_pages``); split the extents at piece
    starts. Returns the piece starts.

    Why: ``mremap`` can grow a mapping in place, and a grown file mapping maps the file
    offsets that follow it. Were another extent's slots there, the grown pages would read
    another process's merged content (and SIGBUS past the end of the file) instead of
    zeros (measured). Each piece is its own memfd whose file continues with a large hole
    (MergeOptions.tail_gap_pages), which reads as zeros, like the anonymous memory that
    a growing anonymous mapping gets.

    Where the madvise guard watches the targets (procksm.guard), an mremap that would
    grow a merged range is stopped and the range unmerged before the call runs, so no
    mapping ever grows over the slots that follow it: a memfd then holds many extents,
    and a stop window hands over one fd instead of one per extent (the scattered
    layout's every-other-page extents each had a memfd of their own).
    """
    ends = {e.slot + e.npages for tp in targets for e in tp.extents} if at_extent_ends else set()
    ends.update(range(segment_pages, nslots, segment_pages))
    starts = np.array(sorted({0, *ends} - {nslots}), dtype=np.int64)
    starts = starts[starts < max(nslots, 1)]
    for tp in targets:
        out: list[Extent] = []
        for e in tp.extents:
            lo = int(np.searchsorted(starts, e.slot, side="right"))
            hi = int(np.searchsorted(starts, e.slot + e.npages, side="left"))
            cuts = [int(c) for c in starts[lo:hi]]
            edges = [e.slot, *cuts, e.slot + e.npages]
            for a, b in itertools.pairwise(edges):
                out.append(Extent(e.addr + (a - e.slot) * PAGE_SIZE, b - a, a, e.prot_write))
        tp.extents = out
    return starts if starts.size else np.zeros(1, np.int64)


# System calls per stop window: an extent costs two (mmap, MADV_POPULATE_READ), a zero
# run one (MADV_DONTNEED), a memfd five (pidfd_getfd, fstat, its two checks, close).
# They run in the target in one go (procksm.attach.call_batch), a few microseconds each,
# from a table of 48 entries (procksm.attach.scratch_layout.TABLE_CAPACITY), two of
# which the window's pidfd takes (open, close). (One ptrace round trip per call, before,
# cost 25-150 us each and windows were held to 12 calls.)
MAX_CALLS_PER_BATCH = 46
FD_CALLS = 5

# A run of at least this many pages is compared by the target itself, not read again by
# procksm (issue 16, "verification that costs less than a second read"): the call
# routine compares its bytes with the slots, mapped for it in the scratch area's staging
# range, and the slots are mapped over the run only if they are equal (EQUAL gives the
# mmap its fd; a zero run: ZERO, then MADV_DONTNEED). That costs two entries more per
# extent (the staging mmap, the comparison; ~5 us) and two calls per window (the staging
# range given back), one more per zero run; procksm's read and comparison cost ~1.2 us a page
# (docs/design.md §7). Shorter runs (scattered duplicates) are read and compared by
# procksm in one process_vm_readv.
IN_TARGET_PAGES = 16
STAGING_CALLS = 2


def compared_in_target(npages: int) -> bool:
    """Whether a run of ``npages`` pages is compared by the target (IN_TARGET_PAGES)."""
    return npages >= IN_TARGET_PAGES


def extent_calls(in_target: bool, advice: int) -> int:
    """The calls of an extent's mapping: mmap, MADV_POPULATE_READ and ``advice`` madvise
    calls; compared in the target, also its staging mmap and its comparison (the
    staging range's own calls are STAGING_CALLS per window)."""
    return (4 if in_target else 2) + advice


def zero_run_calls(in_target: bool) -> int:
    """MADV_DONTNEED; compared in the target, also its ZERO check."""
    return 2 if in_target else 1


# What a stop window costs, in pages' worth: each page, plus for each extent (its read
# and comparison, mmap, populate, the advice again) and each zero run (its read, one
# madvise) a fixed share. Measured on single-threaded targets (2026-12-07): a page ~2.5
# us, an extent ~60 us more than its pages, a zero run about half that. The window
# sizer (procksm.window_sizer) learns the cost of a unit per target; without the share a
# window of 40 scattered one-page extents would count as 40 pages and take ~2.5 ms.
EXTENT_UNITS = 24
ZERO_RUN_UNITS = 12
# The shortest window the sizer may ask for: one extent of 16 pages.
MIN_WINDOW_UNITS = EXTENT_UNITS + 16


def window_units(extents: Sequence[Extent], zero_extents: Sequence[ZeroExtent]) -> int:
    """The cost of a window's work, in pages' worth (see EXTENT_UNITS)."""
    return sum(e.npages + EXTENT_UNITS for e in extents) + sum(
        z.npages + ZERO_RUN_UNITS for z in zero_extents
    )


def split_batches(
    extents: list[Extent],
    zero_extents: list[ZeroExtent],
    window_units_cap: Callable[[], int],
    max_pages: int,
    max_calls: int = MAX_CALLS_PER_BATCH,
    piece_of: Callable[[int], int] | None = None,
    advice_calls: Callable[[int], int] | None = None,
) -> Iterator[tuple[list[Extent], list[ZeroExtent]]]:
    """Cut the work into stop windows of at most ``window_units_cap()`` units of cost
    (:func:`window_units`), ``max_pages`` pages and ``max_calls`` injected system calls
    each, one window at a time: ``window_units_cap`` is asked again for each window,
    after the one before was made (procksm.window_sizer). A window holds at least one
    page whatever its cap.

    An extent costs :func:`extent_calls` (mmap, MADV_POPULATE_READ; compared in the
    target, its staging mmap and comparison too, and the window STAGING_CALLS once), plus
    ``advice_calls(addr)`` for the advice its mapping is given again (one madvise each:
    numpy's arrays carry MADV_HUGEPAGE), a zero run :func:`zero_run_calls`, and each
    memfd a window uses FD_CALLS more (taken, checked, closed): ``piece_of(slot)``
    names the memfd of a slot. Extents longer than a batch are cut; the pieces are
    adjacent in address and slot, so the kernel merges their VMAs back into one.
    """
    cur_e: list[Extent] = []
    cur_z: list[ZeroExtent] = []
    fds: set[int] = set()
    units = pages = calls = 0
    staged = False  # the window has an extent compared in the target (STAGING_CALLS)
    cap = window_units_cap()

    def flush() -> Iterator[tuple[list[Extent], list[ZeroExtent]]]:
        nonlocal cur_e, cur_z, units, pages, calls, cap, staged
        if cur_e or cur_z:
            yield cur_e, cur_z
            cap = window_units_cap()
        cur_e, cur_z, units, pages, calls, staged = [], [], 0, 0, 0, False
        fds.clear()

    def room(share: int) -> int:
        """Pages the current window still takes in a run costing ``share`` more."""
        return min(max_pages - pages, cap - units - share)

    def extent_cost(take: int, piece: int, advice: int) -> int:
        return (
            extent_calls(compared_in_target(take), advice)
            + (FD_CALLS if piece_of and piece not in fds else 0)
            + (STAGING_CALLS if compared_in_target(take) and not staged else 0)
        )

    for e in extents:
        off = 0
        piece = piece_of(e.slot) if piece_of else -1
        advice = advice_calls(e.addr) if advice_calls else 0
        while off < e.npages:
            take = min(e.npages - off, max(1, room(EXTENT_UNITS)))
            cost = extent_cost(take, piece, advice)
            if (calls + cost > max_calls or room(EXTENT_UNITS) < 1) and (cur_e or cur_z):
                yield from flush()
                take = min(e.npages - off, max(1, room(EXTENT_UNITS)))
                cost = extent_cost(take, piece, advice)
            if piece_of:
                fds.add(piece)
            cur_e.append(Extent(e.addr + off * PAGE_SIZE, take, e.slot + off, e.prot_write))
            staged = staged or compared_in_target(take)
            off += take
            pages += take
            units += take + EXTENT_UNITS
            calls += cost
            if room(EXTENT_UNITS) < 1:
                yield from flush()
    for z in zero_extents:
        off = 0
        while off < z.npages:
            take = min(z.npages - off, max(1, room(ZERO_RUN_UNITS)))
            if (
                calls + zero_run_calls(compared_in_target(take)) > max_calls
                or room(ZERO_RUN_UNITS) < 1
            ) and (cur_e or cur_z):
                yield from flush()
                take = min(z.npages - off, max(1, room(ZERO_RUN_UNITS)))
            cur_z.append(ZeroExtent(z.addr + off * PAGE_SIZE, take))
            off += take
            pages += take
            units += take + ZERO_RUN_UNITS
            calls += zero_run_calls(compared_in_target(take))
            if room(ZERO_RUN_UNITS) < 1:
                yield from flush()
    yield from flush()
