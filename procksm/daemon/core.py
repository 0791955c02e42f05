"""The daemon behind ``procksm attach``: KSM's ksmd, in user space.

It puts the parts together and runs the loop: the registry (targets, registrations,
lifecycle), the scan pass (windows, the index, smart scan), the merger (one long-lived
merge engine), the pacer (sleep, CPU cap, idle back-off), the watcher (the COW observer)
and the accounting (counters, snapshots). The control socket (procksm.control) talks to
it through :meth:`Daemon.handle`.

``run``: 0 stop (merged pages stay merged), 1 run, 2 unmerge everything and stop.
"""

from __future__ import annotations

import ctypes
import dataclasses
import threading
import time
from collections.abc import Callable, Sequence

from procksm import PAGE_SIZE, control, coredump
from procksm.daemon.accounting import Accounting, IndexCounters, net_loss_warning
from procksm.daemon.merger import Merger
from procksm.daemon.registry import LogFn, Registration, Registry, Target, alive, parse_region
from procksm.daemon.requests import RequestQueue
from procksm.daemon.scanpass import Round, ScanPass
from procksm.daemon.scheduler import Pacer
from procksm.daemon.settings import DaemonOptions, Settings, parse_settings
from procksm.daemon.smartscan import PageAges
from procksm.daemon.watch import Watcher, ends_idle
from procksm.errors import NoSuchProcess, ProcksmError, UsageError
from procksm.index import KsmIndex, page_ref
from procksm.observe import Lifecycle
from procksm.snapshot import Snapshot
from procksm.unmerge import merged_ranges, unmerge_pieces


class Daemon:
    """The scan loop and its parts. Thread-safety: the loop runs in one thread; the
    control socket calls :meth:`apply_settings` (under ``lock``), :meth:`submit` (queued
    to the loop) and :meth:`snapshot` (an immutable record)."""

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
        self.on_publish: Callable[[Snapshot], None] | None = None
        self._initial = list(pids)
        self._requests = RequestQueue(self.wake)
        # the parts log through self.log, which the live view replaces while it runs
        say: LogFn = lambda m: self.log(m)  # noqa: E731
        self.registry = Registry(self.opts, say)
        self.pacer = Pacer()
        self.accounting = Accounting(self.opts.history, say)
        self.watcher = Watcher(self.opts, say)
        index = KsmIndex()
        self.merger = Merger(self.opts, index.stable, say)
        self.scan = ScanPass(
            self.registry, self.opts, self.merger, self.accounting, self.pacer, say,
            index, drop=self._drop, after_full_scan=self._after_full_scan,
        )  # fmt: skip
        self._snapshot: Snapshot | None = None
        self._snapshot_cost = 0.0  # CPU seconds the last snapshot took
        self._net_loss_said = False  # the net-loss warning, said once while it holds

    @property
    def targets(self) -> dict[int, Target]:
        return self.registry.targets

    @property
    def ages(self) -> PageAges:
        return self.scan.ages

    @property
    def exit_events(self) -> list[str]:
        return self.registry.events

    # --- lifecycle ----------------------------------------------------------------------

    def __enter__(self) -> Daemon:
        try:
            self.watcher.start()
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
        self.watcher.close()
        self.merger.close()

    def add_target(self, pid: int, parent: int | None = None) -> Target:
        self.pacer.wake()
        t = self.registry.add(pid, parent)
        if self.scan.full_scans:
            # New memory may pair with pages that smart scan skips for having stayed
            # unique so far: every page gets looked at again (one more full read).
            self.scan.ages = PageAges()
        return t

    def _drop(self, t: Target, why: str) -> None:
        self.scan.forget(t)
        self.registry.drop(t, why)
        self.watcher.forget(t.pid)

    # --- control (procksm.control parses the requests) ----------------------------------

    def handle(self, line: str) -> str:
        """One control-socket request; ProcksmError -> ``error: ...`` (the server's)."""
        return control.handle_request(self, line)

    def set(self, assignments: Sequence[str]) -> str:
        return self.apply_settings(parse_settings(assignments))

    def apply_settings(self, values: dict[str, float]) -> str:
        self.pacer.wake()
        with self.lock:
            for k, v in values.items():
                setattr(self.settings, k, int(v) if k != "cpu_limit" else float(v))
        self.wake.set()
        s = self.settings
        return " ".join(f"{k}={getattr(s, k)}" for k in values)

    def submit(self, fn: Callable[[], str], timeout: float = 30.0) -> str:
        """Run ``fn`` in the scan loop's thread between batches; its result or error."""
        self.pacer.wake()  # registered ranges, unmerges: there may be work again
        return self._requests.submit(fn, timeout)

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

    def unmerge_pid(self, pid: int) -> str:
        return self.submit(lambda: self._unmerge_one(pid), 300)

    # --- the loop -----------------------------------------------------------------------

    def run_forever(self) -> None:
        return_freed_heap()  # what loading the observer's program freed
        while not self.stopping.is_set():
            self._requests.run()
            with self.lock:
                s = dataclasses.replace(self.settings)
            if s.run == 2:
                self.unmerge_all()
                with self.lock:
                    self.settings.run = 0
                continue
            slept_for = s.sleep_ms / 1000.0
            cpu0, t0 = time.thread_time(), time.monotonic()
            r = self.batch(s) if s.run == 1 and self.targets else None
            # the observer and the counters are procksm's CPU too: the cap counts them
            self._observe()
            self.maybe_publish()
            if r is not None:
                cpu, wall = time.thread_time() - cpu0, time.monotonic() - t0
                slept_for, pages = self.pacer.after_batch(s, r.scanned, r.skipped, cpu, wall)
                if pages is not None:
                    with self.lock:
                        self.settings.pages_to_scan = pages
            self._sleep(slept_for if s.run == 1 and self.targets else 0.2)
        self.maybe_publish(force=True)

    def batch(self, s: Settings) -> Round:
        """One batch of the scan (procksm.daemon.scanpass)."""
        r = self.scan.batch(s, self.stopping)
        self.watcher.changed(self.scan.merged_pids)
        self.scan.merged_pids.clear()
        return r

    def _after_full_scan(self) -> None:
        """Children are adopted (--follow-children), segments no target maps forgotten."""
        if self.opts.follow_children:
            for child, parent in self.registry.new_children():
                try:
                    self.add_target(child, parent=parent)
                except ProcksmError as e:
                    self.log(f"child {child} of {parent} not followed: {e.message}")
        inodes: set[int] = set()
        for t in self.targets.values():
            try:
                inodes.update(v.inode for v in merged_ranges(t.pid))
            except (ProcksmError, OSError):
                continue
        self.scan.index.stable.keep_only(inodes)
        return_freed_heap()

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

    def _observe(self) -> None:
        """Lifecycle events from the observer: an exit drops the target at once, an
        exec starts its state over, a fork adds the child (--follow-children); a COW
        break teaches the backoff. A target's munmap/mremap/brk are no events (docs/
        design.md §11): its mappings are re-read every full scan, and a window over a
        range unmapped since is refused by the merge, which checks under stop."""
        events = self.watcher.poll(list(self.targets))
        if ends_idle(events):
            self.pacer.wake()
        now = time.monotonic()
        for ev in events:
            t = self.targets.get(ev.pid)
            if not isinstance(ev, Lifecycle):
                if t is not None and self.opts.remerge_backoff:
                    ref = page_ref(t.index, ev.addr // PAGE_SIZE)
                    self.scan.backoff.broke(ref, now, self.scan.full_scans)
            elif ev.kind == "exit" and t is not None and not alive(ev.pid):
                self._drop(t, "exited")
            elif ev.kind == "exec" and t is not None:
                self.scan.renew(t)
                t.refresh_parts()
            elif (
                ev.kind == "fork"
                and self.opts.follow_children
                and ev.child_pid
                and ev.child_pid not in self.targets
                and t is not None
            ):
                try:
                    self.add_target(ev.child_pid, parent=ev.pid)
                    self.watcher.changed([ev.child_pid])
                except ProcksmError as e:
                    self.log(f"child {ev.child_pid} of {ev.pid} not followed: {e.message}")

    # --- unmerging --------------------------------------------------------------------

    def _unmerge_one(self, pid: int) -> str:
        """Unmerge one target and stop scanning it (``register PID all`` resumes)."""
        t = self.targets.get(pid)
        if t is None:
            raise UsageError(f"pid {pid} is not a target")
        n = unmerge_target(t, self.accounting, self.opts.merge.pause_budget_ms)
        t.reg = Registration(everything=False)
        self.scan.forget(t)
        t.zero_runs.clear()
        return f"pid {pid}: unmerged {n} pages; not scanned until 'register {pid} all'"

    def unmerge_all(self) -> int:
        """Make every merged page of every target private again (run=2 / exit)."""
        total = 0
        for t in list(self.targets.values()):
            try:
                total += unmerge_target(t, self.accounting, self.opts.merge.pause_budget_ms)
            except NoSuchProcess:
                self._drop(t, "exited")
            except ProcksmError as e:
                self.log(f"pid {t.pid}: unmerge failed: {e.message}")
        # everything starts over, as after the kernel's run=2
        self.scan.clear()
        for t in self.targets.values():
            t.zero_runs.clear()
        self.log(f"unmerged {total} pages")
        return total

    # --- counters -------------------------------------------------------------------------

    def maybe_publish(self, force: bool = False) -> None:
        # every snapshot_interval_s, or less often when a snapshot is expensive (its
        # pagemap and smaps_rollup passes grow with the targets): at most ~4 % of a CPU;
        # idle, every IDLE_SNAPSHOT_EVERY intervals and at most ~1 % (the counters barely
        # move; on four converged CPython workers snapshots were ~2 % of a core)
        idle = self.pacer.idle_scans >= 2
        every, share = (IDLE_SNAPSHOT_EVERY, 100) if idle else (1, 25)
        interval = max(self.opts.snapshot_interval_s * every, share * self._snapshot_cost)
        if not force and self.accounting.seconds_since_snapshot() < interval:
            return
        c0 = time.thread_time()
        self._snapshot = snap = self._build_snapshot()
        # the batches, merges and truth passes since the last snapshot left holes in
        # glibc's heap: on four redis-servers each call here returned 4.8 MiB (median of
        # 27; up to 10 MiB) that waited for the end of the full scan before (~1 ms a call)
        return_freed_heap()
        self._snapshot_cost = time.thread_time() - c0
        if idle:
            # converged: say once if procksm's own memory outweighs the saving
            saved = (snap.pages_sharing + snap.pages_zero) * PAGE_SIZE
            warning = net_loss_warning(saved, snap.private_bytes)
            if warning is not None and not self._net_loss_said:
                self.log(warning)
            self._net_loss_said = warning is not None
        if self.on_publish is not None:
            self.on_publish(snap)

    def snapshot(self) -> Snapshot:
        snap = self._snapshot
        if snap is None:
            snap = self._snapshot = self._build_snapshot()
        return snap

    def _build_snapshot(self) -> Snapshot:
        dt = self.accounting.seconds_since_snapshot()
        for t in self.accounting.truth(list(self.targets.values()), dt, self.watcher.cow_total):
            if not alive(t.pid):
                self._drop(t, "exited")  # also noticed while paused (run=0)
        scan = self.scan
        counters = IndexCounters(
            pages_unshared=len(scan.index.unstable),
            pages_volatile=scan.ages.volatile(),
            full_scans=scan.full_scans,
            ranges_held=scan.backoff.ranges_held(),
            metadata_bytes=scan.index.nbytes + scan.ages.nbytes + scan.backoff.nbytes,
        )
        with self.lock:
            s = dataclasses.replace(self.settings)
        targets = list(self.targets.values())
        return self.accounting.snapshot(targets, s, self.watcher.mode, counters)


def unmerge_target(t: Target, accounting: Accounting, pause_budget_ms: float) -> int:
    """Make every merged page of ``t`` private again; its pauses are counted."""
    pauses: list[float] = []
    ranges = merged_ranges(t.pid)
    n = unmerge_pieces(
        t.pid, [(v.start, v.end) for v in ranges], pause_budget_ms=pause_budget_ms, pauses=pauses
    )
    accounting.pauses.extend(pauses)
    if not merged_ranges(t.pid):
        coredump.restore_after_unmerge(t.pid)
    return n


# snapshot_interval_s multiplier while the scan is idle (procksm.daemon.scheduler)
IDLE_SNAPSHOT_EVERY = 5


# glibc keeps the memory a process frees in its heaps (trimmed only at the heap's top):
# each full scan parses smaps and pagemap into short-lived objects and arrays, and the
# holes they leave kept 15-25 MiB of the daemon's anonymous memory (measured on four
# redis-servers, 60 s: 64-69 MiB before malloc_trim(0), 44-50 MiB after; it takes ~1 ms).
_malloc_trim = getattr(ctypes.CDLL(None), "malloc_trim", None)  # glibc only (not musl)


def return_freed_heap() -> None:
    """Give the memory the daemon freed back to the kernel (glibc's malloc_trim)."""
    if _malloc_trim is not None:
        _malloc_trim(0)
