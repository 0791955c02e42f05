"""procksm.index: the one KSM index of `procksm merge` and `procksm attach` (pure, no root).

The index is checked against a brute-force model of KSM's rules (dicts and lists, no
numpy): checksum stability, the unstable tree rebuilt per full scan, the stable tree, and
what the caller's byte comparison decides (settle).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from procksm.index import (
    ChecksumTable,
    KsmIndex,
    StableTree,
    UnstableTree,
    group_by_hash,
    page_ref,
    page_refs,
    target_refs,
)


def test_page_ref_roundtrip_and_limits() -> None:
    assert page_ref(3, 0x1234) == (3 << 44) | 0x1234
    assert page_refs(3, [1, 2]).tolist() == [page_ref(3, 1), page_ref(3, 2)]
    lo, hi = target_refs(3)
    assert lo == page_ref(3, 0) and hi == page_ref(4, 0)
    with pytest.raises(ValueError):
        page_ref(-1, 0)
    with pytest.raises(ValueError):
        page_ref(0, 1 << 44)
    with pytest.raises(ValueError):
        page_refs(0, [1 << 44])


# --------------------------------------------------------------------------- checksums


def test_checksums_first_scan_never_stable_then_compare() -> None:
    table = ChecksumTable()
    refs = page_refs(1, range(10))
    hashes = np.arange(10, dtype=np.uint64)
    assert not table.update(refs, hashes).any()
    assert table.update(refs, hashes).all()
    changed = hashes.copy()
    changed[[2, 7]] += np.uint64(100)
    assert np.flatnonzero(~table.update(refs, changed)).tolist() == [2, 7]
    assert table.update(refs, changed).all()


def test_checksums_unseen_marker_is_not_a_checksum() -> None:
    """The all-ones hash is a real checksum, not "never scanned"."""
    table = ChecksumTable()
    ones = np.array([0xFFFF_FFFF_FFFF_FFFF], dtype=np.uint64)
    assert not table.update([5], ones).any()
    assert table.update([5], ones).all()
    assert not table.update([5], [0]).any()


def test_checksums_sparse_refs_allocate_chunks_not_ranges() -> None:
    """Pages far apart (other targets, a sparse 32 GiB heap) cost a chunk each."""
    table = ChecksumTable()
    refs = [page_ref(0, 0), page_ref(0, 1 << 23), page_ref(7, 12345), page_ref(7, 12346)]
    table.update(refs, [1, 2, 3, 4])
    assert len(table) == 3
    assert table.nbytes < 4 * ChecksumTable.CHUNK_PAGES * 8 + 1024
    assert table.update(refs, [1, 2, 3, 5]).tolist() == [True, True, True, False]


def test_checksums_forget_ranges_and_reuse_memory() -> None:
    table = ChecksumTable()
    pages = ChecksumTable.CHUNK_PAGES
    refs = np.arange(10 * pages, dtype=np.int64)
    hashes = np.arange(10 * pages, dtype=np.uint64) + np.uint64(1)
    table.update(refs, hashes)
    # A partial first chunk, three whole chunks and a partial one.
    table.forget(100, 4 * pages + 10)
    assert len(table) == 7
    stable = table.update(refs, hashes)
    assert np.flatnonzero(~stable).tolist() == list(range(100, 4 * pages + 10))
    # Forgetting most chunks gives the pool back (compaction keeps the survivors).
    table.forget(0, 8 * pages)
    assert len(table) == 2
    assert table.nbytes < 3 * pages * 8 + 1024
    assert table.update(refs[8 * pages :], hashes[8 * pages :]).all()
    # Slots freed by forget are reused, reset to "never scanned".
    table.forget(8 * pages, 9 * pages)
    pool_bytes = table._pool.nbytes
    assert not table.update(refs[:pages], hashes[:pages]).any()
    assert table._pool.nbytes == pool_bytes
    assert table.update(refs[9 * pages :], hashes[9 * pages :]).all()


# Range ends for forget(): often on chunk boundaries, so whole chunks are freed.
REF_BOUNDARIES = st.one_of(
    st.integers(0, 6 * 512), st.integers(0, 6).map(lambda c: c * ChecksumTable.CHUNK_PAGES)
)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.one_of(
            st.tuples(
                st.just("update"),
                st.lists(st.integers(0, 6 * 512), unique=True, max_size=60),
                st.integers(0, 2),
            ),
            st.tuples(st.just("forget"), REF_BOUNDARIES, REF_BOUNDARIES),
        ),
        max_size=25,
    )
)
def test_checksums_match_a_dict(operations: list[tuple[str, object, int]]) -> None:
    """Random updates and forgets over a few chunks against a dict of ref → checksum."""
    table = ChecksumTable()
    model: dict[int, int] = {}
    all_ones = 0xFFFF_FFFF_FFFF_FFFF
    for kind, first, second in operations:
        if kind == "update":
            assert isinstance(first, list)
            # Checksums depend on the ref and a generation; some are the all-ones value.
            checksums = [all_ones if (r + second) % 7 == 0 else r * 3 + second for r in first]
            expected = [model.get(r) == c for r, c in zip(first, checksums, strict=True)]
            got = table.update(np.array(first, dtype=np.int64), checksums).tolist()
            assert got == expected
            model.update(zip(first, checksums, strict=True))
        else:
            assert isinstance(first, int)
            lo, hi = min(first, second), max(first, second)
            table.forget(lo, hi)
            model = {r: c for r, c in model.items() if not lo <= r < hi}
    chunks = {r // ChecksumTable.CHUNK_PAGES for r in model}
    assert len(table) >= len(chunks)


# --------------------------------------------------------------------------- unit tests


def test_group_by_hash_is_the_first_row_of_each_hash() -> None:
    assert group_by_hash([5, 7, 5, 9, 7, 5]).tolist() == [0, 1, 0, 3, 1, 0]
    assert group_by_hash([]).tolist() == []


def test_first_look_is_volatile_unless_first_look_stable() -> None:
    index = KsmIndex()
    refs = page_refs(0, [1, 2])
    look = index.look(refs, [9, 9])
    assert not look.stable.any() and not look.ready.any()  # the kernel: two looks
    look = index.look(refs, [9, 9])
    assert look.ready.tolist() == [True, True]
    other = KsmIndex()
    assert other.look(refs, [9, 9], first_look_stable=True).ready.all()


def test_a_changed_page_is_volatile_even_when_it_could_merge() -> None:
    """The volatility rule on a mergeable page: it equals a partner now, but its
    checksum changed since its previous scan, so it waits one more scan."""
    index = KsmIndex()
    a, b = page_ref(0, 1), page_ref(1, 1)
    index.look([a, b], [1, 2], first_look_stable=True)
    index.start_full_scan()
    look = index.look([a, b], [1, 1], first_look_stable=True)  # b now equals a
    assert look.stable.tolist() == [True, False]
    assert not look.ready.any()
    index.settle(look, [a, b], [1, 1], [10, 11], [False, False])
    index.start_full_scan()
    look = index.look([a, b], [1, 1], first_look_stable=True)
    assert look.ready.tolist() == [True, True]


def test_unstable_tree_pairs_across_batches_and_is_emptied_per_full_scan() -> None:
    index = KsmIndex()
    a, b = page_ref(0, 1), page_ref(1, 1)
    look = index.look([a], [4], first_look_stable=True)
    assert not look.ready.any()
    index.settle(look, [a], [4], [10], [False])
    assert len(index.unstable) == 1
    look = index.look([b], [4], first_look_stable=True)
    assert look.ready.tolist() == [True]
    partners = index.partners([4])
    assert partners.ref.tolist() == [a] and partners.pfn.tolist() == [10]
    # the caller's byte comparison said no: both stay candidates
    index.settle(look, [b], [4], [11], [False], partners, [False])
    assert len(index.unstable) == 2
    index.start_full_scan()
    assert len(index.unstable) == 0


def test_partners_that_merged_leave_the_tree() -> None:
    index = KsmIndex()
    refs = page_refs(0, [1, 2, 3])
    look = index.look(refs, [4, 4, 5], first_look_stable=True)
    assert look.ready.tolist() == [True, True, False]
    index.settle(look, refs, [4, 4, 5], [1, 2, 3], [False, False, False])
    b = page_ref(1, 1)
    look = index.look([b], [4], first_look_stable=True)
    partners = index.partners([4])
    assert sorted(partners.ref.tolist()) == refs[:2].tolist()
    merged = partners.ref == refs[0]
    index.settle(look, [b], [4], [9], [True], partners, merged)
    assert sorted(index.partners([4, 5]).ref.tolist()) == [refs[1], refs[2]]


def test_stable_tree_lookup_and_prune() -> None:
    tree = StableTree()
    tree.add(100, np.array([7, 8, 9], np.uint64))
    tree.add(200, np.array([9, 3], np.uint64))
    hit, key, page = tree.lookup([9, 3, 4])
    assert hit.tolist() == [True, True, False]
    assert (key[0], page[0]) == (100, 2)  # the first segment added wins
    assert (key[1], page[1]) == (200, 1)
    tree.keep_only({200})
    assert tree.contains([7, 9, 3]).tolist() == [False, True, True]
    tree.clear()
    assert not tree.contains([9]).any()


def test_a_page_equal_to_merged_content_is_ready_alone() -> None:
    index = KsmIndex()
    index.stable.add(1, np.array([42], np.uint64))
    look = index.look(page_refs(0, [5, 6]), [42, 43], first_look_stable=True)
    assert look.in_stable.tolist() == [True, False]
    assert look.ready.tolist() == [True, False]


def test_held_zero_and_unreadable_pages_are_never_candidates() -> None:
    index = KsmIndex()
    refs = page_refs(0, range(4))
    look = index.look(
        refs,
        [1, 1, 1, 1],
        readable=[True, False, True, True],
        zero=[False, False, True, False],
        held=[False, False, False, True],
        first_look_stable=True,
    )
    assert look.candidate.tolist() == [True, False, False, False]
    assert not look.ready.any()  # a lone candidate
    index.settle(look, refs, [1, 1, 1, 1], [0, 1, 2, 3], [False] * 4)
    assert len(index.unstable) == 1


def test_forget_drops_checksums_and_candidates() -> None:
    index = KsmIndex()
    a, b = page_ref(0, 1), page_ref(1, 1)
    look = index.look([a, b], [3, 4])
    look = index.look([a, b], [3, 4])
    index.settle(look, [a, b], [3, 4], [0, 0], [False, False])
    index.forget(*target_refs(0))
    assert index.partners([3, 4]).ref.tolist() == [b]
    assert not index.look([a], [3]).stable.any()  # never scanned again


def test_unstable_tree_merges_runs_and_drops_the_dead() -> None:
    tree = UnstableTree()
    for i in range(64):
        tree.insert([i % 5], [i], [i])
        if i % 3 == 0:
            found = tree.find([i % 5])
            tree.kill(found, found.ref == i)
    expected = [i for i in range(64) if i % 3]
    assert len(tree) == len(expected)
    assert sorted(tree.find(range(5)).ref.tolist()) == expected
    assert len(tree._hash) <= 7  # O(log n) runs


# --------------------------------------------------------------------------- the model


@dataclass
class Model:
    """KSM's rules in plain Python: one dict, one list, one set."""

    checksums: dict[int, int] = field(default_factory=dict)
    unstable: list[tuple[int, int, int]] = field(default_factory=list)  # (hash, ref, pfn)
    stable: set[int] = field(default_factory=set)

    def look(self, pages: list[Page], first_look_stable: bool) -> dict[str, list[bool]]:
        stable = []
        for p in pages:
            if not p.readable:
                stable.append(False)
                continue
            prev = self.checksums.get(p.ref)
            stable.append(prev == p.hash or (prev is None and first_look_stable))
            self.checksums[p.ref] = p.hash
        cand = [s and not p.zero and not p.held for s, p in zip(stable, pages, strict=True)]
        counts = Counter(p.hash for c, p in zip(cand, pages, strict=True) if c)
        tree = {h for h, _r, _p in self.unstable}
        in_stable = [c and p.hash in self.stable for c, p in zip(cand, pages, strict=True)]
        ready = [
            c and (p.hash in self.stable or p.hash in tree or counts[p.hash] > 1)
            for c, p in zip(cand, pages, strict=True)
        ]
        return {"stable": stable, "candidate": cand, "in_stable": in_stable, "ready": ready}

    def partners(self, hashes: set[int]) -> list[int]:
        return sorted(r for h, r, _p in self.unstable if h in hashes)

    def settle(
        self, pages: list[Page], cand: list[bool], merged: list[bool], merged_partners: set[int]
    ) -> None:
        self.unstable = [e for e in self.unstable if e[1] not in merged_partners]
        for p, c, m in zip(pages, cand, merged, strict=True):
            if c and not m:
                self.unstable.append((p.hash, p.ref, p.pfn))

    def forget(self, lo: int, hi: int) -> None:
        self.checksums = {r: h for r, h in self.checksums.items() if not lo <= r < hi}
        self.unstable = [e for e in self.unstable if not lo <= e[1] < hi]


@dataclass(frozen=True)
class Page:
    ref: int
    hash: int
    pfn: int
    readable: bool
    zero: bool
    held: bool


@st.composite
def batch(draw: st.DrawFn, free_refs: list[int]) -> list[Page]:
    """Pages of refs not yet looked at in this full scan (each ref once per scan)."""
    n = draw(st.integers(0, min(8, len(free_refs))))
    picked = draw(st.permutations(free_refs))[:n]
    return [
        Page(
            ref,
            draw(st.integers(1, 4)),  # few contents: many duplicates and collisions
            draw(st.integers(0, 1 << 20)),
            draw(st.booleans() | st.just(True)),
            draw(st.integers(0, 9)) == 0,
            draw(st.integers(0, 9)) == 0,
        )
        for ref in picked
    ]


ALL_REFS = [page_ref(t, p) for t in range(3) for p in range(6)]


@settings(max_examples=150, deadline=None)
@given(st.data(), st.booleans())
def test_index_matches_the_brute_force_model(data: st.DataObject, first_look: bool) -> None:
    index, model = KsmIndex(), Model()
    for _scan in range(data.draw(st.integers(1, 5))):
        index.start_full_scan()
        model.unstable.clear()
        free = list(ALL_REFS)
        for _batch in range(data.draw(st.integers(0, 4))):
            pages = data.draw(batch(free))
            free = [r for r in free if r not in {p.ref for p in pages}]
            _step(data, index, model, pages, first_look)
        if data.draw(st.integers(0, 5)) == 0:
            lo, hi = target_refs(data.draw(st.integers(0, 2)))
            index.forget(lo, hi)
            model.forget(lo, hi)
        if data.draw(st.integers(0, 3)) == 0:
            content = data.draw(st.integers(1, 4))
            index.stable.add(content, np.array([content], np.uint64))
            model.stable.add(content)
        assert len(index.unstable) == len(model.unstable)


def _step(
    data: st.DataObject, index: KsmIndex, model: Model, pages: list[Page], first_look: bool
) -> None:
    refs = [p.ref for p in pages]
    hashes = np.array([p.hash for p in pages], np.uint64)
    look = index.look(
        refs,
        hashes,
        readable=[p.readable for p in pages],
        zero=[p.zero for p in pages],
        held=[p.held for p in pages],
        first_look_stable=first_look,
    )
    want = model.look(pages, first_look)
    for name, expected in want.items():
        assert getattr(look, name).tolist() == expected, name
    ready_hashes = {p.hash for p, r in zip(pages, want["ready"], strict=True) if r}
    partners = index.partners(hashes[look.ready])
    assert sorted(partners.ref.tolist()) == model.partners(ready_hashes)
    # the caller's byte comparison: any subset of the ready pages and partners merged
    merged = [r and data.draw(st.booleans()) for r in want["ready"]]
    partners_merged = [data.draw(st.booleans()) for _ in range(len(partners))]
    index.settle(look, refs, hashes, [p.pfn for p in pages], merged, partners, partners_merged)
    gone = {int(r) for r, m in zip(partners.ref, partners_merged, strict=True) if m}
    model.settle(pages, want["candidate"], merged, gone)
    assert sorted(index.partners(np.arange(1, 5)).ref.tolist()) == model.partners({1, 2, 3, 4})


def test_a_look_without_refs_remembers_nothing() -> None:
    """The one-shot merge's single look: readable pages are stable, no checksum kept."""
    index = KsmIndex()
    look = index.look(
        None, [3, 3, 4, 3], readable=[True, True, True, False], first_look_stable=True
    )
    assert look.stable.tolist() == [True, True, True, False]
    assert look.ready.tolist() == [True, True, False, False]
    assert len(index.checksums) == 0
    assert not KsmIndex().look(None, [3, 3]).stable.any()


def test_stable_tree_sees_a_segment_replaced_under_the_same_key() -> None:
    tree = StableTree()
    tree.add(7, np.array([1], np.uint64))
    assert tree.contains([1]).tolist() == [True]
    tree.segments[7] = np.array([2], np.uint64)  # as the merge engine writes it
    assert tree.contains([1, 2]).tolist() == [False, True]
