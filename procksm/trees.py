"""The KSM index: checksum table, unstable tree and stable tree (pure logic, no syscalls).

Kernel semantics (mm/ksm.c, ``cmp_and_merge_page``), one scanned page at a time:

1. look the page up in the **stable tree** (contents already merged): an identical stable
   page exists → merge into it;
2. else compare its checksum with the one remembered from the previous scan of that page:
   different → remember the new one and skip it (the page is *volatile*);
3. else search the **unstable tree** (candidates seen during this full scan): an identical
   item → the pair becomes a new stable node and the item leaves the unstable tree; none
   → insert the page;
4. the unstable tree is emptied at the start of every full scan.

A hash is only an index: two pages are identical only after an exact byte comparison, and
page contents are never copied into the index. The trees hold a 64-bit hash and an integer
*ref* per page (:func:`page_ref` packs target index and page number) and ask the caller for
bytes through callbacks when they must compare: ``content(ref)`` for scanned pages and
``stable_content(node)`` for merged ones; ``None`` means gone/unreadable, never equal.

Memory: procksm must stay under 32 bytes per scanned page, and targets have millions of
pages, so the structures with one entry per page are numpy arrays, not Python objects
(which cost 100+ bytes each): :class:`ChecksumTable` 8 bytes/page, :class:`UnstableTree`
16 bytes/page. The stable tree holds one Python object per *distinct merged content*.

:class:`KsmIndex` runs steps 1-4 for a batch of pages and returns a :class:`MergeDecision`
that the merge engine executes, then reports back with ``commit_join``/``commit_new_node``.

Batch semantics (the kernel handles one page at a time; procksm handles batches):

- Step 1 sees the stable tree as it was when the batch started. A stable node created from
  this batch is visible to the next batch, not to the other pages of this one.
- All pages of a batch that reach step 3 with identical content form **one group**,
  together with every identical unstable-tree item: three identical pages yield one new
  stable node with three sharers, as in the kernel, where the third page finds the node
  the first two created. Group order: unstable-tree items in insertion order, then the
  batch pages in input order; ``refs[0]`` is the oldest.
- ``max_page_sharing`` (kernel default 256) caps sharers per node. A page identical to
  full nodes only goes on to steps 2-3 and may pair up into a new "dup" node of the same
  content; a group larger than the cap is cut into nodes of at most ``cap`` pages, and a
  single page left over by the cut waits in the unstable tree for a partner.

Zero pages get no special case here: the caller drops them with MADV_DONTNEED before
indexing (docs/design.md §2.4), the counterpart of the kernel's use_zero_pages.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from itertools import pairwise
from typing import Generic, Literal, NamedTuple, TypeVar

import numpy as np
import numpy.typing as npt

__all__ = [
    "REF_PAGE_BITS",
    "ChecksumTable",
    "ContentFn",
    "Join",
    "KsmCounters",
    "KsmIndex",
    "MergeDecision",
    "NewNode",
    "PageData",
    "StableNode",
    "StableTree",
    "UnstableMatch",
    "UnstableTree",
    "page_ref",
    "page_refs",
    "split_ref",
]

P = TypeVar("P")

PageData = bytes | bytearray | memoryview
ContentFn = Callable[[int], PageData | None]
HashArray = npt.NDArray[np.uint64]
RefArray = npt.NDArray[np.int64]
BoolArray = npt.NDArray[np.bool_]

# x86-64 user addresses have 47 bits (56 with 5-level paging): page numbers need up to
# 44 bits, which leaves 19 bits of target index in a non-negative int64.
REF_PAGE_BITS = 44
_REF_PAGE_MASK = (1 << REF_PAGE_BITS) - 1
_REF_MAX_TARGET = (1 << (63 - REF_PAGE_BITS)) - 1

# Refs are >= 0; a tombstoned entry (removed from the unstable tree) has this value.
_DEAD = -1
# Entries moved per step when merging sorted runs in place: bounds the temporary memory.
_MERGE_CHUNK = 1 << 16
# The first, biggest run absorbs the others once they reach 1/_BASE_RATIO of it: a merge
# holds the smaller run twice for a moment, so this bounds that extra memory to ~2
# bytes/page, for ~_BASE_RATIO moves per entry at that level.
_BASE_RATIO = 8


def page_ref(target_index: int, page_number: int) -> int:
    """The ref of page ``page_number`` (address >> 12) of target ``target_index``.

    Neighbouring pages get neighbouring refs, which keeps :class:`ChecksumTable` dense.
    """
    if not 0 <= target_index <= _REF_MAX_TARGET:
        raise ValueError(f"target index {target_index} out of range 0..{_REF_MAX_TARGET}")
    if not 0 <= page_number <= _REF_PAGE_MASK:
        raise ValueError(f"page number {page_number:#x} does not fit in {REF_PAGE_BITS} bits")
    return (target_index << REF_PAGE_BITS) | page_number


def page_refs(target_index: int, page_numbers: npt.ArrayLike) -> RefArray:
    """Vectorised :func:`page_ref`."""
    pages = np.asarray(page_numbers, dtype=np.int64)
    if pages.size and (int(pages.min()) < 0 or int(pages.max()) > _REF_PAGE_MASK):
        raise ValueError(f"page numbers must fit in {REF_PAGE_BITS} bits")
    page_ref(target_index, 0)  # validates the target index
    return pages | np.int64(target_index << REF_PAGE_BITS)


def split_ref(ref: int) -> tuple[int, int]:
    """``(target_index, page_number)`` of a ref made by :func:`page_ref`."""
    return ref >> REF_PAGE_BITS, ref & _REF_PAGE_MASK


def _as_bytes(data: PageData) -> bytes:
    # memoryview == memoryview walks item by item (3 µs per 4 KiB page measured here);
    # bytes == bytes is a memcmp (0.04 µs), and the copy costs 0.24 µs.
    return data if type(data) is bytes else bytes(data)


def _hashes(values: npt.ArrayLike) -> HashArray:
    array = np.asarray(values, dtype=np.uint64)
    if array.ndim != 1:
        raise ValueError("hashes must be a 1-D array")
    return array


def _refs(values: npt.ArrayLike) -> RefArray:
    array = np.asarray(values, dtype=np.int64)
    if array.ndim != 1:
        raise ValueError("refs must be a 1-D array")
    if array.size and int(array.min()) < 0:
        raise ValueError("refs must be non-negative")
    return array


# --------------------------------------------------------------------------- sorted runs


class _SortedRuns:
    """A multiset of (uint64 key, int64 value) pairs kept as a few sorted numpy runs.

    Inserting a batch adds a sorted run; runs of comparable size are merged (each run
    after the first is at least twice as long as the next; the first absorbs the second
    when that reaches 1/8 of it), so there are O(log n) runs and an entry moves
    O(log n) times: a batch of N lookups or inserts costs O(N log n) vectorised, whatever
    the batch size. Merges happen in place: the bigger run grows with ``ndarray.resize``
    (realloc, i.e. mremap for big arrays, no copy) and its entries move backwards in
    chunks, so a merge never holds a second copy of the big run.

    Removal sets the value to ``_DEAD`` and leaves the key (a tombstone): the unstable
    tree is emptied every full scan, so tombstones never outlive one scan there.
    Among equal keys, older entries come first.
    """

    __slots__ = ("_keys", "_live", "_values")

    def __init__(self) -> None:
        # Invariant: every array here owns its data and nobody holds a view of it,
        # because merges resize them in place (refcheck=False).
        self._keys: list[HashArray] = []
        self._values: list[RefArray] = []
        self._live = 0

    def __len__(self) -> int:
        return self._live

    @property
    def entries_stored(self) -> int:
        """Live entries plus tombstones."""
        return sum(len(keys) for keys in self._keys)

    @property
    def nbytes(self) -> int:
        return sum(k.nbytes + v.nbytes for k, v in zip(self._keys, self._values, strict=True))

    def clear(self) -> None:
        self._keys.clear()
        self._values.clear()
        self._live = 0

    def insert_owned(self, keys: HashArray, values: RefArray) -> None:
        """Add entries sorted by key; the arrays become the index's (no copy, no views)."""
        if not len(keys):
            return
        self._keys.append(keys)
        self._values.append(values)
        self._live += int(np.count_nonzero(values != _DEAD))
        while len(self._keys) >= 2:
            older, newer = len(self._keys[-2]), len(self._keys[-1])
            if len(self._keys) == 2:
                if newer * _BASE_RATIO < older:
                    break
            elif older >= 2 * newer:
                break
            newer_keys, newer_values = self._keys.pop(), self._values.pop()
            if older >= newer:
                _merge_in_place(self._keys[-1], self._values[-1], newer_keys, newer_values)
            else:
                # Grow the bigger run: a merge holds the smaller one twice for a moment.
                _merge_in_place(
                    newer_keys, newer_values, self._keys[-1], self._values[-1], older=True
                )
                self._keys[-1], self._values[-1] = newer_keys, newer_values

    def hit_mask(self, sorted_queries: HashArray) -> BoolArray:
        """True where some stored entry (live or tombstone) has the query's key.

        Sorted queries let ``searchsorted`` narrow each search from the previous answer.
        """
        hit = np.zeros(len(sorted_queries), dtype=np.bool_)
        for keys in self._keys:
            position = np.searchsorted(keys, sorted_queries)
            np.minimum(position, len(keys) - 1, out=position)
            hit |= keys[position] == sorted_queries
        return hit

    def entries(self, key: int) -> list[tuple[int, int, int]]:
        """Live entries with ``key`` as (run, position, value), oldest first."""
        found: list[tuple[int, int, int]] = []
        needle = np.uint64(key)
        for run, (keys, values) in enumerate(zip(self._keys, self._values, strict=True)):
            lo = int(np.searchsorted(keys, needle, side="left"))
            hi = int(np.searchsorted(keys, needle, side="right"))
            for position in range(lo, hi):
                value = int(values[position])
                if value != _DEAD:
                    found.append((run, position, value))
        return found

    def entries_for(self, sorted_keys: HashArray) -> tuple[list[int], list[tuple[int, int, int]]]:
        """Live entries for many distinct keys at once, vectorised.

        Returns ``(bounds, entries)``: the entries of ``sorted_keys[i]`` are
        ``entries[bounds[i]:bounds[i + 1]]``, each (run, position, value), oldest first.
        """
        key_parts: list[RefArray] = []
        run_parts: list[RefArray] = []
        position_parts: list[RefArray] = []
        value_parts: list[RefArray] = []
        for run, (keys, values) in enumerate(zip(self._keys, self._values, strict=True)):
            lo = np.searchsorted(keys, sorted_keys, side="left")
            counts = np.searchsorted(keys, sorted_keys, side="right") - lo
            present = np.flatnonzero(counts)
            if not len(present):
                continue
            counts = counts[present]
            # Positions lo..hi-1 of every present key, concatenated.
            ends = np.cumsum(counts)
            positions = np.arange(int(ends[-1]), dtype=np.int64)
            positions += np.repeat(lo[present] - (ends - counts), counts)
            found = values[positions]
            live = found != _DEAD
            key_parts.append(np.repeat(present, counts)[live])
            run_parts.append(np.full(int(np.count_nonzero(live)), run, dtype=np.int64))
            position_parts.append(positions[live])
            value_parts.append(found[live])
        if not key_parts:
            return [0] * (len(sorted_keys) + 1), []
        key_index = np.concatenate(key_parts)
        # Stable: runs are in age order, positions within a run too.
        order = np.argsort(key_index, kind="stable")
        bounds = np.searchsorted(key_index[order], np.arange(len(sorted_keys) + 1)).tolist()
        entries = list(
            zip(
                np.concatenate(run_parts)[order].tolist(),
                np.concatenate(position_parts)[order].tolist(),
                np.concatenate(value_parts)[order].tolist(),
                strict=True,
            )
        )
        return bounds, entries

    def kill(self, run: int, position: int) -> None:
        """Tombstone one entry found by :meth:`entries` (positions change on insert)."""
        if self._values[run][position] != _DEAD:
            self._values[run][position] = _DEAD
            self._live -= 1

    def kill_values_in(self, lo: int, hi: int) -> int:
        """Tombstone every live entry whose value lies in [lo, hi); return how many."""
        killed = 0
        for values in self._values:
            doomed = (values >= lo) & (values < hi)
            count = int(np.count_nonzero(doomed))
            if count:
                values[doomed] = _DEAD
                killed += count
        self._live -= killed
        return killed


def _merge_in_place(
    keys: HashArray,
    values: RefArray,
    other_keys: HashArray,
    other_values: RefArray,
    *,
    older: bool = False,
) -> None:
    """Merge the sorted run (other_keys, other_values) into (keys, values), in place.

    Among equal keys, the entries of the run that is ``older`` come first. Besides the
    grown run, only the other run's positions and chunk-sized temporaries are allocated.
    """
    n, m = len(keys), len(other_keys)
    # Where the other entries go among equal keys, and how each entry of this run
    # counts the other entries placed before it.
    other_side: Literal["left", "right"] = "left" if older else "right"
    own_side: Literal["left", "right"] = "right" if older else "left"
    other_positions = np.searchsorted(keys, other_keys, side=other_side)
    other_positions += np.arange(m, dtype=other_positions.dtype)
    # Entries before the first other key stay where they are.
    first_moved = int(np.searchsorted(keys, other_keys[0], side=other_side))
    keys.resize(n + m, refcheck=False)
    values.resize(n + m, refcheck=False)
    hi = n
    while hi > first_moved:
        # Walk backwards: entries only move right, so a chunk never lands on entries
        # that have not moved yet.
        lo = max(first_moved, hi - _MERGE_CHUNK)
        chunk_keys = keys[lo:hi].copy()
        destination = np.searchsorted(other_keys, chunk_keys, side=own_side)
        destination += np.arange(lo, hi, dtype=destination.dtype)
        values[destination] = values[lo:hi].copy()
        keys[destination] = chunk_keys
        hi = lo
    keys[other_positions] = other_keys
    values[other_positions] = other_values


# --------------------------------------------------------------------------- checksums


class ChecksumTable:
    """The checksum each page had at its previous scan, 8 bytes per page (numpy).

    Kernel KSM skips pages whose checksum changed since the last scan (step 2): they are
    written often, and merging them would only lead to copy-on-write breaks.

    Storage is keyed by ref in chunks of ``CHUNK_PAGES`` neighbouring refs (2 MiB of
    address space), allocated on first use from one pooled array: big sparse regions
    (a reserved 32 GiB JVM heap) cost only the chunks that hold scanned pages, and a
    batch of refs is looked up with no per-page Python. Regions that disappear or shrink
    are dropped with :meth:`forget`; regions that appear or grow need nothing.
    """

    CHUNK_PAGES = 512
    _CHUNK_SHIFT = 9
    # Marks "never scanned": no page is checksum-stable on its first scan. A real
    # checksum equal to it is stored as UNSEEN - 1 (both are 2^-64 events for xxh3).
    UNSEEN = np.uint64(0xFFFF_FFFF_FFFF_FFFF)

    def __init__(self) -> None:
        self._chunk_ids: RefArray = np.empty(0, dtype=np.int64)  # sorted
        self._chunk_slots: RefArray = np.empty(0, dtype=np.int64)
        self._pool: HashArray = np.empty(0, dtype=np.uint64)
        self._free_slots: list[int] = []

    def __len__(self) -> int:
        """Number of allocated chunks."""
        return len(self._chunk_ids)

    @property
    def nbytes(self) -> int:
        return self._pool.nbytes + self._chunk_ids.nbytes + self._chunk_slots.nbytes

    def update(
        self, refs: npt.ArrayLike, hashes: npt.ArrayLike, first_look_stable: bool = False
    ) -> BoolArray:
        """Remember ``hashes`` for ``refs``; True where it equals the previous scan's (and,
        with ``first_look_stable``, where the ref was never scanned before)."""
        ref_array = _refs(refs)
        folded = _hashes(hashes)
        if len(ref_array) != len(folded):
            raise ValueError("refs and hashes differ in length")
        folded = np.where(folded == self.UNSEEN, self.UNSEEN - np.uint64(1), folded)
        flat = self._slots_for(ref_array >> self._CHUNK_SHIFT) * self.CHUNK_PAGES
        flat += ref_array & (self.CHUNK_PAGES - 1)
        previous = self._pool[flat]
        self._pool[flat] = folded
        stable: BoolArray = previous == folded
        if first_look_stable:
            stable |= previous == self.UNSEEN
        return stable

    def forget(self, ref_lo: int, ref_hi: int) -> None:
        """Drop what is known of refs in [ref_lo, ref_hi) (unmapped range, gone target)."""
        if ref_hi <= ref_lo or not len(self._chunk_ids):
            return
        first_chunk = ref_lo >> self._CHUNK_SHIFT
        last_chunk = (ref_hi - 1) >> self._CHUNK_SHIFT
        lo = int(np.searchsorted(self._chunk_ids, first_chunk, side="left"))
        hi = int(np.searchsorted(self._chunk_ids, last_chunk, side="right"))
        freed: list[int] = []
        for position in range(lo, hi):
            chunk = int(self._chunk_ids[position])
            slot = int(self._chunk_slots[position])
            chunk_lo = chunk << self._CHUNK_SHIFT
            start = max(ref_lo, chunk_lo) - chunk_lo
            stop = min(ref_hi, chunk_lo + self.CHUNK_PAGES) - chunk_lo
            if start == 0 and stop == self.CHUNK_PAGES:
                freed.append(position)
                self._free_slots.append(slot)
            else:
                base = slot * self.CHUNK_PAGES
                self._pool[base + start : base + stop] = self.UNSEEN
        if freed:
            self._chunk_ids = np.delete(self._chunk_ids, freed)
            self._chunk_slots = np.delete(self._chunk_slots, freed)
            if len(self._free_slots) * 2 > len(self._pool) // self.CHUNK_PAGES:
                self._compact()

    def _slots_for(self, chunk_ids: RefArray) -> RefArray:
        position = np.searchsorted(self._chunk_ids, chunk_ids)
        known = position < len(self._chunk_ids)
        known[known] = self._chunk_ids[position[known]] == chunk_ids[known]
        if not known.all():
            self._allocate(np.unique(chunk_ids[~known]))
            position = np.searchsorted(self._chunk_ids, chunk_ids)
        slots: RefArray = self._chunk_slots[position]
        return slots

    def _allocate(self, new_chunk_ids: RefArray) -> None:
        count = len(new_chunk_ids)
        reuse = min(count, len(self._free_slots))
        reused = self._free_slots[len(self._free_slots) - reuse :]
        del self._free_slots[len(self._free_slots) - reuse :]
        first_new = len(self._pool) // self.CHUNK_PAGES
        fresh = list(range(first_new, first_new + count - reuse))
        if fresh:
            # Exact-size growth through realloc: no slack, no second copy of the pool.
            self._pool.resize(len(self._pool) + len(fresh) * self.CHUNK_PAGES, refcheck=False)
        if fresh:
            self._pool[first_new * self.CHUNK_PAGES :] = self.UNSEEN
        for slot in reused:
            self._pool[slot * self.CHUNK_PAGES : (slot + 1) * self.CHUNK_PAGES] = self.UNSEEN
        slots = np.array(reused + fresh, dtype=np.int64)
        insert_at = np.searchsorted(self._chunk_ids, new_chunk_ids)
        self._chunk_ids = np.insert(self._chunk_ids, insert_at, new_chunk_ids)
        self._chunk_slots = np.insert(self._chunk_slots, insert_at, slots)

    def _compact(self) -> None:
        """Give memory back after many chunks were forgotten: renumber the live slots."""
        pool: HashArray = np.empty(len(self._chunk_ids) * self.CHUNK_PAGES, dtype=np.uint64)
        # take() into a view of an array that owns its memory: resize() needs the owner.
        np.take(
            self._pool.reshape(-1, self.CHUNK_PAGES),
            self._chunk_slots,
            axis=0,
            out=pool.reshape(-1, self.CHUNK_PAGES),
        )
        self._pool = pool
        self._chunk_slots = np.arange(len(self._chunk_ids), dtype=np.int64)
        self._free_slots = []


# --------------------------------------------------------------------------- unstable tree


class UnstableMatch(NamedTuple):
    """Pages found identical during a search: they can become one stable node."""

    hash: int
    refs: tuple[int, ...]  # >= 2 refs, oldest first (unstable-tree items, then the batch)


class _UnstableResult(NamedTuple):
    matches: list[UnstableMatch]
    inserted: BoolArray  # over the batch
    unreadable: list[int]  # refs whose content was None


class UnstableTree:
    """Candidates seen during the current full scan: sorted hash → ref, 16 bytes/page.

    Backed by :class:`_SortedRuns`; the common case, a page whose hash matches nothing,
    costs no Python per page. Entries are tombstoned when they pair up, and everything is
    dropped by :meth:`reset` at the start of each full scan (kernel step 4).
    Each page should be offered at most once per full scan.
    """

    def __init__(self) -> None:
        self._runs = _SortedRuns()

    def __len__(self) -> int:
        return len(self._runs)

    @property
    def nbytes(self) -> int:
        return self._runs.nbytes

    def reset(self) -> None:
        self._runs.clear()

    def insert(self, hashes: npt.ArrayLike, refs: npt.ArrayLike) -> None:
        """Insert pages without searching."""
        hash_array, ref_array = _hashes(hashes), _refs(refs)
        if len(hash_array) != len(ref_array):
            raise ValueError("hashes and refs differ in length")
        order = np.argsort(hash_array, kind="stable")
        self._runs.insert_owned(hash_array[order], ref_array[order])

    def remove(self, ref: int, hash: int | None = None) -> bool:
        """Remove page ``ref`` (O(log n) given its hash, a full pass without)."""
        if hash is None:
            return self._runs.kill_values_in(ref, ref + 1) > 0
        for run, position, value in self._runs.entries(hash):
            if value == ref:
                self._runs.kill(run, position)
                return True
        return False

    def discard_refs(self, ref_lo: int, ref_hi: int) -> int:
        """Remove every page with a ref in [ref_lo, ref_hi); return how many."""
        return self._runs.kill_values_in(ref_lo, ref_hi)

    def refs(self) -> RefArray:
        """Refs of all pages in the tree (for tests and statistics)."""
        parts = [values[values != _DEAD] for values in self._runs._values]
        return np.concatenate(parts) if parts else np.empty(0, dtype=np.int64)

    def search_insert_batch(
        self, hashes: npt.ArrayLike, refs: npt.ArrayLike, content: ContentFn
    ) -> list[UnstableMatch]:
        """Search a batch of pages; return identical groups, insert the pages left alone.

        Groups follow the module's batch semantics: identical pages of the batch and
        identical tree items form one group; its tree items leave the tree. Pages whose
        content is ``None`` are neither matched nor inserted.
        """
        hash_array, ref_array = _hashes(hashes), _refs(refs)
        if len(hash_array) != len(ref_array):
            raise ValueError("hashes and refs differ in length")
        order = np.argsort(hash_array, kind="stable")
        return self._search_insert_sorted(hash_array[order], ref_array[order], content).matches

    def _search_insert_sorted(
        self, hashes: HashArray, refs: RefArray, content: ContentFn
    ) -> _UnstableResult:
        """:meth:`search_insert_batch` for a batch sorted by hash (ties in input order)."""
        count = len(hashes)
        inserted = np.zeros(count, dtype=np.bool_)
        if count == 0:
            return _UnstableResult([], inserted, [])
        # Only pages whose hash occurs twice in the batch or is in the tree need bytes.
        slow = np.zeros(count, dtype=np.bool_)
        same_as_next = hashes[1:] == hashes[:-1]
        slow[1:] |= same_as_next
        slow[:-1] |= same_as_next
        if len(self._runs):
            slow |= self._runs.hit_mask(hashes)
        np.logical_not(slow, out=inserted)
        matches: list[UnstableMatch] = []
        unreadable: list[int] = []
        slow_positions = np.flatnonzero(slow)
        if len(slow_positions):
            slow_hashes = hashes[slow_positions]
            starts = np.flatnonzero(np.r_[True, slow_hashes[1:] != slow_hashes[:-1]])
            bucket_bounds = [*starts.tolist(), len(slow_positions)]
            tree_bounds, tree_entries = self._runs.entries_for(slow_hashes[starts])
            bucket_keys = slow_hashes[starts].tolist()
            positions = slow_positions.tolist()
            slow_refs = refs[slow_positions].tolist()
            for bucket, (lo, hi) in enumerate(pairwise(bucket_bounds)):
                self._search_bucket(
                    bucket_keys[bucket],
                    tree_entries[tree_bounds[bucket] : tree_bounds[bucket + 1]],
                    positions[lo:hi],
                    slow_refs[lo:hi],
                    content,
                    matches,
                    inserted,
                    unreadable,
                )
        # The inserted pages are a subsequence of a sorted batch: already sorted.
        self._runs.insert_owned(hashes[inserted], refs[inserted])
        return _UnstableResult(matches, inserted, unreadable)

    def _search_bucket(
        self,
        key: int,
        tree_entries: list[tuple[int, int, int]],
        positions: list[int],
        batch_refs: list[int],
        content: ContentFn,
        matches: list[UnstableMatch],
        inserted: BoolArray,
        unreadable: list[int],
    ) -> None:
        """Split one hash bucket (tree items + batch pages) into byte-identical classes:
        per class, its content, its tree entries and its batch (position, ref) pairs."""
        classes: list[tuple[bytes, list[tuple[int, int, int]], list[tuple[int, int]]]] = []
        for entry in tree_entries:
            ref = entry[2]
            data = None if ref in batch_refs else content(ref)
            if data is None:
                # Gone, or the same page offered again in this scan: its old entry goes.
                self._runs.kill(entry[0], entry[1])
                continue
            data = _as_bytes(data)
            for cls in classes:
                if cls[0] == data:
                    cls[1].append(entry)
                    break
            else:
                classes.append((data, [entry], []))
        for position, ref in zip(positions, batch_refs, strict=True):
            data = content(ref)
            if data is None:
                unreadable.append(ref)
                continue
            data = _as_bytes(data)
            for cls in classes:
                if cls[0] == data:
                    cls[2].append((position, ref))
                    break
            else:
                classes.append((data, [], [(position, ref)]))
        for _, tree_class, batch_class in classes:
            if not batch_class:
                continue
            if not tree_class and len(batch_class) == 1:
                inserted[batch_class[0][0]] = True
                continue
            for run, position, _ in tree_class:
                self._runs.kill(run, position)
            group = (*(ref for _, _, ref in tree_class), *(ref for _, ref in batch_class))
            matches.append(UnstableMatch(key, group))


# --------------------------------------------------------------------------- stable tree


@dataclass(eq=False, slots=True)
class StableNode(Generic[P]):
    """One merged content: the caller's ``payload`` (where the content lives) and how many
    pages map it. Identity, not content, makes two nodes equal."""

    hash: int
    payload: P
    sharers: int = 0
    # The nodes with byte-identical content ("dups" when max_page_sharing splits them).
    # None once the node has been pruned from its tree.
    _chain: _Chain[P] | None = field(default=None, repr=False)

    @property
    def in_tree(self) -> bool:
        return self._chain is not None


@dataclass(eq=False, slots=True)
class _Chain(Generic[P]):
    """Stable nodes with identical content: the kernel's stable_node chain of dups."""

    nodes: list[StableNode[P]]


StableContentFn = Callable[[StableNode[P]], PageData | None]


class StableTree(Generic[P]):
    """Merged contents, one :class:`StableNode` per merged page frame.

    Far fewer entries than pages, so a dict (hash → chains of identical nodes) holds
    them; a sorted key index answers "is any stable node under this hash?" for a whole
    batch at once. ``max_page_sharing`` (kernel: /sys/kernel/mm/ksm/max_page_sharing,
    default 256, None = unlimited) bounds the sharers of one node.
    """

    def __init__(self, max_page_sharing: int | None = 256) -> None:
        if max_page_sharing is not None and max_page_sharing < 2:
            raise ValueError("max_page_sharing must be at least 2 (the kernel's minimum)")
        self.max_page_sharing = max_page_sharing
        self._by_hash: dict[int, list[_Chain[P]]] = {}
        # Key index over _by_hash; keys whose chains emptied stay until a rebuild.
        self._key_index = _SortedRuns()
        self._pending_keys: list[int] = []
        self._nodes = 0
        self._nodes_shared = 0  # nodes with at least one sharer
        self._sharers = 0

    def __len__(self) -> int:
        return self._nodes

    def __iter__(self) -> Iterator[StableNode[P]]:
        for chains in self._by_hash.values():
            for chain in chains:
                yield from chain.nodes

    @property
    def pages_shared(self) -> int:
        """Nodes with at least one sharer (kernel: pages_shared)."""
        return self._nodes_shared

    @property
    def pages_sharing(self) -> int:
        """Pages mapping a node beyond its first sharer: the pages saved (pages_sharing)."""
        return self._sharers - self._nodes_shared

    @property
    def nbytes(self) -> int:
        """Approximate memory of the tree itself (payloads are the caller's). O(nodes)."""
        total = sys.getsizeof(self._by_hash) + self._key_index.nbytes
        for key, chains in self._by_hash.items():
            total += sys.getsizeof(key) + sys.getsizeof(chains)
            for chain in chains:
                total += sys.getsizeof(chain) + sys.getsizeof(chain.nodes)
                total += sum(sys.getsizeof(node) for node in chain.nodes)
        return total

    def hit_mask(self, sorted_hashes: HashArray) -> BoolArray:
        """True where some node may have the hash (vectorised; exact check follows)."""
        self._flush_keys()
        return self._key_index.hit_mask(sorted_hashes)

    def lookup(
        self, hash: int, data: PageData, stable_content: StableContentFn[P]
    ) -> StableNode[P] | None:
        """The node with content ``data`` that has room for one more sharer, or None."""
        chain = self._find_chain(hash, _as_bytes(data), stable_content)
        return None if chain is None else self._pick(chain, {})

    def lookup_batch(
        self,
        hashes: npt.ArrayLike,
        refs: npt.ArrayLike,
        content: ContentFn,
        stable_content: StableContentFn[P],
    ) -> list[Join[P]]:
        """Kernel step 1 for a batch: which pages can join which node (room reserved as
        if every join succeeds). Pages with no hash in the tree cost no Python."""
        hash_array, ref_array = _hashes(hashes), _refs(refs)
        if len(hash_array) != len(ref_array):
            raise ValueError("hashes and refs differ in length")
        order = np.argsort(hash_array, kind="stable")
        sorted_hashes, sorted_refs = hash_array[order], ref_array[order]
        hits = np.flatnonzero(self.hit_mask(sorted_hashes))
        return self._plan_joins(sorted_hashes, sorted_refs, hits, content, stable_content)[0]

    def insert(
        self, hash: int, payload: P, stable_content: StableContentFn[P], sharers: int = 0
    ) -> StableNode[P]:
        """Add a node; identical-content nodes (compared through ``stable_content``)
        join one chain of dups."""
        node: StableNode[P] = StableNode(hash, payload, sharers)
        chains = self._by_hash.get(hash)
        chain = None
        if chains is None:
            chains = self._by_hash[hash] = []
            self._pending_keys.append(hash)
        else:
            data = stable_content(node)
            if data is not None:
                chain = self._find_chain(hash, _as_bytes(data), stable_content)
        if chain is None:
            chain = _Chain([])
            chains.append(chain)
        chain.nodes.append(node)
        node._chain = chain
        self._nodes += 1
        self._sharers += sharers
        self._nodes_shared += sharers > 0
        return node

    def add_sharers(self, node: StableNode[P], count: int = 1) -> None:
        if node._chain is None:
            raise ValueError("node was pruned from the stable tree")
        if count < 0:
            raise ValueError("count must be >= 0")
        if self.max_page_sharing is not None and node.sharers + count > self.max_page_sharing:
            raise ValueError(f"node would exceed max_page_sharing={self.max_page_sharing}")
        self._nodes_shared += node.sharers == 0 and count > 0
        node.sharers += count
        self._sharers += count

    def remove_sharers(self, node: StableNode[P], count: int = 1) -> bool:
        """Pages stopped sharing ``node`` (copy-on-write, unmerge, exit). True if the node
        lost its last sharer and was pruned: its payload can be released."""
        if node._chain is None:
            raise ValueError("node was pruned from the stable tree")
        if not 0 <= count <= node.sharers:
            raise ValueError(f"cannot remove {count} of {node.sharers} sharers")
        node.sharers -= count
        self._sharers -= count
        if node.sharers == 0:
            self._nodes_shared -= count > 0
            self.remove(node)
            return True
        return False

    def remove(self, node: StableNode[P]) -> None:
        """Prune ``node`` whatever its sharers (e.g. its payload became unreadable)."""
        chain = node._chain
        if chain is None:
            return
        chain.nodes.remove(node)
        node._chain = None
        self._nodes -= 1
        self._sharers -= node.sharers
        self._nodes_shared -= node.sharers > 0
        if not chain.nodes:
            chains = self._by_hash[node.hash]
            chains.remove(chain)
            if not chains:
                del self._by_hash[node.hash]

    def _flush_keys(self) -> None:
        stored = self._key_index.entries_stored + len(self._pending_keys)
        if stored > 2 * len(self._by_hash) + 1024:
            # Mostly keys of pruned nodes: rebuild from the dict.
            self._key_index.clear()
            self._pending_keys = list(self._by_hash)
        if self._pending_keys:
            keys = np.sort(np.array(self._pending_keys, dtype=np.uint64))
            self._key_index.insert_owned(keys, np.zeros(len(keys), dtype=np.int64))
            self._pending_keys = []

    @staticmethod
    def _chain_content(chain: _Chain[P], stable_content: StableContentFn[P]) -> bytes | None:
        for node in chain.nodes:  # the first readable dup speaks for the chain
            data = stable_content(node)
            if data is not None:
                return _as_bytes(data)
        return None

    def _find_chain(
        self, hash: int, data: bytes, stable_content: StableContentFn[P]
    ) -> _Chain[P] | None:
        for chain in self._by_hash.get(hash, ()):
            if self._chain_content(chain, stable_content) == data:
                return chain
        return None

    def _pick(
        self, chain: _Chain[P], planned: dict[StableNode[P], list[int]]
    ) -> StableNode[P] | None:
        """The dup with the most sharers that still has room (kernel: stable_node_dup
        fills dups up to max_page_sharing to keep their number low)."""
        best: StableNode[P] | None = None
        best_count = -1
        for node in chain.nodes:
            count = node.sharers + len(planned.get(node, ()))
            has_room = self.max_page_sharing is None or count < self.max_page_sharing
            if has_room and count > best_count:
                best, best_count = node, count
        return best

    def _plan_joins(
        self,
        hashes: HashArray,
        refs: RefArray,
        positions: RefArray,
        content: ContentFn,
        stable_content: StableContentFn[P],
    ) -> tuple[list[Join[P]], list[int], list[int]]:
        """Step 1 for the batch pages at ``positions`` (sorted by hash): returns (joins,
        placed positions, unreadable refs). Capacity is reserved as if every planned join
        succeeds. This is the per-page Python path: one content() call and one memcmp."""
        planned: dict[StableNode[P], list[int]] = {}
        placed: list[int] = []
        unreadable: list[int] = []
        cap = self.max_page_sharing
        hit_hashes = hashes[positions]
        starts = np.flatnonzero(np.r_[True, hit_hashes[1:] != hit_hashes[:-1]])
        bounds = [*starts.tolist(), len(positions)]
        bucket_keys = hit_hashes[starts].tolist()
        hit_refs = refs[positions].tolist()
        hit_positions = positions.tolist()
        for bucket, (lo, hi) in enumerate(pairwise(bounds)):
            chains = self._by_hash.get(bucket_keys[bucket])
            if not chains:
                continue  # a stale key: its nodes were pruned
            contents = [self._chain_content(chain, stable_content) for chain in chains]
            # Per chain: the dup being filled and the room it has left.
            filling: list[tuple[StableNode[P] | None, int]] = [(None, 0)] * len(chains)
            for k in range(lo, hi):
                ref = hit_refs[k]
                data = content(ref)
                if data is None:
                    unreadable.append(ref)
                    continue
                data = _as_bytes(data)
                for which, chain_data in enumerate(contents):  # noqa: B007 (used after break)
                    if chain_data == data:
                        break
                else:
                    continue  # a hash collision: continue with step 2
                node, room = filling[which]
                if node is None or room == 0:
                    node = self._pick(chains[which], planned)
                    if node is None:
                        continue  # every dup is full: continue with step 2
                    taken = node.sharers + len(planned.get(node, ()))
                    room = len(hit_refs) if cap is None else cap - taken
                planned.setdefault(node, []).append(ref)
                placed.append(hit_positions[k])
                filling[which] = (node, room - 1)
        joins = [Join(node, tuple(node_refs)) for node, node_refs in planned.items()]
        return joins, placed, unreadable


# --------------------------------------------------------------------------- facade


class Join(NamedTuple, Generic[P]):
    """Map ``node``'s content over these pages (identical to it at compare time)."""

    node: StableNode[P]
    refs: tuple[int, ...]


class NewNode(NamedTuple):
    """Make these identical pages share one new frame; ``refs[0]`` is the oldest."""

    hash: int
    refs: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class MergeDecision(Generic[P]):
    """What one :meth:`KsmIndex.scan_batch` decided; ref arrays are in no set order."""

    joins: tuple[Join[P], ...]
    new_nodes: tuple[NewNode, ...]
    volatile: RefArray  # checksum changed since the last scan: skipped
    unshared: RefArray  # inserted into the unstable tree
    unreadable: tuple[int, ...]  # content() returned None

    @property
    def pages_to_merge(self) -> int:
        return sum(len(j.refs) for j in self.joins) + sum(len(n.refs) for n in self.new_nodes)


class KsmCounters(NamedTuple):
    """The kernel's /sys/kernel/mm/ksm counters, for what this index knows."""

    pages_shared: int  # stable nodes with sharers
    pages_sharing: int  # pages saved: sharers beyond the first of each node
    pages_unshared: int  # pages in the unstable tree
    pages_volatile: int  # pages found volatile during the current full scan
    full_scans: int


class KsmIndex(Generic[P]):
    """Kernel KSM's decision logic for batches of scanned pages (pure, no syscalls).

    Protocol, per full scan::

        index.start_full_scan()
        for each batch of pages not currently merged:
            decision = index.scan_batch(refs, hashes, content, stable_content)
            execute it; for each Join:    index.commit_join(join, merged=k)
                        for each NewNode: index.commit_new_node(new, payload, ...)
        index.end_full_scan()

    Commit before the next ``scan_batch``: a node exists only once its merge succeeded,
    as in the kernel. Pass only pages that are not merged (the caller knows them from
    its mappings; kernel: a page already in its stable node is skipped). When merged
    pages stop sharing, call :meth:`unmerge`.
    """

    def __init__(self, *, max_page_sharing: int | None = 256) -> None:
        self.checksums = ChecksumTable()
        self.unstable = UnstableTree()
        self.stable: StableTree[P] = StableTree(max_page_sharing)
        self.full_scans = 0
        self._volatile_this_scan = 0

    @property
    def nbytes(self) -> int:
        return self.checksums.nbytes + self.unstable.nbytes + self.stable.nbytes

    def counters(self) -> KsmCounters:
        return KsmCounters(
            pages_shared=self.stable.pages_shared,
            pages_sharing=self.stable.pages_sharing,
            pages_unshared=len(self.unstable),
            pages_volatile=self._volatile_this_scan,
            full_scans=self.full_scans,
        )

    def start_full_scan(self) -> None:
        """Kernel step 4: candidates from the previous pass are stale, forget them."""
        self.unstable.reset()
        self._volatile_this_scan = 0

    def end_full_scan(self) -> None:
        self.full_scans += 1

    def forget(self, ref_lo: int, ref_hi: int) -> None:
        """Pages in [ref_lo, ref_hi) are gone (unmapped, target exited). Their stable
        sharers are the caller's to remove with :meth:`unmerge`."""
        self.checksums.forget(ref_lo, ref_hi)
        self.unstable.discard_refs(ref_lo, ref_hi)

    def scan_batch(
        self,
        refs: npt.ArrayLike,
        hashes: npt.ArrayLike,
        content: ContentFn,
        stable_content: StableContentFn[P],
    ) -> MergeDecision[P]:
        """Run kernel steps 1-3 for a batch of pages (each ref at most once per scan)."""
        ref_array, hash_array = _refs(refs), _hashes(hashes)
        if len(ref_array) != len(hash_array):
            raise ValueError("refs and hashes differ in length")
        # One sort by hash serves every step; ties keep input order.
        order = np.argsort(hash_array, kind="stable")
        sorted_hashes, sorted_refs = hash_array[order], ref_array[order]
        del order

        # Step 1: stable tree.
        joins: list[Join[P]] = []
        unreadable: list[int] = []
        if len(self.stable):
            hit = np.flatnonzero(self.stable.hit_mask(sorted_hashes))
            if len(hit):
                joins, placed, unreadable = self.stable._plan_joins(
                    sorted_hashes, sorted_refs, hit, content, stable_content
                )
                if placed or unreadable:
                    rest = np.ones(len(sorted_refs), dtype=np.bool_)
                    rest[placed] = False
                    if unreadable:
                        rest &= ~np.isin(sorted_refs, unreadable)
                    sorted_hashes, sorted_refs = sorted_hashes[rest], sorted_refs[rest]

        # Step 2: checksum of the previous scan.
        checksum_stable = self.checksums.update(sorted_refs, sorted_hashes)
        volatile = sorted_refs[~checksum_stable]
        self._volatile_this_scan += len(volatile)
        if not checksum_stable.all():
            sorted_hashes = sorted_hashes[checksum_stable]
            sorted_refs = sorted_refs[checksum_stable]

        # Step 3: unstable tree.
        result = self.unstable._search_insert_sorted(sorted_hashes, sorted_refs, content)
        unreadable += result.unreadable
        new_nodes, leftovers = self._cut_groups(result.matches)
        unshared = sorted_refs[result.inserted]
        if leftovers:
            left_hashes = [hash for hash, _ in leftovers]
            left_refs = [ref for _, ref in leftovers]
            self.unstable.insert(left_hashes, left_refs)
            unshared = np.concatenate([unshared, np.array(left_refs, dtype=np.int64)])
        return MergeDecision(tuple(joins), new_nodes, volatile, unshared, tuple(unreadable))

    def _cut_groups(
        self, matches: list[UnstableMatch]
    ) -> tuple[tuple[NewNode, ...], list[tuple[int, int]]]:
        """Cut groups to max_page_sharing; a single page left over waits in the tree."""
        cap = self.stable.max_page_sharing
        new_nodes: list[NewNode] = []
        leftovers: list[tuple[int, int]] = []
        for match in matches:
            step = len(match.refs) if cap is None else cap
            for start in range(0, len(match.refs), step):
                piece = match.refs[start : start + step]
                if len(piece) == 1:
                    leftovers.append((match.hash, piece[0]))
                else:
                    new_nodes.append(NewNode(match.hash, piece))
        return tuple(new_nodes), leftovers

    def commit_join(self, join: Join[P], merged: int | None = None) -> None:
        """``merged`` of ``join.refs`` now map the node (default: all of them)."""
        count = len(join.refs) if merged is None else merged
        if not 0 <= count <= len(join.refs):
            raise ValueError(f"merged={count} outside 0..{len(join.refs)}")
        self.stable.add_sharers(join.node, count)

    def commit_new_node(
        self,
        new: NewNode,
        payload: P,
        stable_content: StableContentFn[P],
        merged: int | None = None,
    ) -> StableNode[P] | None:
        """``merged`` of ``new.refs`` now map ``payload``; None if none did."""
        count = len(new.refs) if merged is None else merged
        if not 0 <= count <= len(new.refs):
            raise ValueError(f"merged={count} outside 0..{len(new.refs)}")
        if count == 0:
            return None
        return self.stable.insert(new.hash, payload, stable_content, sharers=count)

    def unmerge(self, node: StableNode[P], count: int = 1) -> bool:
        """``count`` pages stopped sharing ``node``; True if it was pruned."""
        return self.stable.remove_sharers(node, count)
