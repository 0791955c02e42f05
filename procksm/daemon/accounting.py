"""The daemon's counters: what each merge round did, and the truth from pagemap.

Counters follow the kernel's names and are taken from pagemap, not from procksm's own
bookkeeping, wherever pagemap can tell: ``pages_shared`` is the number of distinct frames
of procksm's memfds mapped in the targets, ``pages_sharing`` the mappings of them beyond
the first, ``cow_breaks`` the pages of merged mappings that a write has since made
private again (pagemap: present, not file-backed).
"""

from __future__ import annotations

import collections
import contextlib
import os
import resource
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from procksm import PAGE_SIZE, guard, procfs
from procksm.attach.session import StopParts
from procksm.daemon.merger import BatchOutcome
from procksm.daemon.registry import LogFn, Target, coalesce, zero_pages_in
from procksm.daemon.settings import Settings
from procksm.daemon.window import read_spans
from procksm.errors import ProcksmError
from procksm.slots import SEGMENT_NAME_PREFIX
from procksm.snapshot import HistoryPoint, MappingSnapshot, Snapshot, TargetSnapshot

# how often the guards' pids are asked again (their private memory counts against the saving)
GUARD_PIDS_TTL_S = 10.0


@dataclass(frozen=True, slots=True)
class IndexCounters:
    """What the scan knows, for the snapshot (the kernel's names)."""

    pages_unshared: int
    pages_volatile: int
    full_scans: int
    ranges_held: int
    metadata_bytes: int  # procksm's bookkeeping, taken off general_profit


class Accounting:
    """Totals of the scan and of the merge rounds, and the snapshots built from them."""

    def __init__(self, history: int, log: LogFn) -> None:
        self.log = log
        self._guard_pids: list[int] = []
        self._guards_seen = float("-inf")
        self.pages_scanned = 0
        self.pages_skipped = 0
        self.pages_remerged = 0  # copied pages of segment mappings merged again
        self.zero_dropped_total = 0
        self.pauses: collections.deque[float] = collections.deque(maxlen=8192)
        self.longest: StopParts | None = None  # the longest stop of the daemon's life
        self.target_cpu_s = 0.0  # CPU time procksm's calls took in the targets' threads
        self._target_cpu_prev = 0.0
        self._history: collections.deque[HistoryPoint] = collections.deque(maxlen=history)
        self._last = (time.monotonic(), cpu_seconds(), 0)  # (time, CPU, pages scanned)

    def record(self, outcome: BatchOutcome, targets: dict[int, Target]) -> int:
        """Book one merge round on its targets; returns the pages it merged or dropped."""
        done = 0
        for pid, res in outcome.results.items():
            t = targets.get(pid)
            if t is None:
                continue
            t.pauses.extend(res.pauses)
            self.pauses.extend(res.pauses)
            if res.pauses:
                t.max_pause = max(t.max_pause, max(res.pauses))
            if res.longest is not None and (
                self.longest is None or res.longest.total > self.longest.total
            ):
                self.longest = res.longest
            t.pages_merged_total += res.pages_merged
            self.target_cpu_s += res.target_cpu_s
            done += res.pages_merged + res.pages_zeroed
            t.pages_refused += res.pages_refused
            self.zero_dropped_total += res.pages_zeroed
            if res.error:
                self.log(f"pid {pid}: {res.error}")
                t.refusals[res.error] += 1
        for rf in outcome.refused:
            tt = targets.get(rf.pid)
            if tt is not None:
                tt.refusals[rf.reason] += 1
        return done

    def truth(
        self, targets: Sequence[Target], dt: float, cow_total: Callable[[int], int | None]
    ) -> list[Target]:
        """pagemap over procksm's mappings and dropped zero runs of every target;
        ``cow_total(pid)``: the observer's count of COW breaks, None if it has none.
        Returns the targets it could not read (gone, perhaps)."""
        failed = []
        for t in targets:
            try:
                sites, cow, pfns, copied, zero_now = _pagemap_truth(t)
                rollup = procfs.read_smaps_rollup(t.pid)
            except (ProcksmError, OSError):
                failed.append(t)
                continue
            t.sharing_sites = sites
            t.copied_addrs = copied
            t.shared_pfns = pfns
            if cow > t.cow_now:
                t.cow_total += cow - t.cow_now
                t.cow_rate = (cow - t.cow_now) / dt if dt > 0 else 0.0
            else:
                t.cow_rate = 0.0
            t.cow_now = cow
            observed = cow_total(t.pid)
            if observed is not None:
                t.cow_total = observed
            t.zero_now = zero_now
            t.rss_bytes = rollup.get("Rss", 0) * 1024
            t.pss_bytes = rollup.get("Pss", 0) * 1024
        return failed

    def snapshot(
        self, targets: Sequence[Target], s: Settings, observer: str, index: IndexCounters
    ) -> Snapshot:
        """The counters now (after :meth:`truth`)."""
        now = time.monotonic()
        t_prev, cpu_prev, scanned_prev = self._last
        cpu = cpu_seconds()
        dt = max(now - t_prev, 1e-6)
        self._last = (now, cpu, self.pages_scanned)
        target_cpu, self._target_cpu_prev = (
            self.target_cpu_s - self._target_cpu_prev,
            self.target_cpu_s,
        )
        allp = np.concatenate([t.shared_pfns for t in targets]) if targets else np.zeros(0)
        pages_shared = int(np.unique(allp).size)
        pages_sharing = int(allp.size) - pages_shared
        pages_zero = sum(t.zero_now for t in targets)
        pauses = np.array(self.pauses) * 1000 if self.pauses else np.zeros(0)
        saved = (pages_sharing + pages_zero) * PAGE_SIZE
        private = self._own_private_bytes()
        cow_rate = sum(t.cow_rate for t in targets)
        self._history.append(HistoryPoint(time.time(), saved, round(cow_rate, 3)))
        return Snapshot(
            time=time.time(),
            run=s.run,
            observer=observer,
            pages_shared=pages_shared,
            pages_sharing=pages_sharing,
            pages_unshared=index.pages_unshared,
            pages_volatile=index.pages_volatile,
            pages_skipped=self.pages_skipped,
            pages_zero=pages_zero,
            full_scans=index.full_scans,
            cow_breaks=sum(t.cow_total for t in targets),
            pages_remerged=self.pages_remerged,
            ranges_held=index.ranges_held,
            zero_pages_dropped=self.zero_dropped_total,
            general_profit_bytes=saved - max(private, index.metadata_bytes),
            private_bytes=private,
            scan_rate_pages_s=round((self.pages_scanned - scanned_prev) / dt, 1),
            cpu_percent=round(100.0 * (cpu - cpu_prev) / dt, 2),
            target_cpu_percent=round(100.0 * target_cpu / dt, 2),
            target_cpu_s=round(self.target_cpu_s, 4),
            rss_bytes=procfs.own_rss_bytes(),
            pause_p50_ms=_ms(np.percentile(pauses, 50)) if pauses.size else 0.0,
            pause_p99_ms=_ms(np.percentile(pauses, 99)) if pauses.size else 0.0,
            pause_max_ms=_ms(pauses.max()) if pauses.size else 0.0,
            pause_longest=self.longest.as_json() if self.longest is not None else None,
            sleep_ms=s.sleep_ms,
            pages_to_scan=s.pages_to_scan,
            targets=tuple(target_snapshot(t) for t in targets),
            history=tuple(self._history),
        )

    def _own_private_bytes(self) -> int:
        """The daemon's private memory and the guards' (issue 15: general_profit did
        not take off procksm's own memory, which cancelled the saving on JVM and numpy
        workers). The guards' pids come from the guard's stats (none started here)."""
        now = time.monotonic()
        if now - self._guards_seen >= GUARD_PIDS_TTL_S:
            self._guards_seen, self._guard_pids = now, []
            with contextlib.suppress(ProcksmError, OSError):
                client = guard.GuardClient()
                if client.running():
                    stats = client.stats()
                    pair = (stats.get("pid"), stats.get("peer"))
                    self._guard_pids = [int(p) for p in pair if isinstance(p, int)]
        total = 0
        for pid in [os.getpid(), *self._guard_pids]:
            with contextlib.suppress(ProcksmError, OSError):
                total += procfs.private_bytes(pid)
        return total

    def seconds_since_snapshot(self) -> float:
        return time.monotonic() - self._last[0]


def target_snapshot(t: Target) -> TargetSnapshot:
    return TargetSnapshot(
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
        mappings=tuple(_part_rows(t) + _merged_rows(t.merged_spans)),
    )


def _part_rows(t: Target) -> list[MappingSnapshot]:
    """The target's eligible mappings not procksm's, one row per name: after a scattered
    merge the heap is thousands of VMAs between procksm's (11,000 rows on four merged
    redis-servers, measured), which a reader can neither use nor afford."""
    p = t.parts
    rows = np.flatnonzero(~p.merged)
    if rows.size == 0:
        return []
    start, end = p.start[rows], p.end[rows]
    zero = zero_pages_in(t.zero_runs, start, end)
    # one row per display name (kinds that differ elsewhere may share one), in the
    # order of their first part
    names = [k.name for k in p.kinds]
    group_names = list(dict.fromkeys(names))
    group_of_kind = np.array([group_names.index(n) for n in names], np.int64).reshape(-1)
    group = group_of_kind[p.kind[rows]]
    groups, first = np.unique(group, return_index=True)
    rss = p.rss_pages[rows]
    out = []
    for g in groups[np.argsort(first)].tolist():
        sel = group == g
        n = int(sel.sum())
        out.append(
            MappingSnapshot(
                group_names[g] if n == 1 else f"{group_names[g]} ×{n}",
                int(start[sel].min()),
                int(end[sel].max()),
                int(rss[sel].sum()),
                0,
                int(zero[sel].sum()),
            )
        )
    return out


def _merged_rows(spans: np.ndarray) -> list[MappingSnapshot]:
    """procksm's mappings of a target as one row (a row per VMA made the snapshot of
    four merged redis-servers 14,000 rows: memory, and nothing a reader can use)."""
    if not len(spans):
        return []
    pages = int((spans[:, 1] - spans[:, 0]).sum()) // PAGE_SIZE
    name = "[procksm]" if len(spans) == 1 else f"[procksm] ×{len(spans)}"
    return [MappingSnapshot(name, int(spans[0, 0]), int(spans[-1, 1]), pages, pages)]


def _pagemap_truth(t: Target) -> tuple[int, int, np.ndarray, np.ndarray, int]:
    """(sharing sites, copied pages, shared PFNs, copied addresses, zero pages still
    dropped) of one target."""
    # procksm's mappings as they are now, not t.merged_spans (as of the target's last
    # full scan): a merged range the target unmapped and filled with fresh memory since
    # would count that memory as copied (tests/test_daemon.py, a range refilled mid-scan)
    vmas = procfs.read_maps_with_path(t.pid, SEGMENT_NAME_PREFIX)
    sites = cow = zero_now = 0
    pfn_list = []
    copied = []
    with procfs.PagemapFile(t.pid) as pm:
        # one pagemap read per cluster of merged VMAs (a scattered layout has thousands
        # of one-page VMAs: a read and numpy calls each cost 100 % of a CPU, measured),
        # then a mask of the pages inside them
        for ent, at in read_spans(pm, [(v.start, v.end) for v in vmas]):
            present = (ent & procfs.PM_PRESENT) != 0
            filep = (ent & procfs.PM_FILE) != 0
            sites += int((present & filep).sum())
            cow += int((present & ~filep).sum())
            pfn_list.append(ent[present & filep] & procfs.PM_PFN_MASK)
            copied.append(at[present & ~filep])
        # dropped zero runs still in anonymous memory (not unmapped, not merged over
        # since): absent or on the zero page is still saved
        runs = []
        with procfs.MapsQuery(t.pid) as maps:
            # one PROCMAP_QUERY per run (~10 us), not a parse of every VMA: a merged-
            # then-unmerged CPython worker has ~3,700 (~17 ms a parse, many_vmas.py)
            for a, k in coalesce(t.zero_runs):
                v = maps.vma_at(a)
                if v is not None and v.is_anonymous and a + k * PAGE_SIZE <= v.end:
                    runs.append((a, a + k * PAGE_SIZE))
        for ent, _at in read_spans(pm, runs):
            present = (ent & procfs.PM_PRESENT) != 0
            zpfn = (ent & procfs.PM_PFN_MASK) == procfs.kernel_zero_pfn()
            zero_now += int((~present | zpfn).sum())
    return (
        sites,
        cow,
        np.concatenate(pfn_list) if pfn_list else np.zeros(0, np.uint64),
        np.concatenate(copied) if copied else np.zeros(0, np.int64),
        zero_now,
    )


def _ms(value: float) -> float:
    return round(float(value), 3)


def cpu_seconds() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def net_loss_warning(saved_bytes: int, private_bytes: int) -> str | None:
    """What to tell the user when, converged, procksm's own private memory (the daemon's
    and the guards') outweighs what it saves: targets with little in common (redis at a
    small size saved 7 MiB against the daemon's ~35 MiB, issue 15). None otherwise."""
    if saved_bytes >= private_bytes:
        return None
    mib = 1 << 20
    return (
        f"procksm costs more memory than it saves here: it saves {saved_bytes / mib:.1f} MiB "
        f"and holds {private_bytes / mib:.1f} MiB itself (net "
        f"{(saved_bytes - private_bytes) / mib:.1f} MiB); run `procksm merge` once instead "
        "(only the ~5 MiB guards stay), or attach more processes that hold the same data"
    )
