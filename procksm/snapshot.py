"""Immutable snapshots of what procksm is doing: the one record the daemon publishes
and every view (``procksm stats``, the live view, Prometheus metrics) reads.

Counters keep the kernel KSM names and meanings (Documentation/admin-guide/mm/ksm.rst):
``pages_shared`` is how many distinct shared pages (memfd slots) are mapped,
``pages_sharing`` how many more sites map them (how much is saved), ``pages_zero`` the
zero pages given back (the kernel's ``ksm_zero_pages``). Bytes are bytes, times are
seconds unless a field name says otherwise.

The daemon builds a new :class:`Snapshot` per interval; views never mutate one and never
touch a process themselves (docs/design.md §5).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from procksm import PAGE_SIZE


@dataclass(frozen=True)
class MappingSnapshot:
    """One mapping (VMA or named group of VMAs) of a target."""

    name: str  # "[heap]", "[anon]", a library's .bss, ...
    start: int
    end: int
    rss_pages: int
    merged_pages: int
    zero_pages: int = 0


@dataclass(frozen=True)
class TargetSnapshot:
    pid: int
    name: str
    rss_bytes: int
    pss_bytes: int
    pages_merged: int  # this target's pages now mapping a shared slot
    pages_zero: int  # zero pages given back
    cow_breaks: int  # merged pages written since merged (total)
    cow_breaks_per_s: float
    pages_refused: int
    top_refusal: str | None  # most common reason, e.g. "mlocked (VmLck)"
    last_pause_ms: float
    max_pause_ms: float
    mappings: tuple[MappingSnapshot, ...] = ()


@dataclass(frozen=True)
class HistoryPoint:
    time: float
    saved_bytes: int
    cow_breaks_per_s: float


@dataclass(frozen=True)
class Snapshot:
    time: float  # unix time the snapshot was taken
    run: int  # 0 stopped, 1 running, 2 unmerge-and-stop (KSM's run file)
    observer: str  # "bpf" or "pagemap"
    pages_shared: int
    pages_sharing: int
    pages_unshared: int
    pages_volatile: int
    pages_skipped: int
    pages_zero: int
    full_scans: int
    cow_breaks: int
    # bytes saved minus procksm's own private memory (the daemon's and the guards'), as
    # the kernel's general_profit takes off its rmap_items
    general_profit_bytes: int
    scan_rate_pages_s: float
    cpu_percent: float  # procksm's own, % of one CPU
    rss_bytes: int  # procksm's own
    pause_p50_ms: float = 0.0
    pause_p99_ms: float = 0.0
    pause_max_ms: float = 0.0
    # the longest stop since the daemon started, and where its time went (ms): every
    # thread stopped, gated, the calls the target ran, let go, procksm's own work
    pause_longest: dict[str, float | int] | None = None
    sleep_ms: int = 0
    pages_to_scan: int = 0
    pages_remerged: int = 0  # pages a write had copied, merged again (total)
    ranges_held: int = 0  # 64 KiB ranges held back for breaking soon after merging
    zero_pages_dropped: int = 0  # zero pages dropped (total; a page dropped again counts again)
    private_bytes: int = 0  # procksm's private memory: the daemon's and the guards' (smaps)
    # the CPU its calls took in the targets' threads (mmaps, populates, zero drops; ksmd
    # does that work in its own time), % of one CPU since the last snapshot
    target_cpu_percent: float = 0.0
    target_cpu_s: float = 0.0  # the same, in CPU seconds since the daemon started
    targets: tuple[TargetSnapshot, ...] = ()
    history: tuple[HistoryPoint, ...] = field(default=())

    @property
    def saved_bytes(self) -> int:
        """Memory given back: every sharing site beyond the first, and every zero page."""
        return (self.pages_sharing + self.pages_zero) * PAGE_SIZE

    @property
    def targets_rss_bytes(self) -> int:
        return sum(t.rss_bytes for t in self.targets)

    def as_json(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["saved_bytes"] = self.saved_bytes
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Snapshot:
        d = dict(data)
        d.pop("saved_bytes", None)
        d["targets"] = tuple(
            TargetSnapshot(
                **{
                    **t,
                    "mappings": tuple(MappingSnapshot(**m) for m in t.get("mappings", ())),
                }
            )
            for t in d.get("targets", ())
        )
        d["history"] = tuple(HistoryPoint(**h) for h in d.get("history", ()))
        return cls(**d)


__all__ = ["HistoryPoint", "MappingSnapshot", "Snapshot", "TargetSnapshot"]
