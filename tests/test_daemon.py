"""`procksm attach`: the scan loop, its controls, counters against pagemap truth, target
lifecycle (exit, exec, fork, threads, munmap/mremap), signals and the one-daemon rule.

Targets are real processes (tests/targets/planted.c and lifecycle.c) that verify their
own memory; the daemon runs as `python -m procksm attach` with a private control socket.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import ROOT, build_c_target, require_privileges
from tests.daemon_helpers import (
    FAST,
    Truth,
    merged_vmas,
    targets_by_pid,
    traced_by,
    wait_for,
    zero_or_absent,
)

PAGE = 4096


@pytest.fixture
def lifecycle() -> Path:
    require_privileges()
    return build_c_target("lifecycle")


def lc(spawn: Any, exe: Path, pages: int = 256, zero: int = 32, seed: int = 3) -> Any:
    return spawn([exe, "--pages", pages, "--zero", zero, "--seed", seed])


def merged_sites(pid: int, start: int, npages: int) -> int:
    """Pages of [start, start+npages) that map a procksm memfd page (present, file)."""
    from tests.daemon_helpers import FILE, PRESENT, pagemap

    e = pagemap(pid, start, start + npages * PAGE)
    return int((((e & PRESENT) != 0) & ((e & FILE) != 0)).sum())


def region_merged(t: Any, key: str = "region", pages_key: str = "pages") -> int:
    return merged_sites(t.pid, t.int(key), t.int(pages_key))


# --------------------------------------------------------------------------------------
# counters
# --------------------------------------------------------------------------------------


def test_counters_agree_with_pagemap(
    planted: Path, spawn: Any, daemons: Any, tmp_path: Path
) -> None:
    argv = [planted, "--identical", 256, "--zero", 32, "--unique", 16, "--volatile", 4,
            "--seed", 11]  # fmt: skip
    a, b = spawn(argv), spawn(argv)
    d = daemons(tmp_path / "c.sock", [a.pid, b.pid], *FAST)
    ident = {t.pid: (t.int("identical"), t.int("identical_pages")) for t in (a, b)}
    wait_for(lambda: all(merged_sites(p, *ident[p]) == 256 for p in ident), 30, "identical merged")
    wait_for(lambda: d.stats()["full_scans"] >= 4, 30, "four full scans")
    s = d.pause()
    truth = Truth([a.pid, b.pid])
    assert s["run"] == 0
    assert s["pages_shared"] == truth.pages_shared
    assert s["pages_sharing"] == truth.pages_sharing
    assert s["pages_sharing"] >= 256  # the planted identical pages, at least
    per = targets_by_pid(s)
    for t in (a, b):
        assert per[t.pid]["pages_merged"] == truth.sites[t.pid]
        assert per[t.pid]["cow_breaks"] == truth.cow[t.pid] == 0
        z0 = t.int("zero")
        zero_now = zero_or_absent(t.pid, z0, z0 + 32 * PAGE)
        assert zero_now == 32
        assert per[t.pid]["pages_zero"] >= 32
    # pages_zero: zero pages procksm dropped that are still unused (pagemap: not present
    # or the zero page); planted's own zero region is all of them here
    assert s["pages_zero"] == sum(per[p]["pages_zero"] for p in per)
    assert s["pages_volatile"] >= 2 * 4  # the volatile pages change under every scan
    assert s["pages_skipped"] > 0  # smart scan: unique pages stopped being read
    assert s["full_scans"] >= 4
    # minus procksm's private memory: the daemon's (more than its numpy and Python
    # heap, some MiB) and the guards'
    assert s["private_bytes"] > 4 << 20
    assert s["general_profit_bytes"] == s["saved_bytes"] - s["private_bytes"]
    assert s["saved_bytes"] == (s["pages_sharing"] + s["pages_zero"]) * PAGE
    assert s["rss_bytes"] > 0 and s["pause_max_ms"] > 0 and s["pause_p50_ms"] > 0
    # a write breaks one merged page: cow_breaks and pages_sharing follow pagemap
    assert a.command("write identical 7") == "OK"
    s2 = d.fresh_stats()
    truth2 = Truth([a.pid, b.pid])
    # (planted's write also updates its expectation table, whose page may be merged too)
    assert truth2.cow[a.pid] >= 1 and truth2.cow[b.pid] == 0
    assert s2["cow_breaks"] == targets_by_pid(s2)[a.pid]["cow_breaks"] == truth2.cow[a.pid]
    assert s2["pages_sharing"] == truth2.pages_sharing
    assert truth2.pages_sharing == truth.pages_sharing - truth2.cow[a.pid]
    assert s2["pages_shared"] == truth2.pages_shared
    # unique pages wait in the unstable tree when they are scanned: run a full scan
    d.ctl("set run=1")
    wait_for(lambda: d.stats()["full_scans"] > s2["full_scans"] + 1, 30, "more scans")
    for t in (a, b):
        assert t.command("check").startswith("OK"), t.command("check")


def test_stats_text_and_json_commands(
    lifecycle: Path, spawn: Any, daemons: Any, tmp_path: Path
) -> None:
    a, b = lc(spawn, lifecycle), lc(spawn, lifecycle)
    d = daemons(tmp_path / "c.sock", [a.pid, b.pid], *FAST)
    wait_for(lambda: region_merged(a) == 256, 30, "merge")
    from procksm.snapshot import Snapshot

    out = subprocess.run([sys.executable, "-m", "procksm", "stats", "--json", "--control", d.sock],
                         cwd=ROOT, capture_output=True, text=True, timeout=30)  # fmt: skip
    assert out.returncode == 0, out.stderr
    import json

    snap = Snapshot.from_json(json.loads(out.stdout))
    assert {t.pid for t in snap.targets} == {a.pid, b.pid}
    assert snap.observer == "pagemap"  # FAST has --no-bpf
    txt = subprocess.run([sys.executable, "-m", "procksm", "stats", "--control", d.sock],
                         cwd=ROOT, capture_output=True, text=True, timeout=30)  # fmt: skip
    assert txt.returncode == 0 and "pages_sharing" in txt.stdout
    # the raw protocol: the JSON document, then EOF (what the live view reads)
    raw = d.request("stats --json")
    assert raw.count("\n") == 1 and json.loads(raw)["pages_to_scan"] > 0
    assert "pages_shared " in d.request("stats")


# --------------------------------------------------------------------------------------
# controls
# --------------------------------------------------------------------------------------


def test_set_controls_and_run_modes(
    lifecycle: Path, spawn: Any, daemons: Any, tmp_path: Path
) -> None:
    a, b = lc(spawn, lifecycle), lc(spawn, lifecycle)
    d = daemons(tmp_path / "c.sock", [a.pid, b.pid], *FAST)
    out = d.ctl("set pages_to_scan=64 sleep_ms=7 max_pages_to_merge=1000 cpu_limit=0")
    assert "pages_to_scan=64" in out and "sleep_ms=7" in out
    s = d.fresh_stats()
    assert s["pages_to_scan"] == 64 and s["sleep_ms"] == 7
    wait_for(lambda: region_merged(a) == 256 and region_merged(b) == 256, 30, "merge")
    # run=0: no more full scans, merged pages stay merged
    s0 = d.pause()
    time.sleep(0.5)
    assert d.fresh_stats()["full_scans"] == s0["full_scans"]
    assert region_merged(a) == 256
    # run=2: everything unmerged (exact bytes), then stopped
    d.ctl("set run=2")
    wait_for(lambda: not merged_vmas(a.pid) and not merged_vmas(b.pid), 30, "unmerge")
    s2 = wait_for(lambda: (s := d.stats())["run"] == 0 and s, 10, "run back to 0")
    assert s2["run"] == 0
    for t in (a, b):
        assert t.command("check") == "OK pages=256"
    # run=1: merged again
    d.ctl("set run=1")
    wait_for(lambda: region_merged(a) == 256 and region_merged(b) == 256, 30, "merge again")
    for t in (a, b):
        assert t.command("check") == "OK pages=256"


def test_max_pages_to_merge_bounds_each_batch(
    lifecycle: Path, spawn: Any, daemons: Any, tmp_path: Path
) -> None:
    a, b = lc(spawn, lifecycle, zero=0), lc(spawn, lifecycle, zero=0)
    d = daemons(tmp_path / "c.sock", [a.pid, b.pid], *FAST, "--max-pages-to-merge", 8,
                "--pages-to-scan", 100000)  # fmt: skip
    wait_for(lambda: d.stats()["pages_sharing"] > 0, 30, "first merges")
    s = d.pause()
    # one batch per target per full scan; each merges at most 8 pages (and as many
    # partners), so sharing grows by at most 8 per batch
    batches = 2 * s["full_scans"] + 2
    assert 0 < s["pages_sharing"] <= 8 * batches
    assert s["pages_sharing"] < 256


def test_cpu_limit_adapts_pages_to_scan(
    planted: Path, spawn: Any, daemons: Any, tmp_path: Path
) -> None:
    argv = [planted, "--identical", 8192, "--unique", 4096, "--seed", 5]
    a, b = spawn(argv), spawn(argv)
    d = daemons(tmp_path / "c.sock", [a.pid, b.pid], "--cpu-limit", 10, "--no-bpf",
                "--pages-to-scan", 50000, "-q")  # fmt: skip
    # the cap's rule (unit-tested in tests/test_daemon_rules.py) at work in a real daemon:
    # it scans less per batch; the CPU share itself is a benchmark's number
    # (benchmarks/daemon_vs_ksm.py), not a test's
    wait_for(lambda: d.stats()["pages_to_scan"] < 50000, 30, "pages_to_scan lowered")
    for t in (a, b):
        assert t.command("check").startswith("OK")


def test_idle_backoff_once_converged(
    planted: Path, spawn: Any, daemons: Any, tmp_path: Path
) -> None:
    """Converged targets cost next to nothing (the pause between batches grows to 1 s
    after two full scans that merged nothing); writes do not wake it (on real programs
    they never stop: issue 15), a control request does."""
    from procksm.daemon import idle_sleep

    assert [idle_sleep(n) for n in range(8)] == [0, 0, 0.05, 0.1, 0.2, 0.4, 0.8, 1.0]
    argv = [planted, "--identical", 2048, "--seed", 5]
    a, b = spawn(argv), spawn(argv)
    d = daemons(tmp_path / "i.sock", [a.pid, b.pid], "--no-bpf", "-q")
    wait_for(lambda: d.stats()["pages_sharing"] >= 2048, 60, "converged")
    time.sleep(4)  # a few idle full scans: the pause between batches is at its 1 s
    idle_from = d.fresh_stats()["full_scans"]
    time.sleep(4)
    # backed off: one batch a second (a busy daemon makes hundreds of scans in 4 s)
    assert d.fresh_stats()["full_scans"] - idle_from <= 6, "no idle back-off"
    # COW breaks (seen by the pagemap observer) leave it backed off
    scans = d.fresh_stats()["full_scans"]
    for page in range(0, 64, 8):
        assert a.command(f"write identical {page}") == "OK"
    time.sleep(3)
    assert d.fresh_stats()["full_scans"] - scans <= 5, "woken by copy-on-write breaks"
    # a control request brings full scans back at once (idle, 3 s are 3-4 full scans)
    scans = d.fresh_stats()["full_scans"]
    d.ctl("set sleep_ms=20")
    time.sleep(3)
    assert d.fresh_stats()["full_scans"] - scans >= 6, "no wake-up after a request"
    assert a.command("check").startswith("OK") and b.command("check").startswith("OK")


def test_a_converged_daemon_that_costs_more_than_it_saves_says_so(
    planted: Path, spawn: Any, daemons: Any, tmp_path: Path
) -> None:
    """Two small targets (2 MiB in common): once converged, the daemon's own memory
    (~25 MiB) outweighs the saving, and it says so once, with what to do instead."""
    argv = [planted, "--identical", 512, "--seed", 5]
    a, b = spawn(argv), spawn(argv)
    d = daemons(tmp_path / "n.sock", [a.pid, b.pid], "--no-bpf")
    wait_for(lambda: d.stats()["pages_sharing"] >= 512, 60, "converged")
    said = "procksm costs more memory than it saves here"
    wait_for(lambda: said in d.stderr(), 60, "the net-loss warning")
    stats = d.stats()
    assert stats["general_profit_bytes"] < 0 < stats["private_bytes"]
    time.sleep(3)
    assert d.stderr().count(said) == 1  # once, not at every snapshot
    assert a.command("check").startswith("OK") and b.command("check").startswith("OK")


@pytest.mark.parametrize("stable_scans", [0, 1])
def test_stable_scans_first_look(planted: Path, spawn: Any, stable_scans: int) -> None:
    """stable_scans=1 is the kernel's checksum rule: nothing merges in the first full
    scan, everything in the second. 0 (the default) merges in the first: the byte
    comparison under stop is the second look. A page rewritten between scans (its
    checksum changed) waits either way."""
    from procksm.daemon import Daemon, DaemonOptions, Settings

    argv = [planted, "--identical", 128, "--volatile", 8, "--seed", 31]
    a, b = spawn(argv), spawn(argv)
    ident = {t.pid: t.int("identical") for t in (a, b)}
    s = Settings(cpu_limit=0, sleep_ms=0, stable_scans=stable_scans)
    merged_after = []
    with Daemon([a.pid, b.pid], s, DaemonOptions(use_bpf=False)) as d:
        for _scan in range(2):
            d.scan.step(s)  # the first step of a full scan (it ends the previous one)
            while d.registry.cursor[0] < len(d.registry.order):  # to the end of this scan
                d.scan.step(s)
            merged_after.append(min(merged_sites(p, ident[p], 128) for p in ident))
        assert d.ages.volatile() >= 2 * 8  # the volatile pages never merge
    assert merged_after == ([128, 128] if stable_scans == 0 else [0, 128])
    for t in (a, b):
        assert t.command("check").startswith("OK")


def test_register_and_unregister_ranges(
    lifecycle: Path, spawn: Any, daemons: Any, tmp_path: Path
) -> None:
    a, b = lc(spawn, lifecycle), lc(spawn, lifecycle)
    d = daemons(tmp_path / "c.sock", [a.pid], *FAST)
    # a new process, registered with its region only: attached, region merged, its zero
    # region (not registered) untouched
    r0, z0 = b.int("region"), b.int("zero")
    out = d.ctl(f"register {b.pid} {r0:#x}-{r0 + 256 * PAGE:#x}")
    assert f"pid {b.pid}" in out
    wait_for(lambda: region_merged(b) == 256 and region_merged(a) == 256, 30, "merge")
    assert zero_or_absent(b.pid, z0, z0 + 32 * PAGE) == 0  # still real zero-filled pages
    d.ctl(f"register {b.pid} {z0:#x}+{32 * PAGE}")
    wait_for(lambda: zero_or_absent(b.pid, z0, z0 + 32 * PAGE) == 32, 30, "zero pages dropped")
    # unregistering a name that 'all' covered excludes it; 'all' detaches the process
    assert "excluded" in d.ctl(f"unregister {a.pid} [heap]")
    assert "detached" in d.ctl(f"unregister {b.pid} all")
    s = d.fresh_stats()
    assert [t["pid"] for t in s["targets"]] == [a.pid]
    assert region_merged(b) == 256  # merged pages stay merged
    assert d.request(f"unregister {b.pid} all").startswith("error: pid")
    for t in (a, b):
        assert t.command("check") == "OK pages=256"


def test_pause_budget_measured_and_enforced(
    lifecycle: Path, spawn: Any, daemons: Any, tmp_path: Path
) -> None:
    a, b = lc(spawn, lifecycle, pages=2048), lc(spawn, lifecycle, pages=2048)
    d = daemons(tmp_path / "c.sock", [a.pid, b.pid], "--cpu-limit", 0, "--sleep-ms", 5, "--no-bpf",
                "--pause-budget-ms", 0.001)  # fmt: skip
    wait_for(lambda: region_merged(a, "region", "pages") == 2048, 60, "merge")
    s = d.fresh_stats()
    assert s["pause_p50_ms"] > 0 and s["pause_max_ms"] >= s["pause_p99_ms"] >= s["pause_p50_ms"]
    per = targets_by_pid(s)
    assert per[a.pid]["max_pause_ms"] > 0 and per[a.pid]["last_pause_ms"] > 0
    # the longest stop of the daemon's life, with its parts (stop, gate, calls, ...)
    longest = s["pause_longest"]
    assert longest["pid"] in (a.pid, b.pid) and 0 < longest["ms"] <= s["pause_max_ms"]
    # (a window whose pages all changed makes no calls: its parts are still whole)
    parts = ("stop_ms", "gate_ms", "calls_ms", "resume_ms", "other_ms")
    assert longest["stop_ms"] > 0 and all(longest[k] >= 0 for k in parts)
    assert abs(sum(longest[k] for k in parts) - longest["ms"]) < 0.01
    # what its calls cost the targets' threads, counted with procksm's own CPU
    assert s["target_cpu_s"] > 0 and s["target_cpu_percent"] >= 0
    # the same in the text answers (after fresh_stats: the snapshot has had a round)
    assert "pause_longest " in d.request("stats")
    txt = subprocess.run([sys.executable, "-m", "procksm", "stats", "--control", d.sock],
                         cwd=ROOT, capture_output=True, text=True, timeout=30)  # fmt: skip
    assert txt.returncode == 0 and "longest stop" in txt.stdout, txt.stdout
    assert "its calls in the targets" in txt.stdout, txt.stdout
    # every stop is over a 1 us budget: the stops shrink to the minimum of 16 pages,
    # and the daemon says so once per target
    err = d.stderr()
    for t in (a, b):
        assert err.count(f"pid {t.pid}: stops over the 0.001 ms budget") == 1
    assert a.command("check") == "OK pages=2048"


def scratch_areas(pid: int) -> list[str]:
    """The address ranges of procksm's scratch areas in ``pid`` (one line per VMA)."""
    return [
        line.split()[0]
        for line in Path(f"/proc/{pid}/maps").read_text().splitlines()
        if "/memfd:procksm-scratch" in line
    ]


def test_a_target_keeps_one_scratch_area_for_the_daemons_life(
    lifecycle: Path, spawn: Any, daemons: Any, tmp_path: Path
) -> None:
    """The daemon keeps each target's session from round to round (before, every round
    mapped a scratch area in a stop of its own and unmapped it in another, ~1-2 ms
    each): the same area through rounds of merging; a child the target forks does not
    inherit it (MADV_DONTFORK: its owner, the daemon, lives, so no procksm would remove
    it); the daemon's exit removes it."""
    a, b = lc(spawn, lifecycle), lc(spawn, lifecycle)
    d = daemons(tmp_path / "c.sock", [a.pid, b.pid], *FAST)
    wait_for(lambda: region_merged(a) == 256, 30, "merge")
    area = scratch_areas(a.pid)
    assert area, "no scratch area while the daemon lives"
    for round_ in range(3):
        # a write breaks a merged page; a later round merges it again
        assert a.command(f"write {round_}") == "OK" and b.command(f"write {round_}") == "OK"
        wait_for(lambda: region_merged(a) == 256, 30, f"merged again ({round_})")
        assert scratch_areas(a.pid) == area
    child = int(a.command("fork").split("=")[1])
    assert scratch_areas(child) == []
    os.kill(child, signal.SIGTERM)  # the child checks its memory and exits
    assert a.command("reap") == "CHILD exit=0"
    d.stop(signal.SIGTERM)
    for t in (a, b):
        assert scratch_areas(t.pid) == []
        assert t.command("check") == "OK pages=256"


# --------------------------------------------------------------------------------------
# lifecycle
# --------------------------------------------------------------------------------------


def test_target_exit_and_exec(lifecycle: Path, spawn: Any, daemons: Any, tmp_path: Path) -> None:
    a, b, c = lc(spawn, lifecycle), lc(spawn, lifecycle), lc(spawn, lifecycle)
    d = daemons(tmp_path / "c.sock", [a.pid, b.pid, c.pid], *FAST, "-q")
    wait_for(lambda: all(region_merged(t) == 256 for t in (a, b, c)), 30, "merge")
    # exit: the daemon forgets the target and goes on
    c.kill()
    wait_for(lambda: c.pid not in targets_by_pid(d.stats()), 30, "exited target dropped")
    # exec: same pid, a new address space; state starts over and the new image merges
    a.proc.stdin.write("exec\n")
    a.proc.stdin.flush()
    line = a.proc.stdout.readline()
    assert line.startswith("READY"), line
    a.info = dict(tok.split("=", 1) for tok in line.split()[1:])
    wait_for(lambda: region_merged(a) == 256, 30, "the new image merged")
    assert a.pid in targets_by_pid(d.stats())
    for t in (a, b):
        assert t.command("check") == "OK pages=256"
    assert d.proc.poll() is None


def test_fork_followed_and_threads(
    lifecycle: Path, spawn: Any, daemons: Any, tmp_path: Path
) -> None:
    a, b = lc(spawn, lifecycle), lc(spawn, lifecycle)
    d = daemons(tmp_path / "c.sock", [a.pid, b.pid], *FAST, "--follow-children")
    wait_for(lambda: region_merged(a) == 256, 30, "merge")
    # threads created after the attach: every stop window seizes them too; the daemon
    # keeps working: unmerge everything and merge again
    for _ in range(3):
        assert a.command("thread").startswith("OK threads=")
    d.ctl("set run=2")
    wait_for(lambda: not merged_vmas(a.pid), 30, "unmerged")
    d.ctl("set run=1")
    wait_for(lambda: region_merged(a) == 256, 60, "merged again")
    # a child inherits the merged mappings and is followed
    child = int(a.command("fork").split("=")[1])
    wait_for(lambda: child in targets_by_pid(d.stats()), 30, "child followed")
    # fork copies no page table entries of file mappings: the child maps the same
    # procksm VMAs and faults the shared pages in when it touches them
    r = a.int("region")
    assert sum(min(e, r + 256 * PAGE) - max(s, r) for s, e in merged_vmas(child)
               if s < r + 256 * PAGE and r < e) == 256 * PAGE  # fmt: skip
    s = d.pause()
    truth = Truth([a.pid, b.pid, child])
    assert s["pages_sharing"] == truth.pages_sharing
    assert targets_by_pid(s)[child]["pages_merged"] == truth.sites[child]
    import os

    os.kill(child, signal.SIGTERM)
    assert a.command("reap") == "CHILD exit=0"  # the child's own check of its memory
    wait_for(lambda: child not in targets_by_pid(d.stats()), 30, "child dropped after exit")
    assert a.command("check") == "OK pages=256"


def test_munmap_and_mremap_of_scanned_ranges(
    lifecycle: Path, spawn: Any, daemons: Any, tmp_path: Path
) -> None:
    a, b = lc(spawn, lifecycle), lc(spawn, lifecycle)
    d = daemons(tmp_path / "c.sock", [a.pid, b.pid], *FAST)
    # mremap before anything is merged: the region moves, the daemon finds it there
    wait_for(lambda: d.stats()["full_scans"] >= 1, 30, "a first full scan")
    out = a.command("move")
    assert out.startswith("OK addr=")
    a.info["region"] = out.split("=")[1]
    wait_for(lambda: region_merged(a) == 256 and region_merged(b) == 256, 30, "merged at new place")
    # munmap of merged pages: the counters follow pagemap
    assert b.command("munmap 10 20") == "OK"
    s = d.pause()
    truth = Truth([a.pid, b.pid])
    assert targets_by_pid(s)[b.pid]["pages_merged"] == truth.sites[b.pid]
    assert s["pages_sharing"] == truth.pages_sharing
    assert b.command("check") == "OK pages=236"
    assert a.command("check") == "OK pages=256"


def test_a_scanned_range_unmapped_and_refilled_mid_scan(
    planted: Path, spawn: Any, daemons: Any, tmp_path: Path
) -> None:
    """Nothing tells the daemon that a target unmapped memory (no syscall tracepoints:
    docs/design.md §11): its layout is re-read at each full scan only, so windows of the
    current scan still cover a range that is gone or holds fresh memory. The merge checks
    each page under stop and refuses what is not the private anonymous memory it read:
    the fresh pages keep what the target wrote, the counters follow pagemap."""
    a, b = (spawn([planted, "--identical", 512, "--seed", 5]) for _ in range(2))
    slow = ("--cpu-limit", "0", "--pages-to-scan", "32", "--sleep-ms", "50", "-q")
    d = daemons(tmp_path / "c.sock", [a.pid, b.pid], *slow)
    wait_for(lambda: d.stats()["full_scans"] >= 1, 60, "a first full scan")
    # early in the second scan (one takes seconds): pages 300..399 are in its parts
    scans = d.stats()["full_scans"]
    assert a.command("munmap identical 300 100") == "OK"
    assert a.command("refill identical 300 100") == "OK"
    wait_for(lambda: d.stats()["full_scans"] >= scans + 2, 120, "two more full scans")
    s = d.pause()
    start = a.int("identical")
    with open(f"/proc/{a.pid}/mem", "rb") as mem:
        mem.seek(start + 300 * PAGE)
        fresh = mem.read(100 * PAGE)
    want = (b"\x5a" + bytes(PAGE - 1)) * 100
    assert fresh == want, "a page of the fresh memory does not hold what the target wrote"
    truth = Truth([a.pid, b.pid])
    assert targets_by_pid(s)[a.pid]["pages_merged"] == truth.sites[a.pid]
    assert s["pages_sharing"] == truth.pages_sharing
    assert region_merged(b, "identical", "identical_pages") > 0  # the rest was merged
    for t in (a, b):
        assert t.command("check").startswith("OK")


# --------------------------------------------------------------------------------------
# signals and the one-daemon rule
# --------------------------------------------------------------------------------------


def test_sigterm_detaches_and_leaves_pages_merged(
    lifecycle: Path, spawn: Any, daemons: Any, tmp_path: Path
) -> None:
    a, b = lc(spawn, lifecycle), lc(spawn, lifecycle)
    d = daemons(tmp_path / "c.sock", [a.pid, b.pid], *FAST)
    wait_for(lambda: region_merged(a) == 256 and region_merged(b) == 256, 30, "merge")
    assert d.stop(signal.SIGTERM) == 0
    assert not Path(d.sock).exists()
    for t in (a, b):
        assert region_merged(t) == 256
        assert traced_by(t.pid) == 0
        assert t.command("check") == "OK pages=256"
    assert "detached" in d.stderr() or d.stderr() == ""


def test_sigint_with_unmerge_on_exit(
    lifecycle: Path, spawn: Any, daemons: Any, tmp_path: Path
) -> None:
    a, b = lc(spawn, lifecycle), lc(spawn, lifecycle)
    d = daemons(tmp_path / "c.sock", [a.pid, b.pid], "--cpu-limit", 0, "--sleep-ms", 5, "--no-bpf",
                "--unmerge-on-exit")  # fmt: skip
    wait_for(lambda: region_merged(a) == 256 and region_merged(b) == 256, 30, "merge")
    assert d.stop(signal.SIGINT) == 0
    for t in (a, b):
        assert not merged_vmas(t.pid)
        assert traced_by(t.pid) == 0
        assert t.command("check") == "OK pages=256"
    assert re.search(r"unmerged \d+ pages", d.stderr())


def test_second_daemon_on_same_pid_refused(
    lifecycle: Path, spawn: Any, daemons: Any, tmp_path: Path
) -> None:
    a = lc(spawn, lifecycle)
    d = daemons(tmp_path / "one.sock", [a.pid], *FAST)
    two = subprocess.run(
        [sys.executable, "-m", "procksm", "attach", str(a.pid), "--control",
         str(tmp_path / "two.sock")],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert two.returncode == 5, two.stderr
    assert f"another procksm (pid {d.proc.pid}" in two.stderr or "another procksm" in two.stderr
    assert f"pid {a.pid}" in two.stderr
    assert not (tmp_path / "two.sock").exists()
    # a second daemon on the same socket (other targets) is refused too
    b = lc(spawn, lifecycle)
    three = subprocess.run(
        [sys.executable, "-m", "procksm", "attach", str(b.pid), "--control", d.sock],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert three.returncode == 1 and "another procksm daemon listens" in three.stderr
    assert d.stats()["targets"][0]["pid"] == a.pid  # the first one is unaffected


def test_cow_breaks_from_the_observer(
    lifecycle: Path, spawn: Any, daemons: Any, tmp_path: Path
) -> None:
    """Without --no-bpf the daemon watches merged pages with procksm.observe (eBPF when it
    loads): a write to a merged page is one COW break, as pagemap shows."""
    a, b = lc(spawn, lifecycle), lc(spawn, lifecycle)
    d = daemons(tmp_path / "c.sock", [a.pid, b.pid], "--cpu-limit", 0, "--sleep-ms", 5, "-q")
    wait_for(lambda: region_merged(a) == 256 and region_merged(b) == 256, 30, "merge")
    d.pause()
    before = Truth([a.pid, b.pid]).cow[a.pid]
    assert a.command("write 5") == "OK" and a.command("write 6") == "OK"
    truth = Truth([a.pid, b.pid])
    # (lifecycle's expectation table may be merged too: its page breaks with the write)
    assert truth.cow[a.pid] >= before + 2
    s = wait_for(lambda: (s := d.stats())["cow_breaks"] >= truth.cow[a.pid] and s, 15, "COW")
    assert s["observer"] in ("bpf", "pagemap")
    assert targets_by_pid(s)[a.pid]["cow_breaks"] == truth.cow[a.pid]
    assert s["cow_breaks"] == truth.cow[a.pid] + truth.cow[b.pid]
