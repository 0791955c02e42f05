"""Collect the page table of a read-only scan: pagemap → process_vm_readv → hash → verify.

Data flow (docs/design.md §5): ``procfs`` (which VMAs, which pages are present) → ``reader``
(content, without faulting anything in) → hashes and PFNs into a columnar
:class:`~procksm.analysis.PageTable` → an exact verification pass that turns hash groups
into byte-identical content groups → :func:`procksm.analysis.analyse`.

Never writes to a target and never ptrace-stops it: ``process_vm_readv`` needs only ptrace
*access* (PTRACE_MODE_ATTACH_REALCREDS), not an attach.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from procksm import PAGE_SIZE, procfs
from procksm.analysis import (
    CONTENT_VOLATILE,
    FLAG_FRAME_SHARED,
    Exclusion,
    MappingRef,
    PageTable,
    ProcessIdentity,
    ScanInput,
    bucket_rows,
    hash_buckets,
    pfn_bucket_rows,
)
from procksm.errors import UsageError
from procksm.hashing import hash_pages
from procksm.reader import PageReader, read_and_hash_rows, read_pages_into

PREVIEW_BYTES = 32
_PAGEMAP_CHUNK = 1 << 16  # pagemap entries read at once

ProgressFn = Callable[[int, int], None]  # (pages done, pages total)


@dataclass(frozen=True, slots=True)
class AddressRange:
    start: int
    end: int

    @classmethod
    def parse(cls, text: str) -> AddressRange:
        """``START-END`` or ``START+LENGTH`` (hex with 0x, or decimal; K/M/G suffix on length)."""
        try:
            if "+" in text:
                a, b = text.split("+", 1)
                start = int(a, 0)
                end = start + parse_size(b)
            else:
                a, b = text.split("-", 1)
                start, end = int(a, 0), int(b, 0)
        except ValueError:
            raise UsageError(
                f"bad address range {text!r}: use START-END or START+LENGTH, "
                "e.g. 0x7f0000000000-0x7f0000100000 or 0x7f0000000000+1M"
            ) from None
        if end <= start or start < 0:
            raise UsageError(f"bad address range {text!r}: end must be above start")
        start &= ~(PAGE_SIZE - 1)
        end = (end + PAGE_SIZE - 1) & ~(PAGE_SIZE - 1)
        return cls(start, end)


def parse_size(text: str) -> int:
    t = text.strip().upper().removesuffix("B").removesuffix("I")
    mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}.get(t[-1:], 1)
    if mult != 1:
        t = t[:-1]
    return int(t, 0) * mult


@dataclass(slots=True)
class ScanOptions:
    """What to scan: the "registered ranges" of the original KSM API.

    Empty ``ranges`` and ``mappings`` mean all eligible memory. A VMA is selected when
    it overlaps a range (only the overlap is scanned) or its display name matches one of
    the ``mappings`` glob patterns (``[heap]``, ``[anon]``, ``*libc*``).
    """

    ranges: list[AddressRange] = field(default_factory=list)
    mappings: list[str] = field(default_factory=list)
    # True: content groups are confirmed byte for byte (a second read of every
    # duplicate candidate). False: groups by hash only -- what the merge engine uses,
    # since it compares every page with its slot byte for byte under stop anyway.
    # Hashing alone is always enough for KSM's checksum rule.
    verify: bool = True


def _select(vma: procfs.Vma, opts: ScanOptions) -> list[tuple[int, int]]:
    if not opts.ranges and not opts.mappings:
        return [(vma.start, vma.end)]
    out: list[tuple[int, int]] = []
    if opts.mappings and any(procfs.name_matches(vma.name, pat) for pat in opts.mappings):
        return [(vma.start, vma.end)]
    for r in opts.ranges:
        s, e = max(r.start, vma.start), min(r.end, vma.end)
        if s < e:
            out.append((s, e))
    return out


@dataclass(slots=True)
class _Target:
    index: int
    identity: ProcessIdentity
    selected: list[tuple[int, int, int]]  # (mapping index, start, end)
    rss_pages: list[int]  # per selected VMA: smaps Rss, an upper bound of present pages


def collect(
    pids: Sequence[int],
    opts: ScanOptions | None = None,
    progress: ProgressFn | None = None,
) -> ScanInput:
    """Scan ``pids`` read-only and return the verified page table.

    With ``opts.verify`` False content ids are hash groups (see ScanOptions.verify).
    """
    opts = opts or ScanOptions()
    zero_pfn = procfs.kernel_zero_pfn()
    processes, mappings, exclusions, targets = _select_targets(pids, opts)

    # The table is allocated once, from the VMAs' Rss in smaps (an upper bound of their
    # present pages; the zero page is not counted in Rss): no growing-and-copying, and
    # no extra pass over pagemap (procksm's memory per page and speed are goals).
    total = sum(rss for tgt in targets for rss in tgt.rss_pages)
    cap = total + total // 64 + 64  # pages may become present while we scan
    rows = _TableRows(PageTable.empty(cap, np.uint32), len(mappings), zero_pfn)
    buf = _ReadBuffer()
    for tgt in targets:
        pid = tgt.identity.pid
        reader = PageReader(pid, buffer=buf.array)
        # procfs and reader turn a target that exits meanwhile into NoSuchProcess
        with procfs.PagemapFile(pid) as pm:
            for mi, s0, e0 in tgt.selected:
                rows.start_mapping(mi)
                # pagemap in pieces of 64 Ki pages: 512 KiB of entries at a time
                for s in range(s0, e0, _PAGEMAP_CHUNK * PAGE_SIZE):
                    e = min(e0, s + _PAGEMAP_CHUNK * PAGE_SIZE)
                    first_off = (s - mappings[mi].start) // PAGE_SIZE
                    rows.add(reader, tgt.index, pm.read(s, e), s, first_off)
                    if progress:
                        progress(rows.n, total)
    table, mapping_rows = rows.finish()

    scan = ScanInput(
        processes=processes,
        mappings=mappings,
        pages=table,
        mapping_rows=mapping_rows,
        exclusions=exclusions,
        zero_mapped_pages=rows.zero_mapped,
    )
    _verify(scan, buf, exact=opts.verify)
    return scan


def _select_targets(
    pids: Sequence[int], opts: ScanOptions
) -> tuple[list[ProcessIdentity], list[MappingRef], list[Exclusion], list[_Target]]:
    """Every target's identity and its VMAs: the selected ones that may be merged (the
    scan's mappings), the others with why (exclusions)."""
    processes: list[ProcessIdentity] = []
    mappings: list[MappingRef] = []
    exclusions: list[Exclusion] = []
    targets: list[_Target] = []

    for i, pid in enumerate(pids):
        st = procfs.read_status(pid)
        ident = ProcessIdentity(pid=pid, name=st.name, uid=st.uid_real)
        processes.append(ident)
        sel: list[tuple[int, int, int]] = []
        rss: list[int] = []
        for vma in procfs.read_vmas(pid):
            parts = _select(vma, opts)
            if not parts:
                continue
            reason = procfs.ineligibility(vma)
            if reason is not None:
                exclusions.append(
                    Exclusion(
                        i, vma.start, vma.end, vma.name, reason, vma.rss_kb * 1024 // PAGE_SIZE
                    )
                )
                continue
            mi = len(mappings)
            mappings.append(MappingRef(i, vma.start, vma.end, vma.name, vma.perms, vma.advice))
            sel.extend((mi, s, e) for s, e in parts)
            rss.append(vma.rss_kb * 1024 // PAGE_SIZE)
        targets.append(_Target(i, ident, sel, rss))
    return processes, mappings, exclusions, targets


class _TableRows:
    """The page table filled row by row from pagemap pieces, mapping after mapping, up
    to its capacity; pages mapped to the kernel's zero page are counted, not kept."""

    def __init__(self, table: PageTable, nmappings: int, zero_pfn: int) -> None:
        self.table = table
        self.cap = len(table)
        self.zero_pfn = zero_pfn
        self.zero_mapped: dict[int, int] = {}  # process index -> pages
        self.mapping_rows = np.zeros(nmappings + 1, np.int64)
        self.n = 0
        self.last_mi = -1

    def start_mapping(self, mi: int) -> None:
        if mi != self.last_mi:
            self.mapping_rows[self.last_mi + 1 : mi + 1] = self.n
            self.last_mi = mi

    def add(self, reader: PageReader, proc: int, ent: np.ndarray, s: int, first_off: int) -> None:
        """The present pages of one pagemap piece ``ent`` (from address ``s``, page
        ``first_off`` of its mapping), read and hashed."""
        table, n, zero_pfn = self.table, self.n, self.zero_pfn
        pfn = ent & procfs.PM_PFN_MASK
        present = procfs.present_mask(ent)
        zm = int(np.count_nonzero(present & (pfn == zero_pfn)))
        self.zero_mapped[proc] = self.zero_mapped.get(proc, 0) + zm
        idx = np.flatnonzero(present & (pfn != zero_pfn))
        k = min(idx.size, self.cap - n)
        idx = idx[:k]
        if k and int(pfn[idx].max()) >= 1 << 32 and table.pfn.dtype != np.uint64:
            table.pfn = table.pfn.astype(np.uint64)  # > 16 TiB of RAM: rare
        rows = slice(n, n + k)
        table.off[rows] = idx + first_off
        table.pfn[rows] = pfn[idx]
        # Frames mapped more than once (e.g. shared with an unscanned child
        # after fork): pagemap's "exclusively mapped" bit is clear. Cheaper
        # than /proc/kpagecount per frame (measured: 0.1 s per 400 K pages).
        shared = (ent[idx] & procfs.PM_EXCLUSIVE) == 0
        table.flags[n : n + k][shared] |= FLAG_FRAME_SHARED
        del ent, pfn, shared, present
        read_and_hash_rows(reader, table, n, k, s, idx)
        self.n = n + k

    def finish(self) -> tuple[PageTable, np.ndarray]:
        """The table cut to its rows, and each mapping's first row."""
        self.mapping_rows[self.last_mi + 1 :] = self.n
        return self.table.truncate(self.n), self.mapping_rows


class _ReadBuffer:
    """One buffer shared by the hash pass and the verify pass (they never overlap).

    1 MiB: process_vm_readv is near its plateau from 1-2 MiB chunks on (docs/design.md §2.1;
    measured here, the scan is as fast with 1 MiB as with 2), and a fixed buffer counts
    against procksm's memory per scanned page (goal: <= 32 bytes; 2 MiB alone is 5
    bytes per page of a 1.5 GiB scan).
    """

    PAGES = 256

    def __init__(self) -> None:
        self.array = np.empty(self.PAGES * PAGE_SIZE, np.uint8)
        self.nbytes = self.array.nbytes

    def rows(self) -> np.ndarray:
        return self.array.view(np.uint64).reshape(self.PAGES, PAGE_SIZE // 8)


def _verify(scan: ScanInput, buf: _ReadBuffer, *, exact: bool = True) -> None:
    """Assign content ids; equality is decided by bytes, never by the hash alone.

    1. Bucket by bucket (analysis.hash_buckets), every live row's content id becomes the
       row index of its *reference*: the first row (lowest index) with the same hash.
    2. In row order (address order inside each mapping, so reads coalesce into large
       iovecs both for members and for their references, which usually sit at the same
       offsets in another process), every row whose frame differs from its reference's
       is read again together with its reference and compared byte for byte. A member
       whose re-read hash differs from the first read is volatile; one whose bytes
       differ from the reference (a true hash collision, or a reference that changed)
       keeps its own row index as content id: conservative, never counted as a
       duplicate of anything.
    """
    t = scan.pages
    n = len(t)
    if n == 0:
        return
    if n >= np.iinfo(np.int32).max:
        raise OverflowError("too many pages for int32 content ids")
    _mark_inconsistent_frames(t)
    nb, shift = hash_buckets(n)
    for b in range(nb):
        rows = bucket_rows(t.hash, b, shift)
        live = rows[t.content[rows] == 0]  # read, not zero, not volatile
        if live.size == 0:
            continue
        order = np.argsort(t.hash[live], kind="stable")  # stable: rows stay ascending
        sh = t.hash[live][order]
        starts = np.flatnonzero(np.concatenate(([True], sh[1:] != sh[:-1])))
        sizes = np.diff(np.append(starts, sh.size))
        refs = live[order][starts]  # first row of each hash group
        t.content[live[order]] = np.repeat(refs, sizes).astype(np.int32)
    if not exact:
        return
    pid_of_mapping = np.array(
        [scan.processes[m.proc].pid for m in scan.mappings] or [0], dtype=np.int64
    )
    half = _ReadBuffer.PAGES // 2
    rows_buf = buf.rows()
    chunk = 1 << 14
    for c0 in range(0, n, chunk):
        idx = np.arange(c0, min(n, c0 + chunk))
        ref = t.content[idx].astype(np.int64)
        need = idx[(ref >= 0) & (ref != idx)]
        if need.size == 0:
            continue
        need = need[t.pfn[need] != t.pfn[t.content[need]]]  # same frame: same bytes
        for p0 in range(0, need.size, half):
            _verify_pairs(scan, pid_of_mapping, need[p0 : p0 + half], rows_buf)


def _verify_pairs(
    scan: ScanInput, pid_of_mapping: np.ndarray, members: np.ndarray, out: np.ndarray
) -> None:
    """Read members and their references, compare, fix the members' content ids."""
    t = scan.pages
    m = members.size
    refs = t.content[members].astype(np.int64)
    rows = np.concatenate((members, refs))  # slots: members 0..m-1, references m..2m-1
    mp = scan.mapping_of(rows)
    starts = np.array([scan.mappings[int(x)].start for x in mp], dtype=np.uint64)
    addrs = starts + t.off[rows].astype(np.uint64) * np.uint64(PAGE_SIZE)
    pids = pid_of_mapping[mp]
    ok = np.zeros(2 * m, bool)
    for pid in np.unique(pids):
        sel = np.flatnonzero(pids == pid)
        ok[sel] = read_pages_into(int(pid), addrs[sel], out, sel)
    # Only members are hashed again (volatility); a reference that changed simply
    # compares unequal, and its members then keep their own ids (conservative).
    rehash = hash_pages(out[:m].reshape(-1).view(np.uint8).data)
    mem_ok = ok[:m] & (rehash == t.hash[members])
    equal = np.zeros(m, bool)
    both = np.flatnonzero(mem_ok & ok[m:])
    if both.size:
        equal[both] = (out[both] == out[m + both]).all(axis=1)
    t.content[members[~mem_ok]] = CONTENT_VOLATILE
    differs = members[mem_ok & ~equal]
    t.content[differs] = differs.astype(np.int32)


def _mark_inconsistent_frames(t: PageTable) -> None:
    """Rows of one frame whose hashes differ saw the frame change: mark them volatile.

    Only frames mapped more than once can have several rows (pagemap's "exclusively
    mapped" bit is clear for them: FLAG_FRAME_SHARED), so only those rows are looked at,
    by PFN bucket so the temporaries stay small.
    """
    shared = np.flatnonzero((t.flags & FLAG_FRAME_SHARED) != 0)
    if shared.size < 2:
        return
    pfns = t.pfn[shared]
    nb, _ = hash_buckets(shared.size)
    for b in range(nb):
        rows = shared[pfn_bucket_rows(pfns, b, nb)]
        if rows.size < 2:
            continue
        order = np.lexsort((t.hash[rows], t.pfn[rows]))
        sp = t.pfn[rows][order]
        sh = t.hash[rows][order]
        same_frame = sp[1:] == sp[:-1]
        diff = same_frame & (sh[1:] != sh[:-1])
        if not diff.any():
            continue
        bad_pfn = np.unique(sp[1:][diff])
        bad_rows = rows[np.isin(t.pfn[rows], bad_pfn)]
        t.content[bad_rows] = CONTENT_VOLATILE


def read_preview(pid: int, addr: int, nbytes: int = PREVIEW_BYTES) -> bytes:
    return PageReader(pid).read_page(addr)[:nbytes]
