"""The daemon's targets: what of each is registered for scanning, its lifecycle (attach,
exec, exit, children), and the scan cursor that walks them."""

from __future__ import annotations

import bisect
import collections
import contextlib
import fnmatch
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from procksm import PAGE_SIZE, procfs
from procksm.attach.diagnose import check_attachable
from procksm.attach.locks import target_locks
from procksm.daemon.settings import DaemonOptions
from procksm.errors import NoSuchProcess, ProcksmError, UsageError
from procksm.merge import check_targets
from procksm.scanner import AddressRange
from procksm.slots import SEGMENT_NAME_PREFIX

LogFn = Callable[[str], None]


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
    advice: tuple[int, ...] = ()  # procfs.Vma.advice: given again to a replacement


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
    # (start, end) of each of procksm's mappings in the target, one row per VMA: a
    # scattered merge leaves tens of thousands of one-page VMAs, which as Vma objects
    # cost ~0.5 KiB each (measured: 14 MiB on four redis-servers); 16 bytes here
    merged_spans: np.ndarray = field(default_factory=lambda: np.zeros((0, 2), np.int64))
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
    # pages of merged mappings that a write copied (pagemap, with each snapshot): only the
    # merged mappings that hold one are scanned (a scattered merge leaves thousands of
    # one-page mappings; walking them all every full scan tripled the daemon's CPU on
    # redis, measured)
    copied_addrs: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    # (parts, their (start, end)): see part_spans
    _part_spans: tuple[list[Part], list[tuple[int, int]]] | None = field(default=None, repr=False)

    def refresh_parts(self) -> None:
        """Re-read smaps: the VMAs and their eligibility (one read per full scan)."""
        parts: list[Part] = []
        merged: list[tuple[int, int]] = []
        for vma in procfs.read_vmas(self.pid):
            ours = vma.path.startswith(SEGMENT_NAME_PREFIX)
            if ours:
                merged.append((vma.start, vma.end))
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
                        advice=vma.advice,
                    )
                )
        self.parts = parts
        self.part_starts = [p.start for p in parts]
        self.merged_spans = np.array(merged, np.int64).reshape(-1, 2)

    def part_spans(self) -> list[tuple[int, int]]:
        """(start, end) of each part, made once per list of parts: every window asks
        for them, and on a merged-then-unmerged CPython worker (~3,700 parts) making
        them per window cost ~0.7 ms (benchmarks/many_vmas.py)."""
        cached = self._part_spans
        if cached is None or cached[0] is not self.parts:
            cached = self._part_spans = (self.parts, [(p.start, p.end) for p in self.parts])
        return cached[1]

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


def alive(pid: int) -> bool:
    try:
        return not procfs.read_status(pid).is_zombie
    except ProcksmError:
        return False


class Registry:
    """The targets in scan order, the numbers their page refs use (never reused while the
    daemon runs), and the cursor: (position in order, part index, address)."""

    def __init__(self, opts: DaemonOptions, log: LogFn) -> None:
        self.opts = opts
        self.log = log
        self.targets: dict[int, Target] = {}
        self.order: list[int] = []
        self.cursor = (0, 0, 0)
        self.events: list[str] = []  # exits and execs, for the log and the tests
        self._next_index = 0

    def new_index(self) -> int:
        self._next_index += 1
        return self._next_index - 1

    def add(self, pid: int, parent: int | None = None) -> Target:
        """Check ``pid`` as ``procksm merge`` would, lock it, and append it."""
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
        t = Target(pid, self.new_index(), names[pid], st.uid, mm_identity(pid), lock, parent=parent)
        self.targets[pid] = t
        self.order.append(pid)
        self.log(f"attached to pid {pid} ({t.name})" + (f", child of {parent}" if parent else ""))
        return t

    def drop(self, t: Target, why: str) -> None:
        """Stop scanning ``t`` (its merged pages stay merged) and release its lock."""
        self.targets.pop(t.pid, None)
        if t.pid in self.order:
            pos = self.order.index(t.pid)
            self.order.remove(t.pid)
            p, i, a = self.cursor
            if p > pos:
                self.cursor = (p - 1, i, a)
            elif p == pos:
                self.cursor = (p, 0, 0)
        t.lock.close()
        self.events.append(f"{t.pid}: {why}")
        self.log(f"pid {t.pid} ({t.name}): {why}")

    def renew(self, t: Target, why: str) -> None:
        """exec: the pid stays, its memory is new: a new ref number, nothing known."""
        t.index = self.new_index()
        t.zero_runs.clear()
        t.cow_now = 0
        t.mm_id = mm_identity(t.pid)
        with contextlib.suppress(ProcksmError, OSError):
            t.name = procfs.read_status(t.pid).name
        self.events.append(f"{t.pid}: {why}")
        self.log(f"pid {t.pid}: {why}")

    def new_children(self) -> list[tuple[int, int]]:
        """(child, parent) for the children of targets that are not targets yet."""
        return [
            (child, pid)
            for pid in list(self.order)
            for child in procfs.children(pid)
            if child not in self.targets
        ]


# --- the zero pages a target had dropped: (addr, pages) runs ---------------------------


def coalesce(runs: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """(addr, pages) runs sorted, adjacent and overlapping ones joined."""
    out: list[tuple[int, int]] = []
    for a, k in sorted(runs):
        if out and a <= out[-1][0] + out[-1][1] * PAGE_SIZE:
            b = max(out[-1][0] + out[-1][1] * PAGE_SIZE, a + k * PAGE_SIZE)
            out[-1] = (out[-1][0], (b - out[-1][0]) // PAGE_SIZE)
        else:
            out.append((a, k))
    return out


def in_runs(addr: np.ndarray, runs: list[tuple[int, int]]) -> np.ndarray:
    """Which of ``addr`` lie in one of the (addr, pages) ``runs``."""
    runs = coalesce(runs)
    starts = np.array([a for a, _ in runs], np.int64)
    ends = starts + np.array([k for _, k in runs], np.int64) * PAGE_SIZE
    i = np.searchsorted(starts, addr, side="right") - 1
    return (i >= 0) & (addr < ends[np.maximum(i, 0)])


def zero_pages_in(runs: list[tuple[int, int]], starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """For each range [starts[i], ends[i]), the pages of the (addr, pages) runs inside it
    (vectorised: thousands of ranges against thousands of runs)."""
    if not runs:
        return np.zeros(len(starts), np.int64)
    r = np.array(coalesce(runs), np.int64)
    run_lo = r[:, 0]
    run_hi = run_lo + r[:, 1] * PAGE_SIZE
    before = np.concatenate([[0], np.cumsum(run_hi - run_lo)])  # bytes of runs [0, i)

    def below(x: np.ndarray) -> np.ndarray:
        # runs sorted and disjoint: those before the last one starting at or below x end
        # below it; that one counts up to x
        i = np.searchsorted(run_lo, x, side="right")
        last = np.maximum(i - 1, 0)
        partial = np.where(i > 0, np.minimum(x, run_hi[last]) - run_lo[last], 0)
        return before[last] * (i > 0) + partial

    return (below(np.asarray(ends, np.int64)) - below(np.asarray(starts, np.int64))) // PAGE_SIZE
