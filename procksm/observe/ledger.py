"""What one target's watched pages are (pure): armed (merged, first write not seen yet) or
counted (copied, counted once), per watched range, kept to the target's procksm mappings
by each reconcile; and the counters read from it."""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from procksm import PAGE_SIZE, procfs
from procksm.observe.cow_header import PAGE_SHIFT
from procksm.procfs import U64Array

BoolArray = npt.NDArray[np.bool_]
U32Array = npt.NDArray[np.uint32]


@dataclass(frozen=True, slots=True)
class RangeCounters:
    start: int
    end: int
    pages: int
    cow_breaks: int  # breaks counted in this range (a re-armed page can break again)
    broken: int  # pages of the range that are private copies now


@dataclass(frozen=True, slots=True)
class CowCounters:
    """COW breaks of one target since it was added, by how they were seen.

    ``cow_breaks`` = ``user + kernel + reconciled``, including pages whose range left the
    watch since (munmap, exec). ``merged_pages`` are the watched pages still shared.
    """

    pid: int
    cow_breaks: int
    user: int
    kernel: int
    reconciled: int
    broken_pages: int
    merged_pages: int
    ranges: tuple[RangeCounters, ...]


def normalize_ranges(ranges: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
    """Sorted, non-overlapping, adjacent ones joined; raises on unaligned or empty input."""
    out: list[tuple[int, int]] = []
    for s, e in sorted(ranges):
        if s % PAGE_SIZE or e % PAGE_SIZE or e <= s:
            raise ValueError(f"range {s:#x}-{e:#x} is empty or not page-aligned")
        if out and s <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], e))
        else:
            out.append((s, e))
    return out


def copied(entries: U64Array) -> BoolArray:
    """Which pagemap entries are private copies. A private copy is an anonymous page:
    present or swapped, without the file/shared-anon bit. A memfd page (merged) has bit
    61 set; a page the target dropped (not present, not swapped) reads the memfd on its
    next touch."""
    anon = (entries & (procfs.PM_PRESENT | procfs.PM_SWAPPED)) != 0
    return anon & ((entries & procfs.PM_FILE) == 0)


@dataclass(slots=True)
class _Range:
    start: int
    end: int
    counted: BoolArray  # page is a private copy whose break was counted (bit clear in BPF)
    pending: BoolArray  # counted from a fault since the last reconcile: COW may be in flight
    breaks: U32Array  # breaks counted per page

    @classmethod
    def empty(cls, start: int, end: int) -> _Range:
        n = (end - start) >> PAGE_SHIFT
        return cls(start, end, np.zeros(n, np.bool_), np.zeros(n, np.bool_), np.zeros(n, np.uint32))

    def piece(self, start: int, end: int) -> _Range:
        """A copy of [start, end) of this range."""
        a, b = (start - self.start) >> PAGE_SHIFT, (end - self.start) >> PAGE_SHIFT
        return _Range(
            start,
            end,
            self.counted[a:b].copy(),
            self.pending[a:b].copy(),
            self.breaks[a:b].copy(),
        )


class CowLedger:
    """What one target's watched pages are: armed (merged, first write not seen) or
    counted (copied, counted once). No I/O: the observer feeds it events and pagemap."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.ranges: list[_Range] = []
        self.user = 0
        self.kernel = 0
        self.reconciled = 0
        self.exited = False

    # --- the watched set ---

    def set_ranges(self, ranges: Iterable[tuple[int, int]]) -> None:
        """Replace the watched ranges; pages watched before keep their state."""
        new = [_Range.empty(s, e) for s, e in normalize_ranges(ranges)]
        for r in new:
            for old in self._overlapping(r.start, r.end):
                s, e = max(r.start, old.start), min(r.end, old.end)
                a, b = (s - r.start) >> PAGE_SHIFT, (e - r.start) >> PAGE_SHIFT
                oa, ob = (s - old.start) >> PAGE_SHIFT, (e - old.start) >> PAGE_SHIFT
                r.counted[a:b] = old.counted[oa:ob]
                r.pending[a:b] = old.pending[oa:ob]
                r.breaks[a:b] = old.breaks[oa:ob]
        self.ranges = new

    def range_bounds(self) -> list[tuple[int, int]]:
        return [(r.start, r.end) for r in self.ranges]

    def _overlapping(self, start: int, end: int) -> list[_Range]:
        i = bisect.bisect_right([r.end for r in self.ranges], start)
        out = []
        while i < len(self.ranges) and self.ranges[i].start < end:
            out.append(self.ranges[i])
            i += 1
        return out

    def _find(self, addr: int) -> tuple[_Range, int] | None:
        i = bisect.bisect_right([r.start for r in self.ranges], addr) - 1
        if i >= 0 and addr < self.ranges[i].end:
            r = self.ranges[i]
            return r, (addr - r.start) >> PAGE_SHIFT
        return None

    def watches(self, addr: int) -> bool:
        return self._find(addr) is not None

    def restrict(self, keep: Sequence[tuple[int, int]]) -> bool:
        """Keep only the parts of the watched ranges inside ``keep`` (sorted ranges)."""
        out: list[_Range] = []
        for r in self.ranges:
            for s, e in keep:
                s, e = max(s, r.start), min(e, r.end)
                if s < e:
                    out.append(r if (s, e) == (r.start, r.end) else r.piece(s, e))
        changed = [(r.start, r.end) for r in out] != self.range_bounds()
        self.ranges = out
        return changed

    def child(self, pid: int) -> CowLedger:
        """A forked child's view: the same merged mapping; pages the parent already copied
        are private (anonymous) in the child too, so they are not merged pages there."""
        c = CowLedger(pid)
        c.ranges = [r.piece(r.start, r.end) for r in self.ranges]
        for r in c.ranges:
            r.pending[:] = False
            r.breaks[:] = 0
        return c

    # --- counting ---

    def record_fault(self, addr: int, kernel: bool) -> bool:
        """A fault event for ``addr``: True if it is a new break (counted now)."""
        hit = self._find(addr)
        if hit is None:
            return False  # not watched (any more): e.g. the range was unmapped before
        r, i = hit
        if r.counted[i]:
            return False
        r.counted[i] = True
        r.pending[i] = True
        r.breaks[i] += 1
        if kernel:
            self.kernel += 1
        else:
            self.user += 1
        return True

    def reconcile_chunk(self, start: int, entries: U64Array) -> list[int]:
        """Pagemap entries for pages from ``start`` (inside one watched range): count the
        copied pages not counted yet and re-arm counted pages that are merged again.
        Returns the addresses of the new breaks."""
        hit = self._find(start)
        if hit is None:
            return []
        r, a = hit
        b = a + len(entries)
        if b > len(r.counted):
            raise ValueError("pagemap chunk runs past its range")
        broken = copied(entries)
        counted = r.counted[a:b]
        new = broken & ~counted
        # A page counted from its fault may not be copied yet (the tracepoint fires at
        # fault entry): re-arm only what was counted before the previous reconcile.
        rearm = counted & ~broken & ~r.pending[a:b]
        counted |= new
        counted &= ~rearm
        r.breaks[a:b][new] += 1
        n = int(new.sum())
        self.reconciled += n
        return [r.start + (a + int(i)) * PAGE_SIZE for i in np.flatnonzero(new)]

    def end_reconcile(self) -> None:
        for r in self.ranges:
            r.pending[:] = False

    def armed_pages(self) -> U64Array:
        """Page numbers of the watched pages whose first write is still to be seen."""
        parts = [
            np.uint64(r.start >> PAGE_SHIFT) + np.flatnonzero(~r.counted).astype(np.uint64)
            for r in self.ranges
        ]
        return np.concatenate(parts) if parts else np.zeros(0, np.uint64)

    def counters(self) -> CowCounters:
        rc = tuple(
            RangeCounters(r.start, r.end, len(r.counted), int(r.breaks.sum()), int(r.counted.sum()))
            for r in self.ranges
        )
        broken = sum(x.broken for x in rc)
        return CowCounters(
            pid=self.pid,
            cow_breaks=self.user + self.kernel + self.reconciled,
            user=self.user,
            kernel=self.kernel,
            reconciled=self.reconciled,
            broken_pages=broken,
            merged_pages=sum(x.pages for x in rc) - broken,
            ranges=rc,
        )
