"""Watch copy-on-write breaks of merged pages and the lifecycle of targets (issue 6).

A merged page is a MAP_PRIVATE mapping of one of procksm's sealed memfds; the first
write to it copies the page ("breaks" the merge). Two sources find those breaks:

* **eBPF** (``mode == "bpf"``): ``procksm/bpf/cow.bpf.c``, loaded with bcc, attaches to
  the raw tracepoints ``page_fault_user`` / ``page_fault_kernel`` and keeps, per target,
  a map (tgid, 2 MiB region) -> 512-bit bitmap of armed pages, behind a Bloom filter of
  the 64 KiB chunks that hold armed pages and a bit per target tgid. The first write
  fault on an armed page clears its bit in the kernel and sends one event, so each page
  counts once and fork COWs of pages that were never merged are filtered out in the
  kernel. It also reports fork/exec/exit and the target's mmap, munmap, mremap, madvise,
  brk and process_madvise calls. COW breaks, fork, exec and exit wake ``poll`` at once;
  the memory calls (which can come by the thousand) only every 32nd per CPU, so they
  may wait for ``poll``'s timeout: that timeout bounds their latency.
* **pagemap** (always, and alone when BPF is unavailable or ``use_bpf=False``): a page
  of a merged VMA that still maps the memfd is a file page (pagemap bit 61); one that
  was copied is anonymous (present or swapped, bit 61 clear). ``reconcile(pid)`` reads
  that truth and counts what no fault showed: writes through get_user_pages
  (process_vm_writev, /proc/PID/mem, O_DIRECT) COW without any fault event
  (docs/design.md §3.9), and events a full ring buffer dropped.

API (use from one thread)::

    with CowObserver(use_bpf=None) as obs:      # None: BPF if it works, else pagemap
        obs.mode, obs.fallback_reason           # "bpf" | "pagemap", why not BPF
        obs.set_ranges(pid, [(v.start, v.end) for v in merged_ranges(pid)])
        for ev in obs.poll(0.5):                # CowBreak | Lifecycle, in kernel order
            ...
        obs.counters(pid)                       # CowCounters: cow_breaks, per range
        obs.reconcile(pid)                      # breaks found in pagemap only -> int
        obs.remove_target(pid)
        obs.kernel_totals()                     # the BPF side's per-CPU counters
        obs.detach_probes(); obs.attach_probes()  # pause (no cost) / resume + reconcile

``set_ranges`` replaces the pid's watched ranges (page-aligned [start, end), normally
the merged ranges after a merge) and checks them in pagemap at once. ``poll`` returns
the new breaks (:class:`CowBreak`) and lifecycle events (:class:`Lifecycle`) and runs
``reconcile`` on every target each ``reconcile_interval_s`` (BPF) or on every poll
(pagemap). The observer keeps its ranges in step with the target's own calls: munmap,
mmap over a range, brk shrinking the heap and mremap move the watched pages or drop
them, MADV_DONTNEED re-arms copied pages (they read the memfd again), exec drops all,
exit ends the target (its counters stay until ``remove_target``). With
``follow_children=True`` a forked child of a target becomes a target with its parent's
ranges. Counters are exact after ``reconcile``: a page is counted once per break, by
whichever source saw it first.

Without BPF (bcc missing, no kernel headers, no CAP_BPF, the program does not load) a
one-line warning names the cause and the fix, and the same counters come from pagemap
polling. :func:`bpf_source` is the program as loaded (``python -m procksm.observe
--ebpf`` prints it, like bcc tools' hidden ``--ebpf``); the daemon's ``--ebpf`` /
``--no-bpf`` flags map to it and to ``use_bpf=False``.

Measured cost (benchmarks/bpf_overhead.py, 2-vCPU VM with retpolines, a fault ~1.5 us):
~70 ns per fault in any process while the probes are attached, most of it the
tracepoint's own dispatch to BPF; ~90 ns in a target that also maps and unmaps often.
Known limits: a write fault the kernel answers with SIGSEGV (a merged range made
read-only) is counted, then re-armed by the next reconcile but not subtracted; events
of a target whose tgid is reused within milliseconds of its exit could be attributed to
the old target until the exit event is read.
"""

from __future__ import annotations

import atexit
import bisect
import collections
import contextlib
import ctypes
import os
import struct
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from procksm import PAGE_SIZE, procfs
from procksm.arch.x86_64 import MADV_DONTNEED, MREMAP_DONTUNMAP
from procksm.closing import Closing
from procksm.errors import NoSuchProcess, Unsupported

BPF_DIR = Path(__file__).resolve().parent / "bpf"
PAGE_SHIFT = PAGE_SIZE.bit_length() - 1

# --- mirrored from bpf/cow.h (tests/test_observe.py checks they agree) ---
REGION_SHIFT = 21
REGION_PAGES = 1 << (REGION_SHIFT - PAGE_SHIFT)  # 512: one bit each
REGION_WORDS = 8
BLOOM_SHIFT = 16  # 64 KiB chunks
BLOOM_BITS = 21
BLOOM_MULT = 0x9E3779B97F4A7C15
EV_COW_USER = 1
EV_COW_KERNEL = 2
EV_FORK = 3
EV_EXEC = 4
EV_EXIT = 5
EV_MMAP = 6
EV_MUNMAP = 7
EV_MREMAP = 8
EV_MADVISE = 9
EV_BRK = 10
EV_PROCESS_MADVISE = 11
C_COW_USER = 0
C_COW_KERNEL = 1
C_LIFECYCLE = 2
C_LOST = 3
C_STALE = 4
C_QUIET = 5
C_NR = 6
CFG_FOLLOW_CHILDREN = 0
CFG_NR = 1
KERNEL_COUNTER_NAMES = ("cow_user", "cow_kernel", "lifecycle", "lost", "stale", "syscall_events")
EVENT_FORMAT = "<QIIIIQQQQq"  # struct procksm_event
EVENT_SIZE = struct.calcsize(EVENT_FORMAT)

MAX_EXITED_KEPT = 1024  # exited targets whose counters stay readable
MADV_DONTNEED_LOCKED = 24

LifecycleKind = Literal[
    "fork", "exec", "exit", "mmap", "munmap", "mremap", "madvise", "brk", "process_madvise"
]
_KIND_NAMES: dict[int, LifecycleKind] = {
    EV_FORK: "fork",
    EV_EXEC: "exec",
    EV_EXIT: "exit",
    EV_MMAP: "mmap",
    EV_MUNMAP: "munmap",
    EV_MREMAP: "mremap",
    EV_MADVISE: "madvise",
    EV_BRK: "brk",
    EV_PROCESS_MADVISE: "process_madvise",
}

BoolArray = npt.NDArray[np.bool_]
U32Array = npt.NDArray[np.uint32]
U64Array = npt.NDArray[np.uint64]


# --------------------------------------------------------------------------------------
# Events and counters
# --------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CowBreak:
    """The first write to merged page ``addr`` of ``pid`` since it was merged (or re-armed).

    ``kernel``: the kernel wrote it (read() into the page); ``reconciled``: no fault
    showed it, pagemap did (a write through get_user_pages, or a dropped event).
    ``error_code``: the x86 page-fault error code (0x7 user write to a present page, 0x6
    to a not-present one, 0x3 / 0x2 the same from the kernel); 0 when reconciled.
    """

    pid: int
    addr: int
    kernel: bool = False
    reconciled: bool = False
    tid: int = 0
    error_code: int = 0
    ts_ns: int = 0


@dataclass(frozen=True, slots=True)
class Lifecycle:
    """A target forked, exec'd, exited, or changed its memory map.

    Fields by kind (``ret`` is the system call's result, negative errno on failure):
    fork ``child_pid``; exec ``tid`` = the thread that called execve; mmap ``addr``
    (requested), ``length``, ``prot``, ``flags``, ``ret`` = the address; munmap ``addr``,
    ``length``; mremap ``addr``, ``length`` (old), ``new_length``, ``flags``, ``ret`` =
    the new address; madvise ``addr``, ``length``, ``advice``; brk ``addr`` = requested
    break, ``ret`` = the new break; process_madvise ``fd`` (pidfd), ``length`` (vlen),
    ``advice``, ``ret`` = bytes advised.
    """

    kind: LifecycleKind
    pid: int
    tid: int = 0
    child_pid: int = 0
    addr: int = 0
    length: int = 0
    new_length: int = 0
    prot: int = 0
    flags: int = 0
    advice: int = 0
    fd: int = 0
    ret: int = 0
    ts_ns: int = 0

    @property
    def ok(self) -> bool:
        return self.ret >= 0


Event = CowBreak | Lifecycle


def parse_event(data: bytes) -> Event:
    """One ``struct procksm_event`` from the ring buffer as a typed record."""
    ts, kind, tgid, tid, aux, addr, length, arg, arg2, ret = struct.unpack_from(EVENT_FORMAT, data)
    if kind in (EV_COW_USER, EV_COW_KERNEL):
        kernel = kind == EV_COW_KERNEL
        return CowBreak(tgid, addr, kernel=kernel, tid=tid, error_code=aux, ts_ns=ts)
    name = _KIND_NAMES.get(kind)
    if name is None:
        raise ValueError(f"unknown procksm event kind {kind}")
    base: dict[str, Any] = {"kind": name, "pid": tgid, "tid": tid, "ts_ns": ts, "ret": ret}
    if kind == EV_FORK:
        base["child_pid"] = aux
    elif kind == EV_EXEC:
        base["tid"] = aux
    elif kind == EV_MMAP:
        base.update(addr=addr, length=length, flags=arg, prot=arg2)
    elif kind in (EV_MUNMAP, EV_MADVISE):
        base.update(addr=addr, length=length, advice=arg if kind == EV_MADVISE else 0)
    elif kind == EV_MREMAP:
        base.update(addr=addr, length=length, new_length=arg, flags=arg2)
    elif kind == EV_BRK:
        base["addr"] = addr
    elif kind == EV_PROCESS_MADVISE:
        base.update(length=length, advice=arg, fd=arg2)
    return Lifecycle(**base)


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


# --------------------------------------------------------------------------------------
# Pure logic: region bitmaps and the per-target ledger
# --------------------------------------------------------------------------------------


def page_bitmaps(pages: npt.ArrayLike) -> dict[int, bytes]:
    """Page numbers (address >> 12) -> {2 MiB region: 64-byte bitmap}, as the BPF map holds
    them: bit ``p % 512`` of the region's 8 little-endian u64 words is page ``p``."""
    p = np.asarray(pages, dtype=np.uint64)
    if p.size == 0:
        return {}
    regions = p >> np.uint64(REGION_SHIFT - PAGE_SHIFT)
    uniq, inv = np.unique(regions, return_inverse=True)
    grid = np.zeros((uniq.size, REGION_PAGES), dtype=np.bool_)
    grid[inv, (p & np.uint64(REGION_PAGES - 1)).astype(np.intp)] = True
    packed = np.packbits(grid, axis=1, bitorder="little")
    return {int(r): packed[i].tobytes() for i, r in enumerate(uniq)}


def bloom_index(chunk: int) -> int:
    """The fault filter's bit for a 64 KiB chunk (address >> 16), as cow.bpf.c has it."""
    return ((chunk * BLOOM_MULT) & 0xFFFF_FFFF_FFFF_FFFF) >> (64 - BLOOM_BITS)


def armed_chunks(pages: U64Array) -> set[int]:
    """The 64 KiB chunks holding the given page numbers."""
    return {int(c) for c in np.unique(pages >> np.uint64(BLOOM_SHIFT - PAGE_SHIFT))}


def bitmap_pages(region: int, bits: bytes) -> list[int]:
    """The inverse of :func:`page_bitmaps` for one region."""
    flags = np.unpackbits(np.frombuffer(bits, dtype=np.uint8), bitorder="little")
    first = region << (REGION_SHIFT - PAGE_SHIFT)
    return [first + int(i) for i in np.flatnonzero(flags)]


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


def _page_up(n: int) -> int:
    return (n + PAGE_SIZE - 1) & ~(PAGE_SIZE - 1)


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

    def piece(self, start: int, end: int, shift: int = 0) -> _Range:
        """A copy of [start, end) of this range, moved by ``shift`` bytes."""
        a, b = (start - self.start) >> PAGE_SHIFT, (end - self.start) >> PAGE_SHIFT
        return _Range(
            start + shift,
            end + shift,
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
        self.heap_end = 0  # end of [heap], to see what a brk() shrink unmaps
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

    def overlaps(self, start: int, end: int) -> bool:
        return bool(self._overlapping(start, end))

    def remove(self, start: int, end: int) -> bool:
        """[start, end) is no longer the merged mapping (unmapped, or mapped over)."""
        start, end = start & ~(PAGE_SIZE - 1), _page_up(end)
        if not self.overlaps(start, end):
            return False
        out: list[_Range] = []
        for r in self.ranges:
            if r.end <= start or r.start >= end:
                out.append(r)
                continue
            if r.start < start:
                out.append(r.piece(r.start, start))
            if end < r.end:
                out.append(r.piece(end, r.end))
        self.ranges = out
        return True

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

    def move(self, old: int, old_len: int, new: int, new_len: int, flags: int = 0) -> bool:
        """mremap(old, old_len, new_len, flags) returned ``new``: the first
        min(old_len, new_len) bytes of the old mapping are now at ``new``."""
        old_len, new_len = _page_up(old_len), _page_up(new_len)
        keep = min(old_len, new_len)
        moved = [
            r.piece(max(r.start, old), min(r.end, old + keep), new - old)
            for r in self._overlapping(old, old + keep)
        ]
        changed = bool(moved) or self.overlaps(new, new + new_len)
        if flags & MREMAP_DONTUNMAP:
            # the old range stays mapped without its pages: it reads the memfd again
            changed |= self.rearm(old, old + old_len)
        else:
            changed |= self.remove(old, old + old_len)
        changed |= self.remove(new, new + new_len)
        if moved:
            self.ranges = sorted(self.ranges + moved, key=lambda r: r.start)
        return changed

    def rearm(self, start: int, end: int) -> bool:
        """Copied pages of [start, end) were dropped (MADV_DONTNEED): they read the memfd
        content again, so their next write is a new break."""
        changed = False
        for r in self._overlapping(start, end):
            a = max(0, (start - r.start) >> PAGE_SHIFT)
            b = min(len(r.counted), (_page_up(end) - r.start) >> PAGE_SHIFT)
            if r.counted[a:b].any():
                r.counted[a:b] = False
                r.pending[a:b] = False
                changed = True
        return changed

    def child(self, pid: int) -> CowLedger:
        """A forked child's view: the same merged mapping; pages the parent already copied
        are private (anonymous) in the child too, so they are not merged pages there."""
        c = CowLedger(pid)
        c.ranges = [r.piece(r.start, r.end) for r in self.ranges]
        for r in c.ranges:
            r.pending[:] = False
            r.breaks[:] = 0
        c.heap_end = self.heap_end
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
        # A private copy is an anonymous page: present or swapped, without the
        # file/shared-anon bit. A memfd page (merged) has bit 61 set; a page the target
        # dropped (not present, not swapped) reads the memfd on its next touch.
        anon = (entries & (procfs.PM_PRESENT | procfs.PM_SWAPPED)) != 0
        broken = anon & ((entries & procfs.PM_FILE) == 0)
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


# --------------------------------------------------------------------------------------
# The BPF side: source, availability
# --------------------------------------------------------------------------------------


def bpf_source() -> str:
    """The BPF program exactly as loaded: cow.bpf.c with cow.h inlined."""
    header = (BPF_DIR / "cow.h").read_text()
    return (BPF_DIR / "cow.bpf.c").read_text().replace('#include "cow.h"', header, 1)


_CAP_SYS_ADMIN, _CAP_PERFMON, _CAP_BPF = 21, 38, 39


def _bpf_unavailable() -> str | None:
    """Why BPF cannot work here (cause and fix, one line), before trying to compile."""
    caps = int(procfs.read_status_fields(os.getpid()).get("CapEff", "0"), 16)
    has = lambda c: bool(caps >> c & 1)  # noqa: E731
    if not (has(_CAP_SYS_ADMIN) or (has(_CAP_BPF) and has(_CAP_PERFMON))):
        return (
            "no CAP_BPF and CAP_PERFMON (or CAP_SYS_ADMIN): run procksm as root, or grant "
            "them (setcap cap_bpf,cap_perfmon+ep, or --cap-add BPF --cap-add PERFMON)"
        )
    try:
        import bcc  # noqa: F401
    except ImportError as e:
        return (
            f"bcc is not importable from {sys.executable} ({e}): install the distro package "
            "python3-bpfcc (PyPI's 'bcc' is another project) and use a venv made with "
            "--system-site-packages (`make setup` does both)"
        )
    release = os.uname().release
    mod = Path("/lib/modules") / release
    if not any((mod / d / "include/linux/kconfig.h").exists() for d in ("source", "build")):
        return (
            f"kernel headers for {release} not found (looked for include/linux/kconfig.h "
            f"under {mod}/source and {mod}/build): install linux-headers-{release}, or "
            "run `make setup`, which links the distro's headers there"
        )
    if not Path("/sys/kernel/tracing/events/exceptions/page_fault_user").exists():
        return (
            "tracefs has no exceptions:page_fault_user (not mounted?): "
            "mount -t tracefs tracefs /sys/kernel/tracing"
        )
    return None


@contextlib.contextmanager
def _stderr_captured() -> Iterator[Callable[[], str]]:
    """Collect what C code writes to fd 2 (clang's diagnostics from bcc) instead of
    letting it reach the terminal; the caller gets it to name the cause in one line."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield lambda: (tmp.seek(0), tmp.read().decode("utf-8", "replace"))[1]
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def _first_error(text: str, exc: BaseException) -> str:
    for line in text.splitlines():
        if "error" in line.lower():
            return line.strip()
    return str(exc)


def _load_bpf(cflags: list[str]) -> tuple[Any, bool]:
    """Compile and load the program: ring buffer first (5.8+), perf buffer otherwise.
    Returns (bcc.BPF, uses_perf_buffer); raises Unsupported with the compiler's error."""
    from bcc import BPF

    src = bpf_source()
    first = ""
    for perf in (False, True):
        flags = [*cflags, "-DPROCKSM_PERF_BUFFER"] if perf else cflags
        with _stderr_captured() as err:
            try:
                return BPF(text=src.encode(), cflags=flags), perf
            except Exception as e:
                first = first or _first_error(err(), e)
    raise Unsupported(
        f"the BPF program did not load ({first}); try `make setup` (kernel headers, bcc) "
        "or see `python -m procksm.observe --ebpf`"
    )


def _warn_stderr(message: str) -> None:
    print(f"procksm: warning: {message}", file=sys.stderr)


# --------------------------------------------------------------------------------------
# The observer
# --------------------------------------------------------------------------------------


@dataclass(slots=True)
class _Target:
    ledger: CowLedger
    pagemap: procfs.PagemapFile | None
    written: dict[int, bytes] = field(default_factory=dict)  # BPF map as last written
    chunks: set[int] = field(default_factory=set)  # chunks whose Bloom bit this one holds
    dirty: bool = True


class CowObserver(Closing):
    """COW breaks and lifecycle events of targets; see the module docstring.

    ``use_bpf``: None = BPF when it works, else pagemap polling with a warning; True =
    BPF or :class:`~procksm.errors.Unsupported`; False = pagemap polling.
    """

    def __init__(
        self,
        use_bpf: bool | None = None,
        *,
        reconcile_interval_s: float = 1.0,
        poll_interval_s: float = 0.2,
        follow_children: bool = False,
        warn: Callable[[str], None] = _warn_stderr,
    ) -> None:
        self.reconcile_interval_s = reconcile_interval_s
        self.poll_interval_s = poll_interval_s
        self.follow_children = follow_children
        self._targets: dict[int, _Target] = {}
        self._exited_order: collections.deque[int] = collections.deque()
        self._out: list[Event] = []  # events applied but not returned by poll() yet
        self._raw: list[bytes] = []
        self._bpf: Any = None
        self._perf_buffer = False
        self._last_reconcile = time.monotonic()
        self._lost_seen = 0
        self._bloom_users: collections.Counter[int] = collections.Counter()
        self.mode: Literal["bpf", "pagemap"] = "pagemap"
        self.fallback_reason: str | None = None
        if use_bpf is False:
            self.fallback_reason = "eBPF disabled (--no-bpf)"
        else:
            reason = _bpf_unavailable()
            if reason is None:
                try:
                    self._bpf, self._perf_buffer = _load_bpf([])
                except Unsupported as e:
                    reason = e.message
            if reason is not None and use_bpf:
                raise Unsupported(f"eBPF observation unavailable: {reason}")
            self.fallback_reason = reason
        self._probes: list[tuple[str, bytes, bytes]] = []  # (kind, tracepoint, function)
        if self._bpf is not None:
            self.mode = "bpf"
            self._probes = [
                ("raw", tp, b"raw_tracepoint__" + tp) for tp in self._bpf.raw_tracepoint_fds
            ] + [
                ("tp", tp, b"tracepoint__" + tp.replace(b":", b"__"))
                for tp in self._bpf.tracepoint_fds
            ]
            # bcc registers cleanup at exit, which also keeps the object alive: close()
            # does it and unregisters it.
            if follow_children:
                cfg = self._bpf[b"config"]
                cfg[cfg.Key(CFG_FOLLOW_CHILDREN)] = cfg.Leaf(1)
            if self._perf_buffer:
                self._bpf[b"events"].open_perf_buffer(self._on_perf_event, page_cnt=64)
            else:
                self._bpf[b"events"].open_ring_buffer(self._on_ring_event)
        else:
            warn(
                f"{self.fallback_reason}; COW breaks are found by pagemap polling "
                f"every {poll_interval_s:g} s instead of eBPF"
            )

    # --- public API ---

    def set_ranges(self, pid: int, ranges: Iterable[tuple[int, int]]) -> None:
        """Watch exactly ``ranges`` (page-aligned merged ranges) of ``pid`` from now on."""
        ranges = normalize_ranges(ranges)
        self._drain()  # events from before (e.g. the merge's own mmaps) apply to the old set
        t = self._targets.get(pid)
        if t is None or t.ledger.exited:
            t = _Target(CowLedger(pid), procfs.PagemapFile(pid))
            self._targets[pid] = t
            self._set_target_bit(pid, True)
        t.ledger.set_ranges(ranges)
        t.dirty = True
        self.reconcile(pid)

    def remove_target(self, pid: int) -> None:
        """Stop watching ``pid`` and forget its counters."""
        self._drain()
        t = self._targets.pop(pid, None)
        if t is None:
            return
        self._set_target_bit(pid, False)
        t.ledger.ranges = []
        self._sync(pid, t)
        if t.pagemap is not None:
            t.pagemap.close()

    def targets(self) -> list[int]:
        return [p for p, t in self._targets.items() if not t.ledger.exited]

    def counters(self, pid: int) -> CowCounters:
        self._drain()
        t = self._targets.get(pid)
        if t is None:
            raise KeyError(f"pid {pid} is not a target of this observer")
        return t.ledger.counters()

    def kernel_totals(self) -> dict[str, int]:
        """The BPF side's per-CPU counters, summed (empty in pagemap mode)."""
        if self._bpf is None:
            return {}
        return {name: self._kernel_counter(i) for i, name in enumerate(KERNEL_COUNTER_NAMES)}

    def _kernel_counter(self, idx: int) -> int:
        tab = self._bpf[b"totals"]
        return int(tab.sum(tab.Key(idx)).value)

    def poll(self, timeout_s: float = 0.0) -> list[Event]:
        """New COW breaks and lifecycle events, waiting up to ``timeout_s`` for one."""
        if self._bpf is None:
            return self._poll_pagemap(timeout_s)
        timeout_ms = 0 if self._out else max(0, int(timeout_s * 1000))
        if self._perf_buffer:
            self._bpf.perf_buffer_poll(timeout_ms)
        else:
            self._bpf.ring_buffer_poll(timeout_ms)
            # memory-syscall events do not always wake us (cow.bpf.c, emit): read them
            self._bpf.ring_buffer_consume()
        self._apply_raw()
        lost = self._kernel_counter(C_LOST)
        due = time.monotonic() - self._last_reconcile >= self.reconcile_interval_s
        if due or lost != self._lost_seen:
            # a dropped event may have been a COW break: pagemap finds it
            self._lost_seen = lost
            self._reconcile_all()
        self._sync_dirty()
        out, self._out = self._out, []
        return out

    def reconcile(self, pid: int) -> int:
        """Count the breaks of ``pid`` that pagemap shows and no fault did; returns how
        many. Also drops watched pages that are no longer in a procksm mapping."""
        self._drain()
        t = self._targets.get(pid)
        if t is None or t.ledger.exited:
            return 0
        ledger = t.ledger
        try:
            if t.pagemap is None:
                t.pagemap = procfs.PagemapFile(pid)
            maps = procfs.read_maps(pid)
        except NoSuchProcess:
            if self._bpf is None:  # BPF reports the exit itself
                self._exited(pid, t)
                self._out.append(Lifecycle("exit", pid))
            return 0
        from procksm.slots import SEGMENT_NAME_PREFIX

        merged = [(v.start, v.end) for v in maps if v.path.startswith(SEGMENT_NAME_PREFIX)]
        heap = [v.end for v in maps if v.path == "[heap]"]
        ledger.heap_end = heap[0] if heap else 0
        t.dirty |= ledger.restrict(merged)
        found: list[int] = []
        try:
            for r in list(ledger.ranges):
                for addr, entries in t.pagemap.iter_chunks(r.start, r.end):
                    found += ledger.reconcile_chunk(addr, entries)
        except NoSuchProcess:
            return 0
        ledger.end_reconcile()
        t.dirty = True  # re-armed pages get their bits back
        self._out.extend(CowBreak(pid, a, reconciled=True) for a in found)
        self._sync(pid, t)
        return len(found)

    @property
    def probes_attached(self) -> bool:
        return self._bpf is not None and bool(
            self._bpf.raw_tracepoint_fds or self._bpf.tracepoint_fds
        )

    def detach_probes(self) -> None:
        """Take every probe off its tracepoint (no cost to any fault or syscall) and keep
        the maps. Breaks written meanwhile are found by the reconcile that
        :meth:`attach_probes` runs; lifecycle events of the pause are not reported."""
        if self._bpf is None:
            return
        self._drain()
        for kind, tp, _fn in self._probes:
            with contextlib.suppress(Exception):  # not attached
                if kind == "raw":
                    self._bpf.detach_raw_tracepoint(tp)
                else:
                    self._bpf.detach_tracepoint(tp)

    def attach_probes(self) -> None:
        """Undo :meth:`detach_probes`, then reconcile every target."""
        if self._bpf is None or self.probes_attached:
            return
        for kind, tp, fn in self._probes:
            if kind == "raw":
                self._bpf.attach_raw_tracepoint(tp=tp, fn_name=fn)
            else:
                self._bpf.attach_tracepoint(tp=tp, fn_name=fn)
        self._reconcile_all()

    def close(self) -> None:
        if self._bpf is not None:
            bpf, self._bpf = self._bpf, None
            bpf.cleanup()  # detaches every probe and closes the program and map fds
            atexit.unregister(bpf.cleanup)
        for t in self._targets.values():
            if t.pagemap is not None:
                t.pagemap.close()
        self._targets.clear()

    # --- pagemap mode ---

    def _poll_pagemap(self, timeout_s: float) -> list[Event]:
        deadline = time.monotonic() + timeout_s
        while True:
            self._reconcile_all()
            if self._out or time.monotonic() >= deadline:
                break
            time.sleep(max(0.0, min(self.poll_interval_s, deadline - time.monotonic())))
        out, self._out = self._out, []
        return out

    def _reconcile_all(self) -> None:
        self._last_reconcile = time.monotonic()
        for pid in self.targets():
            self.reconcile(pid)

    # --- BPF events ---

    def _on_ring_event(self, _ctx: Any, data: Any, size: int) -> int:
        self._raw.append(ctypes.string_at(data, size))
        return 0

    def _on_perf_event(self, _cpu: int, data: Any, size: int) -> None:
        self._raw.append(ctypes.string_at(data, size))

    def _drain(self) -> None:
        """Apply what the kernel already sent, without waiting."""
        if self._bpf is None:
            return
        if self._perf_buffer:
            self._bpf.perf_buffer_poll(0)
        else:
            self._bpf.ring_buffer_consume()
        self._apply_raw()

    def _apply_raw(self) -> None:
        raw, self._raw = self._raw, []
        for data in raw:
            ev = parse_event(data)
            if self._apply(ev):
                self._out.append(ev)
        self._sync_dirty()

    def _apply(self, ev: Event) -> bool:
        """Update the targets' state by one event, in the kernel's order: an munmap
        applies before the fault that follows it. Returns whether to report it."""
        t = self._targets.get(ev.pid)
        if t is None or t.ledger.exited:
            return False
        led = t.ledger
        if isinstance(ev, CowBreak):
            if not led.record_fault(ev.addr, ev.kernel):
                return False
            # The kernel cleared the page's bit itself: mirror it in what `written` says
            # the map holds, so that re-arming the page later is seen as a change.
            region = ev.addr >> REGION_SHIFT
            if region in t.written:
                bits = bytearray(t.written[region])
                page = (ev.addr >> PAGE_SHIFT) & (REGION_PAGES - 1)
                bits[page >> 3] &= ~(1 << (page & 7)) & 0xFF
                t.written[region] = bytes(bits)
            return True
        kind, ret = ev.kind, ev.ret
        if kind == "exit":
            self._exited(ev.pid, t)
        elif kind == "exec":
            led.ranges = []  # a new address space
            self._sync(ev.pid, t)
            stale = self._bpf[b"stale"]
            with contextlib.suppress(KeyError):
                del stale[stale.Key(ev.pid)]
        elif kind == "fork" and self.follow_children and ev.child_pid not in self._targets:
            # The child may have exec'd or exited already (the kernel made it a target at
            # fork): its pagemap opens on its first reconcile, if it is still there.
            self._targets[ev.child_pid] = _Target(led.child(ev.child_pid), None)
            self._set_target_bit(ev.child_pid, True)
        elif ret < 0:
            pass  # a failed call changed nothing
        elif kind == "mmap":
            t.dirty |= led.remove(ret, ret + ev.length)  # MAP_FIXED over a watched range
        elif kind == "munmap":
            t.dirty |= led.remove(ev.addr, ev.addr + ev.length)
        elif kind == "mremap":
            t.dirty |= led.move(ev.addr, ev.length, ret, ev.new_length, ev.flags)
        elif kind == "madvise" and ev.advice in (MADV_DONTNEED, MADV_DONTNEED_LOCKED):
            t.dirty |= led.rearm(ev.addr, ev.addr + ev.length)
        elif kind == "brk":
            new_end = _page_up(ret)
            if led.heap_end and new_end < led.heap_end:
                t.dirty |= led.remove(new_end, led.heap_end)
            led.heap_end = new_end
        return True

    def _exited(self, pid: int, t: _Target) -> None:
        # Keep the counters of exited targets for counters(pid), but not forever: a
        # followed target that forks a child per request would grow this without bound.
        self._exited_order.append(pid)
        while len(self._exited_order) > MAX_EXITED_KEPT:
            old = self._exited_order.popleft()
            if old in self._targets and self._targets[old].ledger.exited:
                del self._targets[old]
        t.ledger.exited = True
        t.ledger.ranges = []
        self._set_target_bit(pid, False)
        self._sync(pid, t)
        if t.pagemap is not None:
            t.pagemap.close()
            t.pagemap = None

    # --- BPF maps ---

    def _set_target_bit(self, pid: int, on: bool) -> None:
        if self._bpf is None:
            return
        tab = self._bpf[b"target_bits"]
        key = tab.Key(pid >> 6)
        word = int(tab[key].value)
        bit = 1 << (pid & 63)
        word = word | bit if on else word & ~bit
        tab[key] = tab.Leaf(word)

    def _sync_dirty(self) -> None:
        for pid, t in list(self._targets.items()):
            if t.dirty:
                self._sync(pid, t)

    def _sync(self, pid: int, t: _Target) -> None:
        """Write the target's armed-page bitmaps where they differ from what was written."""
        t.dirty = False
        if self._bpf is None:
            return
        armed = t.ledger.armed_pages()
        want = page_bitmaps(armed)
        chunks = armed_chunks(armed)
        tab = self._bpf[b"merged"]
        dropped = t.written.keys() - want.keys()
        # the filter bits before the pages they let through are armed, and cleared after
        self._bloom_update(chunks - t.chunks, +1)
        for region, bits in want.items():
            if t.written.get(region) != bits:
                leaf = tab.Leaf()
                ctypes.memmove(ctypes.addressof(leaf), bits, len(bits))
                tab[tab.Key(pid, 0, region)] = leaf
        for region in dropped:
            with contextlib.suppress(KeyError):
                del tab[tab.Key(pid, 0, region)]
        self._bloom_update(t.chunks - chunks, -1)
        t.written, t.chunks = want, chunks

    def _bloom_update(self, chunks: Iterable[int], delta: int) -> None:
        """Count the (target, chunk) pairs behind each filter bit; set a bit when its
        first pair comes, clear it when its last one went."""
        words: dict[int, tuple[int, int]] = {}  # word -> (bits to set, bits to clear)
        for chunk in chunks:
            h = bloom_index(chunk)
            self._bloom_users[h] += delta
            n = self._bloom_users[h]
            if (delta > 0 and n == 1) or (delta < 0 and n == 0):
                on, off = words.get(h >> 6, (0, 0))
                bit = 1 << (h & 63)
                words[h >> 6] = (on | bit, off) if delta > 0 else (on, off | bit)
            if n == 0:
                del self._bloom_users[h]
        if not words:
            return
        tab = self._bpf[b"chunk_bloom"]
        for w, (on, off) in words.items():
            key = tab.Key(w)
            tab[key] = tab.Leaf((int(tab[key].value) | on) & ~off)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m procksm.observe --ebpf``: print the BPF program and exit."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args == ["--ebpf"]:
        sys.stdout.write(bpf_source())
        return 0
    print("usage: python -m procksm.observe --ebpf", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
