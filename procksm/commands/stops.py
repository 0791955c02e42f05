"""The stop-window argument `merge`, `unmerge` and `attach` share (no rich here:
'procksm attach' imports it)."""

from __future__ import annotations

import argparse

from procksm.errors import UsageError
from procksm.window_sizer import DEFAULT_PAUSE_BUDGET_MS


def add_pause_budget_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--pause-budget-ms",
        type=float,
        default=DEFAULT_PAUSE_BUDGET_MS,
        metavar="MS",
        help="the pause each stop of a target is sized for, from that target's measured "
        "stops (default %(default)g ms); a target whose shortest stops are over it "
        "(many threads, a busy machine) gets stops as short as they can be",
    )


def pause_budget_from_args(args: argparse.Namespace) -> float:
    budget: float = args.pause_budget_ms
    if not 0 < budget <= 1000:
        raise UsageError(f"--pause-budget-ms {budget:g}: use more than 0 and at most 1000 ms")
    return budget
