"""When the scan loop runs and how much one batch does: ``sleep_ms`` between batches,
the CPU cap (``pages_to_scan`` follows what a page costs, like the kernel's scan-time
advisor), and the idle back-off once full scans stop merging anything. Pure: the loop
passes in the CPU and wall time it measured."""

from __future__ import annotations

from procksm.daemon.settings import Settings

# CPU seconds one batch should cost when cpu_limit adapts pages_to_scan
BATCH_CPU_S = 0.1
# ... within these bounds: small batches multiply the merge rounds, whose fixed costs
# grow with the segments merged so far (measured: a cap that shrank batches to 1,500
# pages took 29 CPU s where 16 Ki pages took 3)
ADVISOR_PAGES = (16384, 1 << 17)
# the longest one batch may run before the loop sleeps and answers the control socket
BATCH_MAX_S = 0.25
# Idle back-off: after two full scans in a row that merged nothing (KSM needs two looks
# at a page), the pause between batches doubles from 50 ms up to 1 s, and what brings
# new address spaces (a fork or exec: watch.ends_idle, a control request, a new target)
# resets it. Measured on two converged 32 MiB targets: the worker used 16.7 % of a CPU at the
# default 25 % cap without it (1,198 full scans in 30 s of nothing to do).
IDLE_FIRST_SLEEP_S = 0.05
# ... "merged nothing": at most this many pages more than it saw unmerged again (copied
# by a write, a dropped zero page refilled), or 1/1024 of the pages scanned. Counting
# merges alone never let a real program's daemon idle: four CPython workers' heaps
# (refcount writes) were merged and copied again 400 times a second, converged, and the
# daemon stayed at its 25 % cap (measured); churn is the backoff's job, not a reason to
# scan at full speed.
IDLE_MERGED_PAGES = 32
IDLE_MAX_SLEEP_S = 1.0
# ... and while idle the loop's CPU share is at most this (% of a core), whatever the
# cap: a converged daemon should cost what ksmd at its defaults costs (1.3-1.8 % on the
# same programs, measured), and reading pages_to_scan pages a second cost more (~30 %).
IDLE_CPU_PERCENT = 2.0


def idle_sleep(idle_scans: int) -> float:
    """The least pause between batches after ``idle_scans`` full scans in a row that
    merged nothing: none for the first two, then 50 ms doubling up to 1 s."""
    if idle_scans < 2:
        return 0.0
    return min(IDLE_MAX_SLEEP_S, IDLE_FIRST_SLEEP_S * 2.0 ** min(idle_scans - 2, 16))


class Pacer:
    """The loop's pace. ``pages_to_scan`` is the only setting it changes (through the
    value :meth:`after_batch` returns; the caller holds the settings' lock)."""

    def __init__(self) -> None:
        self.cost_per_page = 0.0  # CPU seconds per scanned page (EWMA), for cpu_limit
        self.idle_scans = 0  # full scans in a row that merged nothing
        self._merged_this_scan = 0
        self._undone_this_scan = 0
        self._scanned_at_scan_start = 0

    def wake(self) -> None:
        """Something may bring new duplicates (an event, a request, a new target)."""
        self.idle_scans = 0

    def merged(self, pages: int) -> None:
        self._merged_this_scan += pages

    def undone(self, pages: int) -> None:
        """Pages the scan found unmerged again since their merge (copied, zero refilled)."""
        self._undone_this_scan += pages

    def end_full_scan(self, pages_scanned: int) -> None:
        """A scan that merged next to nothing is idle too: copied pages merged again and
        zero pages dropped again trickle in for ever on a live program (four
        redis-servers: 0-4 pages a full scan kept the daemon at its CPU cap)."""
        scanned = pages_scanned - self._scanned_at_scan_start
        gained = self._merged_this_scan - self._undone_this_scan
        busy = gained > max(IDLE_MERGED_PAGES, scanned >> 10)
        self.idle_scans = 0 if busy else self.idle_scans + 1
        self._merged_this_scan = self._undone_this_scan = 0
        self._scanned_at_scan_start = pages_scanned

    def after_batch(
        self, s: Settings, scanned: int, skipped: int, cpu: float, wall: float
    ) -> tuple[float, int | None]:
        """(seconds to sleep, new pages_to_scan or None) after a batch that read
        ``scanned`` pages (and skipped ``skipped``) in ``cpu`` CPU and ``wall`` seconds."""
        sleep, pages = self._capped(s, scanned, skipped, cpu, wall)
        if self.idle_scans >= 2:
            sleep = max(sleep, idle_sleep(self.idle_scans), cpu / (IDLE_CPU_PERCENT / 100) - wall)
        return sleep, pages

    def _capped(
        self, s: Settings, scanned: int, skipped: int, cpu: float, wall: float
    ) -> tuple[float, int | None]:
        """The kernel's advisor in spirit: with a CPU limit, pages_to_scan follows what a
        page costs so that a batch plus sleep_ms stays under the limit, and the sleep
        stretches when a batch cost more than planned."""
        sleep = s.sleep_ms / 1000.0
        if scanned + skipped == 0 or s.cpu_limit <= 0 or s.cpu_limit >= 100:
            return sleep, None
        per_page = cpu / max(scanned, 1)
        c = self.cost_per_page
        self.cost_per_page = per_page if c == 0 else 0.7 * c + 0.3 * per_page
        # the sleep that keeps cpu / (wall + sleep) <= limit: the cap itself
        need = cpu / (s.cpu_limit / 100.0) - wall
        pages = None
        if self.cost_per_page > 0:
            # about BATCH_CPU_S of CPU per batch: big enough to amortise a batch's fixed
            # costs (smaps, one merge round), small enough that the cap's sleeps stay short
            lo, hi = ADVISOR_PAGES
            pages = int(min(hi, max(lo, int(BATCH_CPU_S / self.cost_per_page))))
        return max(sleep, need), pages
