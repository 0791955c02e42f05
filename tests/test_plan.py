"""Pure tests of merge planning (procksm.plan): slots, extents, zero runs, the VMA budget
and stop-window batches, on page tables built by hand (no processes involved)."""

from __future__ import annotations

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from procksm import PAGE_SIZE
from procksm.analysis import (
    CONTENT_VOLATILE,
    CONTENT_ZERO,
    MappingRef,
    PageTable,
    ProcessIdentity,
    ScanInput,
)
from procksm.plan import (
    EXTENT_UNITS,
    IN_TARGET_PAGES,
    MAX_CALLS_PER_BATCH,
    ZERO_RUN_UNITS,
    Extent,
    MergePlan,
    ZeroExtent,
    _distinct_pairs,
    plan_merge,
    split_batches,
    vma_budget,
    window_units,
)

Z, V = CONTENT_ZERO, CONTENT_VOLATILE
PID0 = 100
BASE = 0x7F00_0000_0000
BIG_BUDGET = 1 << 20


def UNLIMITED() -> int:  # a window cost cap that never binds
    return 1 << 30


# contents of one mapping's pages by page offset; None: page absent (not scanned)
Pages = list[int | None]


def build(procs: list[list[tuple[int, Pages]]]) -> ScanInput:
    """procs[p] = [(mapping start, contents by page offset), ...], pid PID0 + p; every
    present page has its own frame."""
    rows: list[tuple[int, int]] = []  # (content, off)
    mappings: list[MappingRef] = []
    mapping_rows = [0]
    for p, maps in enumerate(procs):
        for start, contents in maps:
            mappings.append(
                MappingRef(p, start, start + len(contents) * PAGE_SIZE, "[anon]", "rw-p")
            )
            rows += [(c, off) for off, c in enumerate(contents) if c is not None]
            mapping_rows.append(len(rows))
    t = PageTable.empty(len(rows))
    for i, (c, off) in enumerate(rows):
        t.content[i] = c
        t.off[i] = off
        t.pfn[i] = 1000 + i
        t.hash[i] = np.uint64(c & 0xFFFF_FFFF)
    return ScanInput(
        processes=[ProcessIdentity(PID0 + p, f"w{p}", 0) for p in range(len(procs))],
        mappings=mappings,
        pages=t,
        mapping_rows=np.array(mapping_rows, np.int64),
    )


def plan(
    scan: ScanInput,
    *,
    segment_pages: int = 1 << 14,
    budgets: dict[int, int] | None = None,
    mergeable: np.ndarray | None = None,
    zero_pages: bool = True,
) -> MergePlan:
    if budgets is None:
        budgets = {p.pid: BIG_BUDGET for p in scan.processes}
    if mergeable is None:
        mergeable = np.ones(len(scan.pages), bool)
    return plan_merge(
        scan, mergeable, segment_pages=segment_pages, budgets=budgets, zero_pages=zero_pages
    )


def extents(mp: MergePlan, proc: int) -> list[tuple[int, int, int]]:
    """(page index from BASE, pages, first slot) of process ``proc``'s extents."""
    tp = next(t for t in mp.targets if t.pid == PID0 + proc)
    return [((e.addr - BASE) // PAGE_SIZE, e.npages, e.slot) for e in tp.extents]


def zero_runs(mp: MergePlan, proc: int) -> list[tuple[int, int]]:
    tp = next(t for t in mp.targets if t.pid == PID0 + proc)
    return [((z.addr - BASE) // PAGE_SIZE, z.npages) for z in tp.zero_extents]


def at(page: int) -> int:
    return BASE + page * PAGE_SIZE


# --------------------------------------------------------------------------------------
# slots and extents
# --------------------------------------------------------------------------------------


def test_contiguous_duplicates_are_one_extent_per_target() -> None:
    scan = build([[(at(0), [1, 2, 3, 4])], [(at(100), [1, 2, 3, 4])]])
    mp = plan(scan)
    assert mp.nslots == 4
    assert mp.slot_rows.tolist() == [0, 1, 2, 3]  # references: the first process's pages
    assert extents(mp, 0) == [(0, 4, 0)]
    assert extents(mp, 1) == [(100, 4, 0)]
    tp = mp.targets[0]
    assert tp.pages == 4 and tp.extents[0].end == at(4)


def test_slots_follow_first_occurrence_and_unique_pages_get_none() -> None:
    # p0: u1 A B u2; p1: B A u3 -> slots A=0, B=1 (met first in p0)
    scan = build([[(at(0), [91, 1, 2, 92])], [(at(100), [2, 1, 93])]])
    mp = plan(scan)
    assert mp.nslots == 2
    assert mp.slot_rows.tolist() == [1, 2]
    # p1's one-slot extents end at slot 1 and 2: p0's run A B is cut at slot 1, so that
    # no extent is followed by another extent's slots in its memfd (mremap growth)
    assert extents(mp, 0) == [(1, 1, 0), (2, 1, 1)]
    # in p1, B (slot 1) comes before A (slot 0): the slots go backwards, two extents
    assert extents(mp, 1) == [(100, 1, 1), (101, 1, 0)]
    assert mp.piece_starts.tolist() == [0, 1]


def test_slot_discontinuity_splits_an_extent() -> None:
    # p1 holds A B C but p2 holds A C: in p2 slot 0 is followed by slot 2
    scan = build([[(at(0), [1, 2, 3])], [(at(50), [1, 3])], [(at(90), [2])]])
    mp = plan(scan)
    # the other targets' extents end after slots 0, 1 and 2: p0's run is cut there
    assert extents(mp, 0) == [(0, 1, 0), (1, 1, 1), (2, 1, 2)]
    assert extents(mp, 1) == [(50, 1, 0), (51, 1, 2)]
    assert extents(mp, 2) == [(90, 1, 1)]


def test_mapping_change_splits_an_extent_even_when_addresses_touch() -> None:
    # p0: two VMAs back to back (e.g. different protections), slots continue across
    scan = build([[(at(0), [1, 2]), (at(2), [3, 4])], [(at(100), [1, 2, 3, 4])]])
    mp = plan(scan)
    assert extents(mp, 0) == [(0, 2, 0), (2, 2, 2)]
    assert extents(mp, 1) == [(100, 2, 0), (102, 2, 2)]  # cut where p0's first extent ends


def test_address_gap_splits_an_extent() -> None:
    # p0's page 2 is absent (never touched): slots 1 and 2 are consecutive, addresses not
    scan = build([[(at(0), [1, 2, None, 3])], [(at(100), [1, 2, 3])]])
    mp = plan(scan)
    assert extents(mp, 0) == [(0, 2, 0), (3, 1, 2)]
    assert extents(mp, 1) == [(100, 2, 0), (102, 1, 2)]  # cut where p0's extent ends


def test_segment_boundary_splits_an_extent() -> None:
    contents: Pages = list(range(1, 11))
    scan = build([[(at(0), contents)], [(at(100), contents)]])
    mp = plan(scan, segment_pages=4)
    assert mp.segment_pages == 4
    assert extents(mp, 0) == [(0, 4, 0), (4, 4, 4), (8, 2, 8)]
    assert extents(mp, 1) == [(100, 4, 0), (104, 4, 4), (108, 2, 8)]
    for tp in mp.targets:  # no extent crosses a segment
        assert all(e.slot // 4 == (e.slot + e.npages - 1) // 4 for e in tp.extents)


def test_duplicates_within_one_process_map_one_slot_each() -> None:
    scan = build([[(at(0), [7, 7, 7, 8])]])
    mp = plan(scan)
    assert mp.nslots == 1
    # the same slot three times: never consecutive slots, so three one-page extents
    assert extents(mp, 0) == [(0, 1, 0), (1, 1, 0), (2, 1, 0)]


def test_zero_pages_become_zero_runs_not_slots() -> None:
    scan = build([[(at(0), [Z, Z, 1, Z, None, Z]), (at(6), [Z, Z])], [(at(100), [1, Z])]])
    mp = plan(scan)
    assert mp.nslots == 1
    # split by a non-zero page, an absent page and a mapping boundary
    assert zero_runs(mp, 0) == [(0, 2), (3, 1), (5, 1), (6, 2)]
    assert zero_runs(mp, 1) == [(101, 1)]
    assert mp.targets[0].zero_pages == 6
    off = plan(scan, zero_pages=False)
    assert all(tp.zero_extents == [] for tp in off.targets)
    assert extents(off, 0) == extents(mp, 0)


def test_unmergeable_volatile_and_already_shared_frames_get_no_slot() -> None:
    scan = build([[(at(0), [1, 2, V, 3, Z])], [(at(100), [1, 2, V, 3, Z])]])
    mergeable = np.ones(len(scan.pages), bool)
    mergeable[1] = False  # p0's content 2 changed between the scans
    mergeable[9] = False  # p1's zero page too
    # content 3: both processes map one frame already (after fork): nothing to save
    scan.pages.pfn[8] = scan.pages.pfn[3]
    mp = plan(scan, mergeable=mergeable)
    assert mp.nslots == 1  # only content 1
    assert extents(mp, 0) == [(0, 1, 0)]
    assert extents(mp, 1) == [(100, 1, 0)]
    assert zero_runs(mp, 0) == [(4, 1)]
    assert zero_runs(mp, 1) == []


def test_no_rows_no_plan() -> None:
    scan = build([[(at(0), [1, 2])], [(at(100), [3, 4])]])
    mp = plan(scan)
    assert mp.nslots == 0
    assert all(tp.extents == [] and tp.zero_extents == [] for tp in mp.targets)


# --------------------------------------------------------------------------------------
# the VMA budget
# --------------------------------------------------------------------------------------


def runs_layout(sizes: list[int]) -> tuple[Pages, Pages]:
    """Two processes' pages: runs of shared contents of the given sizes, each followed by
    a page unique to its process (which separates the extents)."""
    p0: Pages = []
    p1: Pages = []
    c = 1
    for n in sizes:
        p0 += list(range(c, c + n))
        p1 += list(range(c, c + n))
        c += n
        p0.append(10_000 + len(p0))
        p1.append(20_000 + len(p1))
    return p0, p1


def test_budget_keeps_the_largest_extents() -> None:
    sizes = [1, 5, 2, 3, 1]
    p0, p1 = runs_layout(sizes)
    scan = build([[(at(0), p0)], [(at(100), p1)]])
    full = plan(scan)
    assert [n for _, n, _ in extents(full, 0)] == sizes
    # 4 VMAs: 2 extents (an extent in the middle of a VMA splits it in three)
    mp = plan(scan, budgets={PID0: 4, PID0 + 1: 5})
    for proc in (0, 1):
        kept = extents(mp, proc)
        assert [n for _, n, _ in kept] == [5, 3]  # the largest, in address order
        assert kept == sorted(kept)
        tp = mp.targets[proc]
        assert tp.pages_refused_budget == 1 + 2 + 1
        assert tp.extents_refused_budget == 3
        assert tp.pages == 8


def test_budget_zero_or_missing_refuses_every_extent_but_not_zero_runs() -> None:
    scan = build([[(at(0), [1, 2, Z])], [(at(100), [1, 2, Z])]])
    mp = plan(scan, budgets={PID0: 1})  # one VMA is not enough for an extent; p1: none
    for tp in mp.targets:
        assert tp.extents == []
        assert tp.pages_refused_budget == 2 and tp.extents_refused_budget == 1
        assert tp.zero_pages == 1  # MADV_DONTNEED splits no VMA


def test_budget_not_exceeded_keeps_everything() -> None:
    scan = build([[(at(0), [1, 9, 2, 8, 3])], [(at(100), [1, 7, 2, 6, 3])]])
    mp = plan(scan, budgets={PID0: 6, PID0 + 1: 6})
    for tp in mp.targets:
        assert len(tp.extents) == 3
        assert tp.pages_refused_budget == 0 and tp.extents_refused_budget == 0


@given(
    st.lists(st.integers(1, 6), min_size=1, max_size=30),
    st.integers(0, 40),
)
def test_budget_property(sizes: list[int], budget: int) -> None:
    p0, p1 = runs_layout(sizes)
    mp = plan(build([[(at(0), p0)], [(at(1000), p1)]]), budgets={PID0: budget, PID0 + 1: budget})
    for tp in mp.targets:
        assert 2 * len(tp.extents) <= budget
        assert len(tp.extents) == min(len(sizes), budget // 2)
        assert tp.pages + tp.pages_refused_budget == sum(sizes)
        assert tp.extents_refused_budget == len(sizes) - len(tp.extents)
        kept = sorted((e.npages for e in tp.extents), reverse=True)
        assert kept == sorted(sizes, reverse=True)[: len(kept)]


# --------------------------------------------------------------------------------------
# vma_budget
# --------------------------------------------------------------------------------------


def test_vma_budget_arithmetic() -> None:
    assert vma_budget(65530, 30) == 8191  # an eighth of the limit
    assert vma_budget(262144, 30) == 8192  # the cap
    assert vma_budget(65530, 30, cap=40) == 40
    assert vma_budget(65530, 65000) == 132  # a quarter of the room left
    assert vma_budget(65530, 65530) == 0
    assert vma_budget(65530, 70000) == 0  # never negative
    assert vma_budget(0, 0) == 0


@given(st.integers(0, 1 << 22), st.integers(0, 1 << 22), st.integers(0, 1 << 14))
def test_vma_budget_property(max_map: int, current: int, cap: int) -> None:
    b = vma_budget(max_map, current, cap)
    assert 0 <= b <= cap
    assert b <= max_map // 8
    if current < max_map:
        # the target keeps at least three quarters of its remaining room for itself
        assert current + b <= max_map - 3 * b


# --------------------------------------------------------------------------------------
# split_batches
# --------------------------------------------------------------------------------------


@st.composite
def work(draw: st.DrawFn) -> tuple[list[Extent], list[ZeroExtent]]:
    """Non-overlapping extents and zero runs at increasing addresses."""
    page = 0
    slot = 0
    exts: list[Extent] = []
    zeros: list[ZeroExtent] = []
    for _ in range(draw(st.integers(0, 25))):
        page += draw(st.integers(0, 3))
        n = draw(st.integers(1, 40))
        if draw(st.booleans()):
            exts.append(Extent(at(page), n, slot))
            slot += n + draw(st.integers(0, 2))
        else:
            zeros.append(ZeroExtent(at(page), n))
        page += n
    return exts, zeros


@given(work(), st.integers(1, 200), st.integers(1, 64), st.integers(2, 40))
def test_split_batches_bounds_and_covers_every_page_once(
    w: tuple[list[Extent], list[ZeroExtent]], units: int, batch_pages: int, max_calls: int
) -> None:
    exts, zeros = w
    batches = list(split_batches(exts, zeros, lambda: units, batch_pages, max_calls))
    want_ext = {e.addr + k * PAGE_SIZE: e.slot + k for e in exts for k in range(e.npages)}
    want_zero = {z.addr + k * PAGE_SIZE for z in zeros for k in range(z.npages)}
    got_ext: dict[int, int] = {}
    got_zero: list[int] = []
    for be, bz in batches:
        assert be or bz  # no empty window
        assert sum(e.npages for e in be) + sum(z.npages for z in bz) <= batch_pages
        # within its cost, unless a single piece is over it alone
        assert window_units(be, bz) <= units or len(be) + len(bz) == 1
        assert 2 * len(be) + len(bz) <= max_calls
        for e in be:
            assert e.npages >= 1
            for k in range(e.npages):
                assert e.addr + k * PAGE_SIZE not in got_ext
                got_ext[e.addr + k * PAGE_SIZE] = e.slot + k  # slot follows the address
        got_zero += [z.addr + k * PAGE_SIZE for z in bz for k in range(z.npages)]
    assert got_ext == want_ext
    assert sorted(got_zero) == sorted(want_zero) and len(got_zero) == len(want_zero)


def test_split_batches_cuts_long_extents_into_adjacent_pieces() -> None:
    batches = list(split_batches([Extent(at(0), 10, 5)], [ZeroExtent(at(20), 3)], lambda: 10**6, 4))
    assert [[(e.addr, e.npages, e.slot) for e in be] for be, _ in batches] == [
        [(at(0), 4, 5)],
        [(at(4), 4, 9)],
        [(at(8), 2, 13)],
        [],
    ]
    # the zero run fills the rest of the last extent's window, then its own
    assert [[(z.addr, z.npages) for z in bz] for _, bz in batches] == [
        [],
        [],
        [(at(20), 2)],
        [(at(22), 1)],
    ]


def test_split_batches_bounds_injected_calls_on_one_page_extents() -> None:
    """The worst layout: every extent one page. Pages alone would put 512 extents (1024
    injected calls, ~130-200 ms stopped, measured) in one window."""
    exts = [Extent(at(2 * i), 1, i) for i in range(1000)]
    batches = list(split_batches(exts, [], lambda: 10**6, 512))
    assert all(2 * len(be) <= MAX_CALLS_PER_BATCH for be, _ in batches)
    assert len(batches) == -(-1000 // (MAX_CALLS_PER_BATCH // 2))
    assert list(split_batches([], [], lambda: 10**6, 512)) == []


def test_split_batches_counts_the_calls_of_runs_the_target_compares() -> None:
    """A run of IN_TARGET_PAGES or more costs 4 calls (staging mmap, populate, mremap;
    the comparison is an entry too) and the window 2 more once (the staging range given
    back); a zero run that long 2 (its check, MADV_DONTNEED)."""
    n = IN_TARGET_PAGES
    exts = [Extent(at(2 * n * i), n, n * i) for i in range(4)]
    # 2 + 4 + 4 = 10: two long extents a window, and the staging range's calls once
    assert [len(b[0]) for b in split_batches(exts, [], UNLIMITED, 4096, max_calls=10)] == [2, 2]
    assert [len(b[0]) for b in split_batches(exts, [], UNLIMITED, 4096, max_calls=9)] == [1] * 4
    zeros = [ZeroExtent(at(2 * n * i), n) for i in range(4)]
    assert [len(b[1]) for b in split_batches([], zeros, UNLIMITED, 4096, max_calls=4)] == [2, 2]
    short = [ZeroExtent(at(2 * i), 1) for i in range(4)]
    assert [len(b[1]) for b in split_batches([], short, UNLIMITED, 4096, max_calls=4)] == [4]


def test_split_batches_counts_a_memfd_hand_over_per_window() -> None:
    # four one-page extents, each in its own memfd: 2 (mmap, populate) + 5 (taken,
    # checked twice, fstat, closed)
    exts = [Extent(0x1000 * (2 * i + 1), 1, i) for i in range(4)]
    batches = list(
        split_batches(exts, [], UNLIMITED, 256, max_calls=14, piece_of=lambda slot: slot)
    )
    assert [len(b[0]) for b in batches] == [2, 2]
    # the same extents in one memfd: its hand-over is paid once per window
    batches = list(split_batches(exts, [], UNLIMITED, 256, max_calls=13, piece_of=lambda slot: 0))
    assert [len(b[0]) for b in batches] == [4]


def test_split_batches_asks_each_windows_pages_after_the_window_before() -> None:
    # a sizer that learns from each window (procksm.window_sizer): window k may
    # hold k + 1 pages, and is asked for only once window k - 1 was taken
    asked: list[int] = []
    taken = 0

    def pages() -> int:
        asked.append(taken)
        return len(asked)

    batches = split_batches([Extent(at(0), 15, 0)], [], lambda: EXTENT_UNITS + pages(), 256)
    sizes = []
    for be, _ in batches:
        taken += 1
        sizes.append(sum(e.npages for e in be))
    assert sizes == [1, 2, 3, 4, 5]
    assert asked[: len(sizes)] == [0, 1, 2, 3, 4]


def test_split_batches_counts_a_share_of_cost_per_extent() -> None:
    """Scattered one-page extents cost more than their pages (a read, a comparison, an
    mmap and a populate each): a window of 256 units holds 9 of them, not the 20 its
    calls would allow."""
    exts = [Extent(at(2 * i), 1, i) for i in range(100)]
    batches = list(split_batches(exts, [], lambda: 256, 256))
    assert {len(be) for be, _ in batches[:-1]} == {256 // (1 + EXTENT_UNITS)}
    assert all(window_units(be, bz) <= 256 for be, bz in batches)
    # a zero run's share is smaller
    zeros = [ZeroExtent(at(2 * i), 1) for i in range(100)]
    batches = list(split_batches([], zeros, lambda: 256, 256))
    assert len(batches[0][1]) == 256 // (1 + ZERO_RUN_UNITS)


def test_a_window_fits_the_call_routines_table() -> None:
    from procksm.attach.scratch_layout import TABLE_CAPACITY

    assert MAX_CALLS_PER_BATCH + 2 <= TABLE_CAPACITY  # + the window's pidfd open, close


def test_split_batches_counts_the_advice_given_again() -> None:
    # numpy's arrays carry MADV_HUGEPAGE: an extent there costs mmap, madvise, populate
    exts = [Extent(0x1000 * (2 * i + 1), 1, i) for i in range(6)]
    batches = list(
        split_batches(exts, [], UNLIMITED, 256, max_calls=9, advice_calls=lambda addr: 1)
    )
    assert [len(b[0]) for b in batches] == [3, 3]
    # advice only where the mapping had some
    batches = list(
        split_batches(
            exts,
            [],
            lambda: 10**6,
            256,
            max_calls=9,
            advice_calls=lambda addr: 1 if addr < 0x6000 else 0,
        )
    )
    assert [len(b[0]) for b in batches] == [3, 3]
    batches = list(
        split_batches(exts, [], UNLIMITED, 256, max_calls=9, advice_calls=lambda addr: 0)
    )
    assert [len(b[0]) for b in batches] == [4, 2]


@given(
    st.lists(st.tuples(st.integers(-2, 1 << 40), st.integers(0, 1 << 40)), max_size=200),
    st.sampled_from([1, 7, 1 << 20, 1 << 62]),
)
def test_distinct_pairs_are_those_of_unique_rows(pairs: list[tuple[int, int]], fold: int) -> None:
    """The planner's distinct (content, frame) pairs, one key per pair or lexsorted when
    they do not fit in 63 bits, are np.unique(axis=0)'s (``fold`` makes repeats)."""
    arr = np.array([(c % fold if c >= 0 else c, f % fold) for c, f in pairs], np.int64)
    arr = arr.reshape(-1, 2)
    want = np.unique(arr, axis=0)[:, 0] if len(arr) else arr[:, 0]
    assert np.array_equal(_distinct_pairs(arr[:, 0].copy(), arr[:, 1].copy()), want)
