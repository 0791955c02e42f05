"""Runs of consecutive elements in numpy arrays (pure).

Pages are read, planned and mapped in runs: consecutive addresses, consecutive slots, one
mapping. Every such place states *where a new run starts* as a boolean array over
neighbouring pairs; :func:`split_runs` turns that into index ranges.
"""

from __future__ import annotations

import numpy as np


def split_runs(new_run: np.ndarray, n: int) -> list[tuple[int, int]]:
    """[(start, end)) index ranges of the runs of ``n`` elements, where ``new_run[i]``
    (length ``n - 1``) says that element ``i + 1`` starts a new run."""
    if n == 0:
        return []
    brk = (np.flatnonzero(new_run) + 1).tolist()
    return list(zip([0, *brk], [*brk, n], strict=True))


def mask_runs(mask: np.ndarray) -> list[tuple[int, int]]:
    """(start, length) of the runs of True in ``mask``."""
    idx = np.flatnonzero(mask)
    return [(int(idx[a]), b - a) for a, b in split_runs(np.diff(idx) != 1, int(idx.size))]
