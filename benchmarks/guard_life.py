"""What the madvise guard pair costs, and how long a call waits when a guard dies or
is upgraded (procksm.guardd), measured in one run (as root).

    .venv/bin/python benchmarks/guard_life.py [--kills 10]

Two planted targets (tests/targets/planted.c) with 2048 identical pages are merged; the
guards run in a scratch cgroup. Measured:

  private memory    Private_Clean + Private_Dirty (smaps_rollup) of each guard
  CPU per call      CPU time (utime + stime, /proc/PID/stat) of the active guard, and of
                    its unmerge helper, over a loop of the target's madvise(MADV_DONTNEED)
                    calls: on never-merged pages (CONTINUE) and on merged pages (the
                    helper unmerges the page, the call restarts)
  kill window       the slowest DONTNEED on never-merged memory while the active guard
                    is SIGKILLed (the standby notices on its pidfd, takes over, restarts
                    the calls the dead guard had received), over --kills kills
  upgrade window    the same across `procksm guard --upgrade`
  alone after kill  from the SIGKILL of the active guard to the fork of a new standby
                    (until then the survivor is the only holder of the listeners)

Writes benchmarks/results/guard_life.json.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this checkout's procksm

from benchmarks.harness.common import RESULTS, Json
from benchmarks.harness.truth import parent_pid, read_thread_cpu
from procksm import PAGE_SIZE, procfs
from procksm.guard import GuardClient
from procksm.merge import MergeEngine, MergeOptions
from procksm.scanner import AddressRange, ScanOptions
from tests.conftest import Target, build_c_target, remove_cgroup

N_IDENTICAL = 2048


def cpu_s(pid: int) -> float:
    return read_thread_cpu(pid).stat_s


def private_kib(pid: int) -> int:
    rollup = procfs.read_smaps_rollup(pid)
    return rollup["Private_Clean"] + rollup["Private_Dirty"]


def helper_pid(guard: int) -> int | None:
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            ppid = parent_pid(int(pid))
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if ppid == guard and b"guard_unmerge" in cmd:
            return int(pid)
    return None


def wait_for_standby(client: GuardClient, what: str) -> None:
    deadline = time.monotonic() + 10
    while not (client.running() and client.stats().get("peer_ready")):
        assert time.monotonic() < deadline, what
        time.sleep(0.02)


def merge_pair(targets: list[Target]) -> None:
    """Merge the identical regions of the targets with each other (starts the guards)."""
    ranges = [
        AddressRange(t.int("identical"), t.int("identical") + N_IDENTICAL * PAGE_SIZE)
        for t in targets
    ]
    pids = [t.pid for t in targets]
    with MergeEngine(pids, MergeOptions(selection=ScanOptions(ranges=ranges))) as eng:
        assert eng.run().pages_merged == len(targets) * N_IDENTICAL


def dontneed_loop(a: Target, ms: int, merged: str) -> dict[str, int]:
    line = a.command(f"dontneedloop {merged} unique {ms}", timeout=120)
    assert line.startswith("OK"), line
    return {k: int(v) for k, v in (w.split("=") for w in line.split()[1:])}


def cpu_per_call(client: GuardClient, a: Target) -> Json:
    """CPU per CONTINUE call (never-merged pages), and per merged call (guard + helper:
    one merged page per call, one call at a time)."""
    active = int(client.stats()["pid"])  # type: ignore[call-overload]
    c0 = cpu_s(active)
    r = dontneed_loop(a, 3000, "unique")
    cont_us = (cpu_s(active) - c0) / r["calls"] * 1e6
    a.command("dontneed identical 0 1")  # starts the helper
    helper = helper_pid(active)
    assert helper is not None
    g0, h0 = cpu_s(active), cpu_s(helper)
    calls = 0
    for i in range(1, 1001):
        assert a.command(f"dontneed identical {i} 1") == "OK"
        calls += 1
    g1, h1 = cpu_s(active), cpu_s(helper)
    return {
        "cpu_us_per_continue_call": round(cont_us, 1),
        "cpu_us_per_merged_call_guard": round((g1 - g0) / calls * 1e6, 1),
        "cpu_us_per_merged_call_helper": round((h1 - h0) / calls * 1e6, 1),
    }


def _start_loop(a: Target, ms: int) -> None:
    """A DONTNEED loop on never-merged memory, its answer read later."""
    a.proc.stdin.write(f"dontneedloop unique unique {ms}\n")  # type: ignore[union-attr]
    a.proc.stdin.flush()  # type: ignore[union-attr]


def _slowest_us(a: Target) -> int:
    line = a.proc.stdout.readline().strip()  # type: ignore[union-attr]
    assert line.startswith("OK"), line
    return int(line.split("max_us=")[1])


def kill_windows(client: GuardClient, a: Target, log: Path, kills: int) -> Json:
    """The slowest call across each SIGKILL of the active guard, and how long the
    survivor was alone until it forked a new standby."""
    slowest = []
    respawns: list[float] = []
    for _ in range(kills):
        _start_loop(a, 1200)
        time.sleep(0.5)
        victim = int(client.stats()["pid"])  # type: ignore[call-overload]
        t0 = time.monotonic()
        os.kill(victim, signal.SIGKILL)
        line = a.proc.stdout.readline().strip()  # type: ignore[union-attr]
        # the survivor logs the (system-wide) monotonic clock when it forked the
        # new standby
        spawned = [
            float(m)
            for m in re.findall(r"started standby \d+ \(monotonic ([\d.]+)\)", log.read_text())
        ]
        respawns.append(round((spawned[-1] - t0) * 1000, 2))
        assert line.startswith("OK"), line
        slowest.append(int(line.split("max_us=")[1]))
        wait_for_standby(client, "no new standby")
    return {"slowest": slowest, "respawns": respawns}


def upgrade_windows(client: GuardClient, a: Target) -> list[int]:
    """The slowest call across each of 3 `procksm guard --upgrade`."""
    ups = []
    for _ in range(3):
        _start_loop(a, 1500)
        time.sleep(0.3)
        client.upgrade()
        ups.append(_slowest_us(a))
    return ups


def measure(client: GuardClient, a: Target, log: Path, kills: int) -> Json:
    per_call = cpu_per_call(client, a)
    time.sleep(0.5)
    st = client.stats()
    mem = {str(p): private_kib(int(p)) for p in (st["pid"], st["peer"])}  # type: ignore[call-overload]
    across_kill = kill_windows(client, a, log, kills)
    ups = upgrade_windows(client, a)
    # the same loop with no kill, for comparison
    base = dontneed_loop(a, 1200, "unique")["max_us"]
    slowest, respawns = across_kill["slowest"], across_kill["respawns"]
    return {
        "guard_private_kib": mem,
        **per_call,
        "slowest_call_us_no_kill": base,
        "slowest_call_us_across_kill": {
            "median": statistics.median(slowest),
            "max": max(slowest),
            "all": slowest,
        },
        "slowest_call_us_across_upgrade": ups,
        # SIGKILL of the active guard -> the survivor's fork of a new standby (which
        # holds every listener from its fork on): the window in which a second kill,
        # of the survivor, would leave no listener
        "ms_alone_after_a_kill": {
            "median": round(statistics.median(respawns), 2),
            "max": max(respawns),
        },
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kills", type=int, default=10)
    args = ap.parse_args()
    lock_dir = tempfile.mkdtemp(prefix="procksm-guard-bench-")
    cg = tempfile.mkdtemp(prefix="procksm-bench-guard-", dir="/sys/fs/cgroup/unified")
    # a private lock dir (guard socket and log) and a scratch cgroup for the guards
    os.environ["PROCKSM_LOCK_DIR"] = lock_dir
    os.environ["PROCKSM_GUARD_CGROUP"] = cg
    exe = build_c_target("planted")
    targets = [
        Target([str(exe), "--identical", str(N_IDENTICAL), "--unique", "256", "--seed", "3"])
        for _ in "ab"
    ]
    client = GuardClient()
    try:
        merge_pair(targets)
        deadline = time.monotonic() + 10
        while not client.stats().get("peer_ready"):
            assert time.monotonic() < deadline, "no standby"
            time.sleep(0.02)
        out = measure(client, targets[0], Path(lock_dir) / "guard.log", args.kills)
        print(json.dumps(out, indent=2))
        (RESULTS / "guard_life.json").parent.mkdir(parents=True, exist_ok=True)
        (RESULTS / "guard_life.json").write_text(json.dumps(out, indent=2) + "\n")
    finally:
        for t in targets:
            t.kill()
        remove_cgroup(Path(cg))  # (SIGKILLs the guards)
        shutil.rmtree(lock_dir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
