"""The observer: its targets, the events that change them, and when to reconcile them with
pagemap; see the package docstring (procksm/observe/__init__.py) for the API."""

from __future__ import annotations

import collections
import sys
import time
from collections.abc import Callable, Iterable
from typing import Literal

from procksm import procfs
from procksm.closing import Closing
from procksm.errors import NoSuchProcess
from procksm.observe.armed_maps import ArmedPageMaps
from procksm.observe.bpf_program import load_program
from procksm.observe.cow_header import C_LOST
from procksm.observe.events import CowBreak, Event, Lifecycle
from procksm.observe.ledger import CowCounters, CowLedger, normalize_ranges
from procksm.observe.target import WatchedTarget

MAX_EXITED_KEPT = 1024  # exited targets whose counters stay readable


def _warn_stderr(message: str) -> None:
    print(f"procksm: warning: {message}", file=sys.stderr)


class CowObserver(Closing):
    """COW breaks and lifecycle events of targets; see the package docstring.

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
        self._targets: dict[int, WatchedTarget] = {}
        self._exited_order: collections.deque[int] = collections.deque()
        self._out: list[Event] = []  # events applied but not returned by poll() yet
        self._last_reconcile = time.monotonic()
        self._lost_seen = 0
        self._bpf, self.fallback_reason = load_program(use_bpf, follow_children)
        self.mode: Literal["bpf", "pagemap"] = "pagemap" if self._bpf is None else "bpf"
        if self._bpf is None:
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
            t = WatchedTarget(CowLedger(pid), procfs.PagemapFile(pid))
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
        t.close_pagemap()

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
        return {} if self._bpf is None else self._bpf.kernel_totals()

    def poll(self, timeout_s: float = 0.0) -> list[Event]:
        """New COW breaks and lifecycle events, waiting up to ``timeout_s`` for one."""
        bpf = self._bpf
        if bpf is None:
            return self._poll_pagemap(timeout_s)
        timeout_ms = 0 if self._out else max(0, int(timeout_s * 1000))
        self._apply_events(bpf.events.wait(timeout_ms), bpf.maps)
        lost = bpf.kernel_counter(C_LOST)
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
        try:
            t.read_layout()
        except NoSuchProcess:
            if self._bpf is None:  # BPF reports the exit itself
                self._exited(pid, t)
                self._out.append(Lifecycle("exit", pid))
            return 0
        found = t.find_copies()
        if found is None:
            return 0
        self._out.extend(CowBreak(pid, a, reconciled=True) for a in found)
        self._sync(pid, t)
        return len(found)

    @property
    def probes_attached(self) -> bool:
        return self._bpf is not None and self._bpf.probes_attached

    def detach_probes(self) -> None:
        """Take every probe off its tracepoint (no cost to any fault or syscall) and keep
        the maps. Breaks written meanwhile are found by the reconcile that
        :meth:`attach_probes` runs; lifecycle events of the pause are not reported."""
        if self._bpf is None:
            return
        self._drain()
        self._bpf.detach_probes()

    def attach_probes(self) -> None:
        """Undo :meth:`detach_probes`, then reconcile every target."""
        if self._bpf is None or self.probes_attached:
            return
        self._bpf.attach_probes()
        self._reconcile_all()

    def close(self) -> None:
        if self._bpf is not None:
            bpf, self._bpf = self._bpf, None
            bpf.close()
        for t in self._targets.values():
            t.close_pagemap()
        self._targets.clear()

    # --- reconciling ---

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

    # --- events ---

    def _drain(self) -> None:
        """Apply what the kernel already sent, without waiting."""
        if self._bpf is not None:
            self._apply_events(self._bpf.events.drain(), self._bpf.maps)

    def _apply_events(self, events: Iterable[Event], maps: ArmedPageMaps) -> None:
        for ev in events:
            if self._apply(ev, maps):
                self._out.append(ev)
        self._sync_dirty()

    def _apply(self, ev: Event, maps: ArmedPageMaps) -> bool:
        """Update the targets' state by one event, in the kernel's order. Returns whether
        to report it."""
        t = self._targets.get(ev.pid)
        if t is None or t.ledger.exited:
            return False
        if isinstance(ev, CowBreak):
            return self._apply_fault(ev, t, maps)
        if ev.kind == "exit":
            self._exited(ev.pid, t)
        elif ev.kind == "exec":
            t.ledger.ranges = []  # a new address space
            self._sync(ev.pid, t)
            maps.clear_stale(ev.pid)
        elif ev.kind == "fork" and self.follow_children and ev.child_pid not in self._targets:
            # The child may have exec'd or exited already (the kernel made it a target at
            # fork): its pagemap opens on its first reconcile, if it is still there.
            self._targets[ev.child_pid] = WatchedTarget(t.ledger.child(ev.child_pid), None)
            self._set_target_bit(ev.child_pid, True)
        return True

    def _apply_fault(self, ev: CowBreak, t: WatchedTarget, maps: ArmedPageMaps) -> bool:
        """A write fault on an armed page: a break only if the page is still procksm's
        and copied (:meth:`WatchedTarget.check_break`)."""
        maps.page_cleared(ev.pid, ev.addr)  # the kernel cleared its bit, whatever it was
        if not t.ledger.watches(ev.addr):
            return False  # dropped from the watch after the fault (a reconcile, an exec)
        try:
            found = t.check_break(ev.addr)
            if found == "gone":
                # unmapped or moved since it was armed: drop every range that went with it
                t.read_layout()
        except NoSuchProcess:
            return False  # its exit event follows
        if found == "not_copied":
            t.dirty = True  # armed again; the reconcile counts it once it is a copy
        elif t.ledger.record_fault(ev.addr, ev.kernel):
            return True
        return False

    def _exited(self, pid: int, t: WatchedTarget) -> None:
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
        t.close_pagemap()

    # --- the BPF maps ---

    def _set_target_bit(self, pid: int, on: bool) -> None:
        if self._bpf is not None:
            self._bpf.maps.set_target(pid, on)

    def _sync_dirty(self) -> None:
        for pid, t in list(self._targets.items()):
            if t.dirty:
                self._sync(pid, t)

    def _sync(self, pid: int, t: WatchedTarget) -> None:
        """Arm in the kernel what the ledger says is armed."""
        t.dirty = False
        if self._bpf is not None:
            self._bpf.maps.write(pid, t.ledger.armed_pages())
