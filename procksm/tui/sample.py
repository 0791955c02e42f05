"""A demo-like :class:`Snapshot`, built by hand: four workers of ``procksm demo`` (64 MiB of
identical data, 16 MiB of zeros, 16 MiB unique, 4 MiB hot each) being merged.

Used by the tests (a scripted source for the live loop), by ``docs/live-view.svg``'s
generator when no daemon is at hand, and nowhere else. Deterministic: no clock, no random.
"""

from __future__ import annotations

import math

from procksm import PAGE_SIZE
from procksm.snapshot import HistoryPoint, MappingSnapshot, Snapshot, TargetSnapshot

MIB_PAGES = (1 << 20) // PAGE_SIZE
T0 = 1_750_000_000.0  # a fixed unix time, so that rendered clocks are stable
SHARED_PAGES = 64 * MIB_PAGES  # each worker's identical data
ZERO_PAGES = 16 * MIB_PAGES  # each worker's zeros
BASE_RSS_PAGES = (10 + 64 + 16 + 16 + 4) * MIB_PAGES  # interpreter + the four regions


def _cow_rate(i: int) -> float:
    """A COW-break rate with a burst now and then (the hot table being rewritten)."""
    return round(4.0 + 3.0 * math.sin(i / 3.0) + (25.0 if i % 17 == 5 else 0.0), 1)


def demo_like_snapshot(
    step: int = 30,
    *,
    steps: int = 30,
    workers: int = 4,
    run: int = 1,
    observer: str = "bpf",
    interval: float = 1.0,
) -> Snapshot:
    """The state ``step`` intervals after the daemon attached; merging completes at ``steps``.

    Savings grow linearly until ``steps``, so consecutive steps show savings growing.
    """
    frac = min(1.0, max(0.0, step / steps)) if steps else 1.0
    merged_each = int(SHARED_PAGES * frac)
    zero_done = int(ZERO_PAGES * frac)
    targets = tuple(_worker(w, step, workers, merged_each, zero_done) for w in range(workers))
    pages_sharing = merged_each * (workers - 1)
    pages_zero = zero_done * workers
    return Snapshot(
        time=T0 + step * interval,
        run=run,
        observer=observer,
        pages_shared=merged_each,
        pages_sharing=pages_sharing,
        pages_unshared=int((1 - frac) * SHARED_PAGES * workers),
        pages_volatile=4 * MIB_PAGES * workers,
        pages_skipped=12,
        pages_zero=pages_zero,
        full_scans=step // 3,
        cow_breaks=sum(t.cow_breaks for t in targets),
        general_profit_bytes=(pages_sharing + pages_zero) * PAGE_SIZE - 3 * (1 << 20),
        scan_rate_pages_s=25_600.0 if run == 1 else 0.0,
        cpu_percent=3.2 if run == 1 else 0.1,
        rss_bytes=48 << 20,
        pause_p50_ms=0.4,
        pause_p99_ms=1.9,
        pause_max_ms=2.3,
        sleep_ms=20,
        pages_to_scan=1000,
        targets=targets,
        history=_history(step, steps, workers, interval),
    )


def _worker(w: int, step: int, workers: int, merged_each: int, zero_done: int) -> TargetSnapshot:
    """Worker ``w``: its merged pages are shared by all workers, so it pays 1/workers of
    them in PSS; the first one is the parent (``python3``), with a refused stack."""
    rss_pages = BASE_RSS_PAGES - zero_done
    pss_pages = rss_pages - merged_each + merged_each // workers
    cow = _cow_rate(step + 5 * w)
    return TargetSnapshot(
        pid=4242 + 3 * w,
        name="python3 -m procksm.demo_worker" if w else "python3",
        rss_bytes=rss_pages * PAGE_SIZE,
        pss_bytes=pss_pages * PAGE_SIZE,
        pages_merged=merged_each,
        pages_zero=zero_done,
        cow_breaks=int(step * cow),
        cow_breaks_per_s=cow,
        pages_refused=0 if w else 12,
        top_refusal=None if w else "stack",
        last_pause_ms=round(0.3 + 0.05 * w, 2),
        max_pause_ms=round(1.1 + 0.4 * w, 2),
        mappings=_mappings(w << 32, merged_each, zero_done),
    )


def _mappings(off: int, merged: int, zero_done: int) -> tuple[MappingSnapshot, ...]:
    """A worker's four mappings, ``off`` bytes from worker 0's."""
    return (
        MappingSnapshot(
            "[anon] model", 0x7F3A00000000 + off, 0x7F3A04000000 + off, SHARED_PAGES, merged
        ),
        MappingSnapshot(
            "[anon] zeros",
            0x7F3A10000000 + off,
            0x7F3A11000000 + off,
            ZERO_PAGES - zero_done,
            0,
            zero_done,
        ),
        MappingSnapshot("[heap]", 0x55D400000000 + off, 0x55D401400000 + off, 20 * MIB_PAGES, 0),
        MappingSnapshot(
            "libpython3.11.so (bss)", 0x7F3B20000000 + off, 0x7F3B20040000 + off, 48, 0
        ),
    )


def _history(step: int, steps: int, workers: int, interval: float) -> tuple[HistoryPoint, ...]:
    """The last 120 intervals up to ``step``: savings growing until ``steps``."""
    full_saving = SHARED_PAGES * (workers - 1) + ZERO_PAGES * workers
    return tuple(
        HistoryPoint(
            time=T0 + i * interval,
            saved_bytes=int(full_saving * min(1.0, i / steps if steps else 1.0)) * PAGE_SIZE,
            cow_breaks_per_s=sum(_cow_rate(i + 5 * w) for w in range(workers)),
        )
        for i in range(max(0, step - 119), step + 1)
    )


__all__ = ["demo_like_snapshot"]
