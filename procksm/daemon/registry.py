"""The daemon's targets: what of each is registered for scanning, its lifecycle (attach,
exec, exit, children), and the scan cursor that walks them."""

from __future__ import annotations

import collections
import contextlib
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

    @property
    def whole_vmas(self) -> bool:
        """Every eligible VMA is scanned whole (the default: nothing named, nothing
        excluded)."""
        return self.everything and not self.excluded_ranges and not self.excluded_names

    def select(self, name: str, start: int, end: int) -> list[tuple[int, int]]:
        """The parts of an eligible VMA (its display name and bounds) to scan."""
        if any(procfs.name_matches(name, p) for p in self.excluded_names):
            return []
        if self.everything or any(procfs.name_matches(name, p) for p in self.names):
            parts = [(start, end)]
        else:
            parts = [
                (max(r.start, start), min(r.end, end))
                for r in self.ranges
                if r.start < end and start < r.end
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


def _int64s(n: int = 0) -> np.ndarray:
    return np.zeros(n, np.int64)


@dataclass(frozen=True, slots=True)
class Parts:
    """The scanned pieces of a target's eligible VMAs, in address order, as columns. A
    scattered merge leaves thousands of heap fragments between procksm's one-page
    mappings; an object each (with its VMA's smaps parsed into objects every full scan)
    grew the daemon to ~60 MiB on four redis-servers, ~45 bytes a row here."""

    start: np.ndarray = field(default_factory=_int64s)  # int64, as every column
    end: np.ndarray = field(default_factory=_int64s)
    vma_start: np.ndarray = field(default_factory=_int64s)  # the VMA's bounds, for the engine
    vma_end: np.ndarray = field(default_factory=_int64s)
    rss_pages: np.ndarray = field(default_factory=_int64s)  # the VMA's smaps Rss
    # one of procksm's own segment mappings: only the pages a write copied there (now
    # anonymous) are read, and merged again like any other page (never as zero pages)
    merged: np.ndarray = field(default_factory=lambda: np.zeros(0, bool))
    kind: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int32))  # -> kinds
    # name, perms, and the advice given again to a replacement (procfs.VmaKind)
    kinds: tuple[procfs.VmaKind, ...] = ()

    def __len__(self) -> int:
        return int(self.start.size)

    def kind_of(self, i: int) -> procfs.VmaKind:
        return self.kinds[int(self.kind[i])]

    def indices(self, addr: np.ndarray) -> np.ndarray:
        """For each address, the index of the part that holds it, or -1."""
        if self.start.size == 0:
            return np.full(addr.size, -1, np.int64)
        i = np.searchsorted(self.start, addr, side="right") - 1
        return np.where((i >= 0) & (addr < self.end[np.maximum(i, 0)]), i, -1)


def scanned_parts(
    table: procfs.VmaTable, reg: Registration, copied: np.ndarray
) -> tuple[Parts, np.ndarray]:
    """The parts of ``table`` (a target's smaps) to scan under ``reg``, and the (start,
    end) rows of procksm's own mappings. Of those, only the ones that hold a page a
    write copied (``copied``: sorted addresses, as of the latest snapshot) are scanned.
    Eligibility is decided once per kind of VMA (procfs.ineligibility)."""
    # user space ends below 2**47: every row that can be eligible fits in an int64
    # ([vsyscall], above 2**63, never is)
    start = table.start.astype(np.int64)
    end = table.end.astype(np.int64)
    ours_kind = np.array(
        [k.path.startswith(SEGMENT_NAME_PREFIX) for k in table.kinds], bool
    ).reshape(-1)
    ok_kind = np.array(
        [
            procfs.ineligibility(k, ours=bool(o)) is None
            for k, o in zip(table.kinds, ours_kind, strict=True)
        ],
        bool,
    ).reshape(-1)
    ours = ours_kind[table.kind] if len(table) else np.zeros(0, bool)
    keep = ok_kind[table.kind] if len(table) else np.zeros(0, bool)
    if copied.size:
        i = np.searchsorted(copied, start)
        holds_copy = (i < copied.size) & (copied[np.minimum(i, copied.size - 1)] < end)
    else:
        holds_copy = np.zeros(len(table), bool)
    keep &= ~ours | holds_copy
    rows = np.flatnonzero(keep)
    if reg.whole_vmas:
        pieces = rows
        p_start, p_end = start[rows], end[rows]
    else:
        sel = [
            (r, s, e)
            for r in rows.tolist()
            for s, e in reg.select(table.kinds[table.kind[r]].name, int(start[r]), int(end[r]))
        ]
        pieces = np.array([r for r, _, _ in sel], np.int64)
        p_start = np.array([s for _, s, _ in sel], np.int64)
        p_end = np.array([e for _, _, e in sel], np.int64)
    parts = Parts(
        start=p_start,
        end=p_end,
        vma_start=start[pieces],
        vma_end=end[pieces],
        rss_pages=table.rss_kb[pieces] * 1024 // PAGE_SIZE,
        merged=ours[pieces],
        kind=table.kind[pieces],
        kinds=table.kinds,
    )
    return parts, np.stack([start[ours], end[ours]], axis=1)


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
    parts: Parts = field(default_factory=Parts)
    # (start, end) of each of procksm's mappings in the target, one row per VMA: a
    # scattered merge leaves tens of thousands of one-page VMAs, which as Vma objects
    # cost ~0.5 KiB each (measured: 14 MiB on four redis-servers); 16 bytes here
    merged_spans: np.ndarray = field(default_factory=lambda: np.zeros((0, 2), np.int64))
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

    def refresh_parts(self) -> None:
        """Re-read smaps: the VMAs and their eligibility (one read per full scan)."""
        self.parts, self.merged_spans = scanned_parts(
            procfs.read_vmas(self.pid), self.reg, self.copied_addrs
        )


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
