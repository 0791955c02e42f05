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
from tests.conftest import build_c_target, require_privileges
from tests.daemon_helpers import FILE, PFN, PRESENT, DaemonProc, Truth, pagemap, wait_for

PAGE = 4096
FAST = ("--cpu-limit", "0", "--sleep-ms", "5", "-q", "--no-bpf")
FAST_BPF = ("--cpu-limit", "0", "--sleep-ms", "5", "-q")


@pytest.fixture
def planted() -> Path:
    require_privileges()
    return build_c_target("planted")


@pytest.fixture
def daemons() -> Any:
    started: list[DaemonProc] = []

    def start(sock: Path, pids: list[int], *args: object) -> DaemonProc:
        d = DaemonProc(sock, pids, *args)
        started.append(d)
        return d

    yield start
    for d in started:
        d.stop(timeout=20)


def entries(pid: int, base: int, npages: int) -> np.ndarray:
    return pagemap(pid, base, base + npages * PAGE)


def merged_mask(pid: int, base: int, npages: int) -> np.ndarray:
    e = entries(pid, base, npages)
    return ((e & np.uint64(PRESENT)) != 0) & ((e & np.uint64(FILE)) != 0)


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
    argv = [planted, "--identical", 64, "--seed", 21]
    a, b = spawn(argv), spawn(argv)
    base = {t.pid: t.int("identical") for t in (a, b)}
    d = daemons(tmp_path / "c.sock", [a.pid, b.pid], *FAST)
    wait_for(lambda: all(merged_mask(p, base[p], 64).all() for p in base), 30, "identical merged")
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
    wait_for(
        lambda: all(merged_mask(p, base[p], 64).all() for p in base),
        60,
        "the copied pages merged again",
    )
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
    argv = [planted, "--identical", 32, "--seed", 22]
    a, b = spawn(argv), spawn(argv)
    base = {t.pid: t.int("identical") for t in (a, b)}
    d = daemons(tmp_path / "c.sock", [a.pid, b.pid], *FAST)
    wait_for(lambda: all(merged_mask(p, base[p], 32).all() for p in base), 30, "identical merged")
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


def _rewrite_loop(targets: list[Any], seconds: float) -> int:
    """Store the same byte into page 7 of every target every 0.2 s: the content never
    changes, so the checksum rule lets the page merge again after every store."""
    n = 0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        for t in targets:
            assert t.command("set identical 7 85") == "OK"
        n += 1
        time.sleep(0.2)
    return n


def _remerges_under_rewrites(
    planted: Path, spawn: Any, daemons: Any, sock: Path, *args: object
) -> tuple[int, dict[str, Any]]:
    argv = [planted, "--identical", 64, "--seed", 23]
    a, b = spawn(argv), spawn(argv)
    base = {t.pid: t.int("identical") for t in (a, b)}
    d = daemons(sock, [a.pid, b.pid], *args)
    wait_for(lambda: all(merged_mask(p, base[p], 64).all() for p in base), 30, "identical merged")
    before = d.fresh_stats()["pages_remerged"]
    _rewrite_loop([a, b], 10.0)
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


def test_backoff_forget_is_per_target_range() -> None:
    from procksm.trees import page_ref

    b = RemergeBackoff(soon_s=10.0)
    r0, r1 = page_ref(0, 100), page_ref(1, 100)
    b.merged(np.array([r0, r1], np.uint64), now=0.0)
    assert b.broke(r0, 1.0, 0) and b.broke(r1, 1.0, 0)
    b.forget(page_ref(0, 0), page_ref(1, 0))
    held = b.held(np.array([r0, r1], np.uint64), 0)
    assert held.tolist() == [False, True]
