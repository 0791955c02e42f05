"""The merge's plain records: its options (:class:`MergeOptions`), what it did per
target (:class:`TargetResult`) and per round (:class:`MergeOutcome`), what it refused
(:class:`Refusal`), and the one-shot run's result (:class:`MergeResult`, its ``--json``
document). procksm.merge re-exports them all.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from procksm import PAGE_SIZE, procfs
from procksm.attach.session import StopParts
from procksm.plan import MAX_CALLS_PER_BATCH
from procksm.scanner import ScanOptions
from procksm.window_sizer import DEFAULT_PAUSE_BUDGET_MS


@dataclass(slots=True)
class MergeOptions:
    selection: ScanOptions = field(default_factory=ScanOptions)
    # A full second scan before planning (KSM's classic two passes); by default the
    # second look at each page is its byte comparison under stop (see MergeEngine._run).
    two_scans: bool = False
    cross_uid: bool = False  # allow merging between processes of different uids
    allow_async_io: bool = False  # merge processes that use io_uring / AIO (docs/design.md §3.4)
    # The madvise guard (procksm.guard, docs/design.md §3.1-3.2): installed with the first merge
    # into a process. Without it (--no-guard), processes whose allocator relies on
    # zero-after-MADV_DONTNEED are refused unless allow_zero_after_dontneed.
    guard: bool = True
    set_no_new_privs: bool = False  # let the guard set no_new_privs in non-root targets
    allow_zero_after_dontneed: bool = False
    zero_pages: bool = True
    # Pages per stop window at most. A window costs ~0.55 ms of fixed work on a
    # single-threaded target (stop, gate, the batch's round trip, resume) plus ~2 us per
    # page (byte comparison, mmap, POPULATE_READ); within this cap the windows are sized
    # to the pause budget from the target's own measured windows
    # (procksm.window_sizer).
    batch_pages: int = 256
    # The pause a window is sized for (ms): each target's windows are cut so that their
    # predicted pause, with a margin for its spread, stays within it.
    pause_budget_ms: float = DEFAULT_PAUSE_BUDGET_MS
    max_calls: int = MAX_CALLS_PER_BATCH  # injected syscalls per stop window
    # Targets merged at once. Measured on 2 CPUs, 4 x 384 MiB: 2 workers were slower than
    # 1 and doubled the p99 pause (the GIL, and the targets' injected mmaps compete for
    # the CPUs).
    parallel: int = 1
    # SCHED_FIFO while merging a target (see merge_target._realtime_priority): it keeps
    # stops short on a CPU-saturated machine (a target with 7 spinning threads on 2 CPUs:
    # p99 pause 15.8 -> 4.4 ms) but doubles an injected syscall's cost on an idle one
    # (25 -> 47 us).
    # None (the CLI's default too): decided per target from the runnable threads.
    realtime: bool | None = None
    vma_budget_cap: int = 8192
    segment_pages: int = (64 << 20) // PAGE_SIZE  # at most this many slots per memfd
    # The hole after each piece's slots (plan.split_at_extent_ends): a merged range that
    # the target grows with mremap reads zeros for up to this much, like anonymous
    # memory, instead of SIGBUS. A hole costs nothing until read. 2^28 pages = 1 TiB.
    tail_gap_pages: int = 1 << 28


@dataclass(slots=True)
class Refusal:
    """What was not merged, and why: a range [start, end) of ``pid``, or (0, 0) the whole
    process, or with ``partial`` some of its pages that no range names (the VMA budget)."""

    pid: int
    start: int
    end: int
    reason: str
    partial: bool = False

    def as_dict(self) -> dict[str, Any]:
        return {
            "pid": self.pid,
            "start": hex(self.start),
            "end": hex(self.end),
            "reason": self.reason,
        }


@dataclass(slots=True)
class TargetResult:
    pid: int
    name: str
    pages_merged: int = 0
    pages_zeroed: int = 0
    pages_volatile: int = 0
    pages_refused: int = 0
    extents: int = 0
    pauses: list[float] = field(default_factory=list)
    longest: StopParts | None = None  # the longest stop, and where its time went
    # CPU time its threads spent running procksm's calls (procksm's cost, on its CPU time)
    target_cpu_s: float = 0.0
    error: str | None = None
    guard_installed: bool = False  # the madvise guard was installed by this run


@dataclass(slots=True)
class MergeOutcome:
    """What one round of :meth:`MergeEngine.merge_scanned` did: per scanned target, and
    what it refused."""

    results: dict[int, TargetResult]
    refused: list[Refusal]


@dataclass(slots=True)
class MergeResult:
    targets: list[TargetResult]
    refused: list[Refusal]
    slots: int
    slots_mapped: int
    segments: int
    scans: int
    elapsed_s: float
    cpu_s: float
    cgroup: procfs.CgroupMemory = field(
        default_factory=lambda: procfs.CgroupMemory("?", None, None)
    )

    @property
    def pages_merged(self) -> int:
        return sum(t.pages_merged for t in self.targets)

    @property
    def pages_zeroed(self) -> int:
        return sum(t.pages_zeroed for t in self.targets)

    @property
    def saved_pages(self) -> int:
        """procksm's own account: merged pages minus the slots they now share, plus
        zero pages dropped. /proc/meminfo is the truth the tests compare it with."""
        return self.pages_merged - self.slots_mapped + self.pages_zeroed

    @property
    def target_cpu_s(self) -> float:
        return sum(t.target_cpu_s for t in self.targets)

    def refused_processes(self) -> list[Refusal]:
        """The targets refused as a whole (their refusal covers no range): nothing was
        done in them, and the reason names the fix."""
        return [r for r in self.refused if r.start == r.end == 0 and not r.partial]

    def as_json(self) -> dict[str, Any]:
        pauses = [p for t in self.targets for p in t.pauses]
        return {
            "totals": {
                "pages_merged": self.pages_merged,
                "pages_zeroed": self.pages_zeroed,
                "pages_volatile": sum(t.pages_volatile for t in self.targets),
                "pages_refused": sum(t.pages_refused for t in self.targets),
                "slots": self.slots_mapped,
                "slots_written": self.slots,
                "segments": self.segments,
                "saved_pages": self.saved_pages,
                "saved_bytes": self.saved_pages * PAGE_SIZE,
                "scans": self.scans,
            },
            "processes": [
                {
                    "pid": t.pid,
                    "name": t.name,
                    "pages_merged": t.pages_merged,
                    "pages_zeroed": t.pages_zeroed,
                    "pages_volatile": t.pages_volatile,
                    "pages_refused": t.pages_refused,
                    "extents": t.extents,
                    "guard_installed": t.guard_installed,
                    "pauses": pause_stats(t.pauses, t.longest),
                    "target_cpu_s": round(t.target_cpu_s, 4),
                    **({"error": t.error} if t.error else {}),
                }
                for t in self.targets
            ],
            "pauses": pause_stats(pauses, longest_of(self.targets)),
            "refused": [r.as_dict() for r in self.refused],
            # Where the shared pages are charged (docs/design.md §3.7): to procksm's cgroup.
            "procksm": {
                "memfd_bytes": self.slots * PAGE_SIZE,
                "cgroup": self.cgroup.path,
                "cgroup_memory_bytes": self.cgroup.usage_bytes,
                "cgroup_memory_limit_bytes": self.cgroup.limit_bytes,
            },
            "elapsed_s": round(self.elapsed_s, 4),
            "cpu_s": round(self.cpu_s, 4),
            # what procksm's calls cost the targets' threads (mmap, populate, zero
            # drops): with cpu_s, procksm's whole cost (ksmd does that work itself)
            "target_cpu_s": round(self.target_cpu_s, 4),
        }


def pause_stats(pauses: Sequence[float], longest: StopParts | None = None) -> dict[str, Any]:
    """Percentiles of the stops; with ``longest``, where the longest one's time went."""
    out: dict[str, Any] = {"count": 0, "p50_ms": 0.0, "p99_ms": 0.0, "max_ms": 0.0}
    if pauses:
        ms = np.array(pauses) * 1000.0
        out = {
            "count": int(ms.size),
            "p50_ms": round(float(np.percentile(ms, 50)), 3),
            "p99_ms": round(float(np.percentile(ms, 99)), 3),
            "max_ms": round(float(ms.max()), 3),
        }
    if longest is not None:
        out["longest"] = longest.as_json()
    return out


def longest_of(targets: Sequence[TargetResult]) -> StopParts | None:
    parts = [t.longest for t in targets if t.longest is not None]
    return max(parts, key=lambda p: p.total) if parts else None
