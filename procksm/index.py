"""KSM's index: the checksum table, the unstable tree and the stable tree (pure logic,
no syscalls), the one place where ``procksm merge`` and ``procksm attach`` decide which
pages may be duplicates.

The kernel's rules (mm/ksm.c ``cmp_and_merge_page``, admin-guide/mm/ksm.rst), for a batch of
scanned pages:

1. **checksum stability**: a page takes part only if its hash equals the one it had at
   its previous scan (:class:`ChecksumTable`); a page seen for the first time, or changed
   since, only has its checksum remembered (``pages_volatile``). ``first_look_stable``
   lets a first look count as stable (procksm's default: the second look is the byte
   comparison under stop at merge time);
2. **stable tree** (:class:`StableTree`): contents already merged (procksm's sealed
   segments, one hash per segment page); a stable page whose hash is there may join it;
3. **unstable tree** (:class:`UnstableTree`): checksum-stable pages not merged, seen
   during the current full scan; a page whose hash is there, or twice among the batch's
   candidates, is *ready*, together with its partners in the tree;
4. the unstable tree is **emptied at the start of every full scan**.

A hash is only an index. Whether two pages are identical is decided by the caller's
exact byte comparison (the merge engine compares every page with its slot under stop):
:meth:`KsmIndex.settle` hears which pages really merged, inserts the candidates that did
not into the unstable tree (they wait for a partner) and takes the partners that merged
out of it.

Memory: targets have millions of pages, so everything with one entry per page is a
numpy array (batch API, no Python object per page): 8 bytes/page of checksums, 24
bytes/page in the unstable tree, 8 bytes per merged page in the stable tree.

Pages are named by a *ref* (:func:`page_ref`): target index and page number in one int64.
Zero pages get no special case here: the caller drops them with MADV_DONTNEED (the
kernel's use_zero_pages); they are never candidates.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

__all__ = [
    "REF_PAGE_BITS",
    "ChecksumTable",
    "KsmIndex",
    "Look",
    "Partners",
    "StableTree",
    "UnstableTree",
    "group_by_hash",
    "page_ref",
    "page_refs",
    "target_refs",
]

HashArray = npt.NDArray[np.uint64]
RefArray = npt.NDArray[np.int64]
BoolArray = npt.NDArray[np.bool_]

# x86-64 user addresses have 47 bits (56 with 5-level paging): page numbers need up to
# 44 bits, which leaves 19 bits of target index in a non-negative int64.
REF_PAGE_BITS = 44
_REF_PAGE_MASK = (1 << REF_PAGE_BITS) - 1
_REF_MAX_TARGET = (1 << (63 - REF_PAGE_BITS)) - 1


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


def target_refs(target_index: int) -> tuple[int, int]:
    """[lo, hi): the refs of every page of target ``target_index``."""
    return target_index << REF_PAGE_BITS, (target_index + 1) << REF_PAGE_BITS


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


def group_by_hash(hashes: npt.ArrayLike) -> RefArray:
    """Per row, the first row with the same hash: the groups that the merge engine plans
    slots from (each page is still compared with its slot byte for byte)."""
    array = _hashes(hashes)
    if array.size == 0:
        return np.zeros(0, np.int64)
    _u, first, inverse = np.unique(array, return_index=True, return_inverse=True)
    groups: RefArray = first[inverse.reshape(-1)].astype(np.int64)
    return groups


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


@dataclass(frozen=True, slots=True)
class Partners:
    """Unstable-tree items found for a batch (hash order within each run)."""

    hash: HashArray
    ref: RefArray
    pfn: HashArray
    run: RefArray  # where each item is stored, for UnstableTree.kill
    position: RefArray

    def __len__(self) -> int:
        return int(self.ref.size)

    @classmethod
    def none(cls) -> Partners:
        return cls(
            np.zeros(0, np.uint64),
            np.zeros(0, np.int64),
            np.zeros(0, np.uint64),
            np.zeros(0, np.int64),
            np.zeros(0, np.int64),
        )


class UnstableTree:
    """Checksum-stable, unmerged pages seen during the current full scan.

    Sorted runs of (hash, ref, pfn) with an alive flag, 25 bytes per page, searched with
    vectorised ``searchsorted`` (no Python per page). Like a log-structured merge, the
    newest run joins the one before while it is at least half its size: O(log n) runs to
    search per batch, and each entry moves O(log n) times (measured: one run per batch
    made the searches the daemon's biggest cost after reading). An item that pairs up is
    killed, not removed; merging runs drops the dead. Emptied by :meth:`reset` at the
    start of every full scan (kernel step 4).
    """

    def __init__(self) -> None:
        self._hash: list[HashArray] = []
        self._ref: list[RefArray] = []
        self._pfn: list[HashArray] = []
        self._alive: list[BoolArray] = []

    def __len__(self) -> int:
        return int(sum(int(a.sum()) for a in self._alive))

    @property
    def nbytes(self) -> int:
        return sum(h.nbytes * 3 + a.nbytes for h, a in zip(self._hash, self._alive, strict=True))

    def reset(self) -> None:
        self._hash, self._ref, self._pfn, self._alive = [], [], [], []

    def insert(self, hashes: npt.ArrayLike, refs: npt.ArrayLike, pfns: npt.ArrayLike) -> None:
        h, r = _hashes(hashes), _refs(refs)
        p = np.asarray(pfns, dtype=np.uint64)
        if not h.size == r.size == p.size:
            raise ValueError("hashes, refs and pfns differ in length")
        if h.size == 0:
            return
        order = np.argsort(h, kind="stable")
        self._hash.append(h[order])
        self._ref.append(r[order])
        self._pfn.append(p[order])
        self._alive.append(np.ones(h.size, np.bool_))
        while len(self._hash) >= 2 and 2 * self._hash[-1].size >= self._hash[-2].size:
            self._merge_last_two()

    def _merge_last_two(self) -> None:
        keep = self._alive[-2:]
        h = np.concatenate([x[k] for x, k in zip(self._hash[-2:], keep, strict=True)])
        r = np.concatenate([x[k] for x, k in zip(self._ref[-2:], keep, strict=True)])
        p = np.concatenate([x[k] for x, k in zip(self._pfn[-2:], keep, strict=True)])
        order = np.argsort(h, kind="stable")  # two sorted runs: a linear merge (timsort)
        for runs in (self._hash, self._ref, self._pfn, self._alive):
            del runs[-2:]
        self._hash.append(h[order])
        self._ref.append(r[order])
        self._pfn.append(p[order])
        self._alive.append(np.ones(h.size, np.bool_))

    def contains(self, hashes: npt.ArrayLike) -> BoolArray:
        """True where a live item has the hash."""
        q = _hashes(hashes)
        hit = np.zeros(q.size, np.bool_)
        for h, a in zip(self._hash, self._alive, strict=True):
            lo = np.searchsorted(h, q, "left")
            hi = np.searchsorted(h, q, "right")
            if not (hi > lo).any():
                continue
            alive_before = np.concatenate(([0], np.cumsum(a)))
            hit |= (alive_before[hi] - alive_before[lo]) > 0
        return hit

    def find(self, hashes: npt.ArrayLike) -> Partners:
        """The live items with one of ``hashes``. They stay in the tree until
        :meth:`kill`: a merge that fails leaves them for later partners."""
        q = np.unique(_hashes(hashes))
        parts: list[tuple[int, RefArray]] = []
        for run, (h, a) in enumerate(zip(self._hash, self._alive, strict=True)):
            lo = np.searchsorted(h, q, "left")
            n = np.searchsorted(h, q, "right") - lo
            if not n.any():
                continue
            # positions lo..lo+n-1 of every hit, concatenated
            pos = np.repeat(lo, n) + (np.arange(int(n.sum())) - np.repeat(np.cumsum(n) - n, n))
            pos = pos[a[pos]]
            if pos.size:
                parts.append((run, pos.astype(np.int64)))
        if not parts:
            return Partners.none()
        return Partners(
            hash=np.concatenate([self._hash[run][pos] for run, pos in parts]),
            ref=np.concatenate([self._ref[run][pos] for run, pos in parts]),
            pfn=np.concatenate([self._pfn[run][pos] for run, pos in parts]),
            run=np.concatenate([np.full(pos.size, run, np.int64) for run, pos in parts]),
            position=np.concatenate([pos for _run, pos in parts]),
        )

    def kill(self, partners: Partners, which: npt.ArrayLike) -> None:
        """Take ``partners[which]`` out of the tree (they merged). ``partners`` must come
        from :meth:`find` with no insert in between (inserts move items)."""
        mask = np.asarray(which, dtype=np.bool_)
        for run in np.unique(partners.run[mask]).tolist():
            sel = mask & (partners.run == run)
            self._alive[run][partners.position[sel]] = False

    def forget(self, ref_lo: int, ref_hi: int) -> None:
        """Items with refs in [ref_lo, ref_hi) are gone (a target exited or exec'd)."""
        for r, a in zip(self._ref, self._alive, strict=True):
            a[(r >= ref_lo) & (r < ref_hi)] = False


# --------------------------------------------------------------------------- stable tree


class StableTree:
    """Contents already merged: for each segment (a sealed memfd, by a caller's key such
    as its inode), the hash of each of its pages, in page order.

    Sealed segments never change, so a segment's hashes are computed once in its life
    (:attr:`segments` doubles as that cache). Lookups go through one sorted array of all
    hashes, rebuilt when a segment is added, replaced or forgotten.
    """

    def __init__(self) -> None:
        self.segments: dict[int, HashArray] = {}
        self._keys: frozenset[tuple[int, int]] | None = None
        self._sorted = np.zeros(0, np.uint64)
        self._key_of = np.zeros(0, np.int64)
        self._page_of = np.zeros(0, np.int64)

    def __len__(self) -> int:
        return len(self.segments)

    @property
    def nbytes(self) -> int:
        return sum(h.nbytes for h in self.segments.values())

    def add(self, key: int, hashes: npt.ArrayLike) -> None:
        self.segments[key] = _hashes(hashes)

    def keep_only(self, keys: set[int]) -> None:
        """Forget the segments not in ``keys`` (no target maps them any more)."""
        for key in [k for k in self.segments if k not in keys]:
            del self.segments[key]

    def clear(self) -> None:
        self.segments.clear()

    def _index(self) -> None:
        # the arrays too: a merge engine writes the dict directly, and a freed memfd's
        # inode number may come back with other content
        keys = frozenset((k, id(h)) for k, h in self.segments.items())
        if keys == self._keys:
            return
        self._keys = keys
        items = list(self.segments.items())
        if not items:
            self._sorted = np.zeros(0, np.uint64)
            self._key_of = self._page_of = np.zeros(0, np.int64)
            return
        hashes = np.concatenate([h for _k, h in items])
        key_of = np.concatenate([np.full(h.size, k, np.int64) for k, h in items])
        page_of = np.concatenate([np.arange(h.size, dtype=np.int64) for _k, h in items])
        order = np.argsort(hashes, kind="stable")
        self._sorted, self._key_of, self._page_of = hashes[order], key_of[order], page_of[order]

    def contains(self, hashes: npt.ArrayLike) -> BoolArray:
        """True where some merged page has the hash."""
        return self.lookup(hashes)[0]

    def lookup(self, hashes: npt.ArrayLike) -> tuple[BoolArray, RefArray, RefArray]:
        """``(hit, key, page)``: per hash, whether a merged page has it and, where one
        does, the first such (segment key, page number), in insertion order."""
        self._index()
        q = _hashes(hashes)
        if self._sorted.size == 0 or q.size == 0:
            empty = np.zeros(q.size, np.int64)
            return np.zeros(q.size, np.bool_), empty, empty.copy()
        pos = np.minimum(np.searchsorted(self._sorted, q), self._sorted.size - 1)
        hit: BoolArray = self._sorted[pos] == q
        return hit, self._key_of[pos], self._page_of[pos]


# --------------------------------------------------------------------------- the index


@dataclass(frozen=True, slots=True)
class Look:
    """The index's verdict on one batch of pages (boolean masks over the batch)."""

    stable: BoolArray  # checksum-stable (readable, and the same hash as last scan)
    candidate: BoolArray  # stable, not zero, not held back: may merge or wait
    in_stable: BoolArray  # candidate whose hash is in the stable tree
    ready: BoolArray  # candidate with a possible partner: stable tree, unstable tree, batch

    @property
    def volatile(self) -> BoolArray:
        return ~self.stable


class KsmIndex:
    """Steps 1-4 of KSM for batches of pages, with the caller's merge in between::

    index.start_full_scan()
    for each batch (refs, hashes, pfns of pages not merged):
        look = index.look(refs, hashes, readable=..., zero=...)
        partners = index.partners(hashes[look.ready])
        merge look.ready (and partners); compare bytes; learn what merged
        index.settle(look, refs, hashes, pfns, merged, partners, partners_merged)
    """

    def __init__(self) -> None:
        self.checksums = ChecksumTable()
        self.unstable = UnstableTree()
        self.stable = StableTree()

    @property
    def nbytes(self) -> int:
        return self.checksums.nbytes + self.unstable.nbytes + self.stable.nbytes

    def start_full_scan(self) -> None:
        """Kernel step 4: candidates of the previous pass are stale."""
        self.unstable.reset()

    def clear(self) -> None:
        """Forget everything (after unmerging everything: run=2)."""
        self.checksums = ChecksumTable()
        self.unstable.reset()
        self.stable.clear()

    def forget(self, ref_lo: int, ref_hi: int) -> None:
        """Pages in [ref_lo, ref_hi) are gone (target exited, exec'd, unregistered)."""
        self.checksums.forget(ref_lo, ref_hi)
        self.unstable.forget(ref_lo, ref_hi)

    def look(
        self,
        refs: npt.ArrayLike | None,
        hashes: npt.ArrayLike,
        *,
        readable: npt.ArrayLike | None = None,
        zero: npt.ArrayLike | None = None,
        held: npt.ArrayLike | None = None,
        first_look_stable: bool = False,
    ) -> Look:
        """Steps 1-3 for a batch (each ref at most once per full scan): remembers the
        checksums and says which pages are candidates and which are ready to merge.
        ``readable``: False for pages whose content could not be read (never stable);
        ``zero``: all-zero pages (the caller drops them); ``held``: pages the caller
        holds back (they are neither merged nor inserted). ``refs`` None: pages looked at
        once and never again (the one-shot merge without --two-scans): nothing is
        remembered, and with ``first_look_stable`` every readable page is stable."""
        h = _hashes(hashes)
        n = h.size
        ok = _mask(readable, n, True)
        if refs is None:
            stable = ok.copy() if first_look_stable else np.zeros(n, np.bool_)
        else:
            r = _refs(refs)
            if r.size != n:
                raise ValueError("refs and hashes differ in length")
            stable = np.zeros(n, np.bool_)
            stable[ok] = self.checksums.update(r[ok], h[ok], first_look_stable=first_look_stable)
        candidate = stable & ~_mask(zero, n, False) & ~_mask(held, n, False)
        in_stable = candidate & self.stable.contains(h) if len(self.stable) else candidate & False
        in_unstable = candidate & self.unstable.contains(h)
        twice = candidate & _in_sorted(_repeated(h[candidate]), h)
        return Look(stable, candidate, in_stable, in_stable | in_unstable | twice)

    def partners(self, hashes: npt.ArrayLike) -> Partners:
        """Unstable-tree items sharing a hash with ``hashes`` (the ready pages')."""
        return self.unstable.find(hashes)

    def settle(
        self,
        look: Look,
        refs: npt.ArrayLike,
        hashes: npt.ArrayLike,
        pfns: npt.ArrayLike,
        merged: npt.ArrayLike,
        partners: Partners | None = None,
        partners_merged: npt.ArrayLike | None = None,
    ) -> None:
        """After the caller's merge: candidates that did not merge wait in the unstable
        tree for a partner; partners that merged leave it."""
        if partners is not None and len(partners):
            self.unstable.kill(partners, _mask(partners_merged, len(partners), False))
        rest = look.candidate & ~_mask(merged, look.candidate.size, False)
        self.unstable.insert(
            _hashes(hashes)[rest], _refs(refs)[rest], np.asarray(pfns, np.uint64)[rest]
        )


def _repeated(hashes: HashArray) -> HashArray:
    """The hashes that occur more than once, sorted (``hashes`` is sorted in place).
    One sort and a neighbour comparison: a scan of millions of pages needs no inverse
    or counts arrays (np.unique's would cost 16 bytes more per page)."""
    hashes.sort()
    repeated: HashArray = np.unique(hashes[1:][hashes[1:] == hashes[:-1]])
    return repeated


def _in_sorted(keys: HashArray, values: HashArray, chunk: int = 1 << 16) -> BoolArray:
    """Which of ``values`` are in the sorted ``keys`` (in chunks: small temporaries)."""
    out = np.zeros(values.size, np.bool_)
    if keys.size == 0:
        return out
    for i in range(0, values.size, chunk):
        part = values[i : i + chunk]
        position = np.minimum(np.searchsorted(keys, part), keys.size - 1)
        out[i : i + chunk] = keys[position] == part
    return out


def _mask(values: npt.ArrayLike | None, n: int, default: bool) -> BoolArray:
    if values is None:
        return np.full(n, default, np.bool_)
    mask = np.asarray(values, dtype=np.bool_)
    if mask.shape != (n,):
        raise ValueError(f"mask of shape {mask.shape}, expected ({n},)")
    return mask
