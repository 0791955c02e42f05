"""The daemon's merger: one long-lived merge engine that takes a batch of pages (a
value) and returns what became of them (a value).

A batch is rows of (ref, hash, pfn, zero?): the window's ready pages and zero pages,
then their partners from the unstable tree. The merger lays them out as the engine
plans them (process, mapping, address; pages grouped by hash through
:func:`procksm.index.group_by_hash`), runs one merge round (every page compared with its
slot byte for byte under stop), and reads back from pagemap which rows are merged now.
"""

from __future__ import annotations

import collections.abc
import contextlib
import dataclasses
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from procksm import PAGE_SIZE, procfs
from procksm.analysis import CONTENT_ZERO, MappingRef, PageTable, ProcessIdentity, ScanInput
from procksm.daemon.registry import LogFn, Target
from procksm.daemon.settings import DaemonOptions
from procksm.daemon.window import GRANULE_PAGES, pagemap_at
from procksm.errors import ProcksmError
from procksm.index import REF_PAGE_BITS, StableTree, group_by_hash, target_refs
from procksm.merge import MapsCache, MergeEngine, Refusal, TargetResult


@dataclass(frozen=True, slots=True)
class MergeBatch:
    """Pages to merge in one round (rows; a ref may repeat, its first row counts)."""

    refs: np.ndarray  # int64 page refs (procksm.index.page_ref)
    hashes: np.ndarray  # uint64
    pfns: np.ndarray  # uint64
    zero: np.ndarray  # bool: an all-zero page, to drop rather than share
    joins: bool = True  # may a page join the stable tree (adopt the targets' segments)?

    def __len__(self) -> int:
        return int(self.refs.size)


@dataclass(frozen=True, slots=True)
class BatchOutcome:
    """What one round did: per row of the batch, whether it is merged now (pagemap: a
    page of a procksm segment, or a dropped zero page); per target, the engine's
    result; and what was refused."""

    merged: np.ndarray
    results: dict[int, TargetResult]
    refused: list[Refusal]

    @classmethod
    def nothing(cls, rows: int) -> BatchOutcome:
        return cls(np.zeros(rows, bool), {}, [])


class Merger:
    """The merge engine of ``procksm attach``, for the daemon's life. Its windows are
    sized to the pause budget per target (procksm.window_sizer), at most
    ``stop_pages`` pages."""

    def __init__(self, opts: DaemonOptions, stable: StableTree, log: LogFn) -> None:
        self.opts = opts
        self.log = log
        # the engine cuts its memfds on the windows' grid (see GRANULE_PAGES)
        merge_opts = dataclasses.replace(
            opts.merge,
            segment_pages=GRANULE_PAGES,
            batch_pages=opts.stop_pages,
        )
        self.engine = MergeEngine([], merge_opts)
        self.engine.keep_sessions = True  # a target's scratch area stays between rounds
        self.engine.start_guard()  # while the daemon starts and makes its first scan
        # the stable tree's cache: the engine adds the segments it creates and adopts
        self.engine.segment_hashes = stable.segments
        # the targets' maps across rounds: a round adopts the segments of every target,
        # and reading each one's maps per round cost ~1/3 of the daemon's CPU on
        # merged-then-unmerged CPython workers (~3,700 VMAs each; many_vmas.py). A round
        # reads its own targets afresh; the cache is cleared every full scan.
        self.maps = MapsCache()
        self._said_over_budget: set[int] = set()

    def close(self) -> None:
        self.engine.end_sessions()
        self.engine.close()

    def refresh_stable(self, pids: Sequence[int]) -> None:
        """Hash the segments merged since the last look (the engine's adoption step: a
        segment is hashed once in its life), from the targets' maps read afresh."""
        self.maps.clear()
        with contextlib.suppress(ProcksmError):
            self.engine.stable_segments(pids, self.maps)
        self.engine.release()

    def forget(self, pids: Iterable[int]) -> None:
        """These targets are gone, exec'd or unmerged: their maps are read again when
        asked, their sessions end (their scratch areas are unmapped)."""
        pids = list(pids)
        self.maps.forget(pids)
        self.engine.forget_sizers(pids)
        self.engine.end_sessions(pids)
        self._said_over_budget.difference_update(pids)

    def merge(
        self, batch: MergeBatch, targets: collections.abc.Mapping[int, Target], order: Sequence[int]
    ) -> BatchOutcome:
        """One merge round over ``batch``; ``order`` names the targets in scan order
        (the stable tree is adopted from them)."""
        scan, kept = engine_input(batch, list(targets.values()))
        if scan is None:
            return BatchOutcome.nothing(len(batch))
        out = self.engine.merge_scanned(
            scan,
            np.ones(len(scan.pages), bool),
            # the stable tree is only needed when a page may join it
            adopt_from=list(order) if batch.joins else [],
            maps=self.maps,
        )
        for pid in out.results:
            self._say_if_over_budget(pid)
        merged = merged_now(batch.refs, kept, list(targets.values()))
        return BatchOutcome(merged, out.results, out.refused)

    def _say_if_over_budget(self, pid: int) -> None:
        """Once per target: its windows are over the pause budget."""
        sizer = self.engine.window_sizers.get(pid)
        if sizer is None or pid in self._said_over_budget:
            return
        pause = sizer.over_budget()
        if pause is None:
            return
        self._said_over_budget.add(pid)
        self.log(
            f"pid {pid}: stops over the {self.opts.merge.pause_budget_ms:g} ms budget "
            f"(~{pause * 1e3:.2f} ms): stopping, gating and resuming each of its threads "
            "takes the budget (or the machine is busy); each stop does a quarter of a "
            "budget's work"
        )


def engine_input(
    batch: MergeBatch, targets: Sequence[Target]
) -> tuple[ScanInput | None, np.ndarray]:
    """The batch as the engine plans it: rows grouped by process and VMA in address
    order, content ids the index's hash groups. Pages no longer in a scanned part
    (unmapped, unregistered) and repeated refs are left out. Returns the input and the
    batch rows it kept, in its row order."""
    refs = batch.refs
    _, first_pos = np.unique(refs, return_index=True)  # first occurrence of each ref
    processes: list[ProcessIdentity] = []
    mappings: list[MappingRef] = []
    bounds: list[int] = [0]
    kept: list[np.ndarray] = []
    n = 0
    for t in sorted(targets, key=lambda t: t.index):
        lo, hi = target_refs(t.index)
        pos = first_pos[(refs[first_pos] >= lo) & (refs[first_pos] < hi)]
        parts = t.parts
        if pos.size == 0 or not len(parts):
            continue
        pos = pos[np.argsort(refs[pos], kind="stable")]
        addr = ((refs[pos] - lo) * PAGE_SIZE).astype(np.int64)
        pi = parts.indices(addr)
        ok = pi >= 0
        pos, pi = pos[ok], pi[ok]
        if pos.size == 0:
            continue
        processes.append(ProcessIdentity(t.pid, t.name, t.uid))
        vstart = parts.vma_start[pi]
        cut = np.flatnonzero(np.diff(vstart) != 0) + 1
        for a0, b0 in zip([0, *cut.tolist()], [*cut.tolist(), pos.size], strict=True):
            j = int(pi[a0])
            kind = parts.kind_of(j)
            mappings.append(
                MappingRef(
                    len(processes) - 1,
                    int(parts.vma_start[j]),
                    int(parts.vma_end[j]),
                    kind.name,
                    kind.perms,
                    kind.advice,
                )
            )
            bounds.append(n + b0)
        kept.append(pos)
        n += pos.size
    if n == 0:
        return None, np.zeros(0, np.int64)
    k = np.concatenate(kept)
    tab = PageTable.empty(k.size, np.uint64)
    tab.hash[:] = batch.hashes[k]
    tab.pfn[:] = batch.pfns[k]
    mrows = np.array(bounds, np.int64)
    mi = np.searchsorted(mrows, np.arange(k.size), side="right") - 1
    vstart_m = np.array([m.start for m in mappings], np.int64)
    page = refs[k] & ((1 << REF_PAGE_BITS) - 1)
    tab.off[:] = (page - vstart_m[mi] // PAGE_SIZE).astype(np.uint32)
    tab.content[:] = group_by_hash(batch.hashes[k]).astype(np.int32)
    tab.content[batch.zero[k]] = CONTENT_ZERO
    return ScanInput(processes=processes, mappings=mappings, pages=tab, mapping_rows=mrows), k


def merged_now(refs: np.ndarray, kept: np.ndarray, targets: Sequence[Target]) -> np.ndarray:
    """Per row of ``refs``: is the page now a procksm mapping (pagemap: present and
    file-backed) or a dropped zero page (not present, or the zero PFN)? Only the
    ``kept`` rows are looked at; the others are False."""
    out = np.zeros(refs.size, bool)
    for t in targets:
        lo, hi = target_refs(t.index)
        sel = kept[(refs[kept] >= lo) & (refs[kept] < hi)]
        if sel.size == 0:
            continue
        try:
            ent = pagemap_at(t.pid, (refs[sel] - lo) * PAGE_SIZE)
        except ProcksmError:
            continue
        present = (ent & procfs.PM_PRESENT) != 0
        filep = (ent & procfs.PM_FILE) != 0
        zpfn = (ent & procfs.PM_PFN_MASK) == procfs.kernel_zero_pfn()
        out[sel] = (present & filep) | ~present | zpfn
    return out
