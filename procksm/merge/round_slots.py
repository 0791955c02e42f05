"""A merge round's slots: the content every merged page is mapped from, numbered.

The new slots come first, written from their reference pages into memfd pieces (one
per :attr:`procksm.plan.MergePlan.piece_starts` entry) and sealed before any target
can map them; the pages of segments adopted from the stable tree are numbered after
them (procksm.merge.adopt). A slot number gives its memfd and offset (:meth:`piece`).
"""

from __future__ import annotations

import bisect
import itertools
import os

import numpy as np

from procksm import PAGE_SIZE
from procksm.analysis import ScanInput
from procksm.errors import ProcksmError
from procksm.hashing import hash_pages
from procksm.plan import Extent, MergePlan
from procksm.reader import PageReader
from procksm.slots import Segment, SlotStore

WRITE_CHUNK_PAGES = 512  # slots written per read: 2 MiB of procksm's memory


class RoundSlots:
    """The slots of one merge round: their segments, which of them may be mapped
    (``ok``: the reference still held what the scan hashed), which were mapped."""

    def __init__(
        self, store: SlotStore, segment_hashes: dict[int, np.ndarray], tail_gap_pages: int
    ) -> None:
        self.store = store
        self.segment_hashes = segment_hashes  # the engine's: inode -> page hashes
        self.tail_gap_pages = tail_gap_pages
        self.segments: list[Segment] = []  # in slot order: slot s is in segments[s // seg]
        self.mapped: set[int] = set()  # new slots some target maps now
        self.new = 0  # slots written this round
        self.adopted = 0  # segments adopted this round (numbered after the new slots)
        self._starts: list[int] = []  # the first slot of each memfd piece
        self.ok = np.zeros(0, bool)

    def write(self, scan: ScanInput, plan: MergePlan) -> None:
        """Copy each slot's reference page into its piece's memfd, 2 MiB at a time; give
        each memfd its hole of ``tail_gap_pages`` (see plan.split_at_extent_ends); seal."""
        chunk = WRITE_CHUNK_PAGES
        rows = plan.slot_rows
        self.ok = np.ones(rows.size, bool)
        self._starts = plan.piece_starts.tolist() if rows.size else []
        self.new = int(rows.size)
        if rows.size == 0:
            return
        mp = scan.mapping_of(rows)
        starts = np.array([m.start for m in scan.mappings], dtype=np.uint64)
        pid_of_map = np.array([scan.processes[m.proc].pid for m in scan.mappings], np.int64)
        addrs = starts[mp] + scan.pages.off[rows].astype(np.uint64) * np.uint64(PAGE_SIZE)
        pids = pid_of_map[mp]
        readers = {int(p): PageReader(int(p), chunk_bytes=PAGE_SIZE) for p in np.unique(pids)}
        buf = np.empty((chunk, PAGE_SIZE // 8), np.uint64)
        bounds = [*plan.piece_starts.tolist(), rows.size]
        for p0, p1 in itertools.pairwise(bounds):
            for s0 in range(p0, p1, chunk):
                sl = slice(s0, min(p1, s0 + chunk))
                n = sl.stop - s0
                for pid in np.unique(pids[sl]):
                    sel = np.flatnonzero(pids[sl] == pid)
                    ok = readers[int(pid)].read_pages_into(addrs[sl][sel], buf, sel)
                    self.ok[s0 + sel[~ok]] = False
                # The reference must still hold what the scan hashed (the "second
                # look"): a slot whose content changed is never mapped.
                view = buf[:n].reshape(-1).view(np.uint8).data
                self.ok[s0 : s0 + n] &= hash_pages(view) == scan.pages.hash[rows[sl]]
                run = self.store.add_run(view, new_segment=s0 == p0)
                if s0 == p0:
                    self.segments.append(self.store.segment(run.segment_id))
        self.store.seal_pending(tail_pages=self.tail_gap_pages)
        # The stable tree learns the new segments from here, not from re-reading every
        # target's maps (a redis with 1,600 VMAs: 20 ms a parse, several per batch).
        # A slot whose reference changed is never mapped, so its scan hash does no harm.
        for seg, (p0, p1) in zip(self.segments, itertools.pairwise(bounds), strict=True):
            self.segment_hashes[seg.identity.ino] = scan.pages.hash[rows[p0:p1]].copy()

    def add_adopted(self, existing: list[tuple[Segment, np.ndarray]]) -> list[int]:
        """Number the adopted segments' slots after the new ones (after :meth:`write`);
        returns each segment's first slot."""
        base = self.new
        bases = []
        for seg, _h in existing:
            bases.append(base)
            self._starts.append(base)
            self.segments.append(seg)
            base += seg.npages
        self.adopted = len(existing)
        self.ok = np.concatenate((self.ok, np.ones(base - self.new, bool)))
        return bases

    def piece(self, slot: int) -> tuple[Segment, int]:
        """The memfd holding ``slot`` and the slot's byte offset in it."""
        # bisect on a list: ~0.3 us, against ~2 us for np.searchsorted on a scalar (asked
        # for ~6 times per extent: planning, the table, the content)
        i = bisect.bisect_right(self._starts, slot) - 1
        return self.segments[i], (slot - self._starts[i]) * PAGE_SIZE

    def content_of(self, extents: list[Extent]) -> bytearray:
        """The slots' content of ``extents``, one after the other, read from procksm's
        fds of the memfds straight into one buffer (a read each and a join copied every
        page twice: ~0.05 s of the first row's 0.07)."""
        out = bytearray(sum(e.npages for e in extents) * PAGE_SIZE)
        view, at = memoryview(out), 0
        for e in extents:
            seg, off = self.piece(e.slot)
            length = e.npages * PAGE_SIZE
            got = os.preadv(seg.fd, [view[at : at + length]], off)
            if got != length:  # a sealed memfd holds every slot it was written with
                raise ProcksmError(f"memfd {seg.name}: read {got} of {length} bytes at {off}")
            at += length
        return out

    def mark_mapped(self, e: Extent) -> None:
        # only new slots cost memory; adopted ones exist already
        end = min(e.slot + e.npages, self.new)
        self.mapped.update(range(e.slot, end))
