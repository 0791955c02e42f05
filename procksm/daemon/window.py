"""The window reader: which pages of a target one batch covers, and their hashes.

Windows are whole granules from their mapping's start (:data:`GRANULE_PAGES`), and only
the pages pagemap shows present are read (absent pages and the zero page cost nothing,
nothing is faulted in).
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from procksm import PAGE_SIZE, procfs
from procksm.analysis import PageTable
from procksm.reader import PageReader, read_and_hash_rows
from procksm.runs import mask_runs
from procksm.scanner import AddressRange

# Windows are whole granules from their mapping's start, and the merge engine cuts its
# memfds at granules (segment_pages): a page can join a content merged by an earlier
# batch only in a run that ends at the end of that content's memfd (the engine's rule
# against mremap growth reading another's content), and with both on one grid a later
# batch's run always does, whatever pages_to_scan is at the time (measured: without it,
# a CPU cap that changed pages_to_scan left 14 % of the standard workload's saving
# unreached after 90 full scans). 2048 pages = 8 MiB: 32 memfds per GiB merged. With the
# madvise guard (the default) the engine lets a run join anywhere in a memfd (the guard
# unmerges before an mremap grow); the grid still gives identical layouts identical
# windows, hence runs that line up across processes.
GRANULE_PAGES = 2048


def next_window(
    starts: np.ndarray, ends: np.ndarray, pi: int, addr: int, pages: int
) -> tuple[int, int, int] | None:
    """(part index, start, end) of the window at or after ``addr`` in part ``pi`` of the
    parts [starts[i], ends[i]), ``pages`` long rounded up to whole granules and cut at
    the part's end; None past the last part."""
    while pi < len(starts):
        p_start, p_end = int(starts[pi]), int(ends[pi])
        start = max(addr, p_start)
        if start < p_end:
            granules = max(1, -(-pages // GRANULE_PAGES))
            return pi, start, min(p_end, start + granules * GRANULE_PAGES * PAGE_SIZE)
        pi, addr = pi + 1, 0
    return None


def unskipped_ranges(start: int, skip: np.ndarray) -> list[AddressRange]:
    """The runs of pages of the window at ``start`` that smart scan does not skip."""
    return [
        AddressRange(start + a * PAGE_SIZE, start + (a + n) * PAGE_SIZE)
        for a, n in mask_runs(~skip)
    ]


class WindowReader:
    """Reads windows of targets into one reused buffer (1 MiB: process_vm_readv's
    plateau, docs/design.md §2.1)."""

    def __init__(self) -> None:
        self._buffer = np.empty(1 << 20, np.uint8)

    def read(
        self, pid: int, ranges: list[AddressRange], copied_only: bool = False
    ) -> tuple[PageTable, np.ndarray]:
        """Hash the present pages of ``ranges``: (table, addresses). ``copied_only``: only
        anonymous pages (in a segment mapping: the pages a write copied). The VMAs'
        eligibility was checked when the target's pass began (smaps, once per full
        scan); a range unmapped since reads short and its pages come out unreadable
        (CONTENT_VOLATILE), and the merge re-checks every VMA under stop anyway."""
        zero_pfn = procfs.kernel_zero_pfn()
        chunks: list[tuple[int, np.ndarray, np.ndarray]] = []
        total = 0
        with procfs.PagemapFile(pid) as pm:
            for r in ranges:
                ent = pm.read(r.start, r.end)
                pfn = ent & procfs.PM_PFN_MASK
                want = procfs.present_mask(ent) & (pfn != zero_pfn)
                if copied_only:
                    want &= (ent & procfs.PM_FILE) == 0
                idx = np.flatnonzero(want)
                if idx.size:
                    chunks.append((r.start, idx, pfn[idx]))
                    total += idx.size
        tab = PageTable.empty(total, np.uint64)
        addr = np.empty(total, np.int64)
        reader = PageReader(pid, buffer=self._buffer)
        n = 0
        for base, idx, pfns in chunks:
            k = idx.size
            tab.pfn[n : n + k] = pfns
            addr[n : n + k] = base + idx.astype(np.int64) * PAGE_SIZE
            tab.off[n : n + k] = idx  # unused by the daemon; kept meaningful
            read_and_hash_rows(reader, tab, n, k, base, idx)
            n += k
        return tab, addr


def read_spans(
    pm: procfs.PagemapFile, ranges: list[tuple[int, int]]
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """pagemap entries of the pages in ``ranges`` (sorted, disjoint) and their addresses,
    read in clusters of ranges less than 1 MiB apart: one read per cluster, entries
    outside the ranges dropped with a vectorised mask."""
    i = 0
    while i < len(ranges):
        j = i
        while j + 1 < len(ranges) and ranges[j + 1][0] - ranges[j][1] < (1 << 20):
            j += 1
        lo, hi = ranges[i][0], ranges[j][1]
        ent = pm.read(lo, hi)
        addr = lo + np.arange(ent.size, dtype=np.int64) * PAGE_SIZE
        if j > i:
            edges = np.array(ranges[i : j + 1], np.int64).reshape(-1) - lo
            d = np.zeros(ent.size + 1, np.int8)
            np.add.at(d, edges[0::2] // PAGE_SIZE, 1)
            np.add.at(d, edges[1::2] // PAGE_SIZE, -1)
            inside = np.cumsum(d[:-1]) > 0
            ent, addr = ent[inside], addr[inside]
        yield ent, addr
        i = j + 1


def pagemap_at(pid: int, addrs: np.ndarray) -> np.ndarray:
    """pagemap entries of the pages at ``addrs`` (sorted or not), read in runs."""
    order = np.argsort(addrs)
    a = addrs[order]
    out = np.zeros(a.size, np.uint64)
    with procfs.PagemapFile(pid) as pm:
        i = 0
        while i < a.size:
            j = i
            # one read per cluster of pages at most 8 MiB apart
            while j + 1 < a.size and a[j + 1] - a[i] < (8 << 20):
                j += 1
            ent = pm.read(int(a[i]), int(a[j]) + PAGE_SIZE)
            out[i : j + 1] = ent[(a[i : j + 1] - a[i]) // PAGE_SIZE]
            i = j + 1
    res = np.empty_like(out)
    res[order] = out
    return res
