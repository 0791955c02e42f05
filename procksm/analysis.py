"""Duplicate analysis: from a columnar table of scanned pages to a typed report.

Pure logic, no syscalls: ``procksm.scanner`` collects the :class:`PageTable` (one row per
present, really-backed page of an eligible mapping) and verifies content groups by exact
byte comparison; this module only counts.

Definitions (docs/design.md §2.1):

* a *frame* is a physical page (PFN). Pages already sharing one frame (after ``fork``) save
  nothing when merged;
* a *content* is a byte-exact page content; the all-zero content is special: zero pages
  are dropped (mapped to the kernel's zero page), they need no keeper frame;
* the **ideal saving** of a set of pages is ``distinct frames − distinct non-zero
  contents``. Volatile pages (content changed between the two reads of the scan) are
  counted as their own content: they save nothing.

Per-process and per-mapping savings attribute each frame to the first (process, address)
where it was seen, and keep, for each content, its lowest-indexed frame (the keeper); every
other frame of that content — and every zero frame — is a saving of its owner. These
attributions add up exactly to the total.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

import numpy as np

from procksm import PAGE_SIZE

# PageTable.flags bits
FLAG_VOLATILE = 2  # content changed between the hash pass and the verify pass
FLAG_FRAME_SHARED = 4  # the frame is mapped more than once (kpagecount > 1, or twice here)
FLAG_FRAME_FIRST = 8  # the first row (lowest index) that maps its frame: it owns the frame


@dataclass(frozen=True, slots=True)
class MappingRef:
    """One scanned VMA: which process (index into the process list) and its name."""

    proc: int
    start: int
    end: int
    name: str
    perms: str
    # madvise values that give a replacement of this VMA its VmFlags again (Vma.advice)
    advice: tuple[int, ...] = ()


@dataclass(slots=True)
class PageTable:
    """Columnar per-page records; row i describes one present page.

    21 bytes per page: hash 8, pfn 4 (8 on machines with more than 16 TiB), page offset
    within its mapping 4, content id 4, flags 1. Rows are grouped by mapping in
    ``ScanInput.mapping_rows`` order and sorted by address inside a mapping, so the
    mapping of a row is a ``searchsorted`` away instead of a column.
    """

    hash: np.ndarray  # uint64 xxh3_64 of the content
    pfn: np.ndarray  # uint32/uint64 physical frame number
    off: np.ndarray  # uint32 page index inside the mapping
    # int32 content id: rows with equal ids have byte-identical content (verified);
    # CONTENT_ZERO for zero pages, CONTENT_VOLATILE for pages that changed or vanished.
    content: np.ndarray
    flags: np.ndarray  # uint8 FLAG_*

    @classmethod
    def empty(cls, n: int, pfn_dtype: type = np.uint32) -> PageTable:
        return cls(
            hash=np.zeros(n, np.uint64),
            pfn=np.zeros(n, pfn_dtype),
            off=np.zeros(n, np.uint32),
            content=np.zeros(n, np.int32),
            flags=np.zeros(n, np.uint8),
        )

    def __len__(self) -> int:
        return int(self.hash.shape[0])

    def truncate(self, n: int) -> PageTable:
        # views, not copies: a copy would double the table at its peak
        return PageTable(
            hash=self.hash[:n],
            pfn=self.pfn[:n],
            off=self.off[:n],
            content=self.content[:n],
            flags=self.flags[:n],
        )

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in (self.hash, self.pfn, self.off, self.content, self.flags))


def hash_buckets(n: int, rows_per_bucket: int = 1 << 14) -> tuple[int, int]:
    """(number of buckets, shift): rows are processed by the top bits of their hash.

    Identical contents have identical hashes, so every content group lies in one bucket;
    working bucket by bucket bounds the sorts' temporaries to a bucket's size and keeps
    procksm's memory near the table's own 21 bytes per page.
    """
    bits = 0
    while (n >> bits) > rows_per_bucket and bits < 12:
        bits += 1
    return 1 << bits, 64 - bits


def pfn_bucket_rows(pfn: np.ndarray, b: int, nb: int, chunk: int = 1 << 16) -> np.ndarray:
    if nb == 1:
        return np.arange(pfn.size, dtype=np.int64)
    parts = [np.flatnonzero((pfn[i : i + chunk] % nb) == b) + i for i in range(0, pfn.size, chunk)]
    return np.concatenate(parts) if parts else np.zeros(0, np.int64)


def bucket_rows(hashes: np.ndarray, b: int, shift: int, chunk: int = 1 << 16) -> np.ndarray:
    """Row indices whose hash falls in bucket ``b`` (computed in chunks: no full-size
    temporaries)."""
    if shift >= 64:
        return np.arange(hashes.size, dtype=np.int64)
    sh, want = np.uint64(shift), np.uint64(b)
    parts = [
        np.flatnonzero((hashes[i : i + chunk] >> sh) == want) + i
        for i in range(0, hashes.size, chunk)
    ]
    return np.concatenate(parts) if parts else np.zeros(0, np.int64)


CONTENT_ZERO = -1
CONTENT_VOLATILE = -2


@dataclass(frozen=True, slots=True)
class ProcessIdentity:
    pid: int
    name: str
    uid: int


@dataclass(frozen=True, slots=True)
class Exclusion:
    """A VMA that procksm would not merge, and why (for the report)."""

    proc: int
    start: int
    end: int
    name: str
    reason: str
    rss_pages: int


@dataclass(slots=True)
class ScanInput:
    processes: list[ProcessIdentity]
    mappings: list[MappingRef]
    pages: PageTable
    # rows of mapping i are mapping_rows[i]:mapping_rows[i+1] (len(mappings)+1 entries)
    mapping_rows: np.ndarray = field(default_factory=lambda: np.zeros(1, np.int64))
    exclusions: list[Exclusion] = field(default_factory=list)
    # pages mapped to the kernel's zero page (read but never written): already free
    zero_mapped_pages: dict[int, int] = field(default_factory=dict)  # proc index -> pages
    previews: dict[int, bytes] = field(default_factory=dict)  # content id -> first bytes

    def mapping_of(self, rows: np.ndarray) -> np.ndarray:
        return np.searchsorted(self.mapping_rows, rows, side="right") - 1

    def address_of(self, row: int) -> tuple[int, int]:
        """(pid, address) of one row."""
        mi = int(self.mapping_of(np.array([row]))[0])
        m = self.mappings[mi]
        return self.processes[m.proc].pid, m.start + int(self.pages.off[row]) * PAGE_SIZE


@dataclass(frozen=True, slots=True)
class Counts:
    """Page counts for a process, a mapping or the total."""

    pages_scanned: int = 0  # present pages backed by their own frame (not the zero page)
    pages_zero: int = 0  # pages whose content is all zeros
    pages_dup_within: int = 0  # non-zero pages whose content occurs again in the same process
    pages_dup_across: int = 0  # non-zero pages whose content also occurs in another process
    pages_shared_frame: int = 0  # pages whose frame is mapped more than once (e.g. fork)
    pages_volatile: int = 0  # content changed during the scan
    frames: int = 0  # distinct frames owned (attributed to the first place seen)
    ideal_savings_pages: int = 0

    @property
    def ideal_savings_bytes(self) -> int:
        return self.ideal_savings_pages * PAGE_SIZE

    def as_dict(self) -> dict[str, int]:
        return {
            **{f.name: getattr(self, f.name) for f in fields(self)},
            "ideal_savings_bytes": self.ideal_savings_bytes,
        }


@dataclass(frozen=True, slots=True)
class MappingReport:
    start: int
    end: int
    name: str
    perms: str
    counts: Counts


@dataclass(frozen=True, slots=True)
class ProcessReport:
    pid: int
    name: str
    uid: int
    counts: Counts
    pages_zero_mapped: int
    mappings: list[MappingReport]
    excluded: list[Exclusion]

    @property
    def pages_excluded(self) -> int:
        return sum(e.rss_pages for e in self.excluded)


@dataclass(frozen=True, slots=True)
class TopContent:
    content: int
    pages: int
    frames: int
    savings_pages: int
    pids: list[int]
    preview: bytes
    row: int = -1  # a representative row of the PageTable (to read a preview from)


@dataclass(frozen=True, slots=True)
class ScanReport:
    totals: Counts
    distinct_frames: int
    distinct_contents: int  # distinct non-zero, non-volatile contents
    processes: list[ProcessReport]
    top: list[TopContent]
    # matrix[i][j]: pages of process i whose non-zero content also occurs in process j
    # (diagonal: pages duplicated within process i)
    matrix: list[list[int]]
    pages_excluded: int
    excluded_by_reason: dict[str, int]


_COUNTERS = tuple(f.name for f in fields(Counts))


@dataclass(slots=True)
class _Tally:
    """What :func:`analyse`'s passes add up: counters per mapping, the process matrix,
    the top contents, the distinct frames and contents."""

    acc: dict[str, np.ndarray]  # counter -> per mapping
    bins: int
    matrix: np.ndarray
    top_n: int
    top_pool: list[tuple[int, int, int, list[int], int]] = field(
        default_factory=list
    )  # frames, pages, id, procs, row
    distinct_frames: int = 0
    distinct_contents: int = 0


def analyse(scan: ScanInput, *, top_n: int = 10, matrix_max: int = 64) -> ScanReport:
    """Count duplicates and the ideal saving; see the module docstring for definitions.

    Works hash bucket by hash bucket (see :func:`hash_buckets`): a content group never
    spans buckets, so per-bucket results add up. Pages of one frame normally share a
    hash; the scanner marks a frame whose rows disagree volatile.
    """
    t = scan.pages
    nproc = len(scan.processes)
    nmap = len(scan.mappings)
    n = len(t)
    proc_of_mapping = np.array([m.proc for m in scan.mappings] or [0], dtype=np.int64)
    m_cap = min(nproc, matrix_max)
    tally = _Tally(
        acc={k: np.zeros(max(nmap, 1), np.int64) for k in _COUNTERS},
        bins=max(nmap, 1),
        matrix=np.zeros((m_cap, m_cap), np.int64),
        top_n=top_n,
    )
    nb, shift = hash_buckets(n)
    _count_frames(t, nb, tally)
    _count_rows(scan, tally)
    # Pass B: contents, by hash bucket, non-zero non-volatile rows only.
    for b in range(nb):
        rows = bucket_rows(t.hash, b, shift)
        rows = rows[t.content[rows] >= 0]
        if rows.size == 0:
            continue
        _count_contents(scan, rows, proc_of_mapping, tally)
    return _report(scan, proc_of_mapping, tally)


def _count_frames(t: PageTable, nb: int, tally: _Tally) -> None:
    # Pass A: frames, by PFN bucket (rows of one frame are in one bucket).
    for b in range(nb):
        rows = pfn_bucket_rows(t.pfn, b, nb)
        if rows.size == 0:
            continue
        pf = t.pfn[rows]
        order = np.argsort(pf, kind="stable")
        sp = pf[order]
        first = np.concatenate(([True], sp[1:] != sp[:-1]))
        last = np.concatenate((sp[1:] != sp[:-1], [True]))
        sizes = np.diff(np.append(np.flatnonzero(first), sp.size))
        t.flags[rows[order[first]]] |= FLAG_FRAME_FIRST
        multi = np.repeat(sizes > 1, sizes)
        t.flags[rows[order[multi]]] |= FLAG_FRAME_SHARED
        tally.distinct_frames += int(sizes.size)
        del pf, order, sp, first, last, sizes, multi


def _count_rows(scan: ScanInput, tally: _Tally) -> None:
    # Row-local counters, in chunks.
    t, acc, bins = scan.pages, tally.acc, tally.bins
    n = len(t)
    for c0 in range(0, n, 1 << 14):
        rows = np.arange(c0, min(n, c0 + (1 << 14)))
        mp = scan.mapping_of(rows)
        c = t.content[rows]
        f = t.flags[rows]
        ff = (f & FLAG_FRAME_FIRST) != 0
        zero = c == CONTENT_ZERO
        acc["pages_scanned"] += np.bincount(mp, minlength=bins)
        acc["pages_zero"] += np.bincount(mp[zero], minlength=bins)
        acc["pages_volatile"] += np.bincount(mp[c == CONTENT_VOLATILE], minlength=bins)
        acc["pages_shared_frame"] += np.bincount(mp[(f & FLAG_FRAME_SHARED) != 0], minlength=bins)
        acc["frames"] += np.bincount(mp[ff], minlength=bins)
        # every zero frame is a saving: zero pages need no keeper
        acc["ideal_savings_pages"] += np.bincount(mp[ff & zero], minlength=bins)


def _count_contents(
    scan: ScanInput, rows: np.ndarray, proc_of_mapping: np.ndarray, tally: _Tally
) -> None:
    """Pass B for one hash bucket's non-zero, non-volatile ``rows``."""
    t, acc, bins = scan.pages, tally.acc, tally.bins
    nproc = len(scan.processes)
    c = t.content[rows].astype(np.int64)
    mp = scan.mapping_of(rows)
    pr = proc_of_mapping[mp]
    frame_first = (t.flags[rows] & FLAG_FRAME_FIRST) != 0
    saving = np.zeros(rows.size, bool)
    ffnz = np.flatnonzero(frame_first)
    within = np.zeros(rows.size, bool)
    across = np.zeros(rows.size, bool)
    if ffnz.size:
        uc, keep_pos, frames_per_c = np.unique(c[ffnz], return_index=True, return_counts=True)
        tally.distinct_contents += int(uc.size)
        sv = np.ones(ffnz.size, bool)
        sv[keep_pos] = False
        saving[ffnz] = sv
        nz = np.arange(rows.size)
        key = c[nz] * max(nproc, 1) + pr[nz]
        uk, kinv, kcnt = np.unique(key, return_inverse=True, return_counts=True)
        within[nz] = kcnt[kinv] > 1
        kc = uk // max(nproc, 1)
        ucc, procs_per = np.unique(kc, return_counts=True)
        multi = ucc[procs_per > 1]
        across[nz] = np.isin(c[nz], multi)
        _add_to_matrix(tally.matrix, nproc, uk, kc, multi, c, pr, nz)
        _add_top(tally, uc, frames_per_c, c, pr, rows)
    acc["pages_dup_within"] += np.bincount(mp[within], minlength=bins)
    acc["pages_dup_across"] += np.bincount(mp[across], minlength=bins)
    acc["ideal_savings_pages"] += np.bincount(mp[frame_first & saving], minlength=bins)


def _add_to_matrix(
    matrix: np.ndarray,
    nproc: int,
    uk: np.ndarray,
    kc: np.ndarray,
    multi: np.ndarray,
    c: np.ndarray,
    pr: np.ndarray,
    nz: np.ndarray,
) -> None:
    """``uk``: the bucket's distinct (content, process) keys, ``kc`` their contents,
    ``multi`` the contents held by more than one process."""
    m_cap = matrix.shape[0]
    # matrix: which processes hold each content (bit masks, first 64 processes)
    if m_cap > 1 and multi.size:
        kp = uk % max(nproc, 1)
        sel = (kp < m_cap) & np.isin(kc, multi)
        kc_s, kp_s = kc[sel], kp[sel]
        uq, qinv = np.unique(kc_s, return_inverse=True)
        mask = np.zeros(uq.size, np.uint64)
        np.bitwise_or.at(mask, qinv, np.left_shift(np.uint64(1), kp_s.astype(np.uint64)))
        rows_nz = nz[np.isin(c[nz], uq) & (pr[nz] < m_cap)]
        pm = mask[np.searchsorted(uq, c[rows_nz])]
        pp = pr[rows_nz]
        for j in range(m_cap):
            has_j = ((pm >> np.uint64(j)) & np.uint64(1)).astype(bool)
            matrix[:, j] += np.bincount(pp[has_j], minlength=m_cap)[:m_cap]


def _add_top(
    tally: _Tally,
    uc: np.ndarray,
    frames_per_c: np.ndarray,
    c: np.ndarray,
    pr: np.ndarray,
    rows: np.ndarray,
) -> None:
    top_n, top_pool = tally.top_n, tally.top_pool
    # top contents by frames
    big = np.flatnonzero(frames_per_c > 1)
    if big.size:
        best = big[np.argsort(-frames_per_c[big], kind="stable")[:top_n]]
        for j in best:
            cid = int(uc[j])
            crow = np.flatnonzero(c == cid)
            top_pool.append(
                (
                    int(frames_per_c[j]),
                    int(crow.size),
                    cid,
                    sorted({int(x) for x in np.unique(pr[crow])}),
                    int(rows[crow[0]]),
                )
            )
        top_pool.sort(key=lambda x: -x[0])
        del top_pool[top_n:]


def _report(scan: ScanInput, proc_of_mapping: np.ndarray, tally: _Tally) -> ScanReport:
    nproc = len(scan.processes)
    nmap = len(scan.mappings)
    acc, matrix = tally.acc, tally.matrix

    def counts(idx: np.ndarray | slice) -> Counts:
        return Counts(**{k: int(v[idx].sum()) for k, v in acc.items()})

    per_map = [counts(slice(i, i + 1)) for i in range(nmap)]
    per_proc = [counts(np.flatnonzero(proc_of_mapping[:nmap] == i)) for i in range(nproc)]
    totals = counts(slice(0, nmap))
    for i in range(matrix.shape[0]):
        matrix[i, i] = per_proc[i].pages_dup_within

    top = [
        TopContent(
            content=cid,
            pages=pages,
            frames=frames,
            savings_pages=frames - 1,
            pids=[scan.processes[p].pid for p in procs],
            preview=scan.previews.get(cid, b""),
            row=row,
        )
        for frames, pages, cid, procs, row in tally.top_pool
    ]
    by_reason: dict[str, int] = {}
    for e in scan.exclusions:
        by_reason[e.reason] = by_reason.get(e.reason, 0) + e.rss_pages
    return ScanReport(
        totals=totals,
        distinct_frames=tally.distinct_frames,
        distinct_contents=tally.distinct_contents,
        processes=_process_reports(scan, per_map, per_proc),
        top=top,
        matrix=matrix.tolist(),
        pages_excluded=sum(by_reason.values()),
        excluded_by_reason=dict(sorted(by_reason.items(), key=lambda kv: -kv[1])),
    )


def _process_reports(
    scan: ScanInput, per_map: list[Counts], per_proc: list[Counts]
) -> list[ProcessReport]:
    nproc = len(scan.processes)
    maps_by_proc: list[list[MappingReport]] = [[] for _ in range(nproc)]
    for i, mref in enumerate(scan.mappings):
        maps_by_proc[mref.proc].append(
            MappingReport(mref.start, mref.end, mref.name, mref.perms, per_map[i])
        )
    excl_by_proc: list[list[Exclusion]] = [[] for _ in range(nproc)]
    for e in scan.exclusions:
        excl_by_proc[e.proc].append(e)
    return [
        ProcessReport(
            pid=p.pid,
            name=p.name,
            uid=p.uid,
            counts=per_proc[i],
            pages_zero_mapped=scan.zero_mapped_pages.get(i, 0),
            mappings=maps_by_proc[i],
            excluded=excl_by_proc[i],
        )
        for i, p in enumerate(scan.processes)
    ]
