"""SIGKILL of procksm's whole process group at random moments (issue 13).

What a supervisor does to a service it stops (``kill -9 -PGID``, a cgroup kill): every
procksm process dies at once, the one that holds a target's threads included. Rounds
alternate over ``procksm merge``, ``procksm unmerge`` and the daemon (``procksm
attach``), with targets of 1, 4 and 32 threads (the 32-thread one with every canary of
``planted --canaries``: registers, FPU/AVX, signal mask, altstack, blocked calls, and
writer threads that store counters into merged pages and check them). After each kill:
every target alive, untraced, not stopped, self-checks clean; then a new procksm removes
what the killed one left and unmerges everything, and the target's fds are as before.

``PROCKSM_KILL_ROUNDS`` sets the number of rounds (CI: 105); ``PROCKSM_KILL_SEED`` the
random seed.
"""

from __future__ import annotations

import os
import random
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from procksm.unmerge import merged_ranges
from tests.conftest import (
    Target,
    assert_target_intact,
    build_c_target,
    require_privileges,
)
from tests.test_kill_steps import (
    AFTER_KILL_S,
    _fds,
    _procksm_things,
    exited,
    kill_procksm,
    start_procksm,
    unmerge_when_free,
)

PROCKSM = [sys.executable, "-m", "procksm"]
ROUNDS = int(os.environ.get("PROCKSM_KILL_ROUNDS", "105"))
PAGES = 2048  # 8 MiB identical per target: a merge is a few stop windows

# threads per target -> planted options
SHAPES: dict[int, list[object]] = {
    1: [],
    4: ["--threads", 1, "--sleepers", 2],
    # main + 4 blockers + canary + 2 writers + 2 spinning + 22 sleeping
    32: ["--canaries", "--threads", 2, "--sleepers", 22],
}


def _intact(t: Target, canaries: bool) -> None:
    if canaries:
        assert_target_intact(t)
        return
    assert t.alive(), f"target {t.pid} died"
    verdict = t.command("check")
    assert verdict.startswith("OK"), verdict
    for tid in os.listdir(f"/proc/{t.pid}/task"):
        status = Path(f"/proc/{t.pid}/task/{tid}/status").read_text()
        assert "\nTracerPid:\t0\n" in status, status
        assert "\nState:\tt" not in status and "\nState:\tT" not in status, status


@pytest.mark.slow
def test_sigkill_of_the_whole_process_group(spawn: Any, tmp_path: Path) -> None:
    require_privileges()
    rng = random.Random(int(os.environ.get("PROCKSM_KILL_SEED", "2026")))
    exe = build_c_target("planted")
    sets = {
        n: [spawn([exe, "--identical", PAGES, "--zero", 256, "--seed", 9, *opts]) for _ in range(2)]
        for n, opts in SHAPES.items()
    }
    time.sleep(0.3)  # the blocker threads make their pipes after READY
    baseline = {t.pid: _fds(t.pid) for ts in sets.values() for t in ts}
    kinds = ("merge", "unmerge", "daemon")
    mid = Counter[str]()
    started = time.monotonic()
    for r in range(ROUNDS):
        if r % 15 == 0:
            print(f"round {r} at {time.monotonic() - started:.0f} s", flush=True)
        kind = kinds[r % 3]
        threads = list(SHAPES)[(r // 3) % 3]
        targets = sets[threads]
        pids = [t.pid for t in targets]
        if kind == "merge":
            pid = start_procksm(["merge", *pids])
            # kill once its first range is merged (or after 60 s: a loaded machine)
            deadline = time.monotonic() + 60
            while not exited(pid) and not merged_ranges(pids[0]):
                if time.monotonic() > deadline:
                    print(f"round {r}: nothing merged after 60 s", flush=True)
                    break
                time.sleep(0.002)
            time.sleep(rng.uniform(0.0, 0.2))
        elif kind == "unmerge":
            merged = start_procksm(["merge", *pids])
            while not exited(merged):
                time.sleep(0.01)
            pid = start_procksm(["unmerge", *pids])
            time.sleep(rng.uniform(0.0, 0.15))
        else:
            pid = start_procksm(["attach", "--no-bpf", "--control", tmp_path / f"c{r}.sock", *pids])
            time.sleep(rng.uniform(0.3, 6.0))  # its first merge can take seconds
        if not exited(pid):
            mid[kind] += any(merged_ranges(p) for p in pids)

        kill_procksm(pid)
        time.sleep(AFTER_KILL_S)
        for t in targets:
            try:
                _intact(t, threads == 32)
            except AssertionError as e:
                raise AssertionError(f"round {r} ({kind}, {threads} threads): {e}") from None
        for t in targets:  # a new procksm (in this process) cleans up and unmerges
            unmerge_when_free(t.pid)
        for t in targets:
            assert merged_ranges(t.pid) == []
            assert _procksm_things(t.pid) == []
            assert _fds(t.pid) == baseline[t.pid]
            _intact(t, threads == 32)
    print(f"\n{ROUNDS} group kills survived; killed with pages merged: {dict(mid)}")
    assert all(mid[k] >= ROUNDS // 12 for k in kinds), mid  # the kills hit work in progress
