"""The scanner daemon behind ``procksm attach``: KSM's ksmd, in user space.

A loop scans the *registered* memory of its targets (by default all eligible private
anonymous memory of each PID) ``pages_to_scan`` pages at a time, sleeping ``sleep_ms``
between batches, with the kernel's rules (mm/ksm.c, Documentation/admin-guide/mm/ksm.rst):

* **incremental**: a cursor walks target after target, mapping after mapping; one batch is
  one window of at most ``pages_to_scan`` pages of one target (windows start at the
  mapping's start, so identical layouts in different processes give identical windows).
  Only the window is read (pagemap first: absent pages cost nothing). When the cursor has
  passed every target a **full scan** is counted and the next one starts;
* **volatility by checksum across scans**: a page takes part only if its hash equals the
  one it had at the previous full scan (trees.ChecksumTable); a page seen for the first
  time, or changed since, only has its checksum remembered (``pages_volatile``);
* **unstable tree**: checksum-stable pages not yet merged, rebuilt every full scan (see
  :class:`_Unstable`); a page whose hash is already there, or twice in its batch, is a
  candidate, together with its partners;
* **stable tree**: the contents procksm has already shared (its sealed memfd segments,
  hashed once); a page equal to one joins it instead of getting a new copy;
* **smart scan**: a page that was scanned and not merged ages; from age 3 on it is skipped
  for 1, 2, 4, then 8 full scans (the kernel's ``smart_scan``; ``pages_skipped``) and
  skipped pages are not even read;
* **merging** is the merge engine's verified step (MergeEngine.merge_scanned): slots are
  written from a reference page that must still hash as scanned, and, with every thread
  of the target stopped for about a millisecond, each page is compared byte for byte with
  its slot before the slot is mapped over it; a page that changed is skipped. Zero pages
  are dropped with MADV_DONTNEED (``pages_zero``). At most ``max_pages_to_merge`` pages
  per batch.

``run``: 0 stop (merged pages stay merged), 1 run, 2 unmerge everything and stop.
``cpu_limit``: % of one CPU; the loop then adapts ``pages_to_scan`` to what a batch costs
(like the kernel's scan-time advisor) and sleeps long enough to stay under the limit.

Counters (:meth:`Daemon.snapshot`) follow the kernel's names and are taken from pagemap,
not from procksm's own bookkeeping, wherever pagemap can tell: ``pages_shared`` is the
number of distinct frames of procksm's memfds mapped in the targets, ``pages_sharing``
the mappings of them beyond the first, ``cow_breaks`` the pages of merged mappings that a
write has since made private again (pagemap: present, not file-backed).
"""

from __future__ import annotations

import bisect
import collections
import contextlib
import dataclasses
import fnmatch
import json
import os
import resource
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from procksm import PAGE_SIZE, procfs
from procksm.analysis import (
    CONTENT_ZERO,
    MappingRef,
    PageTable,
    ProcessIdentity,
    ScanInput,
)
from procksm.attach import check_attachable
from procksm.backoff import RemergeBackoff
from procksm.errors import NoSuchProcess, ProcksmError, UsageError
from procksm.locks import target_locks
from procksm.merge import (
    SEGMENT_NAME_PREFIX,
    MergeEngine,
    MergeOptions,
    Refusal,
    TargetResult,
    check_targets,
    merged_ranges,
    unmerge_pieces,
)
from procksm.observe import CowObserver
from procksm.reader import PageReader
from procksm.scanner import AddressRange, _hash_rows
from procksm.snapshot import HistoryPoint, MappingSnapshot, Snapshot, TargetSnapshot
from procksm.trees import REF_PAGE_BITS, ChecksumTable, page_ref, page_refs

LogFn = Callable[[str], None]
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
# CPU seconds one batch should cost when cpu_limit adapts pages_to_scan
_BATCH_CPU_S = 0.1
# ... within these bounds: small batches multiply the merge rounds, whose fixed costs
# grow with the segments merged so far (measured: a cap that shrank batches to 1,500
# pages took 29 CPU s where 16 Ki pages took 3)
_ADVISOR_PAGES = (16384, 1 << 17)
# merged ranges of one target beyond which the observer does not watch it (see _watch)
_OBSERVER_MAX_RANGES = 256
# runs of adjacent pages merged per batch at most (each costs an injected mmap or madvise
# per target, ~50-150 us)
_MAX_RUNS_PER_BATCH = 512
# the longest one batch may run before the loop sleeps and answers the control socket
_BATCH_MAX_S = 0.25
# Idle back-off: after two full scans in a row that merged nothing (KSM needs two looks
# at a page), the pause between batches doubles from 50 ms up to 1 s, and anything that
# may bring new duplicates (an observer event, a control request, a new target) resets
# it. Measured on two converged 32 MiB targets: the worker used 16.7 % of a CPU at the
# default 25 % cap without it (1,198 full scans in 30 s of nothing to do).
_IDLE_FIRST_SLEEP_S = 0.05
# ... "merged nothing": at most this many pages, or 1/1024 of the pages scanned
_IDLE_MERGED_PAGES = 32
_IDLE_MAX_SLEEP_S = 1.0

# --------------------------------------------------------------------------------------
# Settings: the knobs of /sys/kernel/mm/ksm (and the 2008 API's max_pages_to_merge)
# --------------------------------------------------------------------------------------

# name -> (lowest, highest) accepted value
SETTING_LIMITS: dict[str, tuple[float, float]] = {
    "pages_to_scan": (1, 1 << 24),
    "sleep_ms": (0, 3_600_000),
    "max_pages_to_merge": (1, 1 << 24),
    "run": (0, 2),
    "cpu_limit": (0, 100),
    "stable_scans": (0, 1),
}


@dataclass(slots=True)
class Settings:
    # 16 Ki pages (64 MiB) per batch: a batch then costs ~15-40 ms of CPU, reading
    # process_vm_readv-sized chunks; the kernel's 100 pages per 20 ms needs minutes for a
    # GiB (docs/design.md §4), which is why ksmd's defaults converge so slowly.
    pages_to_scan: int = 16384
    sleep_ms: int = 20
    max_pages_to_merge: int = 16384
    run: int = 1
    # % of one CPU; 0: no cap. The default keeps procksm "modest": a quarter of a core
    # while it has work, ~0 once converged (smart scan, cheap re-reads).
    cpu_limit: float = 25.0
    # Full scans a page seen for the first time waits before it may merge. 1 is the
    # kernel's checksum rule (two looks with the same checksum). 0, the default: at once;
    # its second look is the merge itself (the slot must still hash as the page did, and
    # the page must equal the slot byte for byte under stop, as `procksm merge` does).
    # A page whose checksum changed since its previous scan waits either way, and ranges
    # that break soon after merging are held back (procksm.backoff). Measured on the
    # standard workload at full speed: one full scan to converge instead of two.
    stable_scans: int = 0

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def parse_settings(assignments: Sequence[str]) -> dict[str, float]:
    """``["pages_to_scan=100", "run=1"]`` -> validated values; UsageError on anything
    else (nothing is applied unless everything is valid)."""
    if not assignments:
        raise UsageError("set: nothing to set; use NAME=VALUE (" + ", ".join(SETTING_LIMITS) + ")")
    out: dict[str, float] = {}
    for a in assignments:
        name, sep, text = a.partition("=")
        if not sep:
            raise UsageError(f"set: {a!r} is not NAME=VALUE")
        if name not in SETTING_LIMITS:
            raise UsageError(f"set: unknown setting {name!r} (known: {', '.join(SETTING_LIMITS)})")
        lo, hi = SETTING_LIMITS[name]
        try:
            value = float(text) if name == "cpu_limit" else int(text, 10)
        except ValueError:
            raise UsageError(f"set: {name}={text!r} is not a number") from None
        if not lo <= value <= hi or value != value:  # NaN
            raise UsageError(f"set: {name}={text} is outside {lo:g}..{hi:g}")
        out[name] = value
    return out


# --------------------------------------------------------------------------------------
# Registered ranges
# --------------------------------------------------------------------------------------


@dataclass(slots=True)
class Registration:
    """What of a target is scanned: the original KSM_REGISTER_MEMORY_REGION.

    ``everything`` (the default) is all eligible memory. Ranges and mapping-name globs
    (``[heap]``, ``[anon]``) are added with ``register`` and removed with ``unregister``;
    unregistering something that was only covered by ``everything`` excludes it.
    """

    everything: bool = True
    ranges: list[AddressRange] = field(default_factory=list)
    names: list[str] = field(default_factory=list)
    excluded_ranges: list[AddressRange] = field(default_factory=list)
    excluded_names: list[str] = field(default_factory=list)

    def register(self, item: AddressRange | str) -> str:
        if item == "all":
            self.everything = True
            self.excluded_ranges.clear()
            self.excluded_names.clear()
            return "all eligible memory"
        excl: list[Any] = (
            self.excluded_ranges if isinstance(item, AddressRange) else self.excluded_names
        )
        if item in excl:
            excl.remove(item)
            return f"{_item_text(item)} no longer excluded"
        incl: list[Any] = self.ranges if isinstance(item, AddressRange) else self.names
        if item not in incl:
            incl.append(item)
        return _item_text(item)

    def unregister(self, item: AddressRange | str) -> str:
        incl: list[Any] = self.ranges if isinstance(item, AddressRange) else self.names
        if item in incl:
            incl.remove(item)
            return f"{_item_text(item)} unregistered"
        excl: list[Any] = (
            self.excluded_ranges if isinstance(item, AddressRange) else self.excluded_names
        )
        if item not in excl:
            excl.append(item)
        return f"{_item_text(item)} excluded"

    def select(self, vma: procfs.Vma) -> list[tuple[int, int]]:
        """The parts of an eligible VMA to scan."""
        if any(fnmatch.fnmatchcase(vma.name, p) for p in self.excluded_names):
            return []
        if self.everything or any(fnmatch.fnmatchcase(vma.name, p) for p in self.names):
            parts = [(vma.start, vma.end)]
        else:
            parts = [
                (max(r.start, vma.start), min(r.end, vma.end))
                for r in self.ranges
                if r.start < vma.end and vma.start < r.end
            ]
        for r in self.excluded_ranges:
            parts = [p for s, e in parts for p in _subtract(s, e, r.start, r.end)]
        return sorted(parts)

    def describe(self) -> str:
        inc = ["all"] if self.everything else []
        inc += [_item_text(r) for r in self.ranges] + list(self.names)
        exc = [_item_text(r) for r in self.excluded_ranges] + list(self.excluded_names)
        text = ", ".join(inc) or "nothing"
        return text + (f" except {', '.join(exc)}" if exc else "")


def _item_text(item: AddressRange | str) -> str:
    return f"{item.start:#x}-{item.end:#x}" if isinstance(item, AddressRange) else item


def _subtract(s: int, e: int, xs: int, xe: int) -> list[tuple[int, int]]:
    out = []
    if s < min(e, xs):
        out.append((s, min(e, xs)))
    if max(s, xe) < e:
        out.append((max(s, xe), e))
    return out


def parse_region(text: str) -> AddressRange | str:
    """``START-END`` / ``START+LEN`` -> a range; ``all`` or a mapping-name glob -> str."""
    if text and text[0].isdigit():
        return AddressRange.parse(text)
    if not text or any(c.isspace() for c in text) or len(text) > 256:
        raise UsageError(f"bad range or mapping name {text!r}")
    return text


# --------------------------------------------------------------------------------------
# Per-target state
# --------------------------------------------------------------------------------------


@dataclass(slots=True)
class Part:
    """A scanned piece of an eligible VMA (the VMA's bounds kept for the engine)."""

    vma_start: int
    vma_end: int
    start: int
    end: int
    name: str
    perms: str
    rss_pages: int
    # one of procksm's own segment mappings: only the pages a write copied there (now
    # anonymous) are read, and merged again like any other page (never as zero pages)
    merged: bool = False


@dataclass
class Target:
    pid: int
    index: int  # its number in page refs (never reused while the daemon runs)
    name: str
    uid: int
    mm_id: tuple[str, ...]  # changes on exec: a new address space
    lock: contextlib.ExitStack
    reg: Registration = field(default_factory=Registration)
    parent: int | None = None
    parts: list[Part] = field(default_factory=list)
    merged_vmas: list[procfs.Vma] = field(default_factory=list)
    part_starts: list[int] = field(default_factory=list)
    zero_runs: list[tuple[int, int]] = field(default_factory=list)  # (addr, pages) dropped
    pages_refused: int = 0
    refusals: collections.Counter[str] = field(default_factory=collections.Counter)
    pauses: collections.deque[float] = field(default_factory=lambda: collections.deque(maxlen=4096))
    max_pause: float = 0.0
    pages_merged_total: int = 0
    # pagemap truth, refreshed with each snapshot
    sharing_sites: int = 0
    zero_now: int = 0
    cow_now: int = 0
    cow_total: int = 0
    cow_rate: float = 0.0
    rss_bytes: int = 0
    pss_bytes: int = 0
    shared_pfns: np.ndarray = field(default_factory=lambda: np.zeros(0, np.uint64))
    parts_stale: bool = False  # the observer saw munmap/mremap/brk since refresh_parts
    # pages of merged mappings that a write copied (pagemap, with each snapshot): only the
    # merged mappings that hold one are scanned (a scattered merge leaves thousands of
    # one-page mappings; walking them all every full scan tripled the daemon's CPU on
    # redis, measured)
    copied_addrs: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))

    def refresh_parts(self) -> None:
        """Re-read smaps: the VMAs and their eligibility (one read per full scan)."""
        self.parts_stale = False
        parts: list[Part] = []
        merged: list[procfs.Vma] = []
        for vma in procfs.read_vmas(self.pid):
            ours = vma.path.startswith(SEGMENT_NAME_PREFIX)
            if ours:
                merged.append(vma)
                c = self.copied_addrs
                i = int(np.searchsorted(c, vma.start))
                if i >= c.size or c[i] >= vma.end:
                    continue  # nothing copied there (as of the latest snapshot)
            if procfs.ineligibility(vma, ours=ours) is not None:
                continue
            for s, e in self.reg.select(vma):
                parts.append(
                    Part(
                        vma.start,
                        vma.end,
                        s,
                        e,
                        vma.name,
                        vma.perms,
                        vma.rss_kb * 1024 // PAGE_SIZE,
                        merged=ours,
                    )
                )
        self.parts = parts
        self.part_starts = [p.start for p in parts]
        self.merged_vmas = merged

    def part_indices(self, addr: np.ndarray) -> np.ndarray:
        """For each address, the index of the part that holds it, or -1."""
        starts = np.array([p.start for p in self.parts], np.int64)
        ends = np.array([p.end for p in self.parts], np.int64)
        if starts.size == 0:
            return np.full(addr.size, -1, np.int64)
        i = np.searchsorted(starts, addr, side="right") - 1
        return np.where((i >= 0) & (addr < ends[np.maximum(i, 0)]), i, -1)

    def part_at(self, addr: int) -> Part | None:
        i = bisect.bisect_right(self.part_starts, addr) - 1
        if i >= 0 and addr < self.parts[i].end:
            return self.parts[i]
        return None


def mm_identity(pid: int) -> tuple[str, ...]:
    """Fields of /proc/PID/stat that exec changes (start_code, end_code, start_stack,
    arg_start, env_start): a pid that execs keeps its pid and start time, not these."""
    try:
        f = procfs.read_stat_fields(pid)
    except OSError:
        raise NoSuchProcess(pid) from None
    # index 0 is field 3: start_code 26, end_code 27, start_stack 28, arg_start 48,
    # env_start 50 (proc(5)); with ASLR an exec changes them all
    return (f[23], f[24], f[25], f[45], f[47]) if len(f) > 47 else tuple(f[23:26])


# --------------------------------------------------------------------------------------
# Smart scan ages
# --------------------------------------------------------------------------------------


class PageAges:
    """Per page: scans without a merge (age), full scans still to skip, and whether its
    checksum changed at its latest scan (3 bytes/page, in chunks of 512 pages that exist
    only where pages were scanned)."""

    CHUNK = 512

    def __init__(self) -> None:
        self._chunks: dict[int, np.ndarray] = {}  # ref >> 9 -> uint8[3, 512]

    @property
    def nbytes(self) -> int:
        return len(self._chunks) * (3 * self.CHUNK + 100)

    def volatile(self) -> int:
        """Pages whose checksum changed at their latest scan (skipped ones keep theirs)."""
        return int(sum(int(a[2].sum()) for a in self._chunks.values()))

    def forget_target(self, index: int) -> None:
        lo, hi = page_ref(index, 0) >> 9, page_ref(index + 1, 0) >> 9
        for k in [k for k in self._chunks if lo <= k < hi]:
            del self._chunks[k]

    def take_skips(self, index: int, start: int, end: int) -> np.ndarray:
        """Pages of [start, end) to skip this scan (and count the skip down)."""
        first = page_ref(index, start // PAGE_SIZE)
        n = (end - start) // PAGE_SIZE
        out = np.zeros(n, bool)
        pos = 0
        while pos < n:
            ref = first + pos
            c, off = ref >> 9, ref & (self.CHUNK - 1)
            k = min(self.CHUNK - off, n - pos)
            arr = self._chunks.get(c)
            if arr is not None:
                rem = arr[1, off : off + k]
                skip = rem > 0
                rem[skip] -= 1
                out[pos : pos + k] = skip
            pos += k
        return out

    def update(self, refs: np.ndarray, merged: np.ndarray, volatile: np.ndarray) -> None:
        """After a scan: merged pages are young again, the others age (and from age 3 get
        skips: 1, 2, 4, then 8 full scans, as the kernel's smart scan)."""
        if refs.size == 0:
            return
        chunk_ids = refs >> 9
        for c in np.unique(chunk_ids):
            sel = chunk_ids == c
            arr = self._chunks.get(int(c))
            if arr is None:
                arr = self._chunks[int(c)] = np.zeros((3, self.CHUNK), np.uint8)
            off = refs[sel] & (self.CHUNK - 1)
            m = merged[sel]
            arr[2, off] = volatile[sel]
            age = arr[0]
            age[off[m]] = 0
            arr[1, off[m]] = 0
            old = off[~m]
            age[old] = np.minimum(age[old].astype(np.int16) + 1, 255).astype(np.uint8)
            a = age[old]
            skips = np.where(a <= 3, 1, np.where(a <= 5, 2, np.where(a <= 8, 4, 8)))
            arr[1, old] = np.where(a >= 3, skips, 0).astype(np.uint8)


# --------------------------------------------------------------------------------------
# Unstable tree: sorted chunks of (hash, ref, pfn), one chunk per batch
# --------------------------------------------------------------------------------------


class _Unstable:
    """Checksum-stable, unmerged pages seen during the current full scan.

    One sorted chunk per batch (vectorised searchsorted per chunk; no per-page Python):
    24 bytes per page. Emptied at the start of every full scan (kernel step 4).
    """

    def __init__(self) -> None:
        self.hash: list[np.ndarray] = []
        self.ref: list[np.ndarray] = []
        self.pfn: list[np.ndarray] = []
        self.alive: list[np.ndarray] = []

    def __len__(self) -> int:
        return int(sum(int(a.sum()) for a in self.alive))

    @property
    def nbytes(self) -> int:
        return sum(h.nbytes * 3 + a.nbytes for h, a in zip(self.hash, self.alive, strict=True))

    def reset(self) -> None:
        self.hash, self.ref, self.pfn, self.alive = [], [], [], []

    def insert(self, hashes: np.ndarray, refs: np.ndarray, pfns: np.ndarray) -> None:
        if hashes.size == 0:
            return
        o = np.argsort(hashes, kind="stable")
        self.hash.append(hashes[o])
        self.ref.append(refs[o])
        self.pfn.append(pfns[o].astype(np.uint64))
        self.alive.append(np.ones(hashes.size, bool))
        # Like a log-structured merge: the newest chunk joins the one before while it is
        # at least half its size, so there are O(log n) chunks to search per batch and
        # each entry is moved O(log n) times (measured: one chunk per batch made the
        # searches the daemon's biggest cost after reading).
        while len(self.hash) >= 2 and 2 * self.hash[-1].size >= self.hash[-2].size:
            self._merge_last_two()

    def _merge_last_two(self) -> None:
        keep = [a for a in self.alive[-2:]]
        h = np.concatenate([x[k] for x, k in zip(self.hash[-2:], keep, strict=True)])
        r = np.concatenate([x[k] for x, k in zip(self.ref[-2:], keep, strict=True)])
        p = np.concatenate([x[k] for x, k in zip(self.pfn[-2:], keep, strict=True)])
        o = np.argsort(h, kind="stable")  # two sorted runs: a linear merge (timsort)
        for lst in (self.hash, self.ref, self.pfn, self.alive):
            del lst[-2:]
        self.hash.append(h[o])
        self.ref.append(r[o])
        self.pfn.append(p[o])
        self.alive.append(np.ones(h.size, bool))

    def contains(self, hashes: np.ndarray) -> np.ndarray:
        hit = np.zeros(hashes.size, bool)
        for h, a in zip(self.hash, self.alive, strict=True):
            lo = np.searchsorted(h, hashes, "left")
            hi = np.searchsorted(h, hashes, "right")
            more = hi > lo
            if not more.any():
                continue
            # any alive entry in [lo, hi): cumulative counts of alive entries
            c = np.concatenate(([0], np.cumsum(a)))
            hit |= (c[hi] - c[lo]) > 0
        return hit

    def take(self, hashes: np.ndarray) -> list[tuple[int, int, np.ndarray, np.ndarray, np.ndarray]]:
        """Alive entries with one of ``hashes``: [(chunk, -, positions, refs, pfns)]; they
        stay alive until :meth:`kill` (a failed merge leaves them for later partners)."""
        out = []
        q = np.unique(hashes)
        for i, (h, a) in enumerate(zip(self.hash, self.alive, strict=True)):
            lo = np.searchsorted(h, q, "left")
            hi = np.searchsorted(h, q, "right")
            n = hi - lo
            if not n.any():
                continue
            pos = np.repeat(lo, n) + (np.arange(int(n.sum())) - np.repeat(np.cumsum(n) - n, n))
            pos = pos[a[pos]]
            if pos.size:
                out.append((i, 0, pos, self.ref[i][pos], self.pfn[i][pos]))
        return out

    def kill(self, chunk: int, positions: np.ndarray) -> None:
        self.alive[chunk][positions] = False

    def forget_target(self, index: int) -> None:
        lo, hi = page_ref(index, 0), page_ref(index + 1, 0)
        for r, a in zip(self.ref, self.alive, strict=True):
            a[(r >= lo) & (r < hi)] = False


# --------------------------------------------------------------------------------------
# The daemon
# --------------------------------------------------------------------------------------


@dataclass(slots=True)
class DaemonOptions:
    follow_children: bool = False
    unmerge_on_exit: bool = False
    merge: MergeOptions = field(default_factory=MergeOptions)
    # The longest a target may be stopped (ms): a window over it halves the pages per
    # window (down to 16) for what follows; windows well under it grow them back.
    pause_budget_ms: float = 5.0
    # Pages per stop window at most: twice the one-shot merge's 256, so a window's fixed
    # cost (stop, resume, fd hand-over) is paid half as often. Measured on the standard
    # workload (4 x 384 MiB, 2 CPUs shared with other jobs): 1024 pages p99 8.4 ms,
    # 512 pages p99 5.4 ms and 6 % more CPU. The pause budget shrinks it if needed.
    stop_pages: int = 512
    # Copy-on-write breaks and lifecycle events (procksm.observe): None = eBPF when it
    # works, else pagemap polling; False = pagemap polling (--no-bpf).
    use_bpf: bool | None = None
    # Volatility learned from observation (procksm.backoff): a range that a write broke
    # less than remerge_soon_s after its merge is held back for 2**level full scans.
    remerge_backoff: bool = True
    remerge_soon_s: float = 30.0
    snapshot_interval_s: float = 1.0
    history: int = 120


@dataclass(slots=True)
class _Round:
    """Scratch of one batch."""

    target: Target | None
    scanned: int = 0  # pages read
    skipped: int = 0  # pages smart scan skipped
    covered: int = 0  # pages of address space the window spanned
    end_of_scan: bool = False


class Daemon:
    """The scan loop and everything it knows. Thread-safety: the loop runs in one thread;
    the control socket calls :meth:`apply_settings` (under ``lock``), :meth:`submit`
    (queued to the loop) and :meth:`snapshot` (an immutable record)."""

    def __init__(
        self,
        pids: Sequence[int],
        settings: Settings | None = None,
        opts: DaemonOptions | None = None,
        log: LogFn | None = None,
    ) -> None:
        self.settings = settings or Settings()
        self.opts = opts or DaemonOptions()
        self.log = log or (lambda _m: None)
        self.lock = threading.Lock()
        self.wake = threading.Event()
        self.stopping = threading.Event()
        self.targets: dict[int, Target] = {}
        self._order: list[int] = []
        self._next_index = 0
        self._initial = list(pids)
        self.checksums = ChecksumTable()
        self.unstable = _Unstable()
        self.ages = PageAges()
        self.backoff = RemergeBackoff(self.opts.remerge_soon_s)
        self.pages_remerged = 0  # copied pages of segment mappings merged again
        self.segment_hashes: dict[int, np.ndarray] = {}  # inode -> page hashes
        self._stable_keys: set[int] = set()
        self._stable_sorted = np.zeros(0, np.uint64)
        self._stable_dirty = True
        self.full_scans = 0
        self.pages_skipped = 0
        self.pages_scanned = 0
        self.zero_dropped_total = 0
        self.batch_pages = self.opts.stop_pages
        self.pauses_over_budget = 0
        self._cursor = (0, 0, 0)  # (position in order, part index, address)
        self._queue: collections.deque[tuple[Callable[[], str], _Reply]] = collections.deque()
        self._snapshot: Snapshot | None = None
        self._history: collections.deque[HistoryPoint] = collections.deque(maxlen=self.opts.history)
        self._all_pauses: collections.deque[float] = collections.deque(maxlen=8192)
        self._cost_per_page = 0.0  # CPU seconds per scanned page (EWMA), for cpu_limit
        self._last_snap = (time.monotonic(), _cpu_seconds(), 0)
        self._snapshot_cost = 0.0  # CPU seconds the last snapshot took
        self.exit_events: list[str] = []
        self.on_publish: Callable[[Snapshot], None] | None = None
        self.observer: CowObserver | None = None
        self._unwatched: set[int] = set()  # targets whose merged ranges changed
        self._observed: set[int] = set()  # targets the observer counts COW breaks of
        self._last_poll = 0.0
        self._idle_scans = 0  # full scans in a row that merged nothing
        self._merged_this_scan = 0
        self._scanned_at_scan_start = 0
        # one read buffer for every window (1 MiB: process_vm_readv's plateau, docs/design.md §2.1)
        self._read_buffer = np.empty(1 << 20, np.uint8)

    # --- lifecycle ----------------------------------------------------------------------

    def __enter__(self) -> Daemon:
        try:
            self._start_observer()
            for pid in self._initial:
                self.add_target(pid)
            # a first snapshot before the control socket opens: views never build one
            self.maybe_publish(force=True)
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        for t in list(self.targets.values()):
            self._drop(t, "procksm exits")
        if self.observer is not None:
            self.observer.close()
            self.observer = None

    def _start_observer(self) -> None:
        """The COW observer (eBPF or pagemap). Without one (it failed to start) the
        snapshot counts COW breaks from its own pagemap pass."""
        from procksm.observe import CowObserver

        try:
            self.observer = CowObserver(
                self.opts.use_bpf,
                # eBPF sees the breaks as they happen; the pagemap reconcile (writes by
                # get_user_pages, lost events) costs a pass over every merged range
                reconcile_interval_s=5.0,
                follow_children=self.opts.follow_children,
                warn=lambda m: self.log(f"warning: {m}"),
            )
        except ProcksmError as e:
            if self.opts.use_bpf:
                raise
            self.log(f"warning: no copy-on-write observer: {e.message}")

    def add_target(self, pid: int, parent: int | None = None) -> Target:
        self._idle_scans = 0
        if pid in self.targets:
            raise UsageError(f"pid {pid} is already a target")
        if pid == os.getpid():
            raise UsageError("procksm does not merge itself")
        names, refused = check_targets([pid], self.opts.merge)
        if refused:
            raise UsageError(f"pid {pid}: {refused[0].reason}")
        st = check_attachable(pid)
        others = {t.uid for t in self.targets.values()}
        if others and not self.opts.merge.cross_uid and others != {st.uid}:
            raise UsageError(
                f"pid {pid} runs as uid {st.uid}, the other targets as {sorted(others)}; "
                "merging across uids lets one infer another's memory (pass --cross-uid)"
            )
        lock = contextlib.ExitStack()
        # TargetBusy (another procksm holds it) propagates: a clear "who" message
        lock.enter_context(target_locks([pid]))
        t = Target(pid, self._next_index, names[pid], st.uid, mm_identity(pid), lock, parent=parent)
        self._next_index += 1
        self.targets[pid] = t
        self._order.append(pid)
        if self.full_scans:
            # New memory may pair with pages that smart scan skips for having stayed
            # unique so far: every page gets looked at again (one more full read).
            self.ages = PageAges()
        self.log(f"attached to pid {pid} ({t.name})" + (f", child of {parent}" if parent else ""))
        return t

    def _drop(self, t: Target, why: str) -> None:
        self.targets.pop(t.pid, None)
        if t.pid in self._order:
            pos = self._order.index(t.pid)
            self._order.remove(t.pid)
            p, i, a = self._cursor
            if p > pos:
                self._cursor = (p - 1, i, a)
            elif p == pos:
                self._cursor = (p, 0, 0)
        self._forget(t)
        t.lock.close()
        if self.observer is not None and t.pid in self._observed:
            self._observed.discard(t.pid)
            with contextlib.suppress(ProcksmError, OSError, KeyError):
                self.observer.remove_target(t.pid)
        self.exit_events.append(f"{t.pid}: {why}")
        self.log(f"pid {t.pid} ({t.name}): {why}")

    def _forget(self, t: Target) -> None:
        """Forget what the scan learned of ``t``'s pages (checksums, trees, ages)."""
        lo, hi = page_ref(t.index, 0), page_ref(t.index + 1, 0)
        self.checksums.forget(lo, hi)
        self.unstable.forget_target(t.index)
        self.ages.forget_target(t.index)
        self.backoff.forget(lo, hi)

    def _reset_target(self, t: Target, why: str) -> None:
        """exec: the pid stays, its memory is new. Forget everything known of it."""
        self._forget(t)
        t.index = self._next_index
        self._next_index += 1
        t.zero_runs.clear()
        t.cow_now = 0
        t.mm_id = mm_identity(t.pid)
        self.ages = PageAges()  # a new program's pages may pair with old unique ones
        with contextlib.suppress(ProcksmError, OSError):
            t.name = procfs.read_status(t.pid).name
        self.exit_events.append(f"{t.pid}: {why}")
        self.log(f"pid {t.pid}: {why}")

    # --- control ----------------------------------------------------------------------

    def apply_settings(self, values: dict[str, float]) -> str:
        self._idle_scans = 0
        with self.lock:
            for k, v in values.items():
                setattr(self.settings, k, int(v) if k != "cpu_limit" else float(v))
        self.wake.set()
        s = self.settings
        return " ".join(f"{k}={getattr(s, k)}" for k in values)

    def submit(self, fn: Callable[[], str], timeout: float = 30.0) -> str:
        """Run ``fn`` in the scan loop's thread between batches; its result or error."""
        reply = _Reply()
        self._idle_scans = 0  # registered ranges, unmerges: there may be work again
        self._queue.append((fn, reply))
        self.wake.set()
        if not reply.done.wait(timeout):
            raise ProcksmError("the daemon did not answer in time (a long batch?)")
        if reply.error is not None:
            raise reply.error
        return reply.value

    def register(self, pid: int, region: str) -> str:
        item = parse_region(region)

        def do() -> str:
            t = self.targets.get(pid)
            if t is None:
                t = self.add_target(pid)
                t.reg = Registration(everything=False)
                if item == "all":
                    t.reg.everything = True
                    return f"pid {pid}: attached, all eligible memory"
            what = t.reg.register(item)
            return f"pid {pid}: {what}; scanning {t.reg.describe()}"

        return self.submit(do)

    def unregister(self, pid: int, region: str) -> str:
        item = parse_region(region)

        def do() -> str:
            t = self.targets.get(pid)
            if t is None:
                raise UsageError(f"pid {pid} is not a target")
            if item == "all":
                self._drop(t, "unregistered")
                return f"pid {pid}: detached (merged pages stay merged)"
            what = t.reg.unregister(item)
            return f"pid {pid}: {what}; scanning {t.reg.describe()}"

        return self.submit(do)

    def _run_queue(self) -> None:
        while self._queue:
            fn, reply = self._queue.popleft()
            try:
                reply.value = fn()
            except ProcksmError as e:
                reply.error = e
            except Exception as e:  # a bug must not kill the daemon; the client hears it
                reply.error = ProcksmError(f"internal error: {e!r}")
            reply.done.set()

    def handle(self, line: str) -> str:
        """One control-socket request (procksm.control); ProcksmError -> ``error: ...``."""
        words = line.split()
        cmd, args = words[0], words[1:]
        if cmd == "set":
            return f"ok {self.apply_settings(parse_settings(args))}\n"
        if cmd in ("register", "unregister"):
            if len(args) != 2 or not args[0].isdigit():
                raise UsageError(f"{cmd}: use '{cmd} PID START-END|START+LEN|NAME|all'")
            fn = self.register if cmd == "register" else self.unregister
            return f"ok {fn(int(args[0]), args[1])}\n"
        if cmd == "stats":
            if args == ["--json"]:
                return json.dumps(self.snapshot().as_json()) + "\n"
            if args:
                raise UsageError("stats: the only option is --json")
            return stats_text(self.snapshot())
        # the live view's keys (procksm.tui.source): pause, resume, unmerge PID
        if cmd in ("pause", "resume") and not args:
            return f"ok {self.apply_settings({'run': 0 if cmd == 'pause' else 1})}\n"
        if cmd == "unmerge" and len(args) == 1 and args[0].isdigit():
            return f"ok {self.submit(lambda: self._unmerge_one(int(args[0])), 300)}\n"
        raise UsageError(
            f"unknown command {cmd[:40]!r} (commands: set, register, unregister, stats, "
            "pause, resume, unmerge)"
        )

    # --- the loop -----------------------------------------------------------------------

    def run_forever(self) -> None:
        while not self.stopping.is_set():
            self._run_queue()
            with self.lock:
                s = dataclasses.replace(self.settings)
            if s.run == 2:
                self.unmerge_all()
                with self.lock:
                    self.settings.run = 0
                continue
            slept_for = s.sleep_ms / 1000.0
            cpu0, t0 = _thread_cpu(), time.monotonic()
            r = self.batch(s) if s.run == 1 and self.targets else None
            # the observer and the counters are procksm's CPU too: the cap counts them
            self._observe()
            self.maybe_publish()
            if r is not None:
                slept_for = self._sleep_after(s, r, _thread_cpu() - cpu0, time.monotonic() - t0)
                slept_for = max(slept_for, idle_sleep(self._idle_scans))
            self._sleep(slept_for if s.run == 1 and self.targets else 0.2)
        self.maybe_publish(force=True)

    def _sleep(self, seconds: float) -> None:
        """Sleep between batches; counters stay fresh during long sleeps (a CPU cap can
        ask for seconds), and a control request or a signal ends the sleep."""
        deadline = time.monotonic() + seconds
        while not self.stopping.is_set():
            left = deadline - time.monotonic()
            if left <= 0:
                return
            if self.wake.wait(min(left, self.opts.snapshot_interval_s)):
                self.wake.clear()
                return
            self._observe()
            self.maybe_publish()

    def _watch(self, pid: int) -> None:
        """Tell the observer which ranges of ``pid`` are merged now. A target with more
        than _OBSERVER_MAX_RANGES merged ranges (scattered duplicates) is left to the
        snapshot's own pagemap pass: the observer's reconcile costs O(ranges^2) (a
        bisect over a list rebuilt per chunk; measured: 3 targets x 8 Ki one-page ranges
        kept a CPU busy) and runs every second."""
        assert self.observer is not None
        with contextlib.suppress(ProcksmError, OSError, KeyError):
            ranges = [(v.start, v.end) for v in merged_ranges(pid)]
            if len(ranges) <= _OBSERVER_MAX_RANGES:
                self.observer.set_ranges(pid, ranges)
                self._observed.add(pid)
            elif pid in self._observed:
                self.observer.remove_target(pid)
                self._observed.discard(pid)

    def _observe(self) -> None:
        """Lifecycle events from the observer (every 0.2 s): an exit drops the target at
        once, an exec starts its state over, a fork adds the child (--follow-children),
        munmap/mremap/brk re-read the target's mappings at its next window."""
        obs = self.observer
        now = time.monotonic()
        if obs is None or now - self._last_poll < 0.2:
            return
        self._last_poll = now
        for pid in list(self._unwatched):
            if pid in self.targets:
                self._watch(pid)
        self._unwatched.clear()
        try:
            events = obs.poll(0)
        except (ProcksmError, OSError) as e:
            self.log(f"observer: {e}")
            return
        from procksm.observe import Lifecycle

        if events:
            self._idle_scans = 0  # a write, a new mapping, a fork...: look again soon
        for ev in events:
            t = self.targets.get(ev.pid)
            if not isinstance(ev, Lifecycle):
                # a COW break (the observer counts them): volatility learned from it
                if t is not None and self.opts.remerge_backoff:
                    self.backoff.broke(
                        page_ref(t.index, ev.addr // PAGE_SIZE), now, self.full_scans
                    )
                continue
            if ev.kind == "exit" and t is not None and not _alive(ev.pid):
                self._drop(t, "exited")
            elif ev.kind == "exec" and t is not None:
                self._reset_target(t, "exec: a new program, its state starts over")
                t.refresh_parts()
            elif ev.kind == "fork" and self.opts.follow_children and ev.child_pid:
                if ev.child_pid not in self.targets and t is not None:
                    try:
                        self.add_target(ev.child_pid, parent=ev.pid)
                        self._unwatched.add(ev.child_pid)
                    except ProcksmError as e:
                        self.log(f"child {ev.child_pid} of {ev.pid} not followed: {e.message}")
            elif ev.kind in ("munmap", "mremap", "brk") and t is not None:
                # re-read at the target's next window, once however many calls (the
                # merge's own injected mmaps show up here too, hence not "mmap")
                t.parts_stale = True

    def _sleep_after(self, s: Settings, r: _Round | None, cpu: float, wall: float) -> float:
        """The kernel's advisor in spirit: with a CPU limit, pages_to_scan follows what a
        page costs so that a batch plus sleep_ms stays under the limit, and the sleep
        stretches when a batch cost more than planned."""
        sleep = s.sleep_ms / 1000.0
        if r is None or r.scanned + r.skipped == 0 or s.cpu_limit <= 0 or s.cpu_limit >= 100:
            return sleep
        per_page = cpu / max(r.scanned, 1)
        c = self._cost_per_page
        self._cost_per_page = per_page if c == 0 else 0.7 * c + 0.3 * per_page
        limit = s.cpu_limit / 100.0
        # the sleep that keeps cpu / (wall + sleep) <= limit: the cap itself
        need = cpu / limit - wall
        if self._cost_per_page > 0:
            # pages_to_scan follows the cost of a page so that one batch takes about
            # _BATCH_CPU_S of CPU: big enough to amortise a batch's fixed costs (smaps,
            # one merge round), small enough that the cap's sleeps stay short
            target = int(_BATCH_CPU_S / self._cost_per_page)
            lo, hi = _ADVISOR_PAGES
            with self.lock:
                self.settings.pages_to_scan = int(min(hi, max(lo, target)))
        return max(sleep, need)

    def batch(self, s: Settings) -> _Round:
        """One batch: windows until ``pages_to_scan`` pages of address space are covered
        (a window ends at a mapping's end, so small mappings share a batch), the full
        scan ends, or the batch has run for _BATCH_MAX_S."""
        total = _Round(None)
        left = s.pages_to_scan
        t0 = time.monotonic()
        while left > 0 and not self.stopping.is_set():
            # every window is pages_to_scan long from its mapping's start (not `left`):
            # identical layouts in different processes then give identical windows, and
            # pages joining another's merged run cover it to its end (plan's tail rule)
            r = self.step(s)
            if r is None:
                break
            total.scanned += r.scanned
            total.skipped += r.skipped
            total.covered += r.covered
            left -= max(r.covered, 1)
            if r.end_of_scan or time.monotonic() - t0 > _BATCH_MAX_S:
                break
        return total

    def step(self, s: Settings) -> _Round | None:
        """Scan one batch (one window of one target) and merge what it found ready."""
        if self._cursor[0] >= len(self._order):
            self._end_full_scan()
            if not self._order:
                return None
        pos, pi, addr = self._cursor
        pid = self._order[pos]
        t = self.targets[pid]
        try:
            if pi == 0 and addr == 0:
                if mm_identity(pid) != t.mm_id:
                    self._reset_target(t, "exec: a new program, its state starts over")
                t.refresh_parts()
            elif t.parts_stale:
                # resume at the same address in the re-read parts
                resume = addr or (t.parts[pi].start if pi < len(t.parts) else None)
                t.refresh_parts()
                if resume is None:
                    pi = len(t.parts)
                else:
                    pi = next((i for i, p in enumerate(t.parts) if resume < p.end), len(t.parts))
                    addr = resume
            window = self._window(t, pi, addr, s.pages_to_scan)
            if window is None:
                self._cursor = (pos + 1, 0, 0)
                return _Round(t, end_of_scan=pos + 1 >= len(self._order))
            pi2, start, end = window
            r = self._scan_and_merge(t, t.parts[pi2], start, end, s)
            r.covered = (end - start) // PAGE_SIZE
            part = t.parts[pi2]
            self._cursor = (pos, pi2 + 1, 0) if end >= part.end else (pos, pi2, end)
            return r
        except NoSuchProcess:
            self._drop(t, "exited")
        except ProcksmError as e:
            # one target's trouble (e.g. it went away between checks) skips its window
            self.log(f"pid {pid}: {e.message}")
            if not _alive(pid):
                self._drop(t, "exited")
            else:
                self._cursor = (pos + 1, 0, 0)
        return None

    def _window(self, t: Target, pi: int, addr: int, pages: int) -> tuple[int, int, int] | None:
        while pi < len(t.parts):
            p = t.parts[pi]
            start = max(addr, p.start)
            if start < p.end:
                # whole granules from the mapping's start (see GRANULE_PAGES)
                granules = max(1, -(-pages // GRANULE_PAGES))
                return pi, start, min(p.end, start + granules * GRANULE_PAGES * PAGE_SIZE)
            pi, addr = pi + 1, 0
        return None

    def _end_full_scan(self) -> None:
        if self._order:
            self.full_scans += 1
        # A scan that merged next to nothing is idle too: copied pages merged again and
        # zero pages dropped again trickle in for ever on a live program (four
        # redis-servers: 0-4 pages a full scan kept the daemon at its CPU cap)
        scanned = self.pages_scanned - self._scanned_at_scan_start
        busy = self._merged_this_scan > max(_IDLE_MERGED_PAGES, scanned >> 10)
        self._idle_scans = 0 if busy else self._idle_scans + 1
        self._merged_this_scan = 0
        self._scanned_at_scan_start = self.pages_scanned
        self.unstable.reset()
        self._cursor = (0, 0, 0)
        self._stable_dirty = True  # segments another procksm (or a fork) brought in
        if self.opts.follow_children:
            self._adopt_children()
        self._prune_stable()

    def _adopt_children(self) -> None:
        for pid in list(self._order):
            for child in _children(pid):
                if child in self.targets:
                    continue
                try:
                    self.add_target(child, parent=pid)
                except ProcksmError as e:
                    self.log(f"child {child} of {pid} not followed: {e.message}")

    def _prune_stable(self) -> None:
        """Forget the hashes of segments no target maps any more."""
        inodes: set[int] = set()
        for t in self.targets.values():
            with contextlib.suppress(ProcksmError, OSError):
                inodes.update(v.inode for v in merged_ranges(t.pid))
        for k in [k for k in self.segment_hashes if k not in inodes]:
            del self.segment_hashes[k]

    def _refresh_stable(self) -> None:
        """Hash the segments merged since the last look (the engine's adoption step,
        with the shared cache: a segment is hashed once in its life)."""
        self._stable_dirty = False
        with MergeEngine([], self.opts.merge) as engine:
            engine.segment_hashes = self.segment_hashes
            with contextlib.suppress(ProcksmError):
                engine._adopt_existing(list(self._order))

    def _stable_hashes(self) -> np.ndarray:
        keys = set(self.segment_hashes)
        if keys != self._stable_keys:
            self._stable_keys = keys
            parts = list(self.segment_hashes.values())
            self._stable_sorted = (
                np.unique(np.concatenate(parts)) if parts else np.zeros(0, np.uint64)
            )
        return self._stable_sorted

    def _scan_and_merge(self, t: Target, part: Part, start: int, end: int, s: Settings) -> _Round:
        r = _Round(t)
        # smart scan: pages still to be skipped are not even read
        skip = self.ages.take_skips(t.index, start, end)
        r.skipped = int(skip.sum())
        self.pages_skipped += r.skipped
        ranges = [
            AddressRange(start + a * PAGE_SIZE, start + b * PAGE_SIZE) for a, b in _runs(~skip)
        ]
        if not ranges:
            return r
        tab, addr = self._read_window(t.pid, ranges, copied_only=part.merged)
        n = len(tab)
        r.scanned = n
        self.pages_scanned += n
        if n == 0:
            return r
        refs = page_refs(t.index, addr // PAGE_SIZE)
        readable = tab.content != -2  # CONTENT_VOLATILE: vanished while read
        stable = np.zeros(n, bool)
        stable[readable] = self.checksums.update(
            refs[readable], tab.hash[readable], first_look_stable=s.stable_scans == 0
        )
        zero_content = stable & (tab.content == CONTENT_ZERO)
        # In a segment mapping MADV_DONTNEED brings back the segment's bytes, not zeros:
        # a copied page that is all zeros there stays as it is (merge._verify_zero
        # refuses it as well)
        zero = np.zeros(n, bool) if part.merged else zero_content
        cand = stable & ~zero_content
        held = np.zeros(n, bool)
        if part.merged and self.opts.remerge_backoff:
            # Every page read here was copied since its merge. The observer reports
            # breaks as they happen; this catches the ones it does not watch (a target
            # with more merged ranges than _OBSERVER_MAX_RANGES, lost events). Ranges
            # that broke soon after their last merge wait (procksm.backoff); they stay
            # out of the unstable tree too, or a partner would merge them
            held = self._learn_and_hold(refs, readable)
            cand &= ~held
        # stable tree (procksm's segments) and unstable tree (this full scan), by hash;
        # bytes are compared under stop before anything is mapped
        h = tab.hash
        if self._stable_dirty:
            self._refresh_stable()
        st = self._stable_hashes()
        in_stable = np.zeros(n, bool)
        if st.size:
            in_stable = (st[np.minimum(np.searchsorted(st, h), st.size - 1)] == h) & cand
        in_unstable = self.unstable.contains(h) & cand
        dup_in_batch = np.zeros(n, bool)
        ch = h[cand]
        if ch.size:
            _u, inv, cnt = np.unique(ch, return_inverse=True, return_counts=True)
            dup_in_batch[np.flatnonzero(cand)] = cnt[inv] > 1
        ready = in_stable | in_unstable | dup_in_batch
        if zero.any() and t.zero_runs and self.opts.remerge_backoff:
            # A zero page procksm dropped that is back (present, zeros again: calloc's
            # memset on reused memory) broke its "merge" like a copy-on-write: the same
            # backoff holds its range (measured on redis: 680 pages dropped again and
            # again in 20 s, 352 stop windows for them)
            back = zero & _in_runs(addr, t.zero_runs)
            if back.any():
                zero_held = zero & self._learn_and_hold(refs, back)
                zero &= ~zero_held
                held |= zero_held
        # max_pages_to_merge, and at most _MAX_RUNS_PER_BATCH runs of adjacent pages: a
        # run is one mmap (or madvise) in each target, so scattered duplicates (every
        # other page) would otherwise make one batch a minute of merging, with the CPU
        # cap and the counters waiting for its end (measured). The rest waits, in the
        # unstable tree, for a later batch or the next full scan.
        ready_rows = np.flatnonzero(ready | zero)
        keep = ready_rows.size
        if ready_rows.size:
            run_id = np.cumsum(np.r_[0, np.diff(addr[ready_rows]) != PAGE_SIZE])
            keep = int(np.searchsorted(run_id, _MAX_RUNS_PER_BATCH))
        keep = min(keep, s.max_pages_to_merge)
        if ready_rows.size > keep:
            cut = np.zeros(n, bool)
            cut[ready_rows[keep:]] = True
            ready &= ~cut
            zero &= ~cut
        merged = np.zeros(n, bool)
        if ready.any() or zero.any():
            merged = self._merge(t, tab, addr, refs, ready, zero, joins=bool(in_stable.any()))
        # not merged and checksum-stable: into the unstable tree for later partners
        rest = cand & ~merged
        self.unstable.insert(h[rest], refs[rest], tab.pfn[rest])
        # Held pages do not age: smart scan would skip them for 1, 2, 4... scans after
        # the hold, out of step with their partners in other targets (measured: two
        # copies held one scan apart were then never read in the same full scan)
        aged = readable & ~held
        self.ages.update(refs[aged], merged[aged], ~stable[aged])
        return r

    def _learn_and_hold(self, refs: np.ndarray, undone: np.ndarray) -> np.ndarray:
        """Rows ``undone`` lost their merge since it was made (copied, or a dropped zero
        page back): the backoff learns it. Returns which of ``refs`` are held back now."""
        self.backoff.broke_many(refs[undone], time.monotonic(), self.full_scans)
        return self.backoff.held(refs, self.full_scans)

    def _read_window(
        self, pid: int, ranges: list[AddressRange], copied_only: bool = False
    ) -> tuple[PageTable, np.ndarray]:
        """Hash the present pages of ``ranges`` (pagemap first: absent pages and the zero
        page are never read, nothing is faulted in); ``copied_only``: only anonymous
        pages (in a segment mapping: the pages a write copied). The VMAs' eligibility was checked
        when the target's pass began (smaps, once per full scan); a range unmapped since
        reads short and its pages come out unreadable (CONTENT_VOLATILE), and the merge
        re-checks every VMA under stop anyway."""
        zero_pfn = _zero_pfn()
        chunks: list[tuple[int, np.ndarray, np.ndarray, np.ndarray]] = []
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
                    chunks.append((r.start, idx, pfn[idx], ent))
                    total += idx.size
        tab = PageTable.empty(total, np.uint64)
        addr = np.empty(total, np.int64)
        reader = PageReader(pid, buffer=self._read_buffer)
        n = 0
        for base, idx, pfns, _ent in chunks:
            k = idx.size
            tab.pfn[n : n + k] = pfns
            addr[n : n + k] = base + idx.astype(np.int64) * PAGE_SIZE
            tab.off[n : n + k] = idx  # unused by the daemon; kept meaningful
            _hash_rows(reader, tab, n, k, base, idx)
            n += k
        return tab, addr

    def _merge(
        self,
        t: Target,
        tab: PageTable,
        addr: np.ndarray,
        refs: np.ndarray,
        ready: np.ndarray,
        zero: np.ndarray,
        joins: bool = True,
    ) -> np.ndarray:
        """Merge the batch's ready pages with their unstable partners through the merge
        engine; returns which batch rows are now merged (pagemap says so)."""
        hashes = tab.hash[ready]
        partners = self.unstable.take(hashes)
        # rows: (target index, address, hash, pfn, zero?)
        p_refs = [p[3] for p in partners]
        p_pfn = [p[4] for p in partners]
        rows_ref = np.concatenate([refs[ready | zero], *p_refs]) if p_refs else refs[ready | zero]
        rows_pfn = (
            np.concatenate([tab.pfn[ready | zero].astype(np.uint64), *p_pfn])
            if p_pfn
            else tab.pfn[ready | zero].astype(np.uint64)
        )
        sel = ready | zero
        p_hash = [self.unstable.hash[c][pos] for c, _, pos, _, _ in partners]
        rows_hash = np.concatenate([tab.hash[sel], *p_hash]) if p_hash else tab.hash[sel]
        rows_zero = np.concatenate([zero[sel], np.zeros(sum(p.size for p in p_refs), bool)])
        synth = self._synthetic_scan(rows_ref, rows_hash, rows_pfn, rows_zero)
        if synth is None:
            return np.zeros(len(tab), bool)
        pids = [p.pid for p in synth.processes]
        # (the engine adds the segments it creates to segment_hashes itself: the stable
        # tree needs no re-read of every target's maps after a merge)
        results = {p: TargetResult(p, self.targets[p].name) for p in pids}
        refused: list[Refusal] = []
        mopts = dataclasses.replace(
            self.opts.merge, batch_pages=self.batch_pages, segment_pages=GRANULE_PAGES
        )
        with MergeEngine(pids, mopts) as engine:
            engine.segment_hashes = self.segment_hashes
            engine.merge_scanned(
                synth,
                np.ones(len(synth.pages), bool),
                results,
                refused,
                lambda _m: None,
                # the stable tree is only needed when a page may join it
                adopt_from=list(self._order) if joins else [],
            )
        for pid, res in results.items():
            tt = self.targets.get(pid)
            if tt is None:
                continue
            tt.pauses.extend(res.pauses)
            self._all_pauses.extend(res.pauses)
            if res.pauses:
                tt.max_pause = max(tt.max_pause, max(res.pauses))
            tt.pages_merged_total += res.pages_merged
            self._merged_this_scan += res.pages_merged + res.pages_zeroed
            tt.pages_refused += res.pages_refused
            self.zero_dropped_total += res.pages_zeroed
            if res.error:
                self.log(f"pid {pid}: {res.error}")
                tt.refusals[res.error] += 1
            self._enforce_pause_budget(res.pauses)
        for rf in refused:
            tt = self.targets.get(rf.pid)
            if tt is not None:
                tt.refusals[rf.reason] += 1
        # the observer learns the new merged ranges at its next poll (_observe)
        self._unwatched.update(pids)
        # which rows are merged now: pagemap (file page or dropped zero page)
        now = self._merged_now(rows_ref)
        merged_refs = rows_ref[now]
        if self.opts.remerge_backoff:
            self.backoff.merged(merged_refs, time.monotonic())
        # t.parts are as scanned: a merged row in a segment part was a copied page
        self.pages_remerged += int(self._in_segment_parts(merged_refs).sum())
        n_batch = int(sel.sum())
        batch_merged = np.zeros(len(tab), bool)
        batch_merged[np.flatnonzero(sel)] = now[:n_batch]
        # zero rows dropped: remember them for the pages_zero truth
        z_rows = np.flatnonzero(zero)
        zmerged = batch_merged[z_rows]
        for a, b in _runs(zmerged):
            t.zero_runs.append((int(addr[z_rows[a]]), b - a))
        if len(t.zero_runs) > 64:
            t.zero_runs = _coalesce(t.zero_runs)
        # partners that merged leave the unstable tree; the others stay for later
        off = n_batch
        for c, _, pos, pr, _ in partners:
            k = pr.size
            self.unstable.kill(c, pos[now[off : off + k]])
            off += k
        return batch_merged

    def _in_segment_parts(self, refs: np.ndarray) -> np.ndarray:
        """Which of ``refs`` lie in a scanned part that is a procksm segment mapping."""
        out = np.zeros(refs.size, bool)
        for t in self.targets.values():
            lo, hi = page_ref(t.index, 0), page_ref(t.index + 1, 0)
            sel = np.flatnonzero((refs >= lo) & (refs < hi))
            if sel.size == 0 or not any(p.merged for p in t.parts):
                continue
            pi = t.part_indices(((refs[sel] - lo) * PAGE_SIZE).astype(np.int64))
            ours = np.array([p.merged for p in t.parts] + [False], bool)  # [-1]: no part
            out[sel] = ours[pi]
        return out

    def _enforce_pause_budget(self, pauses: Sequence[float]) -> None:
        """A round whose median stop is over the budget halves the pages per stop (down
        to 32); a round whose stops are all well within it doubles them back. The
        median, not the worst: on a busy machine single stops are long because procksm
        waits for a CPU, whatever their size, and shrinking the stops then only
        multiplies them (measured: 18 000 stops of 16 pages instead of 1 300)."""
        if not pauses:
            return
        budget = self.opts.pause_budget_ms / 1000.0
        self.pauses_over_budget += sum(1 for p in pauses if p > budget)
        median = sorted(pauses)[len(pauses) // 2]
        if median > budget and self.batch_pages > 32:
            self.batch_pages = max(32, self.batch_pages // 2)
            self.log(
                f"stops over the {self.opts.pause_budget_ms:g} ms budget: "
                f"{self.batch_pages} pages per stop from now on"
            )
        elif max(pauses) < budget / 2 and self.batch_pages < self.opts.stop_pages:
            self.batch_pages = min(self.opts.stop_pages, self.batch_pages * 2)

    def _synthetic_scan(
        self, refs: np.ndarray, hashes: np.ndarray, pfns: np.ndarray, zero: np.ndarray
    ) -> ScanInput | None:
        """A ScanInput over the given pages (grouped by process and VMA, address order;
        content ids = hash groups), what the merge engine plans from. Pages no longer in
        a scanned part (unmapped, unregistered) and repeated refs are left out; the rows
        kept are ``self._kept`` (positions in the input)."""
        self._kept = np.zeros(0, np.int64)
        self._n_input = refs.size
        # unique refs, first occurrence (the batch's own rows come first in the input)
        _, first_pos = np.unique(refs, return_index=True)
        processes: list[ProcessIdentity] = []
        mappings: list[MappingRef] = []
        bounds: list[int] = [0]
        kept: list[np.ndarray] = []
        n = 0
        for t in sorted(self.targets.values(), key=lambda t: t.index):
            lo, hi = page_ref(t.index, 0), page_ref(t.index + 1, 0)
            pos = first_pos[(refs[first_pos] >= lo) & (refs[first_pos] < hi)]
            if pos.size == 0 or not t.parts:
                continue
            pos = pos[np.argsort(refs[pos], kind="stable")]
            addr = ((refs[pos] - lo) * PAGE_SIZE).astype(np.int64)
            pi = t.part_indices(addr)
            ok = pi >= 0
            pos, addr, pi = pos[ok], addr[ok], pi[ok]
            if pos.size == 0:
                continue
            processes.append(ProcessIdentity(t.pid, t.name, t.uid))
            vstart = np.array([p.vma_start for p in t.parts], np.int64)[pi]
            cut = np.flatnonzero(np.diff(vstart) != 0) + 1
            for a0, b0 in zip([0, *cut.tolist()], [*cut.tolist(), pos.size], strict=True):
                p = t.parts[int(pi[a0])]
                mappings.append(
                    MappingRef(len(processes) - 1, p.vma_start, p.vma_end, p.name, p.perms)
                )
                bounds.append(n + b0)
            kept.append(pos)
            n += pos.size
        if n == 0:
            return None
        k = np.concatenate(kept)
        self._kept = k
        tab = PageTable.empty(k.size, np.uint64)
        tab.hash[:] = hashes[k]
        tab.pfn[:] = pfns[k]
        mrows = np.array(bounds, np.int64)
        mi = np.searchsorted(mrows, np.arange(k.size), side="right") - 1
        vstart_m = np.array([m.start for m in mappings], np.int64)
        page = refs[k] & ((1 << REF_PAGE_BITS) - 1)
        tab.off[:] = (page - vstart_m[mi] // PAGE_SIZE).astype(np.uint32)
        # content id: the first row with the same hash (the engine compares bytes)
        _, first, inv = np.unique(hashes[k], return_index=True, return_inverse=True)
        tab.content[:] = first[inv].astype(np.int32)
        tab.content[zero[k]] = CONTENT_ZERO
        return ScanInput(processes=processes, mappings=mappings, pages=tab, mapping_rows=mrows)

    def _merged_now(self, refs: np.ndarray) -> np.ndarray:
        """Per input row of the last synthetic scan: is the page now a procksm mapping
        (pagemap: present and file-backed) or a dropped zero page (not present, or the
        zero PFN)? Rows left out of the scan are False."""
        out = np.zeros(self._n_input, bool)
        k = self._kept
        for t in list(self.targets.values()):
            lo, hi = page_ref(t.index, 0), page_ref(t.index + 1, 0)
            sel = k[(refs[k] >= lo) & (refs[k] < hi)]
            if sel.size == 0:
                continue
            try:
                ent = _pagemap_at(t.pid, (refs[sel] - lo) * PAGE_SIZE)
            except ProcksmError:
                continue
            present = (ent & procfs.PM_PRESENT) != 0
            filep = (ent & procfs.PM_FILE) != 0
            zpfn = (ent & procfs.PM_PFN_MASK) == _zero_pfn()
            out[sel] = (present & filep) | ~present | zpfn
        return out

    def _unmerge_one(self, pid: int) -> str:
        """Unmerge one target and stop scanning it (``register PID all`` resumes)."""
        t = self.targets.get(pid)
        if t is None:
            raise UsageError(f"pid {pid} is not a target")
        n = self._unmerge_target(t)
        t.reg = Registration(everything=False)
        self._forget(t)
        t.zero_runs.clear()
        return f"pid {pid}: unmerged {n} pages; not scanned until 'register {pid} all'"

    def _unmerge_target(self, t: Target) -> int:
        from procksm import coredump

        pauses: list[float] = []
        ranges = merged_ranges(t.pid)
        n = unmerge_pieces(t.pid, [(v.start, v.end) for v in ranges], pauses=pauses)
        self._all_pauses.extend(pauses)
        if not merged_ranges(t.pid):
            coredump.restore_after_unmerge(t.pid)
        return n

    # --- run=2 and exit -------------------------------------------------------------------

    def unmerge_all(self) -> int:
        """Make every merged page of every target private again (run=2 / exit)."""
        total = 0
        for t in list(self.targets.values()):
            try:
                total += self._unmerge_target(t)
            except NoSuchProcess:
                self._drop(t, "exited")
            except ProcksmError as e:
                self.log(f"pid {t.pid}: unmerge failed: {e.message}")
        # everything starts over, as after the kernel's run=2
        self.checksums = ChecksumTable()
        self.unstable.reset()
        self.ages = PageAges()
        self.backoff.clear()
        self.segment_hashes.clear()
        for t in self.targets.values():
            t.zero_runs.clear()
        self._cursor = (0, 0, 0)
        self.log(f"unmerged {total} pages")
        return total

    # --- counters -------------------------------------------------------------------------

    def maybe_publish(self, force: bool = False) -> None:
        now = time.monotonic()
        # every snapshot_interval_s, or less often when a snapshot is expensive (its
        # pagemap and smaps_rollup passes grow with the targets): at most ~4 % of a CPU
        interval = max(self.opts.snapshot_interval_s, 25 * self._snapshot_cost)
        if not force and now - self._last_snap[0] < interval:
            return
        c0 = _thread_cpu()
        self._snapshot = snap = self._build_snapshot(now)
        self._snapshot_cost = _thread_cpu() - c0
        if self.on_publish is not None:
            self.on_publish(snap)

    def snapshot(self) -> Snapshot:
        snap = self._snapshot
        if snap is None:
            snap = self._snapshot = self._build_snapshot(time.monotonic())
        return snap

    def _truth(self, dt: float) -> None:
        """pagemap over procksm's mappings and dropped zero runs of every target."""
        for t in list(self.targets.values()):
            try:
                maps = procfs.read_maps(t.pid)
                vmas = [v for v in maps if v.path.startswith(SEGMENT_NAME_PREFIX)]
                sites = cow = 0
                pfn_list = []
                copied = []
                with procfs.PagemapFile(t.pid) as pm:
                    # one pagemap read per cluster of merged VMAs (a scattered layout has
                    # thousands of one-page VMAs: a read and numpy calls each cost 100 %
                    # of a CPU, measured), then a mask of the pages inside them
                    for ent, at in _read_spans(pm, [(v.start, v.end) for v in vmas]):
                        present = (ent & procfs.PM_PRESENT) != 0
                        filep = (ent & procfs.PM_FILE) != 0
                        sites += int((present & filep).sum())
                        cow += int((present & ~filep).sum())
                        pfn_list.append(ent[present & filep] & procfs.PM_PFN_MASK)
                        copied.append(at[present & ~filep])
                    zero_now = 0
                    # dropped zero runs still in anonymous memory (not unmapped, not
                    # merged over since): absent or on the zero page is still saved
                    anon = [(v.start, v.end) for v in maps if procfs.is_anonymous_path(v.path)]
                    starts = [a for a, _ in anon]
                    runs = []
                    for a, k in _coalesce(t.zero_runs):
                        i = bisect.bisect_right(starts, a) - 1
                        if i >= 0 and a + k * PAGE_SIZE <= anon[i][1]:
                            runs.append((a, a + k * PAGE_SIZE))
                    for ent, _at in _read_spans(pm, runs):
                        present = (ent & procfs.PM_PRESENT) != 0
                        zpfn = (ent & procfs.PM_PFN_MASK) == _zero_pfn()
                        zero_now += int((~present | zpfn).sum())
                rollup = procfs.read_smaps_rollup(t.pid)
            except (ProcksmError, OSError):
                if not _alive(t.pid):
                    self._drop(t, "exited")  # also noticed while paused (run=0)
                continue
            t.sharing_sites = sites
            t.copied_addrs = np.concatenate(copied) if copied else np.zeros(0, np.int64)
            t.shared_pfns = np.concatenate(pfn_list) if pfn_list else np.zeros(0, np.uint64)
            if cow > t.cow_now:
                t.cow_total += cow - t.cow_now
                t.cow_rate = (cow - t.cow_now) / dt if dt > 0 else 0.0
            else:
                t.cow_rate = 0.0
            t.cow_now = cow
            if self.observer is not None and t.pid in self._observed:
                with contextlib.suppress(KeyError, ProcksmError, OSError):
                    t.cow_total = self.observer.counters(t.pid).cow_breaks
            t.zero_now = zero_now
            t.rss_bytes = rollup.get("Rss", 0) * 1024
            t.pss_bytes = rollup.get("Pss", 0) * 1024

    def _build_snapshot(self, now: float) -> Snapshot:
        t_prev, cpu_prev, scanned_prev = self._last_snap
        cpu = _cpu_seconds()
        dt = max(now - t_prev, 1e-6)
        self._truth(dt)
        self._last_snap = (now, cpu, self.pages_scanned)
        targets = [t for t in self.targets.values()]
        pfns = [t.shared_pfns for t in targets]
        allp = np.concatenate(pfns) if pfns else np.zeros(0, np.uint64)
        pages_shared = int(np.unique(allp).size)
        sites = int(allp.size)
        pages_sharing = sites - pages_shared
        pages_zero = sum(t.zero_now for t in targets)
        cow = sum(t.cow_total for t in targets)
        meta = (
            self.checksums.nbytes
            + self.unstable.nbytes
            + self.ages.nbytes
            + self.backoff.nbytes
            + sum(h.nbytes for h in self.segment_hashes.values())
        )
        pauses = np.array(self._all_pauses) * 1000 if self._all_pauses else np.zeros(0)
        with self.lock:
            s = dataclasses.replace(self.settings)
        snaps = tuple(
            TargetSnapshot(
                pid=t.pid,
                name=t.name,
                rss_bytes=t.rss_bytes,
                pss_bytes=t.pss_bytes,
                pages_merged=t.sharing_sites,
                pages_zero=t.zero_now,
                cow_breaks=t.cow_total,
                cow_breaks_per_s=round(t.cow_rate, 3),
                pages_refused=t.pages_refused,
                top_refusal=t.refusals.most_common(1)[0][0] if t.refusals else None,
                last_pause_ms=round(t.pauses[-1] * 1000, 3) if t.pauses else 0.0,
                max_pause_ms=round(t.max_pause * 1000, 3),
                mappings=tuple(
                    [
                        MappingSnapshot(
                            p.name,
                            p.start,
                            p.end,
                            p.rss_pages,
                            0,
                            _zero_in(t.zero_runs, p.start, p.end),
                        )
                        for p in t.parts
                        if not p.merged
                    ]
                    + [
                        MappingSnapshot("[procksm]", v.start, v.end, v.npages, v.npages)
                        for v in t.merged_vmas
                    ]
                ),
            )
            for t in targets
        )
        saved = (pages_sharing + pages_zero) * PAGE_SIZE
        cow_rate = sum(t.cow_rate for t in targets)
        self._history.append(HistoryPoint(time.time(), saved, round(cow_rate, 3)))
        return Snapshot(
            time=time.time(),
            run=s.run,
            observer=self.observer.mode if self.observer is not None else "pagemap",
            pages_shared=pages_shared,
            pages_sharing=pages_sharing,
            pages_unshared=len(self.unstable),
            pages_volatile=self.ages.volatile(),
            pages_skipped=self.pages_skipped,
            pages_zero=pages_zero,
            full_scans=self.full_scans,
            cow_breaks=cow,
            pages_remerged=self.pages_remerged,
            ranges_held=self.backoff.ranges_held(),
            zero_pages_dropped=self.zero_dropped_total,
            general_profit_bytes=saved - meta,
            scan_rate_pages_s=round((self.pages_scanned - scanned_prev) / dt, 1),
            cpu_percent=round(100.0 * (cpu - cpu_prev) / dt, 2),
            rss_bytes=_own_rss(),
            pause_p50_ms=round(float(np.percentile(pauses, 50)), 3) if pauses.size else 0.0,
            pause_p99_ms=round(float(np.percentile(pauses, 99)), 3) if pauses.size else 0.0,
            pause_max_ms=round(float(pauses.max()), 3) if pauses.size else 0.0,
            sleep_ms=s.sleep_ms,
            pages_to_scan=s.pages_to_scan,
            targets=snaps,
            history=tuple(self._history),
        )


class _Reply:
    def __init__(self) -> None:
        self.done = threading.Event()
        self.value = ""
        self.error: ProcksmError | None = None


# --------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------


def stats_text(snap: Snapshot) -> str:
    """``name value`` lines, the kernel's counter names first (like /sys/kernel/mm/ksm)."""
    doc = snap.as_json()
    keys = [
        "run",
        "pages_to_scan",
        "sleep_ms",
        "pages_shared",
        "pages_sharing",
        "pages_unshared",
        "pages_volatile",
        "pages_skipped",
        "pages_zero",
        "full_scans",
        "cow_breaks",
        "pages_remerged",
        "ranges_held",
        "zero_pages_dropped",
        "general_profit_bytes",
        "saved_bytes",
        "scan_rate_pages_s",
        "cpu_percent",
        "rss_bytes",
        "pause_p50_ms",
        "pause_p99_ms",
        "pause_max_ms",
    ]
    lines = [f"{k} {doc[k]}" for k in keys]
    for t in snap.targets:
        lines.append(
            f"pid {t.pid} {t.name} pages_merged={t.pages_merged} pages_zero={t.pages_zero} "
            f"cow_breaks={t.cow_breaks} pages_refused={t.pages_refused} "
            f"max_pause_ms={t.max_pause_ms}"
        )
    return "\n".join(lines) + "\n"


def _runs(mask: np.ndarray) -> Iterator[tuple[int, int]]:
    """[a, b) runs of True."""
    if mask.size == 0:
        return
    d = np.diff(np.concatenate(([0], mask.astype(np.int8), [0])))
    starts = np.flatnonzero(d == 1)
    ends = np.flatnonzero(d == -1)
    yield from zip(starts.tolist(), ends.tolist(), strict=True)


def _read_spans(
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


def _coalesce(runs: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """(addr, pages) runs sorted, adjacent and overlapping ones joined."""
    out: list[tuple[int, int]] = []
    for a, k in sorted(runs):
        if out and a <= out[-1][0] + out[-1][1] * PAGE_SIZE:
            b = max(out[-1][0] + out[-1][1] * PAGE_SIZE, a + k * PAGE_SIZE)
            out[-1] = (out[-1][0], (b - out[-1][0]) // PAGE_SIZE)
        else:
            out.append((a, k))
    return out


def _in_runs(addr: np.ndarray, runs: list[tuple[int, int]]) -> np.ndarray:
    """Which of ``addr`` lie in one of the (addr, pages) ``runs``."""
    runs = _coalesce(runs)
    starts = np.array([a for a, _ in runs], np.int64)
    ends = starts + np.array([k for _, k in runs], np.int64) * PAGE_SIZE
    i = np.searchsorted(starts, addr, side="right") - 1
    return (i >= 0) & (addr < ends[np.maximum(i, 0)])


def _zero_in(runs: list[tuple[int, int]], start: int, end: int) -> int:
    return sum(max(0, min(end, a + k * PAGE_SIZE) - max(start, a)) // PAGE_SIZE for a, k in runs)


def _pagemap_at(pid: int, addrs: np.ndarray) -> np.ndarray:
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


def _zero_pfn() -> int:
    from procksm.scanner import kernel_zero_pfn

    return kernel_zero_pfn()


def _children(pid: int) -> list[int]:
    out: list[int] = []
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tids:
        with contextlib.suppress(OSError), open(f"/proc/{pid}/task/{tid}/children") as f:
            out.extend(int(x) for x in f.read().split())
    return out


def _alive(pid: int) -> bool:
    try:
        return not procfs.read_status(pid).is_zombie
    except ProcksmError:
        return False


def idle_sleep(idle_scans: int) -> float:
    """The least pause between batches after ``idle_scans`` full scans in a row that
    merged nothing: none for the first two, then 50 ms doubling up to 1 s."""
    if idle_scans < 2:
        return 0.0
    return min(_IDLE_MAX_SLEEP_S, _IDLE_FIRST_SLEEP_S * 2.0 ** min(idle_scans - 2, 16))


def _cpu_seconds() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def _thread_cpu() -> float:
    return time.thread_time()


def _own_rss() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * PAGE_SIZE
    except OSError:
        return 0


__all__ = [
    "SETTING_LIMITS",
    "Daemon",
    "DaemonOptions",
    "Registration",
    "Settings",
    "parse_region",
    "parse_settings",
]
