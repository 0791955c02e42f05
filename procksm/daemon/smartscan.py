"""Smart scan (the kernel's ``smart_scan``): pages that stay unique are looked at less
and less often, and are then not even read.

A page that was scanned and not merged ages by one per scan; from age 3 on it is skipped
for 1 (ages 3), 2 (ages 4-5), 4 (ages 6-8), then 8 full scans (``pages_skipped``). A
merge makes it young again. The daemon forgets every age when new memory may pair with
pages that stayed unique so far (a new target, an exec).
"""

from __future__ import annotations

import numpy as np

from procksm import PAGE_SIZE
from procksm.index import page_ref, target_refs


class PageAges:
    """Per page: scans without a merge (age), full scans still to skip, and whether its
    checksum changed at its latest scan (3 bytes/page, in chunks of 512 pages that exist
    only where pages were scanned)."""

    CHUNK = 512

    def __init__(self) -> None:
        self._chunks: dict[int, np.ndarray] = {}  # ref >> 9 -> uint8[3, 512]

    @property
    def nbytes(self) -> int:
        return len(self._chunks) * (3 * self.CHUNK + 100)

    def volatile(self) -> int:
        """Pages whose checksum changed at their latest scan (skipped ones keep theirs)."""
        return int(sum(int(a[2].sum()) for a in self._chunks.values()))

    def forget_target(self, index: int) -> None:
        lo, hi = (ref >> 9 for ref in target_refs(index))
        for k in [k for k in self._chunks if lo <= k < hi]:
            del self._chunks[k]

    def take_skips(self, index: int, start: int, end: int) -> np.ndarray:
        """Pages of [start, end) to skip this scan (and count the skip down)."""
        first = page_ref(index, start // PAGE_SIZE)
        n = (end - start) // PAGE_SIZE
        out = np.zeros(n, bool)
        pos = 0
        while pos < n:
            ref = first + pos
            c, off = ref >> 9, ref & (self.CHUNK - 1)
            k = min(self.CHUNK - off, n - pos)
            arr = self._chunks.get(c)
            if arr is not None:
                rem = arr[1, off : off + k]
                skip = rem > 0
                rem[skip] -= 1
                out[pos : pos + k] = skip
            pos += k
        return out

    def update(self, refs: np.ndarray, merged: np.ndarray, volatile: np.ndarray) -> None:
        """After a scan: merged pages are young again, the others age (and from age 3 get
        skips: 1, 2, 4, then 8 full scans, as the kernel's smart scan)."""
        if refs.size == 0:
            return
        chunk_ids = refs >> 9
        for c in np.unique(chunk_ids):
            sel = chunk_ids == c
            arr = self._chunks.get(int(c))
            if arr is None:
                arr = self._chunks[int(c)] = np.zeros((3, self.CHUNK), np.uint8)
            off = refs[sel] & (self.CHUNK - 1)
            m = merged[sel]
            arr[2, off] = volatile[sel]
            age = arr[0]
            age[off[m]] = 0
            arr[1, off[m]] = 0
            old = off[~m]
            age[old] = np.minimum(age[old].astype(np.int16) + 1, 255).astype(np.uint8)
            arr[1, old] = skips_for_age(age[old])


def skips_for_age(age: np.ndarray) -> np.ndarray:
    """Full scans a page of this age (scans in a row without a merge) is skipped for."""
    a = np.asarray(age)
    skips = np.where(a <= 3, 1, np.where(a <= 5, 2, np.where(a <= 8, 4, 8)))
    return np.where(a >= 3, skips, 0).astype(np.uint8)
