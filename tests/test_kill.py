"""Killing procksm never kills a target (the start of the reliability suite, issue 8).

`procksm merge` is SIGKILLed at random moments while it merges two targets whose
threads are blocked in read/futex/nanosleep/poll: every target must stay alive, its
self-check clean, no thread seeing a restart code or EINTR, none left stopped or traced,
and a new procksm must be able to unmerge everything.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time

from procksm.merge import merged_ranges
from tests.conftest import (
    ROOT,
    require_privileges,
    run_procksm,
    spawn_planted,
    thread_states,
)

PROCKSM = [sys.executable, "-m", "procksm"]
# 25 rounds here and 25 during unmerge (tests/test_reliability.py): >= 50 in CI; --long x10
ROUNDS = int(os.environ.get("PROCKSM_KILL_ROUNDS", "25")) * (
    10 if os.environ.get("PROCKSM_LONG") == "1" else 1
)


def test_sigkill_of_procksm_during_merge_leaves_targets_intact(spawn) -> None:  # type: ignore[no-untyped-def]
    require_privileges()
    rng = random.Random(int(os.environ.get("PROCKSM_KILL_SEED", "2008")))
    killed_mid_merge = 0
    for _ in range(ROUNDS):
        targets = spawn_planted(spawn, 2, 32768, 4096, 256, 3, "--blockers")
        proc = subprocess.Popen(
            [*PROCKSM, "merge", "--json", *(str(t.pid) for t in targets)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT,
        )  # fmt: skip
        # Kill while stop windows are running: once the first target shows a merged
        # range, after a random part of the ~0.5 s the merge takes.
        while proc.poll() is None and not merged_ranges(targets[0].pid):
            time.sleep(0.002)
        time.sleep(rng.uniform(0.0, 0.4))
        if proc.poll() is None:
            proc.kill()
            if any(merged_ranges(t.pid) for t in targets):
                killed_mid_merge += 1
        proc.wait()
        time.sleep(0.3)  # the worker finishes its stop window and exits
        for t in targets:
            assert t.alive(), f"target {t.pid} died"
            states = thread_states(t.pid)
            assert all(s not in ("t", "T") and tracer == "0" for s, tracer in states.values()), (
                states
            )
            assert t.command("check").startswith("OK")
            assert t.command("errors") == "ERRORS 0"
        res = run_procksm("unmerge", *(t.pid for t in targets), timeout=60)
        assert res.returncode == 0, res.stderr
        for t in targets:
            assert merged_ranges(t.pid) == []
            assert t.command("check").startswith("OK")
            t.kill()
    print(f"\n{ROUNDS} rounds survived, {killed_mid_merge} killed mid-merge")
    assert killed_mid_merge >= ROUNDS // 2  # the test did hit merges in progress


def test_a_target_exiting_during_the_merge_is_reported_and_the_others_merge(spawn) -> None:  # type: ignore[no-untyped-def]
    require_privileges()
    targets = spawn_planted(spawn, 3, 32768, 4096, 256, 3)
    proc = subprocess.Popen(
        [*PROCKSM, "merge", "--json", *(str(t.pid) for t in targets)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
    )  # fmt: skip
    # the first target is merged first: kill the last one as soon as that starts
    while proc.poll() is None and not merged_ranges(targets[0].pid):
        time.sleep(0.002)
    targets[2].kill()
    out, err = proc.communicate(timeout=120)
    assert proc.returncode in (0, 1), err  # 1: one target failed, said in the JSON
    doc = json.loads(out)
    by_pid = {p["pid"]: p for p in doc["processes"]}
    assert by_pid[targets[0].pid]["pages_merged"] >= 32768
    assert by_pid[targets[1].pid]["pages_merged"] >= 32768
    if proc.returncode == 1:
        assert "error" in by_pid[targets[2].pid]
    for t in targets[:2]:
        assert t.command("check").startswith("OK")
        assert t.command("errors") == "ERRORS 0"
