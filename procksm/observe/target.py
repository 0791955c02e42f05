"""One watched target: its ledger, its open pagemap, and the pagemap reconcile that makes
the ledger agree with what the target's memory is (docs/design.md §3.9)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from procksm import PAGE_SIZE, procfs
from procksm.errors import NoSuchProcess
from procksm.observe.ledger import CowLedger, copied
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
        """Drop watched pages that are no longer in a procksm mapping: the target unmapped
        them (munmap, brk shrinking the heap, mmap over them) or moved them (mremap; the
        moved pages are watched again when the daemon next sets the target's merged
        ranges). Raises NoSuchProcess if the target is gone."""
        pid = self.ledger.pid
        if self.pagemap is None:
            self.pagemap = procfs.PagemapFile(pid)
        merged = [(v.start, v.end) for v in procfs.read_maps_with_path(pid, SEGMENT_NAME_PREFIX)]
        self.dirty |= self.ledger.restrict(merged)

    def check_break(self, addr: int) -> Literal["break", "gone", "not_copied"]:
        """What a write fault on the armed page ``addr`` was. No event says when the
        target unmaps or moves a merged range (docs/design.md §11), so its bits stay armed
        until the next reconcile: fresh memory mapped at the same address meanwhile faults
        on them ("gone": not a break). A page still in a procksm mapping is a break once
        pagemap shows it anonymous; "not_copied": not yet (the tracepoint fires at fault
        entry, the copy may still be in flight, or the write failed), so the reconcile
        decides. Raises NoSuchProcess if the target is gone."""
        with procfs.MapsQuery(self.ledger.pid) as maps:
            vma = maps.vma_at(addr)
        if vma is None or not vma.name.startswith(SEGMENT_NAME_PREFIX):
            return "gone"
        if self.pagemap is None:
            self.pagemap = procfs.PagemapFile(self.ledger.pid)
        return "break" if copied(self.pagemap.read(addr, addr + PAGE_SIZE))[0] else "not_copied"

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
