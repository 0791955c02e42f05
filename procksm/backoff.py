"""Volatility learned from observation: hold back ranges that broke soon after merging.

The kernel's only volatility rule is the checksum one (a page takes part when its
checksum did not change across a full scan). A page that is written now and then, with
quiet spells longer than a full scan, passes that rule every time and is merged, broken,
merged and broken again: each cycle costs a stop window and a copy-on-write fault in the
target. procksm sees every break as it happens (procksm.observe), so it can do better:

* every merge stamps the 64 KiB ranges it touched with the time (:meth:`merged`);
* a copy-on-write break in a range less than ``soon_s`` after its merge raises the
  range's level by one (up to ``max_level``) and holds the range back from merging for
  ``2 ** level`` full scans (:meth:`broke`); only the first such break after a merge
  counts, however many of its pages a write burst copies;
* a break that comes later than ``soon_s`` lowers the level by one: the range is stable
  enough to be worth a merge again at once;
* held ranges are left out of the scan's candidates (:meth:`held`) until their hold ends.

Pure bookkeeping on page refs (procksm.index.page_ref: target index and page number), no
I/O: the daemon feeds it merges and the observer's breaks.
"""

from __future__ import annotations

import numpy as np

# 16 pages: small enough that one hot object does not hold back a whole heap, large
# enough that a burst of writes to neighbouring pages is one event, and the bookkeeping
# stays at a few bytes per 16 merged pages
GROUP_SHIFT = 4
GROUP_PAGES = 1 << GROUP_SHIFT
DEFAULT_SOON_S = 30.0
# 2**6 = 64 full scans at most (the kernel's smart scan skips at most 8 for pages that
# never merge; a range that breaks every time it is merged costs more, a stop window and
# a fault each time)
DEFAULT_MAX_LEVEL = 6
# merge times are kept per chunk of 512 ranges (8192 pages), float32 seconds since the
# first merge: 4 bytes per 16 merged pages (a dict entry per range cost ~100)
_CHUNK_SHIFT = 9
_CHUNK = 1 << _CHUNK_SHIFT


class RemergeBackoff:
    def __init__(self, soon_s: float = DEFAULT_SOON_S, max_level: int = DEFAULT_MAX_LEVEL) -> None:
        self.soon_s = soon_s
        self.max_level = max_level
        self._merged_at: dict[int, np.ndarray] = {}  # chunk -> float32[_CHUNK], NaN: none
        self._epoch: float | None = None
        self._level: dict[int, int] = {}  # group -> level (absent: 0)
        self._hold_until: dict[int, int] = {}  # group -> first full scan it may merge in
        self._held_keys = np.zeros(0, np.int64)  # sorted keys of _hold_until (cache)
        self._dirty = False

    @property
    def nbytes(self) -> int:
        # CPython dict entries of int -> int: about 100 bytes each
        chunks = len(self._merged_at) * (_CHUNK * 4 + 100)
        return chunks + 100 * (len(self._level) + len(self._hold_until))

    def merged(self, refs: np.ndarray, now: float) -> None:
        """Pages ``refs`` were merged at ``now``."""
        if refs.size == 0:
            return
        if self._epoch is None:
            self._epoch = now
        groups = np.unique(refs.astype(np.int64) >> GROUP_SHIFT)
        chunks = groups >> _CHUNK_SHIFT
        for c in np.unique(chunks).tolist():
            arr = self._merged_at.get(c)
            if arr is None:
                arr = self._merged_at[c] = np.full(_CHUNK, np.nan, np.float32)
            arr[groups[chunks == c] & (_CHUNK - 1)] = now - self._epoch

    def _take_merged_at(self, g: int) -> float | None:
        """The time of group ``g``'s latest merge, forgotten as it is read."""
        arr = self._merged_at.get(g >> _CHUNK_SHIFT)
        if arr is None or self._epoch is None:
            return None
        t = float(arr[g & (_CHUNK - 1)])
        if t != t:  # NaN: not merged since its last counted break
            return None
        arr[g & (_CHUNK - 1)] = np.nan
        return t + self._epoch

    def broke(self, ref: int, now: float, full_scans: int) -> bool:
        """A copy-on-write break of page ``ref`` at ``now``; True if it came soon after
        the range's merge (and the range is now held back)."""
        g = ref >> GROUP_SHIFT
        merged_at = self._take_merged_at(g)
        if merged_at is None:
            return False  # not merged by this daemon, or already counted for this merge
        level = self._level.get(g, 0)
        soon = now - merged_at < self.soon_s
        if soon:
            level = min(level + 1, self.max_level)
            self._hold_until[g] = full_scans + (1 << level)
            self._dirty = True
        else:
            level = max(level - 1, 0)
        if level:
            self._level[g] = level
        else:
            self._level.pop(g, None)
        return soon

    def broke_many(self, refs: np.ndarray, now: float, full_scans: int) -> int:
        """Pages ``refs`` were found copied (by a scan's pagemap read); returns how many
        ranges that made held back. Ranges whose break was already counted for their
        latest merge (from the observer's event) are not counted again."""
        if refs.size == 0 or not self._merged_at:
            return 0  # nothing merged yet
        groups = np.unique(refs.astype(np.int64) >> GROUP_SHIFT).tolist()
        return sum(self.broke(g << GROUP_SHIFT, now, full_scans) for g in groups)

    def held(self, refs: np.ndarray, full_scans: int) -> np.ndarray:
        """Which of ``refs`` are in a range held back at full scan ``full_scans``."""
        if not self._hold_until:
            return np.zeros(refs.size, bool)
        expired = [g for g, until in self._hold_until.items() if until <= full_scans]
        for g in expired:
            del self._hold_until[g]
        if expired or self._dirty:
            self._held_keys = np.array(sorted(self._hold_until), np.int64)
            self._dirty = False
        keys = self._held_keys
        if keys.size == 0:
            return np.zeros(refs.size, bool)
        groups = refs.astype(np.int64) >> GROUP_SHIFT
        i = np.minimum(np.searchsorted(keys, groups), keys.size - 1)
        return np.asarray(keys[i] == groups)

    def ranges_held(self) -> int:
        return len(self._hold_until)

    def level(self, ref: int) -> int:
        return self._level.get(ref >> GROUP_SHIFT, 0)

    def forget(self, lo_ref: int, hi_ref: int) -> None:
        """Forget the pages of refs [lo_ref, hi_ref) (a target exited or exec'd)."""
        lo, hi = lo_ref >> GROUP_SHIFT, hi_ref >> GROUP_SHIFT
        for d in (self._level, self._hold_until):
            for g in [g for g in d if lo <= g < hi]:
                del d[g]
        for c in [
            c for c in self._merged_at if lo >> _CHUNK_SHIFT <= c <= (hi - 1) >> _CHUNK_SHIFT
        ]:
            base = c << _CHUNK_SHIFT
            a, b = max(lo, base) - base, min(hi, base + _CHUNK) - base
            if a == 0 and b == _CHUNK:
                del self._merged_at[c]
            else:
                self._merged_at[c][a:b] = np.nan
        self._dirty = True

    def clear(self) -> None:
        """Forget everything (run=2: everything starts over)."""
        self._merged_at.clear()
        self._level.clear()
        self._hold_until.clear()
        self._dirty = True


__all__ = ["GROUP_PAGES", "RemergeBackoff"]
