"""merge: identical pages made one, in sealed memfd segments mapped copy-on-write.

The merge stage of the data flow (docs/design.md §5, §10). The public API is here
(``merge``, ``MergeEngine``, their options and results); the parts:

* ``engine``: check, scan, index, plan, then a round per scan (the engine's steps)
* ``records``: options and results (``MergeOptions``, ``MergeResult``, ``Refusal``)
* ``round_slots``: a round's slots, written from their reference pages and sealed
* ``adopt``: the stable tree's segments, mapped by an earlier run, adopted and joined
* ``target``: one target under stop, window by window (compare, hold, map, populate)
* ``handover``: the segments' fds handed to a target in a window (pidfd_getfd or
  SCM_RIGHTS)
"""

from procksm.merge.engine import MapsCache, MergeEngine, check_targets, merge
from procksm.merge.records import (
    MergeOptions,
    MergeOutcome,
    MergeResult,
    Refusal,
    TargetResult,
    pause_stats,
)

__all__ = [
    "MapsCache",
    "MergeEngine",
    "MergeOptions",
    "MergeOutcome",
    "MergeResult",
    "Refusal",
    "TargetResult",
    "check_targets",
    "merge",
    "pause_stats",
]
