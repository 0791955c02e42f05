"""The stable tree across runs: segments an earlier procksm (or an earlier round) mapped
into the targets, adopted into this round. Pages equal to their content map them again
(a restarted worker joins the merge) instead of getting new slots.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence

import numpy as np

from procksm import PAGE_SIZE, procfs
from procksm.analysis import ScanInput
from procksm.errors import ProcksmError
from procksm.hashing import hash_pages
from procksm.index import StableTree
from procksm.merge.round_slots import WRITE_CHUNK_PAGES
from procksm.plan import Extent, MergePlan, apply_budget
from procksm.runs import split_runs
from procksm.slots import SEGMENT_NAME_PREFIX, Segment, SlotStore


def adopt_segments(
    store: SlotStore, layouts: Sequence[procfs.MapsSnapshot], segment_hashes: dict[int, np.ndarray]
) -> list[tuple[Segment, np.ndarray]]:
    """Open (read-only) each procksm segment mapped in the targets (``layouts``: their
    maps, read once for the round), once per inode, and hash its data pages. Needs
    /proc/PID/map_files (root); skipped otherwise."""
    out: list[tuple[Segment, np.ndarray]] = []
    seen: set[int] = set()
    for layout in layouts:
        pid = layout.pid
        for v in layout.with_path(SEGMENT_NAME_PREFIX, one_per_inode=True):
            if v.inode in seen:
                continue
            fd = procfs.open_mapped_file(pid, v.start, v.end)
            if fd is not None and os.fstat(fd).st_ino != v.inode:
                os.close(fd)
                fd = None
            if fd is None:
                # not root (no map_files), or the target unmapped or remapped the range
                # since the layout was read (the daemon keeps layouts across rounds):
                # read it again next time
                layout.stale = True
                continue
            seen.add(v.inode)
            # Sealed, so a segment's hashes never change: a daemon that merges batch
            # after batch hashes each segment once (see MergeEngine.segment_hashes).
            hashes = segment_hashes.get(v.inode)
            try:
                if hashes is not None:
                    npages = hashes.size
                else:
                    data = os.lseek(fd, 0, os.SEEK_HOLE)  # slots, then the tail hole
                    npages = data // PAGE_SIZE
                if npages == 0:
                    raise OSError("empty segment")
                seg = store.adopt(fd, npages)
            except (OSError, ProcksmError):
                with contextlib.suppress(OSError):
                    os.close(fd)
                continue
            if hashes is None:
                hashes = np.empty(npages, np.uint64)
                for p0 in range(0, npages, WRITE_CHUNK_PAGES):
                    n = min(WRITE_CHUNK_PAGES, npages - p0)
                    hashes[p0 : p0 + n] = hash_pages(os.pread(fd, n * PAGE_SIZE, p0 * PAGE_SIZE))
                segment_hashes[v.inode] = hashes
            out.append((seg, hashes))
    return out


def match_existing(
    scan: ScanInput,
    mergeable: np.ndarray,
    existing: list[tuple[Segment, np.ndarray]],
    tail_only: bool = True,
) -> dict[int, list[tuple[int, int, int, int]]]:
    """Runs of scanned pages that equal (by hash; bytes are compared under stop) pages
    of an adopted segment: ``{pid: [(addr, npages, segment index, first page)]}``.

    With ``tail_only`` (no madvise guard) a run must end at its segment's last data
    page, so that, as for new pieces, nothing but the hole follows it in the file
    (mremap growth reads zeros). Rows of accepted
    runs are taken out of ``mergeable`` (they need no new slot).
    """
    t = scan.pages
    tree = StableTree()
    for i, (_seg, hashes) in enumerate(existing):
        tree.add(i, hashes)
    rows = np.flatnonzero(mergeable[: len(t)] & (t.content >= 0))
    hit, r_seg, r_page = tree.lookup(t.hash[rows])
    rows, r_seg, r_page = rows[hit], r_seg[hit], r_page[hit]
    if rows.size == 0:
        return {}
    mp = scan.mapping_of(rows)
    starts = np.array([m.start for m in scan.mappings], dtype=np.int64)
    addr = starts[mp] + t.off[rows].astype(np.int64) * PAGE_SIZE
    new_run = (
        (np.diff(mp) != 0) | (np.diff(addr) != PAGE_SIZE) | (np.diff(r_seg) != 0)
        | (np.diff(r_page) != 1)
    )  # fmt: skip
    out: dict[int, list[tuple[int, int, int, int]]] = {}
    for a, b in split_runs(new_run, rows.size):
        i = int(r_seg[a])
        if tail_only and int(r_page[b - 1]) + 1 != existing[i][0].npages:
            continue  # not the segment's tail: a new slot run is safer
        pid = scan.processes[scan.mappings[int(mp[a])].proc].pid
        out.setdefault(pid, []).append((int(addr[a]), b - a, i, int(r_page[a])))
        mergeable[rows[a:b]] = False
    return out


def join_existing(
    plan: MergePlan,
    joins: dict[int, list[tuple[int, int, int, int]]],
    bases: list[int],
    budgets: dict[int, int],
) -> None:
    """Give each target its extents into the adopted segments (``bases``: their first
    slots, procksm.merge.round_slots.RoundSlots.add_adopted), verified byte for byte under stop
    like any other."""
    by_pid = {tp.pid: tp for tp in plan.targets}
    for pid, runs in joins.items():
        tp = by_pid.get(pid)
        if tp is None:
            continue
        tp.extents.extend(Extent(a, n, bases[i] + pg) for a, n, i, pg in runs)
        tp.extents.sort(key=lambda e: e.addr)
        apply_budget(tp, budgets.get(pid, 0))
