"""Smoke test of the benchmark suite (issue 8): `benchmarks/suite.py --quick --only W1`.

It runs every variant once on small planted targets (~20-40 s): procksm merge, the daemon,
the kernel's KSM at max speed and at its defaults, and the daemon at ksmd's CPU share;
then checks the JSON file's shape, that each target's memory checked out, and that the
machine-wide KSM settings are back to what they were. Under CI=true it fails instead of
skipping when it cannot run (not root, no KSM, KSM busy with other processes' pages).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT, require_privileges, skip_or_fail

KSM = Path("/sys/kernel/mm/ksm")
SETTINGS = ("run", "pages_to_scan", "sleep_millisecs", "use_zero_pages", "advisor_mode")
VARIANTS = ("merge", "ksmd_max", "daemon", "ksmd_defaults", "daemon_eqcpu")
GOALS = (
    "speed_max",
    "cpu_max",
    "speed_equal_cpu",
    "saving_W1",
    "pause_p99",
    "memory_per_page",
)


def _settings() -> dict[str, str]:
    return {s: (KSM / s).read_text().strip() for s in SETTINGS if (KSM / s).exists()}


def test_suite_quick_w1_writes_its_json(tmp_path: Path) -> None:
    require_privileges()
    if not (KSM / "run").exists():
        skip_or_fail("kernel without KSM (/sys/kernel/mm/ksm missing)")
        return
    busy = int((KSM / "pages_sharing").read_text()) or int((KSM / "pages_shared").read_text())
    if (KSM / "run").read_text().strip() != "0" or busy:
        skip_or_fail("the kernel's KSM is in use by other processes (run != 0 or pages merged)")
        return
    before = _settings()
    out = tmp_path / "suite-quick.json"
    t0 = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "benchmarks/suite.py", "--quick", "--only", "W1", "--output", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    took = time.monotonic() - t0
    print(proc.stdout[-3000:])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _settings() == before, "KSM settings not restored"
    doc = json.loads(out.read_text())
    assert doc["quick"] is True and doc["machine"]
    w1 = doc["workloads"]["W1"]
    assert w1["ideal_pages"] > 0
    assert set(w1["medians"]) == set(VARIANTS)
    assert len(w1["reps"]) == 1
    for v in VARIANTS:
        run = w1["reps"][0][v]
        assert "error" not in run, (v, run.get("error"))
        assert run["memory_check"] == "OK", (v, run["memory_check"])
        assert run["census_after"]["saved_pages"] >= 0
        for key in ("t95_s", "t100_s", "cpu_s", "fraction_pagemap", "samples"):
            assert key in run, (v, key)
        med = w1["medians"][v]
        for key in ("t95_s", "t100_s", "cpu_s", "fraction", "p99_ms", "reps", "failed"):
            assert key in med, (v, key)
    # procksm's one-shot merge reaches the ideal on W1, and so do its pauses get reported
    assert w1["medians"]["merge"]["fraction"] >= 0.99
    assert w1["medians"]["merge"]["p99_ms"] is not None
    assert w1["medians"]["daemon"]["p99_ms"] is not None
    assert set(GOALS) <= set(doc["goals"])
    for g in doc["goals"].values():
        assert g["met"] in (True, False, None) and g["goal"] and "shown" in g
    assert any("time to 100 %" in line for line in doc["table"])
    assert out.with_suffix(".svg").read_text().startswith("<svg")
    print(f"suite --quick --only W1: {took:.0f} s")


def test_speed_at_equal_cpu_is_met_only_at_equal_cpu() -> None:
    """Pure logic: the goal's condition is the CPU actually spent, not the share asked."""
    from benchmarks.harness.goals import goals_of
    from benchmarks.harness.workloads import QUICK

    def judged(daemon_cpu: float) -> dict[str, object]:
        w1 = {
            "ksmd_defaults": {"reps": 1, "t95_s": 4.4, "cpu_s": 0.07},
            "daemon_eqcpu": {"reps": 1, "t95_s": 0.97, "cpu_s": daemon_cpu},
        }
        goal: dict[str, object] = goals_of({"workloads": {"W1": {"medians": w1}}}, QUICK)[
            "speed_equal_cpu"
        ]
        return goal

    assert judged(0.53)["met"] is False  # 4.5x as fast, with 7.6x ksmd's CPU
    assert judged(0.06)["met"] is True
    assert "0.53 vs 0.07" in str(judged(0.53)["shown"])


def test_merge_cpu_goal_counts_what_its_targets_spent() -> None:
    """Pure logic: procksm's calls run in its targets' threads (the mmaps and populates
    ksmd makes in its own time), so their CPU during the merge counts with procksm's,
    and so does the madvise guards' (they answer the guarded calls of its batches)."""
    from benchmarks.harness.goals import goals_of
    from benchmarks.harness.workloads import QUICK

    def judged(
        own: float, in_targets: float | None, guards: float | None = None
    ) -> dict[str, object]:
        w1 = {
            "merge": {
                "reps": 1,
                "cpu_s": own,
                "targets_cpu_s": in_targets,
                "guards_cpu_s": guards,
            },
            "ksmd_max": {"reps": 1, "cpu_s": 1.0},
        }
        goal: dict[str, object] = goals_of({"workloads": {"W1": {"medians": w1}}}, QUICK)["cpu_max"]
        return goal

    assert judged(0.9, 0.0)["met"] is True
    assert judged(0.9, 0.2)["met"] is False  # 1.1 s in all against ksmd's 1.0
    assert judged(0.9, 0.2)["value"] == pytest.approx(1.1)
    assert judged(0.9, None)["met"] is True  # no figure: procksm's own only
    assert "targets and guards 0.20" in str(judged(0.9, 0.2)["shown"])
    # and the madvise guards' CPU answering the calls of its batches
    assert judged(0.9, 0.05, 0.1)["met"] is False
    assert judged(0.9, 0.05, 0.1)["value"] == pytest.approx(1.05)
