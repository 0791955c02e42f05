"""The daemon's link to the copy-on-write observer (procksm.observe: eBPF or pagemap):
which merged ranges it watches, and the events it reports."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Sequence

from procksm.daemon.registry import LogFn
from procksm.daemon.settings import DaemonOptions
from procksm.errors import ProcksmError
from procksm.observe import CowObserver, Event, Lifecycle
from procksm.unmerge import merged_ranges

# merged ranges of one target beyond which the observer does not watch it (see _watch)
OBSERVER_MAX_RANGES = 256
POLL_INTERVAL_S = 0.2


def ends_idle(events: Sequence[Event]) -> bool:
    """Whether these events end the daemon's idle back-off: a fork or an exec (a new
    address space, likely to hold what its parent holds). Copy-on-write breaks and
    memory-map calls do not: on real programs they never stop (a JVM's GC, V8's
    semispaces, malloc), and waking on each kept the daemon at its CPU cap for ever
    (issue 15: 26 % of a core on converged JVM, node, Python and redis targets). A write
    only takes a page out of sharing, and new memory is read by the next full scan at
    the idle pace, as the kernel's ksmd reads it at its own."""
    return any(isinstance(ev, Lifecycle) and ev.kind in ("fork", "exec") for ev in events)


class Watcher:
    def __init__(self, opts: DaemonOptions, log: LogFn) -> None:
        self.opts = opts
        self.log = log
        self.observer: CowObserver | None = None
        self._unwatched: set[int] = set()  # targets whose merged ranges changed
        self._observed: set[int] = set()  # targets the observer counts COW breaks of
        self._last_poll = 0.0

    @property
    def mode(self) -> str:
        return self.observer.mode if self.observer is not None else "pagemap"

    def start(self) -> None:
        """The COW observer (eBPF or pagemap). Without one (it failed to start) the
        snapshot counts COW breaks from its own pagemap pass."""
        try:
            self.observer = CowObserver(
                self.opts.use_bpf,
                # eBPF sees the breaks as they happen; the pagemap reconcile (writes by
                # get_user_pages, lost events) costs a pass over every merged range
                reconcile_interval_s=5.0,
                follow_children=self.opts.follow_children,
                warn=lambda m: self.log(f"warning: {m}"),
            )
        except ProcksmError as e:
            if self.opts.use_bpf:
                raise
            self.log(f"warning: no copy-on-write observer: {e.message}")

    def close(self) -> None:
        if self.observer is not None:
            self.observer.close()
            self.observer = None

    def changed(self, pids: Sequence[int] | set[int]) -> None:
        """These targets' merged ranges changed: the observer learns them at its next poll."""
        self._unwatched.update(pids)

    def forget(self, pid: int) -> None:
        if self.observer is not None and pid in self._observed:
            self._observed.discard(pid)
            with contextlib.suppress(ProcksmError, OSError, KeyError):
                self.observer.remove_target(pid)

    def cow_total(self, pid: int) -> int | None:
        """The observer's count of COW breaks in ``pid``; None if it does not watch it."""
        if self.observer is None or pid not in self._observed:
            return None
        with contextlib.suppress(KeyError, ProcksmError, OSError):
            return int(self.observer.counters(pid).cow_breaks)
        return None

    def poll(self, targets: Sequence[int] | set[int]) -> list[Event]:
        """The observer's events (at most every POLL_INTERVAL_S; [] in between)."""
        obs = self.observer
        now = time.monotonic()
        if obs is None or now - self._last_poll < POLL_INTERVAL_S:
            return []
        self._last_poll = now
        for pid in list(self._unwatched):
            if pid in targets:
                self._watch(pid)
        self._unwatched.clear()
        try:
            return obs.poll(0)
        except (ProcksmError, OSError) as e:
            self.log(f"observer: {e}")
            return []

    def _watch(self, pid: int) -> None:
        """Tell the observer which ranges of ``pid`` are merged now. A target with more
        than OBSERVER_MAX_RANGES merged ranges (scattered duplicates) is left to the
        snapshot's own pagemap pass: the observer's reconcile costs O(ranges^2) (a
        bisect over a list rebuilt per chunk; measured: 3 targets x 8 Ki one-page ranges
        kept a CPU busy) and runs every second."""
        assert self.observer is not None
        with contextlib.suppress(ProcksmError, OSError, KeyError):
            ranges = [(v.start, v.end) for v in merged_ranges(pid)]
            if len(ranges) <= OBSERVER_MAX_RANGES:
                self.observer.set_ranges(pid, ranges)
                self._observed.add(pid)
            elif pid in self._observed:
                self.observer.remove_target(pid)
                self._observed.discard(pid)
