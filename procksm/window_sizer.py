"""Pages per stop window, sized to a pause budget from the target's own measured windows.

"Pages" are whatever the caller counts a window's work in: pages for an unmerge, units
of cost for a merge (procksm.plan.window_units: pages plus a share per extent).

A window's pause is about ``fixed + per_page * pages``. ``fixed`` grows with the
target's threads (stopping, gating and resuming each costs ~50-100 us, docs/design.md
§7) and with the machine's load; ``per_page`` is the byte comparison, the mmap and its
populate (~2 us). Both are fitted per target from its windows, weighted towards the
recent ones, and the next window gets the most pages whose predicted pause, plus a
margin for the pauses' spread, stays within the budget: a window that would be over it
is split, never stretched. But a quarter of the budget always goes to pages: a target
whose fixed cost alone takes the budget (many threads, a CPU-starved machine) cannot get
stops within it, and shrinking its windows further would barely shorten them while
multiplying them (measured, four 8-thread targets: windows of 16 pages took 1.14 ms each,
2,384 stops and 3.1 s where one thread needed 235 and 0.37 s).

The slope is shrunk towards a prior: windows that are all of one size (the steady
state) say nothing about it, and then the prior extrapolates from their mean.
"""

from __future__ import annotations

from dataclasses import dataclass

# Measured on this kind of machine (single-threaded planted targets, `procksm merge`,
# 2026-12-07): compare ~1.0 us, mmap + populate ~1.1 us per page.
PRIOR_S_PER_PAGE = 2.5e-6
# How firmly the prior holds, as a weighted sum of squares of the windows' sizes about
# their mean: one window 32 pages off the others weighs the fitted slope as much as it.
PRIOR_WEIGHT_PAGES2 = 32.0**2
DECAY = 0.85  # each window's weight against the one before: ~7 windows' memory
SPREAD_MARGIN = 3.0  # mean absolute misprediction counted against the budget...
MAX_MARGIN_SHARE = 0.5  # ...up to half of it
MIN_PAGES_SHARE = 0.25  # of the budget, for pages, whatever the fixed cost
FIRST_PAGES = 64  # before any window is measured: short, then grown
# The pause windows are sized for unless told otherwise (ms): issue 15's goal for p99.
DEFAULT_PAUSE_BUDGET_MS = 1.0


@dataclass(slots=True)
class WindowSizer:
    budget_s: float
    max_pages: int
    min_pages: int = 16
    _w: float = 0.0
    _x: float = 0.0  # weighted means of pages and pause
    _y: float = 0.0
    _xx: float = 0.0  # weighted centred second moments
    _xy: float = 0.0
    _spread: float = 0.0  # weighted mean |pause - predicted pause|
    windows: int = 0
    windows_over_budget: int = 0

    def __post_init__(self) -> None:
        self.min_pages = max(1, min(self.min_pages, self.max_pages))

    def next_pages(self) -> int:
        """Pages for the next window."""
        if not self.windows:
            return max(self.min_pages, min(self.max_pages, FIRST_PAGES))
        fixed, per_page = self._model()
        margin = min(SPREAD_MARGIN * self._spread, MAX_MARGIN_SHARE * self.budget_s)
        room = max(self.budget_s - margin - fixed, MIN_PAGES_SHARE * self.budget_s)
        return max(self.min_pages, min(self.max_pages, int(room / per_page)))

    def over_budget(self) -> float | None:
        """The predicted pause of the next window when it is over the budget (its fixed
        cost takes the budget: many threads, or a CPU-starved machine)."""
        if not self.windows:
            return None
        fixed, per_page = self._model()
        pause = fixed + per_page * self.next_pages()
        return pause if pause > self.budget_s else None

    def observe(self, pages: int, pause_s: float) -> None:
        """A window of ``pages`` pages held its target ``pause_s`` seconds."""
        if self.windows:
            fixed, per_page = self._model()
            miss = abs(pause_s - (fixed + per_page * pages))
            self._spread = DECAY * self._spread + (1 - DECAY) * miss
        self.windows += 1
        self.windows_over_budget += pause_s > self.budget_s
        # exponentially weighted running mean and centred moments (West's update)
        w = DECAY * self._w + 1.0
        dx, dy = pages - self._x, pause_s - self._y
        self._x += dx / w
        self._y += dy / w
        self._xx = DECAY * self._xx + dx * (pages - self._x)
        self._xy = DECAY * self._xy + dx * (pause_s - self._y)
        self._w = w

    def _model(self) -> tuple[float, float]:
        """(fixed seconds, seconds per page) of a window, as fitted so far."""
        slope = (self._xy + PRIOR_WEIGHT_PAGES2 * PRIOR_S_PER_PAGE) / (
            self._xx + PRIOR_WEIGHT_PAGES2
        )
        slope = max(slope, PRIOR_S_PER_PAGE / 4)  # noise never makes pages free
        fixed = max(0.0, self._y - slope * self._x)
        return fixed, slope
