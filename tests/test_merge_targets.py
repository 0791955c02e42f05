"""`procksm merge` on the targets that make merging hard: other users, busy threads,
another network namespace, the worst layout for the VMA budget, and bad input.

The truth is pagemap (merged pages share one PFN), the targets' own self-checks and their
blocked threads' error counters, and /proc/PID/maps (VMAs added, procksm's mappings).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from procksm import PAGE_SIZE, procfs
from procksm.attach.locks import target_locks
from procksm.fdpass import FdSender, netns_identity, same_netns
from procksm.merge import MergeOptions, MergeResult
from procksm.merge import engine as merge_mod
from procksm.merge import handover as merge_handover
from procksm.merge import target as merge_target
from procksm.merge.round_slots import RoundSlots
from procksm.plan import IN_TARGET_PAGES, vma_budget
from procksm.procfs import PM_PFN_MASK, PM_PRESENT, PagemapFile
from procksm.scanner import AddressRange, ScanOptions
from procksm.unmerge import merged_ranges, unmerge
from tests.conftest import ROOT, build_c_target, require_privileges, run_procksm, skip_or_fail

PROCKSM = [sys.executable, "-m", "procksm"]
NOBODY = 65534
# Popen arguments that start a process as nobody (no supplementary groups).
AS_NOBODY: dict[str, Any] = {"user": NOBODY, "group": NOBODY, "extra_groups": []}
SETPRIV_NOBODY = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"]
N, Z, U = 256, 32, 16  # identical, zero, unique pages per target
REGIONS = ("identical", "zero", "unique")


# --------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------


@pytest.fixture
def planted() -> Path:
    require_privileges()
    return build_c_target("planted")


def planted_argv(exe: Path, *extra: object, seed: int = 5) -> list[object]:
    return [exe, "--identical", N, "--zero", Z, "--unique", U, "--seed", seed, *extra]


def region(t: Any, name: str) -> tuple[int, int]:
    start = t.int(name)
    return start, start + t.int(name + "_pages") * PAGE_SIZE


def selection(targets: list[Any], regions: tuple[str, ...] = REGIONS) -> ScanOptions:
    return ScanOptions(ranges=[AddressRange(*region(t, r)) for t in targets for r in regions])


def pfns(pid: int, start: int, end: int) -> np.ndarray:
    with PagemapFile(pid) as pm:
        ent = pm.read(start, end)
    assert ((ent & PM_PRESENT) != 0).all()
    return ent & PM_PFN_MASK


def run_engine(pids: list[int], opts: MergeOptions) -> MergeResult:
    return merge_mod.merge(pids, opts)


def vma_count(pid: int) -> int:
    return len(Path(f"/proc/{pid}/maps").read_text().splitlines())


def uid_of(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Uid:"):
            return int(line.split()[1])
    raise AssertionError("no Uid line")


def assert_identical_region_shared(targets: list[Any]) -> None:
    """Every target's identical region maps the same N frames, page for page."""
    first = pfns(targets[0].pid, *region(targets[0], "identical"))
    assert np.unique(first).size == N
    for t in targets[1:]:
        assert (pfns(t.pid, *region(t, "identical")) == first).all()
    for t in targets:
        assert merged_ranges(t.pid), f"no procksm mapping in pid {t.pid}"


def blocked_stack_pointers(pid: int, want: int = 5, timeout: float = 5.0) -> list[int]:
    """Stack pointers of the threads blocked in a system call (/proc/.../syscall gives
    "nr args... sp pc" for those, "running" for the others). Threads just released from
    a stop window re-enter their system call a moment later: poll until ``want``."""
    deadline = time.monotonic() + timeout
    while True:
        sps = []
        for tid in os.listdir(f"/proc/{pid}/task"):
            fields = Path(f"/proc/{pid}/task/{tid}/syscall").read_text().split()
            if len(fields) == 9:
                sps.append(int(fields[7], 16))
        if len(sps) >= want or time.monotonic() > deadline:
            return sps
        time.sleep(0.02)


@pytest.fixture
def fd_senders(monkeypatch: pytest.MonkeyPatch) -> list[FdSender]:
    """The real FdSender, recorded: which hand-overs went through SCM_RIGHTS (the
    /proc/<procksm>/fd/N open is the other path, for targets allowed to open it)."""
    made: list[FdSender] = []

    class RecordingFdSender(FdSender):
        def __init__(self, target_pid: int) -> None:
            super().__init__(target_pid)
            made.append(self)

    monkeypatch.setattr(merge_handover, "FdSender", RecordingFdSender)
    return made


# --------------------------------------------------------------------------------------
# 1. targets of another user
# --------------------------------------------------------------------------------------


def _status(pid: int, key: str) -> str:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return line.split(":", 1)[1].strip()
    raise AssertionError(key)


def test_non_root_targets_without_no_new_privs_are_refused(spawn, planted) -> None:  # type: ignore[no-untyped-def]
    """seccomp(2) needs no_new_privs or CAP_SYS_ADMIN: without --set-no-new-privs a
    non-root target cannot take the madvise guard and is left exactly as it was."""
    pair = [spawn(planted_argv(planted), **AS_NOBODY) for _ in range(2)]
    res = run_engine([t.pid for t in pair], MergeOptions(selection=selection(pair)))
    assert res.pages_merged == 0
    reasons = {r.pid: r.reason for r in res.refused}
    assert set(reasons) == {t.pid for t in pair}
    assert all("--set-no-new-privs" in why for why in reasons.values()), reasons
    for t in pair:
        assert _status(t.pid, "NoNewPrivs") == "0"
        assert _status(t.pid, "Seccomp_filters") == "0"
        assert merged_ranges(t.pid) == []
        assert t.command("check") == f"OK pages={N + Z + U}"


def test_merge_says_on_the_terminal_why_a_non_root_target_was_not_merged(spawn, planted) -> None:  # type: ignore[no-untyped-def]
    """`procksm merge` printed "merged 0 pages ... 0 refused" and exited 0 (issue 15):
    the reason, with its fix, is now a line on stderr per target, the exit code is 1,
    and the targets are untouched."""
    pair = [spawn(planted_argv(planted), **AS_NOBODY) for _ in range(2)]
    proc = run_procksm("merge", *(t.pid for t in pair))
    assert proc.returncode == 1, (proc.stdout, proc.stderr)
    for t in pair:
        line = f"pid {t.pid}: not merged: madvise guard needs no_new_privs"
        assert line in proc.stderr, proc.stderr
        assert _status(t.pid, "Seccomp_filters") == "0"
        assert merged_ranges(t.pid) == []
        assert t.command("check") == f"OK pages={N + Z + U}"
    assert "--set-no-new-privs" in proc.stderr


def test_non_root_targets_merge_through_scm_rights(spawn, planted, fd_senders) -> None:  # type: ignore[no-untyped-def]
    pair = [spawn(planted_argv(planted, "--blockers"), **AS_NOBODY) for _ in range(2)]
    assert [uid_of(t.pid) for t in pair] == [NOBODY, NOBODY]
    res = run_engine(
        [t.pid for t in pair], MergeOptions(selection=selection(pair), set_no_new_privs=True)
    )
    # the guard is in, with the no_new_privs the user allowed
    for t in pair:
        assert _status(t.pid, "NoNewPrivs") == "1"
        assert _status(t.pid, "Seccomp_filters") == "1"
    doc = res.as_json()
    assert all(p.get("error") is None for p in doc["processes"]), doc["processes"]
    assert doc["totals"]["pages_merged"] == 2 * N
    assert doc["totals"]["pages_zeroed"] == 2 * Z
    assert_identical_region_shared(pair)
    # nobody may not open /proc/<procksm>/fd/N (PTRACE_MODE_READ on a root process): every
    # target got its fds over SCM_RIGHTS, in our network namespace
    assert {s.target_pid for s in fd_senders} == {t.pid for t in pair}
    assert all(s.same_netns for s in fd_senders)
    for t in pair:
        assert t.command("check") == f"OK pages={N + Z + U}"
        assert t.command("errors") == "ERRORS 0"
    # and procksm (root) undoes it for a target of another user
    assert unmerge(pair[0].pid).pages_unmerged == N
    assert merged_ranges(pair[0].pid) == []
    assert pair[0].command("check") == f"OK pages={N + Z + U}"


def test_root_targets_open_the_memfd_through_proc(spawn, planted, fd_senders) -> None:  # type: ignore[no-untyped-def]
    """The control for the test above: a root target opens /proc/<procksm>/fd/N itself,
    so no SCM_RIGHTS hand-over happens."""
    pair = [spawn(planted_argv(planted)) for _ in range(2)]
    res = run_engine([t.pid for t in pair], MergeOptions(selection=selection(pair)))
    assert res.pages_merged == 2 * N
    assert_identical_region_shared(pair)
    assert fd_senders == []


# --------------------------------------------------------------------------------------
# 2. busy and blocked threads
# --------------------------------------------------------------------------------------


def test_multithreaded_busy_target_merges_whole_process(spawn, planted) -> None:  # type: ignore[no-untyped-def]
    """7 spinning threads and 4 threads blocked in read/futex/nanosleep/poll, whole
    process (heap, thread arenas, libc data, pthread stacks that are not in use...)."""
    pair = [spawn(planted_argv(planted, "--threads", 7, "--blockers")) for _ in range(2)]
    nthreads = 1 + 7 + 4
    for t in pair:
        assert len(os.listdir(f"/proc/{t.pid}/task")) == nthreads
    res = run_engine([t.pid for t in pair], MergeOptions())
    doc = res.as_json()
    assert all(p.get("error") is None for p in doc["processes"]), doc["processes"]
    assert doc["totals"]["pages_merged"] >= 2 * N
    assert doc["totals"]["pages_zeroed"] >= 2 * Z
    assert_identical_region_shared(pair)
    # the stacks of the blocked threads (and main, blocked reading stdin) stay anonymous
    for t in pair:
        merged = merged_ranges(t.pid)
        sps = blocked_stack_pointers(t.pid)
        assert len(sps) >= 5, sps
        assert not any(v.start <= sp < v.end for v in merged for sp in sps)
    for t in pair:
        assert t.command("check") == f"OK pages={N + Z + U}"
        # no blocked thread saw EINTR or a kernel restart code
        assert t.command("errors") == "ERRORS 0"
        # every thread still exists and none was left stopped (state t/T) by procksm
        tasks = os.listdir(f"/proc/{t.pid}/task")
        assert len(tasks) == nthreads
        for tid in tasks:
            stat = Path(f"/proc/{t.pid}/task/{tid}/stat").read_text()
            assert stat.rsplit(")", 1)[1].split()[0] not in ("t", "T"), stat
            tracer = Path(f"/proc/{t.pid}/task/{tid}/status").read_text()
            assert "TracerPid:\t0\n" in tracer
        # the spinners still spin: the process keeps using CPU
        utime0 = int(Path(f"/proc/{t.pid}/stat").read_text().rsplit(")", 1)[1].split()[11])
        time.sleep(0.1)
        utime1 = int(Path(f"/proc/{t.pid}/stat").read_text().rsplit(")", 1)[1].split()[11])
        assert utime1 > utime0


# --------------------------------------------------------------------------------------
# 3. another network namespace
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("as_nobody", [True, False], ids=["nobody", "root"])
def test_target_in_another_network_namespace(spawn, planted, fd_senders, as_nobody: bool) -> None:  # type: ignore[no-untyped-def]
    """`unshare --net` execs the target (same pid) in a fresh netns. A non-root target
    there can only receive fds over SCM_RIGHTS, from a socket procksm creates after
    setns() into that namespace; a root one opens /proc/<procksm>/fd/N itself."""
    user = SETPRIV_NOBODY if as_nobody else []
    pair = [
        spawn(["unshare", "--net", *user, *planted_argv(planted, "--blockers")]) for _ in range(2)
    ]
    for t in pair:
        assert t.int("pid") == t.pid  # unshare and setpriv exec: the pid is the target's
        assert not same_netns(t.pid)
        assert uid_of(t.pid) == (NOBODY if as_nobody else 0)
    assert netns_identity(pair[0].pid) != netns_identity(pair[1].pid)
    res = run_engine(
        [t.pid for t in pair], MergeOptions(selection=selection(pair), set_no_new_privs=True)
    )
    doc = res.as_json()
    assert all(p.get("error") is None for p in doc["processes"]), doc["processes"]
    assert res.pages_merged == 2 * N and res.pages_zeroed == 2 * Z
    assert_identical_region_shared(pair)
    if as_nobody:
        assert {s.target_pid for s in fd_senders} == {t.pid for t in pair}
        assert not any(s.same_netns for s in fd_senders)
        # the sockets lived in the targets' namespaces, not in ours
        assert {s.netns for s in fd_senders} == {netns_identity(t.pid) for t in pair}
    else:
        assert fd_senders == []
    for t in pair:
        assert t.command("check") == f"OK pages={N + Z + U}"
        assert t.command("errors") == "ERRORS 0"


# --------------------------------------------------------------------------------------
# 4. the VMA budget on the worst layout (every other page a duplicate)
# --------------------------------------------------------------------------------------


def alternate_pair(spawn, exe: Path, pages: int) -> list[Any]:  # type: ignore[no-untyped-def]
    return [spawn([exe, "--alternate", pages, "--seed", 4]) for _ in range(2)]


def shared_even_pages(pair: list[Any]) -> np.ndarray:
    """Indexes of the alternate-region pages whose frame both targets share."""
    a, b = (pfns(t.pid, *region(t, "alternate")) for t in pair)
    return np.flatnonzero(a == b)


def test_vma_budget_holds_on_worst_layout(spawn, planted) -> None:  # type: ignore[no-untyped-def]
    pages, cap = 256, 40  # 128 isolated duplicates per target, room for 20 extents
    pair = alternate_pair(spawn, planted, pages)
    before = {t.pid: vma_count(t.pid) for t in pair}
    assert all(vma_budget(procfs.max_map_count(), n, cap) == cap for n in before.values())
    res = run_engine(
        [t.pid for t in pair],
        MergeOptions(selection=selection(pair, ("alternate",)), vma_budget_cap=cap),
    )
    doc = res.as_json()
    # merged in part: not a process refused as a whole (`procksm merge` then said "not
    # merged" on the terminal and exited 1)
    assert res.refused_processes() == []
    for t, proc in zip(pair, doc["processes"], strict=True):
        added = vma_count(t.pid) - before[t.pid]
        assert 0 < added <= cap, added
        assert proc["extents"] == cap // 2  # each isolated page costs up to 2 VMAs
        assert proc["pages_merged"] == cap // 2
        assert proc["pages_refused"] == pages // 2 - cap // 2
        reasons = [r["reason"] for r in doc["refused"] if r["pid"] == t.pid]
        assert len(reasons) == 1 and reasons[0].startswith("vma-budget:"), doc["refused"]
        assert f"{pages // 2 - cap // 2} pages" in reasons[0]
        assert t.command("check") == f"OK pages={pages}"
        assert t.command("mmap 64") == "OK"
    # the kept extents are the same pages in both targets (equal sizes: lowest
    # addresses first), so each merged page really shares a frame
    shared = shared_even_pages(pair)
    assert shared.size == cap // 2 and (shared % 2 == 0).all()


def test_default_vma_budget_stays_far_below_max_map_count(spawn, planted) -> None:  # type: ignore[no-untyped-def]
    """More isolated duplicates than the default budget admits (it is at most 8192 VMAs,
    4096 extents): VMAs added stay under the budget, an eighth of vm.max_map_count at
    most; stop windows are bounded by injected calls although every extent is one page
    (how long they are: benchmarks/suite.py, W2)."""
    pages = 8400  # 4200 isolated duplicates per target
    pair = alternate_pair(spawn, planted, pages)
    before = {t.pid: vma_count(t.pid) for t in pair}
    max_map = procfs.max_map_count()
    res = run_engine([t.pid for t in pair], MergeOptions(selection=selection(pair, ("alternate",))))
    doc = res.as_json()
    budgets = {t.pid: vma_budget(max_map, before[t.pid]) for t in pair}
    for t, proc in zip(pair, doc["processes"], strict=True):
        budget = budgets[t.pid]
        assert budget <= max_map // 8
        added = vma_count(t.pid) - before[t.pid]
        assert budget // 2 <= added <= budget, (added, budget)
        assert proc["pages_refused"] == pages // 2 - budget // 2 > 0
        assert any(
            r["pid"] == t.pid and r["reason"].startswith("vma-budget:") for r in doc["refused"]
        )
        assert t.command("check") == f"OK pages={pages}"
        assert t.command("mmap 256") == "OK"
        # one page per extent: windows are bounded by injected calls, not only by pages
        # (bounded by pages alone, 512 one-page extents stopped a target ~130-200 ms)
        assert proc["pauses"]["count"] >= budget // 32, proc["pauses"]
    # both keep their lowest-addressed extents: the same pages, sharing frames
    assert shared_even_pages(pair).size == min(b // 2 for b in budgets.values())


# --------------------------------------------------------------------------------------
# 5. bad input: one line, non-zero exit, nothing changed
# --------------------------------------------------------------------------------------


@pytest.fixture
def cli_pair(spawn, planted) -> list[Any]:  # type: ignore[no-untyped-def]
    return [spawn(planted_argv(planted)) for _ in range(2)]


def run_cli(*args: object, **kw: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*PROCKSM, *(str(a) for a in args)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
        **kw,
    )


def assert_one_line_error(res: subprocess.CompletedProcess[str], code: int, needle: str) -> None:
    assert res.returncode == code, (res.returncode, res.stdout, res.stderr)
    assert res.stdout == ""
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr
    assert needle in lines[0], lines[0]


def assert_untouched(targets: list[Any]) -> None:
    for t in targets:
        assert "/memfd:procksm" not in Path(f"/proc/{t.pid}/maps").read_text()
        assert t.command("check") == f"OK pages={N + Z + U}"


def test_merge_unknown_pid(cli_pair) -> None:  # type: ignore[no-untyped-def]
    res = run_cli("merge", cli_pair[0].pid, cli_pair[1].pid, 4194303)
    assert_one_line_error(res, 3, "no such process (pid=4194303)")
    assert_untouched(cli_pair)


def test_merge_non_numeric_pid(cli_pair) -> None:  # type: ignore[no-untyped-def]
    res = run_cli("merge", cli_pair[0].pid, cli_pair[1].pid, "abc")
    assert_one_line_error(res, 2, "bad PID 'abc'")
    assert_untouched(cli_pair)


def test_merge_not_permitted(cli_pair) -> None:  # type: ignore[no-untyped-def]
    """procksm as nobody against root's processes (and root's lock directory)."""
    res = run_cli("merge", cli_pair[0].pid, cli_pair[1].pid, **AS_NOBODY)
    assert_one_line_error(res, 4, "not permitted")
    assert "root" in res.stderr
    assert_untouched(cli_pair)


def test_merge_across_uids_needs_cross_uid(spawn, planted, cli_pair) -> None:  # type: ignore[no-untyped-def]
    other = spawn(planted_argv(planted), **AS_NOBODY)
    res = run_cli("merge", cli_pair[0].pid, other.pid)
    assert_one_line_error(res, 4, "--cross-uid")
    assert_untouched([cli_pair[0], other])


def test_merge_while_another_procksm_works_on_the_target(cli_pair) -> None:  # type: ignore[no-untyped-def]
    with target_locks([cli_pair[1].pid]):
        res = run_cli("merge", cli_pair[0].pid, cli_pair[1].pid)
    assert_one_line_error(res, 5, "another procksm")
    assert f"pid {os.getpid()}" in res.stderr  # names the holder
    assert_untouched(cli_pair)


@pytest.fixture
def merged_pair(cli_pair) -> Iterator[list[Any]]:  # type: ignore[no-untyped-def]
    """Two root targets with their identical regions merged (something to unmerge)."""
    res = run_engine([t.pid for t in cli_pair], MergeOptions(selection=selection(cli_pair)))
    assert res.pages_merged == 2 * N
    yield cli_pair


def assert_still_merged(targets: list[Any], before: dict[int, list[procfs.Vma]]) -> None:
    for t in targets:
        assert merged_ranges(t.pid) == before[t.pid]
        assert t.command("check") == f"OK pages={N + Z + U}"
    assert_identical_region_shared(targets)


def snapshot(targets: list[Any]) -> dict[int, list[procfs.Vma]]:
    return {t.pid: merged_ranges(t.pid) for t in targets}


def test_unmerge_unknown_pid(merged_pair) -> None:  # type: ignore[no-untyped-def]
    before = snapshot(merged_pair)
    res = run_cli("unmerge", merged_pair[0].pid, 4194303)
    assert_one_line_error(res, 3, "no such process (pid=4194303)")
    assert_still_merged(merged_pair, before)


def test_unmerge_non_numeric_pid(merged_pair) -> None:  # type: ignore[no-untyped-def]
    before = snapshot(merged_pair)
    res = run_cli("unmerge", merged_pair[0].pid, "abc")
    assert_one_line_error(res, 2, "bad PID 'abc'")
    assert_still_merged(merged_pair, before)


def test_unmerge_not_permitted(merged_pair) -> None:  # type: ignore[no-untyped-def]
    before = snapshot(merged_pair)
    res = run_cli("unmerge", merged_pair[0].pid, **AS_NOBODY)
    assert_one_line_error(res, 4, "not permitted")
    assert_still_merged(merged_pair, before)


def test_unmerge_while_another_procksm_works_on_the_target(merged_pair) -> None:  # type: ignore[no-untyped-def]
    before = snapshot(merged_pair)
    with target_locks([merged_pair[0].pid]):
        res = run_cli("unmerge", merged_pair[0].pid)
    assert_one_line_error(res, 5, "another procksm")
    assert_still_merged(merged_pair, before)


def test_stale_lock_files_are_removed(tmp_path, monkeypatch, spawn, planted) -> None:  # type: ignore[no-untyped-def]
    """Lock files of exited targets do not accumulate; a live target's lock stays."""
    from procksm.attach import locks

    monkeypatch.setenv("PROCKSM_LOCK_DIR", str(tmp_path))
    t = spawn(planted_argv(planted))
    (tmp_path / "4194305-123.lock").write_text("1\n")  # a pid above pid_max: gone
    (tmp_path / f"{t.pid}-1.lock").write_text("1\n")  # pid reused (other start time)
    with locks.target_locks([t.pid]):
        live = tmp_path / f"{t.pid}-{locks.start_time(t.pid)}.lock"
        assert live.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [live.name]


# --------------------------------------------------------------------------------------
# docs/design.md §3.1: allocators that rely on zero-after-MADV_DONTNEED are refused (until the
# issue-4 guard exists)
# --------------------------------------------------------------------------------------


def test_jemalloc_programs_are_refused_unless_allowed(spawn, planted, tmp_path) -> None:  # type: ignore[no-untyped-def]
    # planted with jemalloc "linked in": the marker string anywhere in its executable
    exe = tmp_path / "planted-jemalloc"
    exe.write_bytes(planted.read_bytes() + b"\0<jemalloc>: static marker\0")
    exe.chmod(0o755)
    pair = [spawn(planted_argv(exe)) for _ in range(2)]
    # without the madvise guard (procksm.guard) DONTNEED would read stale data: refused
    res = run_engine([t.pid for t in pair], MergeOptions(selection=selection(pair), guard=False))
    assert res.pages_merged == 0
    reasons = {r.pid: r.reason for r in res.refused if r.start == 0}
    assert all("jemalloc" in reasons[t.pid] for t in pair), reasons
    assert all("--allow-dontneed-reuse" in reasons[t.pid] for t in pair)
    assert all(merged_ranges(t.pid) == [] for t in pair)
    res = run_engine(
        [t.pid for t in pair],
        MergeOptions(selection=selection(pair), guard=False, allow_zero_after_dontneed=True),
    )
    assert res.pages_merged == 2 * N
    for t in pair:
        assert t.command("check") == f"OK pages={N + Z + U}"
    # with the guard (the default) they merge: DONTNEED reads zeros again
    more = [spawn(planted_argv(exe)) for _ in range(2)]
    res = run_engine([t.pid for t in more], MergeOptions(selection=selection(more)))
    assert res.pages_merged == 2 * N
    assert more[0].command("dontneed identical 0 4") == "OK"
    for t in more:
        assert t.command("check") == f"OK pages={N + Z + U}"


def test_real_redis_server_is_refused_without_the_guard(spawn, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """redis-server links jemalloc statically (installed by `make setup`); with the
    guard it merges (tests/test_real_programs.py)."""
    require_privileges()
    redis = shutil.which("redis-server")
    if redis is None:
        skip_or_fail("redis-server is not installed (make setup installs it)")
    code = textwrap.dedent(
        f"""
        import subprocess, sys
        p = subprocess.Popen([{redis!r}, "--port", "0", "--save", "", "--dir", {str(tmp_path)!r}],
                             stdout=subprocess.DEVNULL)
        print(f"READY pid={{p.pid}}", flush=True)
        sys.stdin.readline()
        p.kill()
        """
    )
    holder = spawn([sys.executable, "-c", code])
    pid = holder.int("pid")
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and not Path(f"/proc/{pid}/maps").read_text():
        time.sleep(0.05)
    res = run_engine([pid], MergeOptions(guard=False))
    assert res.pages_merged == 0 and res.pages_zeroed == 0
    assert any(r.pid == pid and "jemalloc" in r.reason for r in res.refused)


# --------------------------------------------------------------------------------------
# docs/design.md §3.5: a page that changes between the scan and its merge is skipped
# --------------------------------------------------------------------------------------


def _compared_here(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, int]]:
    """(address, pages) of every run procksm reads and compares itself under stop; the
    long runs are compared by the target (procksm.plan.IN_TARGET_PAGES)."""
    seen: list[tuple[int, int]] = []
    equal_pages, zero_here = merge_target._equal_pages, merge_target._zero_here

    def spy_equal(reader, runs, want):  # type: ignore[no-untyped-def]
        seen.extend((a, n) for a, n, _ in runs)
        return equal_pages(reader, runs, want)

    def spy_zero(reader, zero, res):  # type: ignore[no-untyped-def]
        seen.extend((z.addr, z.npages) for z in zero)
        return zero_here(reader, zero, res)

    monkeypatch.setattr(merge_target, "_equal_pages", spy_equal)
    monkeypatch.setattr(merge_target, "_zero_here", spy_zero)
    return seen


def test_long_runs_are_compared_by_the_target_not_read_again(spawn, planted, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """Issue 16, "verification that costs less than a second read": the identical and
    zero regions (runs of >= IN_TARGET_PAGES) are compared by the target's call routine
    against the slots mapped in its staging range; procksm reads none of those runs'
    bytes under stop, and nothing of a segment's stays in the staging range."""
    assert N >= IN_TARGET_PAGES and Z >= IN_TARGET_PAGES
    pair = [spawn(planted_argv(planted)) for _ in range(2)]
    seen = _compared_here(monkeypatch)
    res = run_engine([t.pid for t in pair], MergeOptions(selection=selection(pair)))
    totals = res.as_json()["totals"]
    assert (totals["pages_merged"], totals["pages_zeroed"], totals["pages_volatile"]) == (
        2 * N,
        2 * Z,
        0,
    )
    # only a window's short pieces (an extent cut where a window ends) are read here
    assert all(n < IN_TARGET_PAGES for _, n in seen), seen
    assert sum(n for _, n in seen) < (N + Z) // 4, seen
    fa, fb = (pfns(t.pid, *region(t, "identical")) for t in pair)
    assert (fa == fb).all()
    for t in pair:
        assert t.command("check") == f"OK pages={N + Z + U}"
        # nothing of a segment's is left outside the merged region (the staging range)
        identical = region(t, "identical")
        assert all(identical[0] <= v.start and v.end <= identical[1] for v in merged_ranges(t.pid))


def test_a_windows_tables_are_built_before_its_stop(spawn, planted, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """Issue 16, fewer round trips' Python in the stop: a window whose checks find the
    work it was planned with runs the tables built before its stop; the first windows
    (before the scratch area and the hand-over's way are known) build theirs under stop.
    The merge is whole either way."""
    pair = [spawn(planted_argv(planted)) for _ in range(2)]
    used: list[bool] = []
    holds = merge_target._Prepared.holds

    def spy(self, st, work):  # type: ignore[no-untyped-def]
        used.append(holds(self, st, work))
        return used[-1]

    monkeypatch.setattr(merge_target._Prepared, "holds", spy)
    res = run_engine([t.pid for t in pair], MergeOptions(selection=selection(pair)))
    totals = res.as_json()["totals"]
    assert (totals["pages_merged"], totals["pages_zeroed"]) == (2 * N, 2 * Z)
    windows = sum(len(t.pauses) for t in res.targets)
    assert used and all(used), used
    # all but each target's first windows (scratch area, guard, the first merge window)
    assert len(used) >= windows - 3 * len(pair), (len(used), windows)
    for t in pair:
        assert t.command("check") == f"OK pages={N + Z + U}"


def test_a_page_written_after_the_scan_is_not_merged(spawn, planted, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    pair = [spawn(planted_argv(planted)) for _ in range(2)]
    a, b = pair
    seen = _compared_here(monkeypatch)
    write_slots = RoundSlots.write

    def write_then_change(self, scan, plan):  # type: ignore[no-untyped-def]
        write_slots(self, scan, plan)  # slots hold the scanned content ...
        assert a.command("write identical 3") == "OK"  # ... then a changes one page

    monkeypatch.setattr(RoundSlots, "write", write_then_change)
    res = run_engine([a.pid, b.pid], MergeOptions(selection=selection(pair)))
    doc = res.as_json()
    by_pid = {p["pid"]: p for p in doc["processes"]}
    assert by_pid[a.pid]["pages_merged"] == N - 1  # compared under stop: page 3 differs
    assert by_pid[a.pid]["pages_volatile"] == 1
    assert by_pid[b.pid]["pages_merged"] == N
    fa, fb = (pfns(t.pid, *region(t, "identical")) for t in pair)
    assert fa[3] != fb[3] and (np.delete(fa, 3) == np.delete(fb, 3)).all()
    # the target found the run changed; procksm compared that run, page by page, and
    # no other long run (short pieces where a window cut an extent are read here: how
    # windows cut depends on the pauses measured)
    page3 = region(a, "identical")[0] + 3 * PAGE_SIZE
    with_page3 = [n for addr, n in seen if addr <= page3 < addr + n * PAGE_SIZE]
    others = [n for addr, n in seen if not addr <= page3 < addr + n * PAGE_SIZE]
    assert any(n >= IN_TARGET_PAGES for n in with_page3), seen
    assert all(n < IN_TARGET_PAGES for n in others), seen
    for t in pair:
        assert t.command("check") == f"OK pages={N + Z + U}"


# --------------------------------------------------------------------------------------
# docs/design.md §3.4: processes with io_uring (pinned pages the kernel may DMA into) are refused
# --------------------------------------------------------------------------------------

IO_URING_TARGET = textwrap.dedent(
    """
    import ctypes, mmap, sys
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    ring = libc.syscall(425, 4, (ctypes.c_char * 120)())  # io_uring_setup
    if ring < 0:
        print(f"NOURING errno={ctypes.get_errno()}", flush=True)
        sys.exit(0)
    m = mmap.mmap(-1, 64 * 4096, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    for i in range(64):
        m[i * 4096:(i + 1) * 4096] = bytes([i + 1]) * 4096
    addr = ctypes.addressof(ctypes.c_char.from_buffer(m))
    print(f"READY ring={ring} addr={addr:#x}", flush=True)
    sys.stdin.readline()
    """
)


def test_io_uring_users_are_refused_unless_allowed(spawn) -> None:  # type: ignore[no-untyped-def]
    require_privileges()
    try:
        pair = [spawn([sys.executable, "-c", IO_URING_TARGET]) for _ in range(2)]
    except RuntimeError as e:
        skip_or_fail(f"io_uring_setup is not available: {e}")
    sel = ScanOptions(
        ranges=[AddressRange(t.int("addr"), t.int("addr") + 64 * PAGE_SIZE) for t in pair]
    )
    res = run_engine([t.pid for t in pair], MergeOptions(selection=sel))
    assert res.pages_merged == 0
    reasons = {r.pid: r.reason for r in res.refused if r.start == 0}
    assert all(
        "uses io_uring" in reasons[t.pid] and "--allow-async-io" in reasons[t.pid] for t in pair
    )
    assert all(merged_ranges(t.pid) == [] for t in pair)
    res = run_engine([t.pid for t in pair], MergeOptions(selection=sel, allow_async_io=True))
    assert res.pages_merged == 2 * 64


# --------------------------------------------------------------------------------------
# docs/design.md §3.7: a merge never pushes a target over its memory limit
# --------------------------------------------------------------------------------------


def _memory_cgroup_root() -> Path:
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if "memory" in controllers.split(","):
            return Path("/sys/fs/cgroup/memory") / path.lstrip("/")
    if Path("/sys/fs/cgroup/cgroup.controllers").exists():
        own = Path("/proc/self/cgroup").read_text().strip().split("::", 1)[1]
        return Path("/sys/fs/cgroup") / own.lstrip("/")
    raise AssertionError("no memory cgroup")


def test_merge_never_raises_a_limited_targets_memory_charge(spawn, planted, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Two targets in a memory cgroup limited to what they use plus 4 MiB: merging them
    only lowers the cgroup's charge (its peak never rises), nothing fails or is
    OOM-killed, and the shared pages are charged to procksm's own cgroup, which the
    JSON reports."""
    parent = _memory_cgroup_root()
    v1 = (parent / "memory.limit_in_bytes").exists()
    cg = parent / f"procksm-test-{os.getpid()}"
    cg.mkdir()
    try:
        if not v1:
            (cg / "memory.max").write_text("max")

        def enter() -> None:
            (cg / "cgroup.procs").write_text(str(os.getpid()))

        pair = [spawn(planted_argv(planted), preexec_fn=enter) for _ in range(2)]
        usage_file = cg / ("memory.usage_in_bytes" if v1 else "memory.current")
        usage = int(usage_file.read_text())
        limit = usage + (4 << 20)
        if v1:
            (cg / "memory.limit_in_bytes").write_text(str(limit))
            (cg / "memory.max_usage_in_bytes").write_text("0")  # reset the peak
        else:
            (cg / "memory.max").write_text(str(limit))
            (cg / "memory.peak").write_text("0") if (cg / "memory.peak").exists() else None
        res = run_engine([t.pid for t in pair], MergeOptions(selection=selection(pair)))
        assert res.pages_merged == 2 * N
        after = int(usage_file.read_text())
        assert after < usage - N * PAGE_SIZE, (usage, after)  # the targets' charge fell
        if v1:
            peak = int((cg / "memory.max_usage_in_bytes").read_text())
            # page tables at most, plus what the memcg charges ahead per CPU: charges are
            # taken in batches of 64 pages (mm/memcontrol.c MEMCG_CHARGE_BATCH) and the
            # stock left on a CPU counts in the usage (seen: exactly 128 pages over, once)
            ahead = 64 * PAGE_SIZE * (os.cpu_count() or 1)
            assert peak <= usage + (256 << 10) + ahead, (usage, peak)
            assert int((cg / "memory.failcnt").read_text()) == 0
        for t in pair:
            assert t.command("check") == f"OK pages={N + Z + U}"
        doc = res.as_json()["procksm"]
        assert doc["memfd_bytes"] == res.slots * PAGE_SIZE
        assert doc["cgroup"] == str(parent).removeprefix("/sys/fs/cgroup/memory").removeprefix(
            "/sys/fs/cgroup"
        )
        assert doc["cgroup_memory_bytes"] > 0
    finally:
        for t in list(locals().get("pair", [])):
            t.kill()
        for _ in range(50):
            try:
                cg.rmdir()
                break
            except OSError:
                time.sleep(0.05)


def test_equal_pages_compares_each_run_with_its_rows() -> None:
    """Pure logic of the window's one-read comparison (procksm.merge.target._equal_pages):
    rows follow the runs in any order, rows of no run stay False, and a read that stops
    early leaves the pages after it False."""
    from procksm.merge.target import _equal_pages

    page = lambda b: bytes([b]) * PAGE_SIZE  # noqa: E731
    memory = {0x10000 + i * PAGE_SIZE: page(i) for i in range(8)}

    class Reader:  # the target's memory: 8 pages, the 6th changed since the scan
        def __init__(self, readable: int) -> None:
            self.readable = readable  # pages readable in all

        def read_gather(self, runs: list[tuple[int, int]]) -> memoryview:
            out = b""
            for addr, n in runs:
                for k in range(n):
                    if len(out) // PAGE_SIZE == self.readable:
                        return memoryview(out)
                    a = addr + k * PAGE_SIZE
                    out += page(99) if a == 0x10000 + 5 * PAGE_SIZE else memory[a]
            return memoryview(out)

    want = b"".join(page(i) for i in range(8))  # rows 0..7 = the slots of pages 0..7
    every = [(0x10000, 8, 0)]
    assert _equal_pages(Reader(8), every, want).tolist() == [True] * 5 + [False] + [True] * 2
    # two runs, rows 4-7 first, rows 0-1 after; rows 2-3 in no run
    runs = [(0x10000 + 4 * PAGE_SIZE, 4, 4), (0x10000, 2, 0)]
    got = _equal_pages(Reader(8), runs, want).tolist()
    assert got == [True, True, False, False, True, False, True, True]
    # the read stops after 5 pages: the rest of the second run is not equal
    got = _equal_pages(Reader(5), runs, want).tolist()
    assert got == [True, False, False, False, True, False, True, True]
