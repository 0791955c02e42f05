"""procksm.window_sizer: pages per stop window from measured pauses (pure logic).

The pauses here are made up from a linear cost with noise, as measured windows are
(docs/design.md §7); the real windows are in tests/test_merge.py and test_daemon.py."""

from __future__ import annotations

import random

import pytest

from procksm.window_sizer import FIRST_PAGES, WindowSizer


def run(sizer: WindowSizer, fixed: float, per_page: float, windows: int, noise: float = 0.0,
        seed: int = 1) -> list[tuple[int, float]]:  # fmt: skip
    rnd = random.Random(seed)
    out = []
    for _ in range(windows):
        pages = sizer.next_pages()
        pause = fixed + per_page * pages + rnd.uniform(-noise, noise)
        sizer.observe(pages, pause)
        out.append((pages, pause))
    return out


def test_first_window_is_short_then_windows_grow_to_the_budget() -> None:
    sizer = WindowSizer(budget_s=1e-3, max_pages=512)
    assert sizer.next_pages() == FIRST_PAGES
    windows = run(sizer, fixed=0.5e-3, per_page=2e-6, windows=40)
    pages, pauses = zip(*windows[10:], strict=True)
    # room for (1 ms - 0.5 ms) / 2 us = 250 pages, none over the budget
    assert all(200 <= p <= 250 for p in pages), pages
    assert max(pauses) <= 1e-3
    assert sizer.over_budget() is None


def test_windows_stay_within_the_cap() -> None:
    sizer = WindowSizer(budget_s=5e-3, max_pages=256)
    windows = run(sizer, fixed=0.3e-3, per_page=1e-6, windows=20)
    assert max(p for p, _ in windows) == 256


@pytest.mark.parametrize("per_page", [1e-6, 8e-6])
def test_the_cost_per_page_is_learnt(per_page: float) -> None:
    """A target whose pages cost four times the prior (or less than half of it) gets
    windows sized for its own cost, within the budget."""
    sizer = WindowSizer(budget_s=2e-3, max_pages=4096)
    windows = run(sizer, fixed=0.4e-3, per_page=per_page, windows=60, noise=0.02e-3)
    pages, pauses = zip(*windows[20:], strict=True)
    ideal = (2e-3 - 0.4e-3) / per_page
    assert 0.6 * ideal <= sorted(pages)[len(pages) // 2] <= ideal
    assert sum(p > 2e-3 for p in pauses) <= 1


def test_noisy_pauses_get_a_margin() -> None:
    """Pauses that scatter by ±0.2 ms are sized below the budget by their spread: at most
    a few over it, where sizing for the mean would put half of them over."""
    sizer = WindowSizer(budget_s=1e-3, max_pages=1024)
    windows = run(sizer, fixed=0.3e-3, per_page=2e-6, windows=400, noise=0.2e-3, seed=7)
    over = sum(pause > 1e-3 for _, pause in windows[20:])
    assert over <= 0.05 * len(windows[20:]), over


def test_a_target_whose_fixed_cost_is_over_the_budget_gets_a_quarter_budget_of_pages() -> None:
    """Many threads: 1.5 ms before the first page. No window can be within the budget;
    a quarter of it still goes to pages (0.25 ms at 2-2.5 us: 100-125), not the floor of 16,
    which would multiply the stops for ~0.2 ms less each. The sizer says what a window
    costs."""
    sizer = WindowSizer(budget_s=1e-3, max_pages=512, min_pages=16)
    windows = run(sizer, fixed=1.5e-3, per_page=2e-6, windows=30)
    pages = [p for p, _ in windows[10:]]
    assert all(95 <= p <= 125 for p in pages), pages
    pause = sizer.over_budget()
    assert pause is not None and pause == pytest.approx(1.5e-3 + 125 * 2e-6, rel=0.1)
    assert sizer.windows_over_budget == 30


def test_a_budget_too_small_for_any_page_gets_the_floor() -> None:
    sizer = WindowSizer(budget_s=1e-6, max_pages=512, min_pages=16)
    windows = run(sizer, fixed=0.5e-3, per_page=2e-6, windows=10)
    assert [p for p, _ in windows[1:]] == [16] * 9


def test_the_sizer_follows_a_change_in_cost() -> None:
    """The machine gets busy (every window costs 0.4 ms more), then quiet again."""
    sizer = WindowSizer(budget_s=1e-3, max_pages=1024)
    quiet = run(sizer, fixed=0.3e-3, per_page=2e-6, windows=30)
    busy = run(sizer, fixed=0.7e-3, per_page=2e-6, windows=30)
    again = run(sizer, fixed=0.3e-3, per_page=2e-6, windows=30)
    assert busy[-1][0] < 0.6 * quiet[-1][0]
    assert again[-1][0] >= 0.9 * quiet[-1][0]
