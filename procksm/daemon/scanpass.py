"""One pass of the scan loop: a batch of windows, each read, looked up in the index and
merged where ready (KSM's ksmd, in user space).

* **incremental**: the cursor walks target after target, mapping after mapping; a window
  is at most ``pages_to_scan`` pages of one mapping (whole granules from the mapping's
  start, so identical layouts in different processes give identical windows). When the
  cursor has passed every target a **full scan** is counted and the next one starts;
* **the index** (procksm.index): checksum stability, the stable tree (procksm's
  segments) and the unstable tree (this full scan);
* **smart scan** (procksm.daemon.smartscan): pages that stay unique are skipped, unread;
* **merging**: at most ``max_pages_to_merge`` pages and _MAX_RUNS_PER_BATCH runs per
  window go to the merger, which compares every page with its slot under stop.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from procksm import PAGE_SIZE
from procksm.analysis import CONTENT_VOLATILE, CONTENT_ZERO, PageTable
from procksm.backoff import RemergeBackoff
from procksm.daemon.accounting import Accounting
from procksm.daemon.merger import MergeBatch, Merger
from procksm.daemon.registry import (
    LogFn,
    Registry,
    Target,
    alive,
    coalesce,
    in_runs,
    mm_identity,
)
from procksm.daemon.scheduler import BATCH_MAX_S, Pacer
from procksm.daemon.settings import DaemonOptions, Settings
from procksm.daemon.smartscan import PageAges
from procksm.daemon.window import WindowReader, next_window, unskipped_ranges
from procksm.errors import NoSuchProcess, ProcksmError
from procksm.index import KsmIndex, Look, Partners, page_refs, target_refs
from procksm.runs import mask_runs

# runs of adjacent pages merged per batch at most (each costs an injected mmap or madvise
# per target, ~50-150 us)
_MAX_RUNS_PER_BATCH = 512


@dataclass(slots=True)
class Round:
    """What one batch (or one window) did."""

    scanned: int = 0  # pages read
    skipped: int = 0  # pages smart scan skipped
    covered: int = 0  # pages of address space the window spanned
    end_of_scan: bool = False


class ScanPass:
    """The scan's state (index, ages, backoff) and its batches over the registry."""

    def __init__(
        self,
        registry: Registry,
        opts: DaemonOptions,
        merger: Merger,
        accounting: Accounting,
        pacer: Pacer,
        log: LogFn,
        index: KsmIndex,
        drop: Callable[[Target, str], None],
        after_full_scan: Callable[[], None],
    ) -> None:
        self.registry = registry
        self.opts = opts
        self.merger = merger
        self.accounting = accounting
        self.pacer = pacer
        self.log = log
        # the daemon's: a target that is gone leaves every part; a full scan ended
        self.drop = drop
        self.after_full_scan = after_full_scan
        self.index = index
        self.ages = PageAges()
        self.backoff = RemergeBackoff(opts.remerge_soon_s)
        self.reader = WindowReader()
        self.full_scans = 0
        self.stable_dirty = True  # segments another procksm (or a fork) brought in
        self.merged_pids: set[int] = set()  # targets whose merged ranges changed

    def forget(self, t: Target) -> None:
        """Forget what the scan learned of ``t``'s pages (checksums, trees, ages)."""
        lo, hi = target_refs(t.index)
        self.index.forget(lo, hi)
        self.ages.forget_target(t.index)
        self.backoff.forget(lo, hi)
        self.merger.forget([t.pid])

    def clear(self) -> None:
        """Everything starts over, as after the kernel's run=2."""
        self.index.clear()
        self.merger.forget(list(self.registry.targets))
        self.ages = PageAges()
        self.backoff.clear()
        self.registry.cursor = (0, 0, 0)

    def batch(self, s: Settings, stopping: threading.Event) -> Round:
        """Windows until ``pages_to_scan`` pages of address space are covered (a window
        ends at a mapping's end, so small mappings share a batch), the full scan ends,
        or the batch has run for BATCH_MAX_S (or ``stopping`` is set)."""
        total = Round()
        left = s.pages_to_scan
        t0 = time.monotonic()
        while left > 0 and not stopping.is_set():
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
            if r.end_of_scan or time.monotonic() - t0 > BATCH_MAX_S:
                break
        return total

    def step(self, s: Settings) -> Round | None:
        """Scan one window of one target and merge what it found ready."""
        reg = self.registry
        if reg.cursor[0] >= len(reg.order):
            self.end_full_scan()
            if not reg.order:
                return None
        pos, pi, addr = reg.cursor
        t = reg.targets[reg.order[pos]]
        try:
            return self._step(t, pos, pi, addr, s)
        except NoSuchProcess:
            self.drop(t, "exited")
        except ProcksmError as e:
            # one target's trouble (e.g. it went away between checks) skips its window
            self.log(f"pid {t.pid}: {e.message}")
            if not alive(t.pid):
                self.drop(t, "exited")
            else:
                reg.cursor = (pos + 1, 0, 0)
        return None

    def _step(self, t: Target, pos: int, pi: int, addr: int, s: Settings) -> Round:
        reg = self.registry
        if pi == 0 and addr == 0:
            if mm_identity(t.pid) != t.mm_id:
                self.renew(t)
            t.refresh_parts()
        window = next_window(t.parts.start, t.parts.end, pi, addr, s.pages_to_scan)
        if window is None:
            reg.cursor = (pos + 1, 0, 0)
            return Round(end_of_scan=pos + 1 >= len(reg.order))
        pi2, start, end = window
        r = self.scan_window(t, bool(t.parts.merged[pi2]), start, end, s)
        r.covered = (end - start) // PAGE_SIZE
        reg.cursor = (pos, pi2 + 1, 0) if end >= int(t.parts.end[pi2]) else (pos, pi2, end)
        return r

    def renew(self, t: Target) -> None:
        """exec: the pid stays, its memory is new. Forget everything known of it."""
        self.forget(t)
        self.registry.renew(t, "exec: a new program, its state starts over")
        self.ages = PageAges()  # a new program's pages may pair with old unique ones

    def end_full_scan(self) -> None:
        reg = self.registry
        if reg.order:
            self.full_scans += 1
        self.pacer.end_full_scan(self.accounting.pages_scanned)
        self.index.start_full_scan()
        reg.cursor = (0, 0, 0)
        self.stable_dirty = True
        self.after_full_scan()

    def scan_window(self, t: Target, merged: bool, start: int, end: int, s: Settings) -> Round:
        """Read the window's pages that smart scan does not skip, look them up, merge.
        ``merged``: the window lies in one of procksm's segment mappings."""
        r = Round()
        skip = self.ages.take_skips(t.index, start, end)  # skipped pages are not read
        r.skipped = int(skip.sum())
        self.accounting.pages_skipped += r.skipped
        ranges = unskipped_ranges(start, skip)
        if not ranges:
            return r
        tab, addr = self.reader.read(t.pid, ranges, copied_only=merged)
        r.scanned = len(tab)
        self.accounting.pages_scanned += r.scanned
        if r.scanned:
            self._look_and_merge(t, merged, tab, addr, s)
        return r

    def _look_and_merge(
        self, t: Target, merged_part: bool, tab: PageTable, addr: np.ndarray, s: Settings
    ) -> None:
        n = len(tab)
        refs = page_refs(t.index, addr // PAGE_SIZE)
        readable = tab.content != CONTENT_VOLATILE  # vanished while read
        held = np.zeros(n, bool)
        if merged_part and self.opts.remerge_backoff:
            # Every page read here was copied since its merge. The observer reports
            # breaks as they happen; this catches the ones it does not watch (a target
            # with more merged ranges than the observer takes, lost events). Ranges that
            # broke soon after their last merge wait (procksm.backoff); they stay out of
            # the unstable tree too, or a partner would merge them
            held = self._learn_and_hold(refs, readable)
        zero_content = tab.content == CONTENT_ZERO
        if self.stable_dirty:
            self.stable_dirty = False
            self.merger.refresh_stable(list(self.registry.order))
        look = self.index.look(
            refs,
            tab.hash,
            readable=readable,
            zero=zero_content,
            held=held,
            first_look_stable=s.stable_scans == 0,
        )
        # In a segment mapping MADV_DONTNEED brings back the segment's bytes, not zeros:
        # a copied page that is all zeros there stays as it is (merge_target._verify_zero
        # refuses it as well)
        zero = np.zeros(n, bool) if merged_part else look.stable & zero_content
        if zero.any() and t.zero_runs and self.opts.remerge_backoff:
            # A zero page procksm dropped that is back (present, zeros again: calloc's
            # memset on reused memory) broke its "merge" like a copy-on-write: the same
            # backoff holds its range (measured on redis: 680 pages dropped again and
            # again in 20 s, 352 stop windows for them)
            back = zero & in_runs(addr, t.zero_runs)
            if back.any():
                zero_held = zero & self._learn_and_hold(refs, back)
                zero &= ~zero_held
                held |= zero_held
        cut = _over_cap(look.ready | zero, addr, s.max_pages_to_merge)
        ready = look.ready & ~cut
        zero &= ~cut
        merged = np.zeros(n, bool)
        partners = Partners.none()
        partners_merged = np.zeros(0, bool)
        if ready.any() or zero.any():
            partners = self.index.partners(tab.hash[ready])
            merged, partners_merged = self._merge(t, tab, addr, refs, ready, zero, look, partners)
        # not merged and checksum-stable: into the unstable tree for later partners;
        # partners that merged leave it
        self.index.settle(look, refs, tab.hash, tab.pfn, merged, partners, partners_merged)
        # Held pages do not age: smart scan would skip them for 1, 2, 4... scans after
        # the hold, out of step with their partners in other targets (measured: two
        # copies held one scan apart were then never read in the same full scan)
        aged = readable & ~held
        self.ages.update(refs[aged], merged[aged], ~look.stable[aged])

    def _learn_and_hold(self, refs: np.ndarray, undone: np.ndarray) -> np.ndarray:
        """Rows ``undone`` lost their merge since it was made (copied, or a dropped zero
        page back): the backoff learns it. Returns which of ``refs`` are held back now."""
        self.backoff.broke_many(refs[undone], time.monotonic(), self.full_scans)
        self.pacer.undone(int(undone.sum()))
        return self.backoff.held(refs, self.full_scans)

    def _merge(
        self,
        t: Target,
        tab: PageTable,
        addr: np.ndarray,
        refs: np.ndarray,
        ready: np.ndarray,
        zero: np.ndarray,
        look: Look,
        partners: Partners,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Merge the window's ready and zero pages with their unstable partners; returns
        which window rows and which partners are merged now (pagemap says so)."""
        sel = ready | zero
        batch = MergeBatch(
            refs=np.concatenate([refs[sel], partners.ref]),
            hashes=np.concatenate([tab.hash[sel], partners.hash]),
            pfns=np.concatenate([tab.pfn[sel].astype(np.uint64), partners.pfn]),
            zero=np.concatenate([zero[sel], np.zeros(len(partners), bool)]),
            joins=bool(look.in_stable.any()),
        )
        reg = self.registry
        out = self.merger.merge(batch, reg.targets, reg.order)
        self.pacer.merged(self.accounting.record(out, reg.targets))
        # the observer learns the new merged ranges at its next poll
        self.merged_pids.update(out.results)
        merged_refs = batch.refs[out.merged]
        if self.opts.remerge_backoff:
            self.backoff.merged(merged_refs, time.monotonic())
        # t.parts are as scanned: a merged row in a segment part was a copied page
        self.accounting.pages_remerged += int(self._in_segment_parts(merged_refs).sum())
        n_sel = int(sel.sum())
        window_merged = np.zeros(len(tab), bool)
        window_merged[np.flatnonzero(sel)] = out.merged[:n_sel]
        # zero rows dropped: remember them for the pages_zero truth
        z_rows = np.flatnonzero(zero)
        for a, k in mask_runs(window_merged[z_rows]):
            t.zero_runs.append((int(addr[z_rows[a]]), k))
        if len(t.zero_runs) > 64:
            t.zero_runs = coalesce(t.zero_runs)
        return window_merged, out.merged[n_sel:]

    def _in_segment_parts(self, refs: np.ndarray) -> np.ndarray:
        """Which of ``refs`` lie in a scanned part that is a procksm segment mapping."""
        out = np.zeros(refs.size, bool)
        for t in self.registry.targets.values():
            lo, hi = target_refs(t.index)
            sel = np.flatnonzero((refs >= lo) & (refs < hi))
            if sel.size == 0 or not t.parts.merged.any():
                continue
            pi = t.parts.indices(((refs[sel] - lo) * PAGE_SIZE).astype(np.int64))
            ours = np.append(t.parts.merged, False)  # [-1]: no part
            out[sel] = ours[pi]
        return out


def _over_cap(wanted: np.ndarray, addr: np.ndarray, max_pages: int) -> np.ndarray:
    """The rows of ``wanted`` beyond ``max_pages`` pages and _MAX_RUNS_PER_BATCH runs of
    adjacent pages, in address order. A run is one mmap (or madvise) in
    each target, so scattered duplicates (every other page) would otherwise make one
    batch a minute of merging, with the CPU cap and the counters waiting for its end
    (measured). The rest waits, in the unstable tree, for a later batch or the next full
    scan."""
    rows = np.flatnonzero(wanted)
    keep = rows.size
    if rows.size:
        run_id = np.cumsum(np.r_[0, np.diff(addr[rows]) != PAGE_SIZE])
        keep = int(np.searchsorted(run_id, _MAX_RUNS_PER_BATCH))
    keep = min(keep, max_pages)
    if rows.size <= keep:
        return np.zeros(wanted.size, bool)
    cut = np.zeros(wanted.size, bool)
    cut[rows[keep:]] = True
    return cut
