"""The merge engine: share identical pages through sealed memfd segments, drop zero
pages, and undo it exactly (docs/design.md §2.3-2.7, §3).

One-shot flow (``procksm merge``):

1. **check** every target (attach diagnostics; one uid unless ``cross_uid``; io_uring/AIO
   users refused unless ``allow_async_io``) — nothing is touched before all pass;
2. **scan** (``scanner.collect``) once, and **index** it (``procksm.index``, the same
   KSM index as ``procksm attach``'s): pages whose hash another page or procksm's
   stable tree (segments already mapped in the targets) has are ready. KSM's volatility
   rule (two looks with the same checksum) is met by the merge itself (step 4 and 5),
   or by a full second scan with ``two_scans``, whose checksums the index compares;
3. **plan** (``plan.plan_merge``) slots and extents within each target's VMA budget;
4. **write** each slot's content (read from its reference page, which must still hash as
   in the scan) into memfd segments and **seal** them before any target can map them;
5. **merge** target by target in stop windows of at most ``batch_pages`` pages: with every
   thread stopped, re-read each extent and compare it byte for byte with its slots
   (pages that changed are skipped, counted volatile), hand over read-only fds,
   ``mmap(MAP_PRIVATE|MAP_FIXED)`` with the VMA's protection, ``MADV_POPULATE_READ``
   (never POPULATE_WRITE: that would copy every page), ``MADV_DONTNEED`` zero runs,
   close the fds, resume.

Its parts: the options and results (procksm.merge.records), a round's slots, written
and sealed (procksm.merge.round_slots), the stable tree's segments adopted (procksm.merge.adopt),
one target's stop windows (procksm.merge.target) and the fd hand-over in them
(procksm.merge.handover). Undoing a merge is procksm.unmerge.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import resource
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from procksm import PAGE_SIZE, guard, procfs
from procksm.analysis import CONTENT_VOLATILE, CONTENT_ZERO, ScanInput
from procksm.attach import PtraceSession
from procksm.attach.diagnose import check_attachable
from procksm.attach.locks import target_locks
from procksm.closing import Closing
from procksm.errors import AccessDenied, ProcksmError, UsageError
from procksm.index import REF_PAGE_BITS, KsmIndex, Look
from procksm.merge.adopt import adopt_segments, join_existing, match_existing
from procksm.merge.handover import FdHandOver
from procksm.merge.records import (
    MergeOptions,
    MergeOutcome,
    MergeResult,
    Refusal,
    TargetResult,
)
from procksm.merge.round_slots import RoundSlots
from procksm.merge.target import TargetMerger
from procksm.plan import (
    EXTENT_UNITS,
    MIN_WINDOW_UNITS,
    MergePlan,
    TargetPlan,
    plan_merge,
    vma_budget,
)
from procksm.scanner import collect
from procksm.slots import SEGMENT_NAME_PREFIX, Segment, SlotStore
from procksm.window_sizer import WindowSizer

ProgressFn = Callable[[str], None]


def merge(
    pids: Sequence[int], opts: MergeOptions | None = None, progress: ProgressFn | None = None
) -> MergeResult:
    """One-shot merge of ``pids`` (procksm's fds are closed at the end; merged pages stay
    merged)."""
    with MergeEngine(pids, opts) as engine:
        return engine.run(progress)


def _cpu_seconds() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


# --------------------------------------------------------------------------------------
# Checks (nothing is touched before all targets pass)
# --------------------------------------------------------------------------------------


def check_targets(pids: Sequence[int], opts: MergeOptions) -> tuple[dict[int, str], list[Refusal]]:
    """Attach diagnostics for every pid, the uid domain, async I/O. Returns names and
    per-process refusals (io_uring/AIO users); raises on anything that stops the run."""
    if len(set(pids)) != len(pids):
        raise UsageError("a PID is given twice")
    names: dict[int, str] = {}
    uids: dict[int, int] = {}
    refused: list[Refusal] = []
    for pid in pids:
        st = check_attachable(pid)
        names[pid] = st.name
        uids[pid] = st.uid
    if not opts.cross_uid and len(set(uids.values())) > 1:
        desc = ", ".join(f"{p} (uid {u})" for p, u in uids.items())
        raise AccessDenied(
            pids[0],
            f"targets run as different users: {desc}; merging across uids lets one infer "
            "another's memory through copy-on-write timing; pass --cross-uid to allow it",
        )
    if not opts.allow_async_io:
        for pid in pids:
            why = procfs.uses_async_io(pid)
            if why:
                refused.append(Refusal(pid, 0, 0, f"{why}; pass --allow-async-io to merge it"))
    if opts.guard:
        for pid in pids:
            why = guard.why_unguardable(pid, set_no_new_privs=opts.set_no_new_privs)
            if why:
                refused.append(Refusal(pid, 0, 0, why))
    elif not opts.allow_zero_after_dontneed:
        # docs/design.md §3.1 without the guard: after MADV_DONTNEED a merged page reads its
        # shared content, not zeros; refuse allocators that rely on zeros.
        for pid in pids:
            why = procfs.relies_on_zero_after_dontneed(pid)
            if why:
                refused.append(
                    Refusal(
                        pid, 0, 0,
                        f"{why}, which assumes memory reads zeros after MADV_DONTNEED; a "
                        "merged page would read its old content; pass --allow-dontneed-reuse "
                        "to merge it anyway",
                    )
                )  # fmt: skip
    return names, refused


def exclusion_refusals(scan: ScanInput) -> list[Refusal]:
    """The scan's excluded VMAs that hold pages, as refusals; procksm's own segment
    mappings excepted."""
    refused: list[Refusal] = []
    for e in scan.exclusions:
        if e.rss_pages and not e.name.startswith(SEGMENT_NAME_PREFIX):
            pid = scan.processes[e.proc].pid
            refused.append(Refusal(pid, e.start, e.end, e.reason))
    return refused


# --------------------------------------------------------------------------------------
# Scan with the volatility rule
# --------------------------------------------------------------------------------------


def scan_refs(scan: ScanInput) -> np.ndarray:
    """The index's ref of every row: (process index << REF_PAGE_BITS) | page number."""
    mp = scan.mapping_of(np.arange(len(scan.pages)))
    starts = np.array([m.start for m in scan.mappings] or [0], dtype=np.int64)
    procs = np.array([m.proc for m in scan.mappings] or [0], dtype=np.int64)
    page = starts[mp] // PAGE_SIZE + scan.pages.off.astype(np.int64)
    refs: np.ndarray = (procs[mp] << REF_PAGE_BITS) | page
    return refs


def look_at_scan(index: KsmIndex, scan: ScanInput, *, remember: bool) -> Look:
    """One full scan of the index (the one-shot merge's scan is one batch). Without
    ``remember`` (one scan only) its first look counts as stable, and nothing is kept:
    the second look is the byte comparison under stop."""
    index.start_full_scan()
    content = scan.pages.content
    return index.look(
        scan_refs(scan) if remember else None,
        scan.pages.hash,
        readable=content != CONTENT_VOLATILE,
        zero=content == CONTENT_ZERO,
        first_look_stable=not remember,
    )


def mergeable_rows(scan: ScanInput, look: Look) -> np.ndarray:
    """Rows the plan may use: the pages the index found ready, and checksum-stable zero
    pages. Their content ids are the scan's hash groups (scanner: the first row with the
    hash, what procksm.index.group_by_hash gives), computed bucket by bucket there."""
    zero = look.stable & (scan.pages.content == CONTENT_ZERO)
    mergeable: np.ndarray = look.ready | zero
    return mergeable


# --------------------------------------------------------------------------------------
# The engine
# --------------------------------------------------------------------------------------


class MapsCache:
    """Each target's /proc/PID/maps (procfs.MapsSnapshot), read when first asked and
    kept until forgotten or found stale. A merge round reads the targets it merges
    afresh and forgets them after (it changed them); the others' snapshots serve only
    the stable tree's adoption, which checks the file it opens (merge.adopt), so the
    daemon keeps one cache across its rounds and clears it every full scan."""

    def __init__(self) -> None:
        self._of: dict[int, procfs.MapsSnapshot] = {}

    def of(self, pid: int) -> procfs.MapsSnapshot:
        snap = self._of.get(pid)
        if snap is None or snap.stale:
            snap = self._of[pid] = procfs.MapsSnapshot(pid)
        return snap

    def forget(self, pids: Iterable[int]) -> None:
        for pid in pids:
            self._of.pop(pid, None)

    def clear(self) -> None:
        self._of.clear()


class MergeEngine(Closing):
    """The one-shot merge (:meth:`run`: steps 1-5) and the merge rounds it and
    ``procksm attach`` are made of (:meth:`merge_scanned`: steps 3-5)."""

    def __init__(self, pids: Sequence[int], opts: MergeOptions | None = None) -> None:
        self.pids = list(pids)
        self.opts = opts or MergeOptions()
        self.store = SlotStore(segment_pages=self.opts.segment_pages)
        self.handover = FdHandOver()  # procksm's read-only fds, handed to targets
        # inode -> page hashes of the segments' data pages (so also their size: finding
        # the data's end with SEEK_HOLE walks the file, ~75 us per mapping and round,
        # measured); a caller may share one dict between engines (procksm attach: one
        # engine per batch, which drops the inodes no target maps any more).
        self.segment_hashes: dict[int, np.ndarray] = {}
        self.slots = self._new_round_slots()  # the round's slots; its counters stay after it
        self._guard_client: guard.GuardClient | None = None
        # each target's window sizes, learnt from its own windows; the daemon's engine
        # keeps them across rounds (forget_sizers when a target goes)
        self.window_sizers: dict[int, WindowSizer] = {}
        # The daemon keeps each target's session (and so its scratch area) from round to
        # round: a new one per round cost each round two stops of ~1-2 ms (the scratch
        # area mapped, then unmapped), the daemon's p99 on scattered layouts. end_sessions.
        self.keep_sessions = False
        self._sessions: dict[int, PtraceSession] = {}

    def close(self) -> None:
        # procksm's fds only: targets keep their mappings (the kernel frees a segment
        # when its last mapping goes; docs/design.md §2.3, never a hole punched under a mapping).
        self.handover.close()
        self.store.close()

    def run(self, progress: ProgressFn | None = None) -> MergeResult:
        # Diagnose before locking: a procksm that may not trace a target cannot create
        # its lock file in root's /run/procksm either, and would fail with a raw EACCES
        # instead of saying who owns the target.
        check_targets(self.pids, self.opts)
        with target_locks(self.pids), _not_an_oom_victim():
            return self._run(progress)

    def _run(self, progress: ProgressFn | None) -> MergeResult:
        t0, cpu0 = time.perf_counter(), _cpu_seconds()
        say = progress or (lambda _msg: None)
        names, refused = check_targets(self.pids, self.opts)  # again, under the locks
        refused_pids = {r.pid for r in refused}
        pids = [p for p in self.pids if p not in refused_pids]
        results = {p: TargetResult(p, names[p]) for p in self.pids}
        scans = 0
        if pids:
            self.start_guard()
            say("scanning")
            # Hash groups are enough here: every page is compared byte for byte with its
            # slot under stop before it is replaced (a hash collision is then skipped).
            sel = dataclasses.replace(self.opts.selection, verify=False)
            scan = collect(pids, sel)
            scans = 1
            # The stable tree: segments an earlier procksm mapped into these targets.
            existing = self.stable_segments(pids)
            index = KsmIndex()
            for i, (_seg, hashes) in enumerate(existing):
                index.stable.add(i, hashes)
            # KSM's volatility rule asks for two looks at a page with the same checksum.
            # By default the second look is the merge itself: a slot's content must still
            # hash as its reference did in the scan, and every page must equal its slot
            # byte for byte under stop, so a merged page had the same content at scan
            # time and at merge time. --two-scans adds a full second scan first.
            if not self.opts.two_scans:
                look = look_at_scan(index, scan, remember=False)
            else:
                look_at_scan(index, scan, remember=True)
                say("scanning again (pages must not change between scans)")
                scan = collect(pids, sel)
                scans = 2
                look = look_at_scan(index, scan, remember=True)
                for i, p in enumerate(scan.processes):
                    rows = self._rows_of_proc(scan, i)
                    results[p.pid].pages_volatile += int(look.volatile[rows].sum())
            mergeable = mergeable_rows(scan, look)
            del look  # its masks are not needed while planning (memory per page is a goal)
            out = self.merge_scanned(scan, mergeable, say, existing=existing)
            refused += out.refused
            for pid, res in out.results.items():
                res.pages_volatile += results[pid].pages_volatile
                results[pid] = res
        slots_mapped = len(self.slots.mapped)
        return MergeResult(
            targets=list(results.values()),
            refused=refused,
            slots=self.slots.new,
            slots_mapped=slots_mapped,
            segments=len(self.slots.segments) - self.slots.adopted,
            scans=scans,
            elapsed_s=time.perf_counter() - t0,
            cpu_s=_cpu_seconds() - cpu0,
            cgroup=procfs.memory_cgroup(),
        )

    def merge_scanned(
        self,
        scan: ScanInput,
        mergeable: np.ndarray,
        say: ProgressFn | None = None,
        *,
        adopt_from: Sequence[int] | None = None,
        existing: list[tuple[Segment, np.ndarray]] | None = None,
        maps: MapsCache | None = None,
    ) -> MergeOutcome:
        """One round of steps 3-5 for pages already scanned (rows where ``mergeable``;
        content ids group them): plan, write and seal slots, merge every target (each
        page compared with its slot byte for byte under stop). The engine may be
        long-lived: ``procksm attach`` calls it for every batch its scan loop found
        ready, and procksm's fds of a round's segments are closed when it ends (the
        targets keep their mappings). ``existing``: the stable tree's segments, adopted
        already; else those mapped in ``adopt_from`` (default: the scanned processes).
        ``maps``: the targets' maps kept across rounds (a new cache by default)."""
        maps = maps if maps is not None else MapsCache()
        try:
            return self._merge_round(
                scan, mergeable, say or (lambda _m: None), adopt_from, existing, maps
            )
        finally:
            # the round changed the maps of the targets it merged
            maps.forget(p.pid for p in scan.processes)
            self.release()

    def release(self) -> None:
        """Close procksm's fds of this round's segments (targets keep their mappings) and
        start an empty slot store for the next round; the round's counters stay."""
        self.close()
        self.store = SlotStore(segment_pages=self.opts.segment_pages)

    def _merge_round(
        self,
        scan: ScanInput,
        mergeable: np.ndarray,
        say: ProgressFn,
        adopt_from: Sequence[int] | None,
        existing: list[tuple[Segment, np.ndarray]] | None,
        maps: MapsCache,
    ) -> MergeOutcome:
        self.slots = self._new_round_slots()
        pids = [p.pid for p in scan.processes]
        results = {p.pid: TargetResult(p.pid, p.name) for p in scan.processes}
        refused = exclusion_refusals(scan)
        # Each target's maps, read once for the round's questions asked outside its
        # stop windows (its segments, its VMA count, whether it is merged already):
        # ~17 ms a parse on a target with 3,700 VMAs, asked several times per round
        # (benchmarks/many_vmas.py). The round's own targets are read afresh; whatever
        # decides a replacement is read again under stop (procksm.merge.target).
        maps.forget(pids)
        # The stable tree across runs: segments an earlier procksm mapped into these
        # targets. Pages equal to their content map them again (a restarted worker
        # joins the merge) instead of getting new slots.
        if existing is None:
            existing = self._adopt(adopt_from if adopt_from is not None else pids, maps)
        plan, joins, budgets = self._plan(scan, mergeable, pids, existing, maps)
        say(f"writing {plan.nslots:,} slots")
        self.slots.write(scan, plan)
        join_existing(plan, joins, self.slots.add_adopted(existing), budgets)
        for tp in plan.targets:
            res = results[tp.pid]
            if tp.pages_refused_budget:
                res.pages_refused += tp.pages_refused_budget
                refused.append(
                    Refusal(
                        tp.pid,
                        0,
                        0,
                        f"vma-budget: {tp.extents_refused_budget} extents "
                        f"({tp.pages_refused_budget} pages) not merged",
                        partial=True,
                    )
                )
            say(f"merging pid {tp.pid}: {tp.pages:,} pages, {tp.zero_pages:,} zero pages")
        self._merge_targets(plan, results, refused, maps)
        return MergeOutcome(results, refused)

    def _plan(
        self,
        scan: ScanInput,
        mergeable: np.ndarray,
        pids: list[int],
        existing: list[tuple[Segment, np.ndarray]],
        maps: MapsCache,
    ) -> tuple[MergePlan, dict[int, list[tuple[int, int, int, int]]], dict[int, int]]:
        """The round's plan, the runs that join adopted segments (their rows taken out
        of ``mergeable`` first), and each target's VMA budget."""
        # With the guard a merged range never grows (procksm.guard unmerges it before an
        # mremap grow), so neither new pieces nor joins need a hole right after them.
        tail_only = not self.opts.guard
        joins = match_existing(scan, mergeable, existing, tail_only) if existing else {}
        budgets = {
            pid: vma_budget(
                procfs.max_map_count(), maps.of(pid).vma_count, self.opts.vma_budget_cap
            )
            for pid in pids
        }
        plan = plan_merge(
            scan,
            mergeable,
            segment_pages=self.opts.segment_pages,
            budgets=budgets,
            zero_pages=self.opts.zero_pages,
            cut_at_extent_ends=tail_only,
        )
        return plan, joins, budgets

    def _merge_targets(
        self,
        plan: MergePlan,
        results: dict[int, TargetResult],
        refused: list[Refusal],
        maps: MapsCache,
    ) -> None:
        # Targets are merged in parallel, one thread each (ptrace is per tracer
        # thread; ctypes releases the GIL in ptrace/wait/process_vm_readv), so the
        # kernel work of one target's mmap overlaps another's on the other CPU.
        workers = max(1, min(len(plan.targets), self.opts.parallel or os.cpu_count() or 1))
        if workers == 1:
            # In the calling thread: its stop windows defer SIGINT/SIGTERM, and no
            # other procksm thread is left to take them mid-window.
            for tp in plan.targets:
                self._merge_target_safely(tp, results[tp.pid], refused, maps)
        else:
            with ThreadPoolExecutor(max_workers=workers) as pool:
                futures = [
                    pool.submit(self._merge_target_safely, tp, results[tp.pid], refused, maps)
                    for tp in plan.targets
                ]
                for f in futures:
                    f.result()

    # --- helpers ----------------------------------------------------------------------

    @staticmethod
    def _rows_of_proc(scan: ScanInput, proc: int) -> np.ndarray:
        ms = [i for i, m in enumerate(scan.mappings) if m.proc == proc]
        if not ms:
            return np.zeros(0, np.int64)
        return np.concatenate(
            [np.arange(scan.mapping_rows[i], scan.mapping_rows[i + 1]) for i in ms]
        )

    def stable_segments(
        self, pids: Sequence[int], maps: MapsCache | None = None
    ) -> list[tuple[Segment, np.ndarray]]:
        """The stable tree's segments: procksm's segments mapped in ``pids``, adopted
        into this round's slot store, with their page hashes (cached in
        :attr:`segment_hashes`)."""
        return self._adopt(pids, maps if maps is not None else MapsCache())

    def _adopt(self, pids: Sequence[int], maps: MapsCache) -> list[tuple[Segment, np.ndarray]]:
        return adopt_segments(self.store, [maps.of(pid) for pid in pids], self.segment_hashes)

    def _new_round_slots(self) -> RoundSlots:
        return RoundSlots(self.store, self.segment_hashes, self.opts.tail_gap_pages)

    def _merge_target_safely(
        self, tp: TargetPlan, res: TargetResult, refused: list[Refusal], maps: MapsCache
    ) -> None:
        merged_before = bool(maps.of(tp.pid).with_path(SEGMENT_NAME_PREFIX, one_per_inode=True))
        merger = TargetMerger(
            tp, self.opts, self.slots, self.handover, self._guard, res, refused, merged_before,
            self.window_sizer(tp.pid), lambda: self._session(tp.pid),
        )  # fmt: skip
        merger.merge_safely()

    def _session(self, pid: int) -> contextlib.AbstractContextManager[PtraceSession]:
        return self._kept_session(pid) if self.keep_sessions else PtraceSession(pid)

    @contextlib.contextmanager
    def _kept_session(self, pid: int) -> Iterator[PtraceSession]:
        """The target's session from the rounds before (renewed), or a new one kept for
        the rounds after; ended when a round fails in it or sees an exec."""
        sess = self._sessions.get(pid)
        if sess is None:
            sess = PtraceSession(pid).__enter__()
            self._sessions[pid] = sess
        else:
            try:
                sess.renew()
            except ProcksmError:
                self.end_sessions([pid])
                raise
        kept = False
        try:
            yield sess
            kept = not sess.exec_seen
        finally:
            if not kept:
                self.end_sessions([pid])

    def end_sessions(self, pids: Iterable[int] | None = None) -> None:
        """End the kept sessions of ``pids`` (all when None): their scratch areas are
        unmapped from the targets that still live."""
        for pid in list(self._sessions) if pids is None else list(pids):
            sess = self._sessions.pop(pid, None)
            if sess is not None:
                with contextlib.suppress(ProcksmError, OSError):
                    sess.__exit__(None, None, None)

    def window_sizer(self, pid: int) -> WindowSizer:
        """The target's window sizer, new when the budget or the cap changed. It sizes
        windows in units of cost (procksm.plan.window_units): at most one extent of
        ``batch_pages``, at least one of 16 pages."""
        budget_s = self.opts.pause_budget_ms / 1000.0
        cap = self.opts.batch_pages + EXTENT_UNITS
        sizer = self.window_sizers.get(pid)
        if sizer is None or (sizer.budget_s, sizer.max_pages) != (budget_s, cap):
            sizer = WindowSizer(budget_s, cap, min_pages=MIN_WINDOW_UNITS)
            self.window_sizers[pid] = sizer
        return sizer

    def forget_sizers(self, pids: Iterable[int]) -> None:
        for pid in pids:
            self.window_sizers.pop(pid, None)

    def start_guard(self) -> None:
        """Start the madvise guard pair now, without waiting for it, when merges will
        need it: it then starts while procksm scans (or the daemon starts), not in the
        first target's stop windows (procksm.guard.GuardClient.start)."""
        if self.opts.guard:
            self._guard().start()

    def _guard(self) -> guard.GuardClient:
        """The guard's client, one for the engine's life (started on first use)."""
        client = self._guard_client = self._guard_client or guard.GuardClient()
        return client


@contextlib.contextmanager
def _not_an_oom_victim() -> Iterator[None]:
    """oom_score_adj -1000 while procksm merges (root only; restored after).

    If procksm is killed while a target thread runs an injected system call, that thread
    resumes with the injected registers and the target crashes (measured: 2 of 40 random
    SIGKILLs during a merge). SIGKILL cannot be blocked, but the kernel's OOM killer --
    the likeliest killer of a tool whose memory grows with the targets' -- can be told
    to pick something else.
    """
    before = procfs.swap_own_oom_score_adj("-1000")
    if before is None:
        yield
        return
    try:
        yield
    finally:
        procfs.swap_own_oom_score_adj(before)
