"""One watched target: its ledger, its open pagemap, and the pagemap reconcile that makes
the ledger agree with what the target's memory is (docs/design.md §3.9)."""

from __future__ import annotations

from dataclasses import dataclass

from procksm import procfs
from procksm.errors import NoSuchProcess
from procksm.observe.ledger import CowLedger
from procksm.slots import SEGMENT_NAME_PREFIX


@dataclass(slots=True)
class WatchedTarget:
    """A merged page of a merged VMA that still maps the memfd is a file page (pagemap bit
    61); one that was copied is anonymous (present or swapped, bit 61 clear). Reading that
    finds the breaks no fault showed: writes through get_user_pages (process_vm_writev,
    /proc/PID/mem, O_DIRECT) and events a full ring buffer dropped."""

    ledger: CowLedger
    pagemap: procfs.PagemapFile | None  # opened on the first reconcile if None
    dirty: bool = True  # the ledger changed since the BPF maps were written

    def read_layout(self) -> None:
        """Drop watched pages that are no longer in a procksm mapping; learn the heap's
        end (for brk). Raises NoSuchProcess if the target is gone."""
        pid = self.ledger.pid
        if self.pagemap is None:
            self.pagemap = procfs.PagemapFile(pid)
        maps = procfs.read_maps(pid)
        merged = [(v.start, v.end) for v in maps if v.path.startswith(SEGMENT_NAME_PREFIX)]
        heap = [v.end for v in maps if v.path == "[heap]"]
        self.ledger.heap_end = heap[0] if heap else 0
        self.dirty |= self.ledger.restrict(merged)

    def find_copies(self) -> list[int] | None:
        """After :meth:`read_layout`: count the copied pages no fault counted, re-arm the
        counted ones that are merged again. Returns the addresses of the new breaks, or
        None if the target went away meanwhile."""
        assert self.pagemap is not None, "read_layout opens the pagemap"
        found: list[int] = []
        try:
            for r in list(self.ledger.ranges):
                for addr, entries in self.pagemap.iter_chunks(r.start, r.end):
                    found += self.ledger.reconcile_chunk(addr, entries)
        except NoSuchProcess:
            return None
        self.ledger.end_reconcile()
        self.dirty = True  # re-armed pages get their bits back
        return found

    def close_pagemap(self) -> None:
        if self.pagemap is not None:
            self.pagemap.close()
            self.pagemap = None
