"""The daemon's rules, without root or processes: smart scan, the volatility rule, the
stable tree, pacing. The scan pass runs over fake memory (a dict of page hashes per
target) with a fake merger that merges what the index calls ready, so each test follows
the real ScanPass, KsmIndex and PageAges full scan by full scan."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import numpy as np

from procksm import PAGE_SIZE, procfs
from procksm.analysis import CONTENT_ZERO, PageTable
from procksm.daemon.accounting import Accounting, _part_rows, net_loss_warning
from procksm.daemon.merger import BatchOutcome, MergeBatch, Merger
from procksm.daemon.registry import (
    Parts,
    Registration,
    Registry,
    Target,
    coalesce,
    scanned_parts,
    zero_pages_in,
)
from procksm.daemon.scanpass import ScanPass, _over_cap
from procksm.daemon.scheduler import ADVISOR_PAGES, IDLE_CPU_PERCENT, Pacer, idle_sleep
from procksm.daemon.settings import DaemonOptions, Settings
from procksm.daemon.smartscan import PageAges, skips_for_age
from procksm.daemon.watch import ends_idle
from procksm.index import KsmIndex, StableTree, page_ref, target_refs
from procksm.observe import CowBreak, Event, Lifecycle
from procksm.scanner import AddressRange
from procksm.slots import SEGMENT_NAME_PREFIX

BASE = 0x10000000  # every fake target's one mapping starts here
PAGES = 16


def one_part(start: int, end: int) -> Parts:
    """One scanned anonymous VMA [start, end)."""
    table = procfs.parse_vma_lines(smaps_text([(start, end, "")]).encode().splitlines())
    parts, _ = scanned_parts(table, Registration(), np.zeros(0, np.int64))
    return parts


ANON_FLAGS = "rd wr mr mw me ac"


def smaps_text(vmas: list[tuple[int, int, str]], flags: str = ANON_FLAGS) -> str:
    """smaps of (start, end, path) private rw VMAs, each fully resident."""
    return "".join(
        f"{s:x}-{e:x} rw-p 00000000 00:00 0 {path}\n"
        f"Size: {(e - s) // 1024} kB\nRss: {(e - s) // 1024} kB\nVmFlags: {flags}\n"
        for s, e, path in vmas
    )


@dataclass
class Memory:
    """Per target index: page number -> hash (0: an all-zero page); merged refs."""

    pages: dict[int, dict[int, int]] = field(default_factory=dict)
    merged: set[int] = field(default_factory=set)
    reads: list[int] = field(default_factory=list)  # refs read, in order

    def write(self, target: int, page: int, content: int) -> None:
        self.pages[target][page] = content
        self.merged.discard(page_ref(target, BASE // PAGE_SIZE + page))


class FakeReader:
    """Reads the unmerged pages of the fake memory (a merged page is file-backed)."""

    def __init__(self, memory: Memory, index_of_pid: dict[int, int]) -> None:
        self.memory = memory
        self.index_of_pid = index_of_pid

    def read(
        self, pid: int, ranges: list, copied_only: bool = False
    ) -> tuple[PageTable, np.ndarray]:
        ti = self.index_of_pid[pid]
        addrs, hashes = [], []
        for r in ranges:
            for addr in range(r.start, r.end, PAGE_SIZE):
                ref = page_ref(ti, addr // PAGE_SIZE)
                page = (addr - BASE) // PAGE_SIZE
                if ref in self.memory.merged or page not in self.memory.pages[ti]:
                    continue  # merged (file-backed) or not present
                addrs.append(addr)
                hashes.append(self.memory.pages[ti][page])
                self.memory.reads.append(ref)
        tab = PageTable.empty(len(addrs), np.uint64)
        tab.hash[:] = hashes
        tab.pfn[:] = np.arange(len(addrs)) + 1000 * ti
        tab.content[:] = np.where(np.array(hashes, np.uint64) == 0, CONTENT_ZERO, 0)
        return tab, np.array(addrs, np.int64)


class FakeMerger:
    """Merges every ready page whose content another row of the batch has, or that the
    stable tree has (the byte comparison always agrees); drops zero pages."""

    def __init__(self, memory: Memory, stable: StableTree) -> None:
        self.memory = memory
        self.stable = stable
        self.rounds: list[MergeBatch] = []

    def refresh_stable(self, pids: list[int]) -> None:
        pass

    def forget(self, pids: list[int]) -> None:
        pass

    def merge(self, batch: MergeBatch, targets: dict, order: list) -> BatchOutcome:
        self.rounds.append(batch)
        hashes = batch.hashes
        values, counts = np.unique(hashes[~batch.zero], return_counts=True)
        twice = set(values[counts > 1].tolist())
        merged = np.array(
            [z or int(h) in twice or bool(self.stable.contains([h])[0])
             for h, z in zip(hashes, batch.zero, strict=True)],
            bool,
        )  # fmt: skip
        for h in set(hashes[merged & ~batch.zero].tolist()):
            self.stable.add(len(self.stable) + 1, np.array([h], np.uint64))
        self.memory.merged.update(batch.refs[merged].tolist())
        return BatchOutcome(merged, {}, [])


@dataclass
class Harness:
    memory: Memory
    scan: ScanPass
    merger: FakeMerger
    targets: list[Target]
    settings: Settings

    scans: int = 0

    def full_scan(self) -> None:
        """As the daemon's cursor does: the previous full scan ends when the next begins
        (the unstable tree lives until then)."""
        if self.scans:
            self.scan.end_full_scan()
        for t in self.targets:
            start, end = int(t.parts.start[0]), int(t.parts.end[0])
            self.scan.scan_window(t, False, start, end, self.settings)
        self.scans += 1

    def is_merged(self, target: int, page: int) -> bool:
        return page_ref(target, BASE // PAGE_SIZE + page) in self.memory.merged

    def was_read(self, target: int, page: int, since: int = 0) -> bool:
        return page_ref(target, BASE // PAGE_SIZE + page) in self.memory.reads[since:]


def harness(contents: list[dict[int, int]], stable_scans: int = 0) -> Harness:
    opts = DaemonOptions(remerge_backoff=False)
    memory = Memory({i: dict(c) for i, c in enumerate(contents)})
    registry = Registry(opts, lambda _m: None)
    index = KsmIndex()
    merger = FakeMerger(memory, index.stable)
    targets = []
    for i in range(len(contents)):
        t = Target(1000 + i, registry.new_index(), f"t{i}", 0, (), contextlib.ExitStack())
        end = BASE + PAGES * PAGE_SIZE
        t.parts = one_part(BASE, end)
        registry.targets[t.pid] = t
        registry.order.append(t.pid)
        targets.append(t)
    scan = ScanPass(
        registry, opts, merger, Accounting(4, lambda _m: None), Pacer(), lambda _m: None,  # type: ignore[arg-type]
        index, drop=lambda _t, _why: None, after_full_scan=lambda: None,
    )  # fmt: skip
    scan.reader = FakeReader(memory, {t.pid: t.index for t in targets})  # type: ignore[assignment]
    return Harness(memory, scan, merger, targets, Settings(stable_scans=stable_scans))


def unique(n: int = PAGES, offset: int = 0) -> dict[int, int]:
    return {p: 10_000 + offset + p for p in range(n)}


# --------------------------------------------------------------------------- smart scan


def test_skip_schedule_of_a_page_that_stays_unique() -> None:
    """Ages 1-2: read every scan; then skipped 1 (age 3), 2 (ages 4-5), 4 (ages 6-8),
    then 8 full scans (the kernel's smart_scan)."""
    ages = PageAges()
    ref = page_ref(0, 7)
    reads = []
    for scan in range(35):
        if not ages.take_skips(0, 7 * PAGE_SIZE, 8 * PAGE_SIZE)[0]:
            reads.append(scan)
            ages.update(np.array([ref]), np.array([False]), np.array([False]))
    assert reads == [0, 1, 2, 4, 7, 10, 15, 20, 25, 34]
    assert skips_for_age(np.arange(12)).tolist() == [0, 0, 0, 1, 2, 2, 4, 4, 4, 8, 8, 8]


def test_ages_merged_pages_young_again_volatile_count_and_forget() -> None:
    ages = PageAges()
    refs = np.array([page_ref(0, 1), page_ref(0, 2), page_ref(1, 1)])
    for _ in range(3):
        ages.update(refs, np.zeros(3, bool), np.array([True, False, False]))
    assert ages.volatile() == 1
    assert ages.take_skips(0, PAGE_SIZE, 3 * PAGE_SIZE).tolist() == [True, True]
    ages.update(refs[:1], np.array([True]), np.array([False]))  # merged: young again
    for _ in range(2):
        ages.update(refs[:1], np.array([False]), np.array([False]))
    assert ages.take_skips(0, PAGE_SIZE, 2 * PAGE_SIZE).tolist() == [False]
    ages.forget_target(1)
    assert ages.take_skips(1, PAGE_SIZE, 2 * PAGE_SIZE).tolist() == [False]
    assert ages.volatile() == 0


def test_smart_scan_skips_unique_pages_unread() -> None:
    h = harness([unique(), unique(offset=100)])
    for _ in range(6):
        h.full_scan()
    reads_before = len(h.memory.reads)
    h.full_scan()
    assert h.scan.accounting.pages_skipped > 0
    assert len(h.memory.reads) - reads_before < 2 * PAGES  # skipped pages are not read


def test_a_skipped_page_that_becomes_a_duplicate_still_merges() -> None:
    h = harness([unique(), unique(offset=100)])
    for _ in range(11):
        h.full_scan()
    mark = len(h.memory.reads)
    h.full_scan()  # the 12th: unique for 11 scans, target 0's page 3 is skipped now
    assert not h.was_read(0, 3, since=mark)
    # target 1's page 5 is written to equal it (also skipped: its write goes unseen)
    h.memory.write(1, 5, h.memory.pages[0][3])
    for _scan in range(30):
        h.full_scan()
        if h.is_merged(0, 3):
            break
    assert h.is_merged(0, 3) and h.is_merged(1, 5), "never merged"
    assert not h.is_merged(0, 4) and not h.is_merged(1, 4)


# --------------------------------------------------------------------------- volatility


def test_a_page_written_every_scan_never_merges_though_it_equals_another() -> None:
    """The checksum rule on a mergeable page: target 1's page 0 holds target 0's content
    every other scan, but it changed since its previous scan each time."""
    same = 777
    h = harness([{0: same}, {0: 1}])
    for scan in range(10):
        h.memory.write(1, 0, same if scan % 2 else 1 + scan)
        h.full_scan()
        assert not h.is_merged(1, 0) and not h.is_merged(0, 0), scan
    # once it stops changing, the next look is stable and it merges
    h.full_scan()
    assert h.is_merged(1, 0) and h.is_merged(0, 0)


def test_stable_scans_one_waits_for_a_second_look() -> None:
    for stable_scans, merged_at in ((0, 0), (1, 1)):
        h = harness([{0: 5, 1: 6}, {0: 5, 1: 7}], stable_scans=stable_scans)
        scans = []
        for _scan in range(3):
            h.full_scan()
            scans.append(h.is_merged(0, 0) and h.is_merged(1, 0))
        assert scans.index(True) == merged_at
        assert not h.is_merged(0, 1) and not h.is_merged(1, 1)


def test_zero_pages_are_dropped_not_candidates() -> None:
    h = harness([{0: 0, 1: 42}, {0: 0, 1: 43}])
    h.full_scan()
    assert h.is_merged(0, 0) and h.is_merged(1, 0)
    assert len(h.scan.index.unstable) == 2  # the two unique pages wait; no zero page


# --------------------------------------------------------------------------- stable tree


def test_a_page_equal_to_merged_content_joins_the_stable_tree_alone() -> None:
    h = harness([{0: 9}, {0: 9}, {0: 1}])
    h.full_scan()
    assert h.is_merged(0, 0) and h.is_merged(1, 0)
    h.memory.write(2, 0, 9)
    h.full_scan()  # changed since its last scan: volatile
    assert not h.is_merged(2, 0)
    h.full_scan()
    assert h.is_merged(2, 0)
    last = h.merger.rounds[-1]
    assert last.joins and len(last) == 1  # no partner: the stable tree's content


def test_the_merger_shares_the_stable_tree_with_its_engine() -> None:
    index = KsmIndex()
    merger = Merger(DaemonOptions(), index.stable, lambda _m: None)
    try:
        assert merger.engine.segment_hashes is index.stable.segments
        merger.engine.segment_hashes[5] = np.array([1, 2], np.uint64)
        assert index.stable.contains([2, 3]).tolist() == [True, False]
    finally:
        merger.close()


def test_forget_a_target_drops_what_the_scan_knew() -> None:
    h = harness([{0: 3, 1: 4}, {0: 5}])
    h.full_scan()
    h.full_scan()
    h.scan.forget(h.targets[0])
    lo, hi = target_refs(h.targets[0].index)
    assert h.scan.index.partners([3, 4, 5]).ref.tolist() == [page_ref(1, BASE // PAGE_SIZE)]
    assert not h.scan.index.look([lo], [3]).stable.any()
    assert hi > lo


# --------------------------------------------------------------------------- pacing


def test_merge_cap_cuts_pages_and_runs() -> None:
    addr = np.arange(10, dtype=np.int64) * PAGE_SIZE
    wanted = np.ones(10, bool)
    assert np.flatnonzero(_over_cap(wanted, addr, 4)).tolist() == [4, 5, 6, 7, 8, 9]
    assert not _over_cap(wanted, addr, 100).any()
    scattered = np.arange(1200, dtype=np.int64) * 2 * PAGE_SIZE  # 1,200 runs of one page
    assert int(_over_cap(np.ones(1200, bool), scattered, 10_000).sum()) == 1200 - 512


def test_only_forks_and_execs_end_the_idle_back_off() -> None:
    """Writes never stop on a real program: they must not keep a converged daemon awake
    (issue 15); nor an exit."""
    churn: list[Event] = [
        CowBreak(1, 0x1000),
        CowBreak(1, 0x2000, kernel=True),
        Lifecycle("exit", 3),
    ]
    assert not ends_idle(churn)
    assert not ends_idle([])
    assert ends_idle([*churn, Lifecycle("fork", 1, child_pid=2)])
    assert ends_idle([Lifecycle("exec", 1)])


def test_idle_back_off_counts_full_scans_that_merged_nothing() -> None:
    pacer = Pacer()
    assert [idle_sleep(n) for n in range(8)] == [0, 0, 0.05, 0.1, 0.2, 0.4, 0.8, 1.0]
    scanned = 0
    for _ in range(3):
        scanned += 10_000
        pacer.end_full_scan(scanned)
    assert pacer.idle_scans == 3
    pacer.merged(100)
    scanned += 10_000
    pacer.end_full_scan(scanned)
    assert pacer.idle_scans == 0
    pacer.end_full_scan(scanned)
    pacer.wake()
    assert pacer.idle_scans == 0


def test_churn_merged_again_and_again_is_idle_and_capped_at_the_idle_share() -> None:
    """Merges that writes undo as fast (a CPython heap's refcounts) gain nothing: the
    scan idles, and an idle batch sleeps long enough to stay at IDLE_CPU_PERCENT."""
    pacer = Pacer()
    s = Settings(cpu_limit=25.0, sleep_ms=20)
    scanned = 0
    for _ in range(3):
        pacer.merged(800)
        pacer.undone(790)
        scanned += 100_000
        pacer.end_full_scan(scanned)
    assert pacer.idle_scans == 3
    sleep, _ = pacer.after_batch(s, 16_384, 0, 0.05, 0.06)
    assert abs(0.05 / (0.06 + sleep) - IDLE_CPU_PERCENT / 100) < 1e-9
    pacer.merged(800)  # a scan that gains pages is busy again
    pacer.undone(100)
    pacer.end_full_scan(scanned + 100_000)
    assert pacer.idle_scans == 0
    assert pacer.after_batch(s, 16_384, 0, 0.05, 0.06)[0] < 0.2


def test_cpu_cap_sizes_batches_and_sleeps() -> None:
    pacer = Pacer()
    s = Settings(cpu_limit=25.0, sleep_ms=20)
    # 0.05 CPU s for 10,000 pages in 0.05 s of wall time: 0.15 s more to stay at 25 %
    sleep, pages = pacer.after_batch(s, 10_000, 0, 0.05, 0.05)
    assert abs(sleep - 0.15) < 1e-9
    assert pages == max(ADVISOR_PAGES[0], min(ADVISOR_PAGES[1], int(0.1 / 5e-6)))
    no_cap = Settings(cpu_limit=0, sleep_ms=20)
    assert pacer.after_batch(no_cap, 10_000, 0, 0.05, 0.05) == (0.02, None)


def test_zero_pages_in_counts_the_dropped_runs_inside_each_range() -> None:
    """The snapshot's zero pages per mapping, vectorised, against the per-range sum."""
    rng = np.random.default_rng(15)
    for _ in range(300):
        runs = [
            (int(rng.integers(0, 200)) * PAGE_SIZE, int(rng.integers(1, 6)))
            for _ in range(int(rng.integers(0, 8)))
        ]
        starts = rng.integers(0, 220, 10) * PAGE_SIZE
        ends = starts + rng.integers(0, 30, 10) * PAGE_SIZE
        disjoint = coalesce(runs)  # overlapping runs count once
        want = [
            sum(max(0, min(e, a + k * PAGE_SIZE) - max(s, a)) // PAGE_SIZE for a, k in disjoint)
            for s, e in zip(starts.tolist(), ends.tolist(), strict=True)
        ]
        assert zero_pages_in(runs, starts, ends).tolist() == want


def test_a_daemon_that_costs_more_than_it_saves_says_so() -> None:
    mib = 1 << 20
    assert net_loss_warning(300 * mib, 60 * mib) is None
    assert net_loss_warning(60 * mib, 60 * mib) is None
    said = net_loss_warning(7 * mib, 40 * mib)
    assert said is not None
    assert "saves 7.0 MiB" in said and "holds 40.0 MiB" in said and "net -33.0 MiB" in said
    assert "procksm merge" in said  # and what to do instead


SEG = SEGMENT_NAME_PREFIX + "7 (deleted)"


def scattered_layout() -> list[tuple[int, int, str]]:
    """A heap cut by procksm's one-page mappings, as a scattered merge leaves it, and a
    stack (never eligible)."""
    out = []
    for i in range(6):
        a = BASE + i * 4 * PAGE_SIZE
        out.append((a, a + 3 * PAGE_SIZE, "[heap]" if i == 0 else ""))
        out.append((a + 3 * PAGE_SIZE, a + 4 * PAGE_SIZE, SEG))
    out.append((0x7FFF0000000, 0x7FFF0021000, "[stack]"))
    return out


def test_scanned_parts_of_a_scattered_layout() -> None:
    """The parts of a target's smaps: eligible anonymous VMAs whole, procksm's mappings
    only where a page was copied (merged=True), the stack never; procksm's mappings all
    in merged_spans."""
    table = procfs.parse_vma_lines(smaps_text(scattered_layout()).encode().splitlines())
    seg_starts = [BASE + i * 4 * PAGE_SIZE + 3 * PAGE_SIZE for i in range(6)]
    copied = np.array([seg_starts[2], seg_starts[5]], np.int64)
    parts, spans = scanned_parts(table, Registration(), copied)
    heap = [BASE + i * 4 * PAGE_SIZE for i in range(6)]
    want = sorted([(a, a + 3 * PAGE_SIZE, False) for a in heap]
                  + [(a, a + PAGE_SIZE, True) for a in (seg_starts[2], seg_starts[5])])  # fmt: skip
    got = list(zip(parts.start.tolist(), parts.end.tolist(), parts.merged.tolist(), strict=True))
    assert got == want
    assert parts.vma_start.tolist() == parts.start.tolist()
    assert parts.rss_pages.tolist() == [(e - s) // PAGE_SIZE for s, e, _ in want]
    assert [parts.kind_of(i).name for i in range(2)] == ["[heap]", "[anon]"]
    assert spans.tolist() == [[a, a + PAGE_SIZE] for a in seg_starts]
    # nothing copied: procksm's mappings are not scanned
    parts, _ = scanned_parts(table, Registration(), np.zeros(0, np.int64))
    assert not parts.merged.any() and len(parts) == 6
    addr = np.array([BASE, BASE + 3 * PAGE_SIZE, BASE + 4 * PAGE_SIZE + 5], np.int64)
    assert parts.indices(addr).tolist() == [0, -1, 1]


def test_scanned_parts_follow_the_registration() -> None:
    """Registered ranges cut VMAs (the VMA's bounds kept for the engine); excluded
    names and ranges leave them out, as Registration.select says for each VMA."""
    table = procfs.parse_vma_lines(smaps_text(scattered_layout()).encode().splitlines())
    reg = Registration(everything=False)
    reg.register(AddressRange(BASE + PAGE_SIZE, BASE + 6 * PAGE_SIZE))
    parts, _ = scanned_parts(table, reg, np.zeros(0, np.int64))
    assert list(zip(parts.start.tolist(), parts.end.tolist(), strict=True)) == [
        (BASE + PAGE_SIZE, BASE + 3 * PAGE_SIZE),
        (BASE + 4 * PAGE_SIZE, BASE + 6 * PAGE_SIZE),
    ]
    assert parts.vma_start.tolist() == [BASE, BASE + 4 * PAGE_SIZE]
    assert parts.vma_end.tolist() == [BASE + 3 * PAGE_SIZE, BASE + 7 * PAGE_SIZE]
    reg = Registration()
    reg.unregister("*heap*")  # a glob: "[heap]" is a character class to fnmatch
    reg.unregister(AddressRange(BASE + 4 * PAGE_SIZE, BASE + 5 * PAGE_SIZE))
    parts, _ = scanned_parts(table, reg, np.zeros(0, np.int64))
    assert parts.start.tolist()[:2] == [BASE + 5 * PAGE_SIZE, BASE + 8 * PAGE_SIZE]
    assert len(parts) == 5


def test_ineligible_kinds_give_no_parts() -> None:
    """Eligibility is decided per kind of VMA: an mlocked heap is not scanned."""
    text = smaps_text(scattered_layout(), flags=ANON_FLAGS + " lo")
    parts, spans = scanned_parts(
        procfs.parse_vma_lines(text.encode().splitlines()), Registration(), np.zeros(0, np.int64)
    )
    assert len(parts) == 0 and len(spans) == 6


def test_snapshot_rows_group_the_parts_by_name() -> None:
    """One row per name in order of first appearance, procksm's copied parts left out."""
    table = procfs.parse_vma_lines(smaps_text(scattered_layout()).encode().splitlines())
    t = Target(1, 0, "t", 0, (), contextlib.ExitStack())
    t.parts, _ = scanned_parts(table, Registration(), np.array([BASE + 3 * PAGE_SIZE], np.int64))
    t.zero_runs = [(BASE + 4 * PAGE_SIZE, 2)]
    rows = _part_rows(t)
    assert [(r.name, r.start, r.end, r.rss_pages, r.zero_pages) for r in rows] == [
        ("[heap]", BASE, BASE + 3 * PAGE_SIZE, 3, 0),
        ("[anon] ×5", BASE + 4 * PAGE_SIZE, BASE + 23 * PAGE_SIZE, 15, 2),
    ]
