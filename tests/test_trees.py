"""Tests for procksm.trees: each structure alone, the KsmIndex against a brute-force model
of kernel KSM's cmp_and_merge_page (hypothesis), memory per page, and a micro-benchmark."""

from __future__ import annotations

import time
import tracemalloc
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from itertools import pairwise

import numpy as np
import pytest
import xxhash
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from procksm import PAGE_SIZE
from procksm.trees import (
    ChecksumTable,
    KsmIndex,
    MergeDecision,
    NewNode,
    PageData,
    StableNode,
    StableTree,
    UnstableTree,
    _merge_in_place,
    _SortedRuns,
    page_ref,
    page_refs,
    split_ref,
)

# A deliberately weak hash: 4 values for many contents, so equal hashes with different
# bytes are the rule. Equality must be decided by bytes, never by the hash.
WEAK_HASHES = 4


def weak_hash(data: bytes) -> int:
    return data[0] % WEAK_HASHES


def strong_hash(data: bytes) -> int:
    return xxhash.xxh3_64_intdigest(data)


def payload_content(node: StableNode[bytes]) -> bytes:
    """In these tests a node's payload is the merged content itself."""
    return node.payload


def hashes_of(datas: list[bytes], hash_fn: Callable[[bytes], int] = weak_hash) -> np.ndarray:
    return np.array([hash_fn(d) for d in datas], dtype=np.uint64)


class Pages:
    """A content() callback over a dict, counting its calls."""

    def __init__(self, contents: dict[int, bytes | None] | None = None) -> None:
        self.contents: dict[int, bytes | None] = dict(contents or {})
        self.calls = 0

    def __call__(self, ref: int) -> PageData | None:
        self.calls += 1
        return self.contents.get(ref)


def no_content(ref: int) -> PageData | None:
    raise AssertionError(f"content({ref}) called on a path that needs no comparison")


def no_stable_content(node: StableNode[bytes]) -> PageData | None:
    raise AssertionError("stable_content called on a path that needs no comparison")


# --------------------------------------------------------------------------- refs


def test_page_ref_roundtrip_and_limits() -> None:
    ref = page_ref(3, (1 << 44) - 1)
    assert split_ref(ref) == (3, (1 << 44) - 1)
    assert page_ref(0, 0) == 0
    assert page_refs(2, [0, 1, 5]).tolist() == [page_ref(2, n) for n in (0, 1, 5)]
    with pytest.raises(ValueError):
        page_ref(0, 1 << 44)
    with pytest.raises(ValueError):
        page_ref(1 << 19, 0)
    with pytest.raises(ValueError):
        page_refs(1, [-1])


# --------------------------------------------------------------------------- sorted runs


@settings(max_examples=150, deadline=None)
@given(
    a=st.lists(st.integers(0, 20), max_size=300),
    b=st.lists(st.integers(0, 20), min_size=1, max_size=300),
    b_is_older=st.booleans(),
)
def test_merge_in_place_is_a_stable_merge(a: list[int], b: list[int], b_is_older: bool) -> None:
    a_keys = np.array(sorted(a), dtype=np.uint64)
    b_keys = np.array(sorted(b), dtype=np.uint64)
    # Values number the entries by age, so the expected result is a sort by (key, value).
    a_values = np.arange(len(a), dtype=np.int64) + (len(b) if b_is_older else 0)
    b_values = np.arange(len(b), dtype=np.int64) + (0 if b_is_older else len(a))
    expected = sorted(
        zip(a_keys.tolist() + b_keys.tolist(), a_values.tolist() + b_values.tolist(), strict=True)
    )
    _merge_in_place(a_keys, a_values, b_keys, b_values, older=b_is_older)
    assert list(zip(a_keys.tolist(), a_values.tolist(), strict=True)) == expected


def test_merge_in_place_moves_in_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Large runs cross several _MERGE_CHUNK steps; the result must still be exact."""
    monkeypatch.setattr("procksm.trees._MERGE_CHUNK", 7)
    rng = np.random.default_rng(5)
    a = np.sort(rng.integers(0, 50, 500).astype(np.uint64))
    b = np.sort(rng.integers(0, 50, 300).astype(np.uint64))
    keys, values = a.copy(), np.arange(500, dtype=np.int64)
    _merge_in_place(keys, values, b, np.arange(500, 800, dtype=np.int64))
    order = np.lexsort((np.arange(800), np.concatenate([a, b])))
    assert keys.tolist() == np.concatenate([a, b])[order].tolist()
    assert values.tolist() == order.tolist()


def test_sorted_runs_lookup_kill_and_run_invariant() -> None:
    rng = np.random.default_rng(1)
    runs = _SortedRuns()
    model: list[tuple[int, int]] = []  # (key, value) in insertion order
    for batch in range(60):
        # Mostly small batches, sometimes one bigger than the whole tree.
        size = int(rng.integers(1, 50)) if batch % 20 else 20 * batch + 5
        keys = rng.integers(0, 40, size).astype(np.uint64)
        values = np.arange(len(model), len(model) + len(keys), dtype=np.int64)
        order = np.argsort(keys, kind="stable")
        runs.insert_owned(keys[order], values[order])
        model += zip(keys.tolist(), values.tolist(), strict=True)
        sizes = [len(k) for k in runs._keys]
        assert all(big >= 2 * small for big, small in pairwise(sizes[1:]))
        assert len(sizes) < 2 or sizes[1] * 8 < sizes[0]
    assert len(runs) == len(model)
    dead: set[int] = set()
    for run, position, value in runs.entries(7)[::2]:
        runs.kill(run, position)
        dead.add(value)
    expected_killed = [v for _, v in model if 100 <= v < 200 and v not in dead]
    assert runs.kill_values_in(100, 200) == len(expected_killed)
    dead |= set(range(100, 200))
    live = [(k, v) for k, v in model if v not in dead]
    assert len(runs) == len(live)
    keys = np.arange(45, dtype=np.uint64)
    bounds, entries = runs.entries_for(keys)
    for key in range(45):
        expected = [v for k, v in live if k == key]  # oldest first
        assert [v for _, _, v in runs.entries(key)] == expected
        assert [v for _, _, v in entries[bounds[key] : bounds[key + 1]]] == expected
    queries = np.array([0, 39, 40, 41, 1 << 63], dtype=np.uint64)
    # Tombstones keep their key: the mask answers "maybe", entries() answers exactly.
    assert runs.hit_mask(queries).tolist() == [True, True, False, False, False]


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


# --------------------------------------------------------------------------- unstable tree


def test_unstable_unique_pages_need_no_content() -> None:
    tree = UnstableTree()
    assert tree.search_insert_batch([1, 2, 3], [10, 20, 30], no_content) == []
    assert tree.search_insert_batch([4, 5], [40, 50], no_content) == []
    assert len(tree) == 5
    assert sorted(tree.refs().tolist()) == [10, 20, 30, 40, 50]


def test_unstable_pairs_with_tree_item_and_removes_it() -> None:
    pages = Pages({1: b"A", 2: b"A"})
    tree = UnstableTree()
    assert tree.search_insert_batch([7], [1], pages) == []
    [match] = tree.search_insert_batch([7], [2], pages)
    assert match.refs == (1, 2) and match.hash == 7
    assert len(tree) == 0


def test_unstable_hash_collision_compares_bytes() -> None:
    """Same hash, different bytes: no pair, both wait in the tree."""
    pages = Pages({1: b"A", 2: b"B", 3: b"B"})
    tree = UnstableTree()
    assert tree.search_insert_batch([0], [1], pages) == []
    assert tree.search_insert_batch([0], [2], pages) == []
    assert len(tree) == 2
    [match] = tree.search_insert_batch([0], [3], pages)
    assert match.refs == (2, 3)
    assert tree.refs().tolist() == [1]


def test_unstable_groups_identical_pages_of_one_batch() -> None:
    """Three identical pages in a batch are one group (one node of 3, as the kernel's
    third page finds the stable node the first two made); a collision stays apart."""
    pages = Pages({1: b"A", 2: b"A", 3: b"X", 4: b"A", 5: b"A"})
    tree = UnstableTree()
    tree.search_insert_batch([0], [5], pages)
    matches = tree.search_insert_batch([0, 0, 0, 0], [1, 2, 3, 4], pages)
    assert [m.refs for m in matches] == [(5, 1, 2, 4)]  # tree item first, then input order
    assert tree.refs().tolist() == [3]


def test_unstable_unreadable_pages() -> None:
    pages = Pages({1: b"A", 2: b"A", 3: None})
    tree = UnstableTree()
    tree.search_insert_batch([0], [1], pages)
    pages.contents[1] = None  # the tree item's page went away
    assert tree.search_insert_batch([0, 0], [2, 3], pages) == []
    assert tree.refs().tolist() == [2]  # 1 removed, 3 neither matched nor inserted


def test_unstable_page_offered_twice_does_not_pair_with_itself() -> None:
    pages = Pages({1: b"A"})
    tree = UnstableTree()
    tree.search_insert_batch([0], [1], pages)
    assert tree.search_insert_batch([0], [1], pages) == []
    assert tree.refs().tolist() == [1]


def test_unstable_remove_discard_reset() -> None:
    tree = UnstableTree()
    tree.insert([5, 5, 6, 7], [page_ref(1, 0), page_ref(1, 1), page_ref(2, 0), page_ref(3, 0)])
    assert tree.remove(page_ref(1, 1), hash=5)
    assert not tree.remove(page_ref(1, 1), hash=5)
    assert tree.remove(page_ref(3, 0))
    assert tree.discard_refs(page_ref(2, 0), page_ref(3, 0)) == 1
    assert tree.refs().tolist() == [page_ref(1, 0)]
    assert len(tree) == 1 and tree.nbytes > 0
    tree.reset()
    assert len(tree) == 0 and tree.nbytes == 0


# --------------------------------------------------------------------------- stable tree


def test_stable_lookup_is_exact_under_collisions() -> None:
    tree: StableTree[bytes] = StableTree()
    node_a = tree.insert(0, b"A", payload_content, sharers=2)
    node_b = tree.insert(0, b"B", payload_content, sharers=2)
    assert tree.lookup(0, b"A", payload_content) is node_a
    assert tree.lookup(0, memoryview(b"B"), payload_content) is node_b
    assert tree.lookup(0, b"C", payload_content) is None
    assert tree.lookup(1, b"A", payload_content) is None
    assert (tree.pages_shared, tree.pages_sharing, len(tree)) == (2, 2, 2)


def test_stable_lookup_batch_plans_joins_with_room() -> None:
    tree: StableTree[bytes] = StableTree(max_page_sharing=3)
    node_a = tree.insert(0, b"A", payload_content, sharers=1)
    node_b = tree.insert(0, b"B", payload_content, sharers=3)  # full
    pages = Pages({1: b"A", 2: b"B", 3: b"A", 4: b"C", 5: b"A", 6: b"X"})
    joins = tree.lookup_batch([0, 0, 0, 0, 0, 9], [1, 2, 3, 4, 5, 6], pages, payload_content)
    assert joins == [(node_a, (1, 3))]  # room for two; B is full; C collides; X misses
    assert pages.calls == 5  # no content() for the page whose hash is not in the tree
    assert node_b.sharers == 3 and node_a.sharers == 1  # nothing committed


def test_stable_sharers_and_pruning() -> None:
    tree: StableTree[bytes] = StableTree()
    node = tree.insert(3, b"A", payload_content, sharers=2)
    tree.add_sharers(node, 3)
    assert (tree.pages_shared, tree.pages_sharing) == (1, 4)
    assert not tree.remove_sharers(node, 4)
    assert tree.remove_sharers(node)  # the last sharer: pruned
    assert not node.in_tree and len(tree) == 0 and tree.pages_shared == 0
    assert tree.lookup(3, b"A", payload_content) is None
    with pytest.raises(ValueError):
        tree.add_sharers(node)
    with pytest.raises(ValueError):
        tree.remove_sharers(tree.insert(3, b"A", payload_content, sharers=1), 2)


def test_stable_max_page_sharing_makes_dups() -> None:
    tree: StableTree[bytes] = StableTree(max_page_sharing=3)
    first = tree.insert(0, b"A", payload_content, sharers=3)
    assert tree.lookup(0, b"A", payload_content) is None  # full
    with pytest.raises(ValueError):
        tree.add_sharers(first)
    dup = tree.insert(0, b"A", payload_content, sharers=2)
    assert tree.lookup(0, b"A", payload_content) is dup
    assert first._chain is dup._chain  # one chain of identical dups
    tree.remove_sharers(first, 2)
    # The fullest dup with room is preferred (kernel: fill dups to keep them few).
    assert tree.lookup(0, b"A", payload_content) is dup
    with pytest.raises(ValueError):
        StableTree(max_page_sharing=1)


def test_stable_key_index_survives_many_prunes() -> None:
    tree: StableTree[bytes] = StableTree()
    for round_ in range(3):
        nodes = [tree.insert(h, b"%d" % h, payload_content, sharers=1) for h in range(3000)]
        keys = np.arange(3000, dtype=np.uint64)
        assert tree.hit_mask(keys).all()
        for node in nodes[round_:]:
            tree.remove_sharers(node)
    # Survivors: hash 0 from rounds 1 and 2 (one chain of two dups), hash 1 from round 2.
    assert len(tree) == 3
    assert tree.hit_mask(np.arange(3, dtype=np.uint64)).tolist() == [True, True, False]
    assert tree.lookup(0, b"0", payload_content) is not None
    # Stale keys were dropped by the rebuild: at most the live keys plus slack remain.
    assert tree._key_index.entries_stored <= 2 * len(tree._by_hash) + 1024
    assert tree.nbytes > 0


# --------------------------------------------------------------------------- KsmIndex


def scan(
    index: KsmIndex[bytes], pages: Pages, refs: list[int], hash_fn: Callable[[bytes], int]
) -> MergeDecision[bytes]:
    datas = [pages.contents[r] or b"\0" for r in refs]
    return index.scan_batch(refs, hashes_of(datas, hash_fn), pages, payload_content)


def commit_all(index: KsmIndex[bytes], pages: Pages, decision: MergeDecision[bytes]) -> None:
    for join in decision.joins:
        index.commit_join(join)
    for new in decision.new_nodes:
        index.commit_new_node(new, pages.contents[new.refs[0]] or b"", payload_content)


def test_index_two_scans_then_merge_then_join() -> None:
    pages = Pages({1: b"A", 2: b"A", 3: b"A", 4: b"B", 5: b"E"})  # weak hash: E collides with A
    index: KsmIndex[bytes] = KsmIndex()
    index.start_full_scan()
    first = scan(index, pages, [1, 2, 3, 4, 5], weak_hash)
    index.end_full_scan()
    # Never scanned before: every page is volatile (no checksum to compare with yet).
    assert sorted(first.volatile.tolist()) == [1, 2, 3, 4, 5] and not first.pages_to_merge
    index.start_full_scan()
    second = scan(index, pages, [1, 2, 3, 4, 5], weak_hash)
    assert second.new_nodes == (NewNode(weak_hash(b"A"), (1, 2, 3)),)
    assert sorted(second.unshared.tolist()) == [4, 5]
    commit_all(index, pages, second)
    index.end_full_scan()
    assert index.counters()[:4] == (1, 2, 2, 0)
    # A new page identical to the node joins it at once, though its checksum is new:
    # the stable tree is searched before the checksum (kernel step 1 before 2).
    pages.contents[6] = b"A"
    index.start_full_scan()
    third = scan(index, pages, [4, 5, 6], weak_hash)
    assert [(j.refs, j.node.payload) for j in third.joins] == [((6,), b"A")]
    commit_all(index, pages, third)
    index.end_full_scan()
    assert index.counters() == (1, 3, 2, 0, 3)


def test_index_volatile_page_never_forms_a_node() -> None:
    pages = Pages({1: b"A", 2: b"A"})
    index: KsmIndex[bytes] = KsmIndex()
    scan(index, pages, [1, 2], strong_hash)
    pages.contents[2] = b"Z"
    index.start_full_scan()
    scan(index, pages, [1, 2], strong_hash)  # 2 changed: volatile
    pages.contents[2] = b"A"
    index.start_full_scan()
    decision = scan(index, pages, [1, 2], strong_hash)  # 2 changed back: volatile again
    assert decision.volatile.tolist() == [2] and not decision.new_nodes
    assert decision.unshared.tolist() == [1]


def test_index_max_page_sharing_cuts_groups() -> None:
    """6 identical pages, cap 2: three nodes; with 7, the odd page waits in the tree."""
    contents = {r: b"A" for r in range(7)}
    pages = Pages(contents)
    index: KsmIndex[bytes] = KsmIndex(max_page_sharing=2)
    scan(index, pages, list(range(7)), weak_hash)
    decision = scan(index, pages, list(range(7)), weak_hash)
    assert [n.refs for n in decision.new_nodes] == [(0, 1), (2, 3), (4, 5)]
    assert decision.unshared.tolist() == [6] and len(index.unstable) == 1
    commit_all(index, pages, decision)
    assert all(node.sharers == 2 for node in index.stable)
    # A full chain does not take more: the new page pairs with the waiting one.
    pages.contents[7] = b"A"
    decision = scan(index, pages, [7], weak_hash)
    assert decision.volatile.tolist() == [7] and not decision.joins
    pages.contents[8] = b"A"
    scan(index, pages, [8], weak_hash)
    decision = scan(index, pages, [8], weak_hash)
    assert [n.refs for n in decision.new_nodes] == [(6, 8)]


def test_index_join_respects_room_within_a_batch() -> None:
    pages = Pages({r: b"A" for r in range(10)})
    index: KsmIndex[bytes] = KsmIndex(max_page_sharing=3)
    node = index.stable.insert(weak_hash(b"A"), b"A", payload_content, sharers=1)
    decision = scan(index, pages, list(range(5)), weak_hash)
    assert [(j.node, j.refs) for j in decision.joins] == [(node, (0, 1))]
    assert sorted(decision.volatile.tolist()) == [2, 3, 4]


def test_index_partial_commit_and_unmerge() -> None:
    pages = Pages({1: b"A", 2: b"A", 3: b"A"})
    index: KsmIndex[bytes] = KsmIndex()
    scan(index, pages, [1, 2, 3], weak_hash)
    [new] = scan(index, pages, [1, 2, 3], weak_hash).new_nodes
    # Two merges succeeded; one page changed under stop.
    node = index.commit_new_node(new, b"A", payload_content, merged=2)
    assert node is not None and node.sharers == 2
    assert index.commit_new_node(new, b"A", payload_content, merged=0) is None
    with pytest.raises(ValueError):
        index.commit_new_node(new, b"A", payload_content, merged=4)
    assert not index.unmerge(node)
    assert index.unmerge(node)
    assert len(index.stable) == 0


def test_index_forget_drops_checksums_and_candidates() -> None:
    pages = Pages({page_ref(1, 0): b"A", page_ref(2, 0): b"A"})
    index: KsmIndex[bytes] = KsmIndex()
    scan(index, pages, [page_ref(1, 0)], weak_hash)
    index.forget(page_ref(1, 0), page_ref(2, 0))
    assert scan(index, pages, [page_ref(1, 0)], weak_hash).volatile.tolist() == [page_ref(1, 0)]
    scan(index, pages, [page_ref(1, 0)], weak_hash)
    assert len(index.unstable) == 1
    index.forget(page_ref(1, 0), page_ref(2, 0))
    assert len(index.unstable) == 0


def test_index_unreadable_pages_are_reported_not_merged() -> None:
    pages = Pages({1: b"A", 2: b"A", 3: b"A"})
    index: KsmIndex[bytes] = KsmIndex()
    scan(index, pages, [1, 2, 3], weak_hash)
    commit_all(index, pages, scan(index, pages, [1, 2], weak_hash))
    pages.contents[3] = None
    decision = index.scan_batch([3], hashes_of([b"A"]), pages, payload_content)
    assert decision.unreadable == (3,) and not decision.pages_to_merge
    assert not len(decision.volatile) and not len(decision.unshared)


# --------------------------------------------------------------------------- model


@dataclass(eq=False)
class ModelNode:
    content: bytes
    sharers: set[int] = field(default_factory=set)


@dataclass
class Expected:
    joins: list[tuple[ModelNode, tuple[int, ...]]]
    new_nodes: list[tuple[int, ...]]
    volatile: list[int]
    unshared: list[int]


@dataclass
class Model:
    """Kernel KSM's cmp_and_merge_page, one page at a time over plain dicts and lists,
    with the batch semantics documented in procksm.trees. Contents are compared as
    bytes; hashes matter only where the kernel keeps one (checksum, unstable key)."""

    hash_fn: Callable[[bytes], int]
    cap: int | None
    remembered: dict[int, int] = field(default_factory=dict)
    unstable: list[tuple[int, int]] = field(default_factory=list)  # (ref, hash), oldest first
    nodes: list[ModelNode] = field(default_factory=list)  # creation order
    merged: dict[int, ModelNode] = field(default_factory=dict)

    def scan_batch(self, refs: list[int], contents: dict[int, bytes]) -> Expected:
        planned: dict[int, list[int]] = {}  # id(node) → refs
        joins: list[tuple[ModelNode, int]] = []
        candidates: list[int] = []
        volatile: list[int] = []
        for ref in refs:
            data = contents[ref]
            best = None
            for node in self.nodes:
                taken = len(node.sharers) + len(planned.get(id(node), []))
                if node.content == data and (self.cap is None or taken < self.cap):
                    best_taken = -1 if best is None else best[1]
                    if taken > best_taken:
                        best = (node, taken)
            if best is not None:
                planned.setdefault(id(best[0]), []).append(ref)
                joins.append((best[0], ref))
                continue
            checksum = self.hash_fn(data)
            if self.remembered.get(ref) != checksum:
                self.remembered[ref] = checksum
                volatile.append(ref)
            else:
                candidates.append(ref)
        groups: list[tuple[int, tuple[int, ...]]] = []
        inserted: list[tuple[int, int]] = []
        seen: list[bytes] = []
        for ref in candidates:
            data = contents[ref]
            if data in seen:
                continue
            seen.append(data)
            key = self.hash_fn(data)
            tree = [r for r, h in self.unstable if h == key and contents[r] == data]
            batch = [r for r in candidates if contents[r] == data]
            if len(tree) + len(batch) == 1:
                inserted.append((ref, key))
                continue
            self.unstable = [(r, h) for r, h in self.unstable if r not in tree]
            groups.append((key, (*tree, *batch)))
        new_nodes: list[tuple[int, ...]] = []
        leftovers: list[tuple[int, int]] = []
        for key, group in groups:
            step = len(group) if self.cap is None else self.cap
            for start in range(0, len(group), step):
                piece = group[start : start + step]
                if len(piece) == 1:
                    leftovers.append((piece[0], key))
                else:
                    new_nodes.append(piece)
        self.unstable += inserted + leftovers
        by_node: dict[int, tuple[ModelNode, list[int]]] = {}
        for node, ref in joins:
            by_node.setdefault(id(node), (node, []))[1].append(ref)
        return Expected(
            joins=[(node, tuple(node_refs)) for node, node_refs in by_node.values()],
            new_nodes=new_nodes,
            volatile=sorted(volatile),
            unshared=sorted(r for r, _ in inserted + leftovers),
        )

    def cow(self, ref: int) -> ModelNode | None:
        node = self.merged.pop(ref, None)
        if node is not None:
            node.sharers.discard(ref)
            if not node.sharers:
                self.nodes.remove(node)
        return node


# Small alphabets so duplicates and collisions are frequent: with weak_hash, A/E/I/M
# (65, 69, 73, 77) share hash 1, B/F hash 2.
ALPHABET = [b"A" * 8, b"E" * 8, b"I" * 8, b"M" * 8, b"B" * 8, b"F" * 8, b"C" * 8]


@dataclass
class Harness:
    """Plays the daemon: scans unmerged pages in batches, commits what the engine managed,
    and turns writes to merged pages into copy-on-write breaks. Checks every decision of
    the KsmIndex against the model."""

    index: KsmIndex[bytes]
    model: Model
    contents: dict[int, bytes]
    node_of_model: dict[int, StableNode[bytes]] = field(default_factory=dict)

    def content(self, ref: int) -> PageData | None:
        return self.contents[ref]

    def nodes(self) -> list[tuple[ModelNode, StableNode[bytes]]]:
        return [(n, self.node_of_model[id(n)]) for n in self.model.nodes]

    def write(self, ref: int, data: bytes) -> None:
        model_node = self.model.cow(ref)
        if model_node is not None:
            node = self.node_of_model[id(model_node)]
            pruned = self.index.unmerge(node)
            assert pruned == (not model_node.sharers)
        self.contents[ref] = data

    def scan_batch(self, refs: list[int], draw_success: Callable[[int], list[bool]]) -> None:
        hashes = hashes_of([self.contents[r] for r in refs], self.model.hash_fn)
        decision = self.index.scan_batch(refs, hashes, self.content, payload_content)
        expected = self.model.scan_batch(refs, self.contents)
        model_of = {id(node): model_node for model_node, node in self.nodes()}
        got_joins = {(id(model_of[id(j.node)]), j.refs) for j in decision.joins}
        assert got_joins == {(id(node), refs) for node, refs in expected.joins}
        assert len(decision.joins) == len(expected.joins)
        assert sorted(n.refs for n in decision.new_nodes) == sorted(expected.new_nodes)
        # Which paths this example exercised (--hypothesis-show-statistics).
        if decision.joins:
            event("joined an existing node")
        if any(len(n.refs) > 2 for n in decision.new_nodes):
            event("group of 3+")
        if any(r not in refs for n in decision.new_nodes for r in n.refs):
            event("paired with an unstable-tree item")
        if len({self.contents[r] for r in refs if weak_hash(self.contents[r]) == 1}) > 1:
            event("colliding contents in one batch")
        assert sorted(decision.volatile.tolist()) == expected.volatile
        assert sorted(decision.unshared.tolist()) == expected.unshared
        assert not decision.unreadable
        # The properties the model encodes, stated directly:
        volatile = set(decision.volatile.tolist())
        for new in decision.new_nodes:
            assert not volatile & set(new.refs), "a volatile page formed a stable node"
            assert len({self.contents[r] for r in new.refs}) == 1, "different contents merged"
        for join in decision.joins:
            assert all(self.contents[r] == join.node.payload for r in join.refs)

        # The engine merges some pages and not others (content changed under stop).
        for join in decision.joins:
            model_node = model_of[id(join.node)]
            done = [r for r, ok in zip(join.refs, draw_success(len(join.refs)), strict=True) if ok]
            self.index.commit_join(join, merged=len(done))
            model_node.sharers.update(done)
            self.model.merged.update(dict.fromkeys(done, model_node))
        for new in decision.new_nodes:
            done = [r for r, ok in zip(new.refs, draw_success(len(new.refs)), strict=True) if ok]
            node = self.index.commit_new_node(
                new, self.contents[new.refs[0]], payload_content, merged=len(done)
            )
            assert (node is None) == (not done)
            if node is not None:
                model_node = ModelNode(self.contents[new.refs[0]], set(done))
                self.model.nodes.append(model_node)
                self.model.merged.update(dict.fromkeys(done, model_node))
                self.node_of_model[id(model_node)] = node

    def check_state(self) -> None:
        model, index = self.model, self.index
        live_nodes = {id(n) for n in model.nodes}
        tree_nodes = list(index.stable)
        assert len(tree_nodes) == len(model.nodes)
        assert {id(self.node_of_model[i]) for i in live_nodes} == {id(n) for n in tree_nodes}
        for model_node in model.nodes:
            node = self.node_of_model[id(model_node)]
            assert node.sharers == len(model_node.sharers)
            assert model.cap is None or node.sharers <= model.cap
            # Never two different contents in one node.
            assert all(self.contents[r] == node.payload for r in model_node.sharers)
        sharing = sum(len(n.sharers) for n in model.nodes)
        assert index.counters()[:3] == (
            len(model.nodes),
            sharing - len(model.nodes),
            len(model.unstable),
        )
        assert sorted(index.unstable.refs().tolist()) == sorted(r for r, _ in model.unstable)


@settings(
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(data=st.data())
def test_index_matches_model(data: st.DataObject) -> None:
    hash_fn = data.draw(st.sampled_from([weak_hash, strong_hash]), label="hash")
    cap = data.draw(st.sampled_from([None, 2, 3]), label="max_page_sharing")
    npages = data.draw(st.integers(2, 14), label="pages")
    # Pages of three "targets" so refs are spread like the daemon's.
    refs = [page_ref(i % 3, 1000 + i) for i in range(npages)]
    alphabet = ALPHABET[: data.draw(st.integers(1, len(ALPHABET)), label="alphabet")]
    contents = {r: data.draw(st.sampled_from(alphabet)) for r in refs}
    harness = Harness(KsmIndex(max_page_sharing=cap), Model(hash_fn, cap), contents)

    def draw_success(count: int) -> list[bool]:
        all_ok = data.draw(st.booleans())
        return (
            [True] * count
            if all_ok
            else data.draw(st.lists(st.booleans(), min_size=count, max_size=count))
        )

    for _ in range(data.draw(st.integers(1, 5), label="full scans")):
        harness.index.start_full_scan()
        harness.model.unstable = []
        todo = [r for r in data.draw(st.permutations(refs)) if r not in harness.model.merged]
        while todo:
            size = data.draw(st.integers(1, len(todo)))
            harness.scan_batch(todo[:size], draw_success)
            todo = todo[size:]
            # Writes between batches: pages change, merged pages break copy-on-write.
            for ref in data.draw(st.lists(st.sampled_from(refs), max_size=3)):
                harness.write(ref, data.draw(st.sampled_from(alphabet)))
        harness.index.end_full_scan()
        harness.check_state()


@settings(max_examples=100, deadline=None)
@given(
    contents=st.lists(st.sampled_from(ALPHABET), min_size=1, max_size=30),
    hash_fn=st.sampled_from([weak_hash, strong_hash]),
    batch=st.integers(1, 30),
)
def test_stable_content_merges_after_two_scans(
    contents: list[bytes], hash_fn: Callable[[bytes], int], batch: int
) -> None:
    """Pages with identical content, checksum-stable over two consecutive scans, end up in
    the same stable node: one node per content shared by two pages or more."""
    pages = Pages(dict(enumerate(contents)))
    index: KsmIndex[bytes] = KsmIndex(max_page_sharing=None)
    node_of: dict[int, StableNode[bytes]] = {}
    for _ in range(2):
        index.start_full_scan()
        todo = [r for r in range(len(contents)) if r not in node_of]
        for start in range(0, len(todo), batch):
            decision = scan(index, pages, todo[start : start + batch], hash_fn)
            for join in decision.joins:
                index.commit_join(join)
                node_of.update(dict.fromkeys(join.refs, join.node))
            for new in decision.new_nodes:
                node = index.commit_new_node(new, contents[new.refs[0]], payload_content)
                assert node is not None
                node_of.update(dict.fromkeys(new.refs, node))
        index.end_full_scan()
    for content in set(contents):
        sharing = [r for r, c in enumerate(contents) if c == content]
        nodes = {id(node_of.get(r)) for r in sharing}
        if len(sharing) >= 2:
            assert len(nodes) == 1 and None not in {node_of.get(r) for r in sharing}
            assert node_of[sharing[0]].payload == content
        else:
            assert sharing[0] not in node_of
    assert index.counters().full_scans == 2


# --------------------------------------------------------------------------- memory, speed


def unique_page_hashes(npages: int, chunk_pages: int = 16384) -> Iterator[np.ndarray]:
    """xxh3 of ``npages`` distinct 4 KiB pages, by chunks: a 64 MiB buffer whose first
    word per page is rewritten for every chunk (no 4 GiB allocation)."""
    buffer = np.random.default_rng(0).integers(0, 255, chunk_pages * PAGE_SIZE, dtype=np.uint8)
    words = buffer.view(np.uint64).reshape(chunk_pages, PAGE_SIZE // 8)
    view = memoryview(buffer)
    digest = xxhash.xxh3_64_intdigest
    for start in range(0, npages, chunk_pages):
        words[:, 0] = np.arange(start, start + chunk_pages, dtype=np.uint64)
        yield np.fromiter(
            (digest(view[i : i + PAGE_SIZE]) for i in range(0, len(view), PAGE_SIZE)),
            dtype=np.uint64,
            count=chunk_pages,
        )


MILLION = 1 << 20


def test_memory_per_page_under_budget(capsys: pytest.CaptureFixture[str]) -> None:
    """UnstableTree + ChecksumTable at 1 Mi pages: at most 24 bytes/page held, measured
    by nbytes and by tracemalloc (numpy reports its buffers to it)."""
    rng = np.random.default_rng(3)
    hashes = rng.integers(0, 1 << 63, MILLION, dtype=np.uint64)
    refs = page_refs(1, np.arange(MILLION) + 4096)
    batch = 65536
    warmup: KsmIndex[bytes] = KsmIndex()
    warmup.scan_batch(refs[:1000], hashes[:1000], no_content, no_stable_content)
    tracemalloc.start()
    try:
        index: KsmIndex[bytes] = KsmIndex()
        for _ in range(2):  # the second scan fills the unstable tree
            index.start_full_scan()
            for start in range(0, MILLION, batch):
                decision = index.scan_batch(
                    refs[start : start + batch],
                    hashes[start : start + batch],
                    no_content,
                    no_stable_content,
                )
            del decision
            index.end_full_scan()
        held, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(index.unstable) == MILLION
    per_page = (index.unstable.nbytes + index.checksums.nbytes) / MILLION
    with capsys.disabled():
        print(
            f"\nmemory: {per_page:.2f} B/page held (nbytes), {held / MILLION:.2f} traced, "
            f"peak {peak / MILLION:.2f} with {batch}-page batches"
        )
    assert per_page <= 24.1
    assert held / MILLION <= 24.5
    # Runs merge in place: no moment with a second copy of the tree.
    assert peak / MILLION <= 32


def test_benchmark_million_pages(capsys: pytest.CaptureFixture[str]) -> None:
    """1 Mi distinct pages with real xxh3 hashes through KsmIndex as one batch: the
    common path (nothing matches) must not call content() (no per-page Python)."""
    started = time.perf_counter()
    hashes = np.concatenate(list(unique_page_hashes(MILLION)))
    hash_seconds = time.perf_counter() - started
    refs = page_refs(1, np.arange(MILLION))
    index: KsmIndex[bytes] = KsmIndex()
    rates = []
    for _ in range(2):  # first pass: all volatile; second: all into the unstable tree
        index.start_full_scan()
        started = time.perf_counter()
        decision = index.scan_batch(refs, hashes, no_content, no_stable_content)
        rates.append(MILLION / (time.perf_counter() - started))
        index.end_full_scan()
    assert len(decision.unshared) == MILLION and len(index.unstable) == MILLION
    # Duplicates: every page once more under another target; joins and new nodes need
    # bytes, so this path is per-page Python by nature.
    page = b"\1" * PAGE_SIZE
    content = lambda ref: page  # noqa: E731 (the same bytes: hashes decide the buckets)
    started = time.perf_counter()
    dup_decision = index.scan_batch(
        page_refs(2, np.arange(65536)), hashes[:65536], content, payload_content
    )
    index.scan_batch(page_refs(2, np.arange(65536)), hashes[:65536], content, payload_content)
    dup_rate = 2 * 65536 / (time.perf_counter() - started)
    with capsys.disabled():
        print(
            f"\nxxh3: {MILLION / hash_seconds / 1e6:.2f} M pages/s; KsmIndex, 1 Mi-page batch: "
            f"{rates[0] / 1e6:.2f} M pages/s (first scan), {rates[1] / 1e6:.2f} M pages/s "
            f"(unstable insert); matching duplicates: {dup_rate / 1e6:.3f} M pages/s"
        )
    assert not dup_decision.pages_to_merge  # first sight of these refs: volatile
    assert min(rates) > 500_000
