"""`procksm merge` / `unmerge` on real targets: the truth is pagemap, /proc/meminfo and
the targets' own self-checks, not procksm's counters."""

from __future__ import annotations

import json
import os
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from procksm import PAGE_SIZE, procfs
from procksm.analysis import analyse
from procksm.index import KsmIndex
from procksm.merge import MergeEngine, MergeOptions, merge
from procksm.merge.engine import look_at_scan, mergeable_rows
from procksm.plan import EXTENT_UNITS
from procksm.procfs import PM_PFN_MASK, PM_PRESENT, PagemapFile
from procksm.scanner import AddressRange, ScanOptions, collect
from procksm.unmerge import merged_ranges, unmerge
from procksm.window_sizer import FIRST_PAGES
from tests.conftest import (
    IN_CI,
    assert_target_intact,
    build_c_target,
    require_privileges,
    run_procksm,
)

PROCKSM = [sys.executable, "-m", "procksm"]
N, Z, U = 1024, 256, 128  # identical, zero, unique pages per target


@pytest.fixture
def trio(spawn):  # type: ignore[no-untyped-def]
    require_privileges()
    exe = build_c_target("planted")
    return [
        spawn([exe, "--identical", N, "--zero", Z, "--unique", U, "--seed", 11, "--blockers"])
        for _ in range(3)
    ]


def region(t, name: str) -> tuple[int, int]:  # type: ignore[no-untyped-def]
    start = t.int(name)
    return start, start + t.int(name + "_pages") * PAGE_SIZE


def selection(targets) -> ScanOptions:  # type: ignore[no-untyped-def]
    return ScanOptions(
        ranges=[
            AddressRange(*region(t, r)) for t in targets for r in ("identical", "zero", "unique")
        ]
    )


def pfns(pid: int, start: int, end: int) -> np.ndarray:
    with PagemapFile(pid) as pm:
        ent = pm.read(start, end)
    assert ((ent & PM_PRESENT) != 0).all()
    return ent & PM_PFN_MASK


def meminfo_kb(targets) -> tuple[int, int]:  # type: ignore[no-untyped-def]
    """(anonymous kB in the planted regions, procksm memfd kB counted once) of the targets.

    From /proc/PID/smaps, which walks the page tables: exact, and deaf to the rest of
    the machine and to the targets' other memory (stdio buffers, procksm's scratch page).
    The memfd's pages are counted once by summing their Pss over all sharers.
    """
    anon = shmem = 0
    for t in targets:
        ranges = [region(t, r) for r in ("identical", "zero", "unique")]
        vma: tuple[int, int, str] | None = None
        for line in Path(f"/proc/{t.pid}/smaps").read_text().splitlines():
            head = line.split()
            if "-" in head[0] and len(head) >= 5 and ":" not in head[0]:
                a, b = (int(x, 16) for x in head[0].split("-"))
                vma = (a, b, head[5] if len(head) > 5 else "")
            elif vma and head[0] == "Anonymous:":
                if any(s <= vma[0] and vma[1] <= e for s, e in ranges):
                    anon += int(head[1])
            elif vma and head[0] == "Pss:" and vma[2].startswith("/memfd:procksm"):
                shmem += int(head[1])
    return anon, shmem


def test_merge_shares_frames_and_saves_memory(trio) -> None:  # type: ignore[no-untyped-def]
    opts = selection(trio)
    ideal = analyse(collect([t.pid for t in trio], opts)).totals.ideal_savings_pages
    assert ideal == 3 * (N + Z + U) - (N + 3 * U)
    anon0, shmem0 = meminfo_kb(trio)
    res = merge([t.pid for t in trio], MergeOptions(selection=opts))
    anon1, shmem1 = meminfo_kb(trio)
    doc = res.as_json()
    assert doc["totals"]["pages_merged"] == 3 * N
    assert doc["totals"]["pages_zeroed"] == 3 * Z
    assert doc["totals"]["slots"] == N
    assert doc["totals"]["saved_pages"] >= 0.99 * ideal
    # one VMA per region, although it was mapped in N/256 stop windows: every window
    # maps procksm's same open file description, so the kernel merges the mappings
    for t in trio:
        s, e = region(t, "identical")
        assert [(v.start, v.end) for v in merged_ranges(t.pid)] == [(s, e)]
    # truth 1: every target's identical region maps the same frames, page for page
    first = pfns(trio[0].pid, *region(trio[0], "identical"))
    for t in trio[1:]:
        assert (pfns(t.pid, *region(t, "identical")) == first).all()
    assert np.unique(first).size == N
    # truth 2: anonymous memory fell by every merged and zeroed page, shared memory rose
    # by one copy of the identical region
    assert anon0 - anon1 == 3 * (N + Z) * PAGE_SIZE // 1024, (anon0, anon1)
    assert abs((shmem1 - shmem0) - N * PAGE_SIZE // 1024) <= 4, (shmem0, shmem1)
    saved_kb = (anon0 - anon1) - (shmem1 - shmem0)
    assert saved_kb >= 0.99 * ideal * PAGE_SIZE // 1024
    # truth 3: the targets' own checks, and their blocked threads saw nothing
    for t in trio:
        assert t.command("check") == f"OK pages={N + Z + U}"
        assert t.command("errors") == "ERRORS 0"
    assert res.as_json()["pauses"]["count"] >= 3


def test_cow_after_merge_only_changes_the_writer(trio) -> None:  # type: ignore[no-untyped-def]
    opts = selection(trio)
    merge([t.pid for t in trio], MergeOptions(selection=opts))
    a, b, _c = trio
    before_b = pfns(b.pid, *region(b, "identical"))
    for i in (0, 5, N - 1):
        assert a.command(f"write identical {i}") == "OK"
    after_a = pfns(a.pid, *region(a, "identical"))
    assert (after_a != before_b).sum() == 3  # exactly the written pages got their own copy
    assert (pfns(b.pid, *region(b, "identical")) == before_b).all()
    for t in trio:
        assert t.command("check").startswith("OK")  # a knows its writes; b, c unchanged
    # zero pages dropped: a write there gives a fresh private page, the rest stay zero
    assert a.command("write zero 3") == "OK"
    assert a.command("check").startswith("OK")


def test_unmerge_restores_private_anonymous_memory(trio) -> None:  # type: ignore[no-untyped-def]
    opts = selection(trio)
    anon0, _ = meminfo_kb(trio)
    merge([t.pid for t in trio], MergeOptions(selection=opts))
    trio[0].command("write identical 7")  # a COWed page must keep its new byte
    res = run_procksm("unmerge", "--json", *(t.pid for t in trio))
    assert res.returncode == 0, res.stderr
    doc = json.loads(res.stdout)
    assert doc["totals"]["pages_unmerged"] == 3 * N
    for t in trio:
        assert merged_ranges(t.pid) == []
        maps = Path(f"/proc/{t.pid}/maps").read_text()
        assert "procksm" not in maps
        assert t.command("check").startswith("OK")
        assert t.command("errors") == "ERRORS 0"
        # every identical page is a private frame again
        f = pfns(t.pid, *region(t, "identical"))
        assert np.unique(f).size == N
    anon1, shmem1 = meminfo_kb(trio)
    # anonymous memory is back (zero pages stay dropped: they read as zeros), and no
    # memfd page is mapped any more
    assert anon0 - anon1 == 3 * Z * PAGE_SIZE // 1024, (anon0, anon1)
    assert shmem1 == 0
    # unmerging twice is a no-op
    assert unmerge(trio[0].pid).pages_unmerged == 0


def test_stop_windows_are_sized_to_the_pause_budget(trio) -> None:  # type: ignore[no-untyped-def]
    """Each target's windows are sized from its measured ones (procksm.window_sizer):
    under a generous budget they grow to --batch-pages; under one no window can meet,
    every window after the first holds the floor of 16 pages."""

    def stops(*extra: str) -> int:
        args = ["merge", "--json", *extra, *(str(t.pid) for t in trio)]
        for t in trio:
            s, e = region(t, "identical")
            args += ["--range", f"{s:#x}-{e:#x}"]
        res = run_procksm(*args)
        assert res.returncode == 0, res.stderr
        doc = json.loads(res.stdout)
        assert doc["totals"]["pages_merged"] == 3 * N
        assert run_procksm("unmerge", *(str(t.pid) for t in trio)).returncode == 0
        return int(doc["pauses"]["count"])

    first = FIRST_PAGES - EXTENT_UNITS  # pages of the first merge window, a single extent
    roomy = stops("--pause-budget-ms", "1000", "--batch-pages", "256")
    # the scratch area, the madvise guard, the first merge window, then 256 pages each
    assert roomy == 3 * (2 + 1 + -(-(N - first) // 256)), roomy
    # Guarded already (a filter stays), and the unmerge left the region in several
    # VMAs, which cut the extents further: at least this many windows of 16 pages
    tiny = stops("--pause-budget-ms", "0.001")
    assert tiny >= 3 * (1 + 1 + -(-(N - first) // 16)), tiny
    for t in trio:
        assert t.command("check") == f"OK pages={N + Z + U}"


def _cpu_ns(pid: int) -> int:
    """The process's CPU time over its threads, from schedstat (not procksm's reader)."""
    total = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
            total += int(f.read().split()[0])
    return total


def test_merge_cli_json(trio) -> None:  # type: ignore[no-untyped-def]
    args = ["merge", "--json", *(str(t.pid) for t in trio)]
    for t in trio:
        for r in ("identical", "zero", "unique"):
            s, e = region(t, r)
            args += ["--range", f"{s:#x}-{e:#x}"]
    cpu_before = {x.pid: _cpu_ns(x.pid) for x in trio}  # idle targets: blocked on a read
    res = run_procksm(*args)
    assert res.returncode == 0, res.stderr
    doc = json.loads(res.stdout)
    t = doc["totals"]
    assert t["pages_merged"] == 3 * N and t["pages_zeroed"] == 3 * Z and t["slots"] == N
    # the CPU time procksm's calls took in the targets: reported, and within what the
    # targets spent meanwhile (they spent nothing else: the rest is the first windows'
    # single calls and being stopped and resumed)
    for p in doc["processes"]:
        spent = (_cpu_ns(p["pid"]) - cpu_before[p["pid"]]) / 1e9
        assert 0 < p["target_cpu_s"] <= spent, (p["target_cpu_s"], spent)
    assert doc["target_cpu_s"] == pytest.approx(
        sum(p["target_cpu_s"] for p in doc["processes"]), abs=1e-3
    )
    assert t["saved_bytes"] == (3 * N - N + 3 * Z) * PAGE_SIZE
    assert set(doc["pauses"]) == {"count", "p50_ms", "p99_ms", "max_ms", "longest"}
    # the longest stop and where its time went: its parts add up to it
    longest = doc["pauses"]["longest"]
    assert longest["ms"] == doc["pauses"]["max_ms"]
    assert longest["pid"] in {t.pid for t in trio} and longest["threads"] >= 1
    parts = ("stop_ms", "gate_ms", "calls_ms", "resume_ms", "other_ms")
    assert all(longest[k] >= 0 for k in parts) and longest["stop_ms"] > 0
    assert abs(sum(longest[k] for k in parts) - longest["ms"]) < 0.01
    # the memfd pages are charged to procksm's own cgroup: reported (docs/design.md §3.7)
    assert doc["procksm"]["memfd_bytes"] == N * PAGE_SIZE
    assert doc["procksm"]["cgroup"].startswith("/")
    charged = doc["procksm"]["cgroup_memory_bytes"]
    # None where procksm's cgroup has no memory.current; CI's machine has one
    assert charged > 0 if IN_CI else charged is None or charged > 0, charged
    assert [p["pid"] for p in doc["processes"]] == [x.pid for x in trio]
    assert isinstance(doc["refused"], list)
    for x in trio:
        assert x.command("check").startswith("OK")


def test_unmerge_all(trio) -> None:  # type: ignore[no-untyped-def]
    """`unmerge --all` (the kernel KSM's run=2) finds every merged process by itself."""
    opts = selection(trio)
    merge([t.pid for t in trio], MergeOptions(selection=opts))
    assert all(merged_ranges(t.pid) for t in trio)
    res = run_procksm("unmerge", "--all", "--json")
    doc = json.loads(res.stdout)
    # 5: some other process was held by another procksm (e.g. a daemon): skipped, said so
    assert res.returncode == (5 if doc["skipped"] else 0), res.stderr
    assert {p["pid"] for p in doc["processes"]} >= {t.pid for t in trio}
    assert not {s["pid"] for s in doc["skipped"]} & {t.pid for t in trio}
    for t in trio:
        assert merged_ranges(t.pid) == []
        assert t.command("check").startswith("OK")


def test_a_new_target_joins_an_existing_merge(trio) -> None:  # type: ignore[no-untyped-def]
    """A restarted worker: its pages map the segments an earlier merge left in the other
    targets (the stable tree across runs), no new copy of the shared data is written."""
    a, b, c = trio
    first = merge([a.pid, b.pid], MergeOptions(selection=selection([a, b])))
    assert first.pages_merged == 2 * N
    res = merge([a.pid, b.pid, c.pid], MergeOptions(selection=selection(trio)))
    doc = res.as_json()
    assert doc["processes"][2]["pages_merged"] == N  # c, into the existing segment
    assert doc["totals"]["slots_written"] == 0  # nothing new to store
    shared = pfns(a.pid, *region(a, "identical"))
    assert (pfns(c.pid, *region(c, "identical")) == shared).all()
    inodes = {v.inode for t in trio for v in merged_ranges(t.pid)}
    assert len(inodes) == 1
    for t in trio:
        assert t.command("check").startswith("OK")
    # growing c's merged range still reads zeros: it ends the adopted segment
    assert c.command(f"write identical {N - 1}") == "OK"
    assert (pfns(a.pid, *region(a, "identical")) == shared).all()


def test_a_merged_then_unmerged_target_is_merged_again_reading_its_maps_once(  # type: ignore[no-untyped-def]
    spawn, monkeypatch
) -> None:
    """After a merge and an unmerge each unmerged piece stays a VMA of its own
    (docs/design.md §10): every other page merged leaves thousands of VMAs. A merge round
    asks a target's maps several things outside its stop windows (its segments, how many
    VMAs it has, where its code is for the injected calls): one read of
    /proc/PID/maps answers them, none is parsed whole (~17 ms per read of 3,700 VMAs,
    benchmarks/many_vmas.py), and the leftovers check reads it again under stop."""
    require_privileges()
    exe = build_c_target("planted")
    alt = 4096  # pages; the even ones identical in both targets
    pair = [spawn([exe, "--alternate", alt, "--seed", 11]) for _ in range(2)]
    pids = [t.pid for t in pair]
    sel = ScanOptions(ranges=[AddressRange(*region(t, "alternate")) for t in pair])
    opts = MergeOptions(selection=sel)
    # the first merge only makes the VMAs (at load average 12 on 2 CPUs an injected mmap
    # missed its 2 s limit and ended one target's merge early: still a thousand VMAs)
    assert merge(pids, opts).as_json()["totals"]["pages_merged"] >= alt // 2
    for pid in pids:
        unmerge(pid)
        assert procfs.MapsSnapshot(pid).vma_count > 1000
    scan = collect(pids, sel)
    mergeable = mergeable_rows(scan, look_at_scan(KsmIndex(), scan, remember=False))

    maps_reads: Counter[int] = Counter()
    whole_parses: list[str] = []
    read_file = procfs._read_memory_map_file

    def counted_read(pid: int, name: str) -> str:
        if name == "maps":
            maps_reads[pid] += 1
        return read_file(pid, name)

    def parse_spy(parse):  # type: ignore[no-untyped-def]
        def parse_whole(text: str) -> list[procfs.Vma]:
            whole_parses.append(parse.__name__)
            return parse(text)  # type: ignore[no-any-return]

        return parse_whole

    monkeypatch.setattr(procfs, "_read_memory_map_file", counted_read)
    for name in ("parse_maps", "parse_smaps"):
        monkeypatch.setattr(procfs, name, parse_spy(getattr(procfs, name)))
    t0 = time.perf_counter()
    with MergeEngine(pids, opts) as engine:
        out = engine.merge_scanned(scan, mergeable)
    took = time.perf_counter() - t0
    monkeypatch.undo()
    merged = sum(r.pages_merged for r in out.results.values())
    print(f"\n{merged} pages merged in {took:.2f} s; reads of maps per target {dict(maps_reads)}")
    assert merged == alt
    # the round's snapshot, then the leftovers check in the first stop window
    assert maps_reads == {pid: 2 for pid in pids}
    assert whole_parses == []
    for t in pair:
        assert_target_intact(t)
