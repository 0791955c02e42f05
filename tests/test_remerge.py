"""The daemon merges copy-on-write-broken pages again, and backs off from ranges that
break soon after merging (procksm.backoff: volatility learned from observation).

Real targets (tests/targets/planted.c, which verifies its own memory) under a real
`procksm attach`; what is merged is read from pagemap, not from procksm's counters.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from procksm.backoff import GROUP_PAGES, RemergeBackoff
from tests.daemon_helpers import (
    FAST,
    FAST_BPF,
    FILE,
    PFN,
    PRESENT,
    DaemonProc,
    Truth,
    pagemap,
    wait_for,
    zero_or_absent,
)

PAGE = 4096


def entries(pid: int, base: int, npages: int) -> np.ndarray:
    return pagemap(pid, base, base + npages * PAGE)


def merged_mask(pid: int, base: int, npages: int) -> np.ndarray:
    e = entries(pid, base, npages)
    return ((e & np.uint64(PRESENT)) != 0) & ((e & np.uint64(FILE)) != 0)


def wait_all_merged(base: dict[int, int], npages: int, what: str, timeout: float = 30) -> None:
    """Until every page of [base[pid], +npages) maps a shared frame, in every target."""
    wait_for(lambda: all(merged_mask(p, a, npages).all() for p, a in base.items()), timeout, what)


def merged_pair(
    planted: Path, spawn: Any, daemons: Any, sock: Path, pages: int, seed: int, *args: object
) -> tuple[Any, Any, dict[int, int], DaemonProc]:
    """Two planted targets with ``pages`` identical pages under a daemon started with
    ``args``, once the identical pages are merged: (a, b, {pid: region start}, daemon)."""
    argv = [planted, "--identical", pages, "--seed", seed]
    a, b = spawn(argv), spawn(argv)
    base = {t.pid: t.int("identical") for t in (a, b)}
    d = daemons(sock, [a.pid, b.pid], *args)
    wait_all_merged(base, pages, "identical merged")
    return a, b, base, d


def read_page(pid: int, addr: int) -> bytes:
    with open(f"/proc/{pid}/mem", "rb", buffering=0) as f:
        f.seek(addr)
        return f.read(PAGE)


def write_page(pid: int, addr: int, data: bytes) -> None:
    # a write through /proc/PID/mem (get_user_pages): the kernel copies the merged page
    with open(f"/proc/{pid}/mem", "r+b", buffering=0) as f:
        f.seek(addr)
        f.write(data)


# --------------------------------------------------------------------------------------
# merging copied pages again
# --------------------------------------------------------------------------------------


def test_copied_pages_are_merged_again(
    planted: Path, spawn: Any, daemons: Any, tmp_path: Path
) -> None:
    a, b, base, d = merged_pair(planted, spawn, daemons, tmp_path / "c.sock", 64, 21, *FAST)
    # 1. both targets store the same new byte into page 5: two copies, equal to each
    #    other and to no slot; they must end up sharing one new frame
    for t in (a, b):
        assert t.command("set identical 5 119") == "OK"
    # 2. a stores into page 9 and then restores the byte: the copy equals its own slot
    orig = read_page(a.pid, base[a.pid] + 9 * PAGE)[0]
    assert a.command(f"set identical 9 {(orig + 1) % 256}") == "OK"
    assert a.command(f"set identical 9 {orig}") == "OK"
    for t in (a, b):
        assert not merged_mask(t.pid, base[t.pid], 64)[5], "the store did not copy page 5"
    assert not merged_mask(a.pid, base[a.pid], 64)[9]
    wait_all_merged(base, 64, "the copied pages merged again", timeout=60)
    pa = entries(a.pid, base[a.pid], 64) & np.uint64(PFN)
    pb = entries(b.pid, base[b.pid], 64) & np.uint64(PFN)
    assert pa[5] == pb[5], "page 5 of both targets maps one frame"
    assert read_page(a.pid, base[a.pid] + 5 * PAGE)[0] == 119
    assert read_page(a.pid, base[a.pid] + 9 * PAGE)[0] == orig
    s = d.fresh_stats()
    truth = Truth([a.pid, b.pid])
    assert s["pages_remerged"] >= 3, s["pages_remerged"]
    assert s["pages_sharing"] == truth.pages_sharing
    assert s["pages_shared"] == truth.pages_shared
    for t in (a, b):
        assert t.command("check").startswith("OK"), t.command("check")
        assert t.command("errors") == "ERRORS 0"


def test_a_copied_zero_page_in_a_merged_mapping_stays_zero(
    planted: Path, spawn: Any, daemons: Any, tmp_path: Path
) -> None:
    """Hazard: MADV_DONTNEED in a segment mapping brings back the segment's bytes, not
    zeros. A merged page that a write made all zeros must keep reading zeros; it is
    neither dropped as a zero page nor merged."""
    a, b, base, d = merged_pair(planted, spawn, daemons, tmp_path / "c.sock", 32, 22, *FAST)
    for t in (a, b):
        write_page(t.pid, base[t.pid] + 12 * PAGE, bytes(PAGE))
    scans = d.stats()["full_scans"]
    wait_for(lambda: d.stats()["full_scans"] >= scans + 6, 30, "six more full scans")
    for t in (a, b):
        assert read_page(t.pid, base[t.pid] + 12 * PAGE) == bytes(PAGE)
        e = entries(t.pid, base[t.pid], 32)
        assert e[12] & np.uint64(PRESENT) and not e[12] & np.uint64(FILE), "still its copy"
        assert merged_mask(t.pid, base[t.pid], 32).sum() == 31


# --------------------------------------------------------------------------------------
# the backoff: learned from the observed breaks
# --------------------------------------------------------------------------------------


def _rewrite_loop(targets: list[Any], seconds: float, daemon: Any = None) -> int:
    """Store the same byte into page 7 of every target every 0.2 s: the content never
    changes, so the checksum rule lets the page merge again after every store. With
    ``daemon``, a control request each time ends its idle back-off (merges that stores
    undo gain nothing, which idles the scan): full scans at full speed, so that only the
    backoff under test differs between the arms."""
    n = 0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        for t in targets:
            assert t.command("set identical 7 85") == "OK"
        if daemon is not None:
            daemon.ctl("set sleep_ms=5")
        n += 1
        time.sleep(0.2)
    return n


def _remerges_under_rewrites(
    planted: Path, spawn: Any, daemons: Any, sock: Path, *args: object
) -> tuple[int, dict[str, Any]]:
    a, b, _base, d = merged_pair(planted, spawn, daemons, sock, 64, 23, *args)
    before = d.fresh_stats()["pages_remerged"]
    _rewrite_loop([a, b], 10.0, d)
    s = d.fresh_stats()
    for t in (a, b):
        assert t.command("check").startswith("OK"), t.command("check")
    return s["pages_remerged"] - before, s


@pytest.mark.parametrize("observer", ["bpf", "pagemap"])
def test_ranges_that_break_soon_after_merging_are_held_back(
    planted: Path, spawn: Any, daemons: Any, tmp_path: Path, observer: str
) -> None:
    """The breaks come from the observer: eBPF fault events, or pagemap polling."""
    fast = FAST_BPF if observer == "bpf" else FAST
    # Without the backoff (--remerge-soon-s 0) every store is followed by a merge: a
    # stop window and a copy-on-write fault per store and target.
    naive, _ = _remerges_under_rewrites(
        planted, spawn, daemons, tmp_path / "n.sock", *fast, "--remerge-soon-s", "0"
    )
    backed, s = _remerges_under_rewrites(planted, spawn, daemons, tmp_path / "b.sock", *fast)
    assert s["observer"] == observer
    print(
        f"{observer}: re-merged pages in 10 s of stores: {naive} without the backoff, "
        f"{backed} with it"
    )
    assert naive >= 20, naive  # 50 stores per target: most of them were merged again
    assert backed * 3 <= naive, (backed, naive)
    assert s["ranges_held"] >= 1


def test_zero_pages_that_come_back_soon_are_held_back(
    planted: Path, spawn: Any, daemons: Any, tmp_path: Path
) -> None:
    """A zero page that is dropped and then written with zeros again (calloc's memset on
    reused memory) comes back present: each drop costs a stop window. The same backoff
    holds its range."""
    drops = {}
    for arm, args in (("naive", ("--remerge-soon-s", "0")), ("backoff", ())):
        argv = [planted, "--zero", 16, "--seed", 24]
        a = spawn(argv)
        d = daemons(tmp_path / f"{arm}.sock", [a.pid], *FAST, *args)
        z0 = a.int("zero")
        wait_for(
            lambda a=a, z0=z0: zero_or_absent(a.pid, z0, z0 + 16 * PAGE) == 16, 30, "zero dropped"
        )
        before = d.fresh_stats()["zero_pages_dropped"]
        deadline = time.monotonic() + 8.0
        while time.monotonic() < deadline:
            assert a.command("set zero 3 0") == "OK"  # a fresh page of zeros
            # a control request ends the daemon's idle back-off in both arms: full scans
            # at full speed, so that only the backoff under test differs
            d.ctl("set sleep_ms=5")
            time.sleep(0.2)
        drops[arm] = d.fresh_stats()["zero_pages_dropped"] - before
        assert a.command("check").startswith("OK")
    print(f"zero page re-dropped in 8 s of stores: {drops}")
    assert drops["naive"] >= 15, drops
    assert drops["backoff"] * 3 <= drops["naive"], drops


# --------------------------------------------------------------------------------------
# RemergeBackoff (pure)
# --------------------------------------------------------------------------------------


def test_backoff_levels_holds_and_decay() -> None:
    b = RemergeBackoff(soon_s=10.0, max_level=3)
    refs = np.arange(0, 2 * GROUP_PAGES, dtype=np.uint64)  # two ranges
    b.merged(refs, now=100.0)
    # a break soon after: level 1, held for 2 full scans; the other range is not held
    assert b.broke(3, now=101.0, full_scans=5)
    assert b.level(3) == 1
    held = b.held(refs, full_scans=5)
    assert held[:GROUP_PAGES].all() and not held[GROUP_PAGES:].any()
    # a second page of the same range, same merge: counted once
    assert not b.broke(4, now=101.5, full_scans=5)
    assert b.level(3) == 1
    assert b.held(refs, full_scans=6)[0] and not b.held(refs, full_scans=7)[0]
    # merged again and broken soon again: level 2 (4 scans), capped at max_level
    for level, scan in ((2, 10), (3, 20), (3, 30)):
        b.merged(refs[:1], now=200.0 + scan)
        assert b.broke(0, now=201.0 + scan, full_scans=scan)
        assert b.level(0) == level
        assert b.held(refs[:1], full_scans=scan + (1 << level) - 1)[0]
        assert not b.held(refs[:1], full_scans=scan + (1 << level))[0]
    # a late break lowers the level and holds nothing
    b.merged(refs[:1], now=1000.0)
    assert not b.broke(0, now=1100.0, full_scans=50)
    assert b.level(0) == 2 and not b.held(refs[:1], full_scans=50)[0]
    # a break of a page this daemon never merged is nothing to learn from
    assert not b.broke(10_000, now=1.0, full_scans=1)
    assert b.ranges_held() == 0
    b.forget(0, GROUP_PAGES)
    assert b.level(0) == 0


def test_backoff_from_pages_a_scan_found_copied() -> None:
    b = RemergeBackoff(soon_s=10.0)
    refs = np.arange(0, 3 * GROUP_PAGES, dtype=np.uint64)
    b.merged(refs, now=0.0)
    assert b.broke(5, now=1.0, full_scans=0)  # the observer's event for range 0
    # the scan then finds pages of ranges 0 and 2 copied: range 0 was counted already
    found = np.array([5, 6, 2 * GROUP_PAGES + 1], np.uint64)
    assert b.broke_many(found, now=2.0, full_scans=0) == 1
    assert b.level(5) == 1 and b.level(2 * GROUP_PAGES) == 1 and b.level(GROUP_PAGES) == 0
    assert b.broke_many(found, now=3.0, full_scans=0) == 0  # nothing merged since


def test_backoff_forget_part_of_a_chunk() -> None:
    b = RemergeBackoff(soon_s=10.0)
    refs = np.arange(0, 4 * GROUP_PAGES, dtype=np.uint64)  # ranges 0-3, one chunk
    b.merged(refs, now=1e6)  # monotonic clocks of long-running hosts: stored relative
    b.forget(GROUP_PAGES, 3 * GROUP_PAGES)  # ranges 1 and 2
    assert [b.broke(g * GROUP_PAGES, 1e6 + 1, 0) for g in range(4)] == [True, False, False, True]
    assert b.nbytes > 0


def test_backoff_forget_is_per_target_range() -> None:
    from procksm.index import page_ref

    b = RemergeBackoff(soon_s=10.0)
    r0, r1 = page_ref(0, 100), page_ref(1, 100)
    b.merged(np.array([r0, r1], np.uint64), now=0.0)
    assert b.broke(r0, 1.0, 0) and b.broke(r1, 1.0, 0)
    b.forget(page_ref(0, 0), page_ref(1, 0))
    held = b.held(np.array([r0, r1], np.uint64), 0)
    assert held.tolist() == [False, True]
