"""A target that exits while procksm merges it (killing procksm itself:
tests/test_kill_group.py and tests/test_kill_steps.py)."""

from __future__ import annotations

import json
import subprocess
import sys
import time

from procksm.unmerge import merged_ranges
from tests.conftest import (
    ROOT,
    require_privileges,
    spawn_planted,
)
from tests.daemon_helpers import Truth

PROCKSM = [sys.executable, "-m", "procksm"]


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
    assert proc.returncode == 1, err  # 1: one target failed, said in the JSON
    doc = json.loads(out)
    by_pid = {p["pid"]: p for p in doc["processes"]}
    assert by_pid[targets[0].pid]["pages_merged"] >= 32768
    assert by_pid[targets[1].pid]["pages_merged"] >= 32768
    # pagemap agrees: the identical pages map procksm's segments
    truth = Truth([targets[0].pid, targets[1].pid])
    assert min(truth.sites.values()) >= 32768, truth.sites
    assert "no such process" in by_pid[targets[2].pid]["error"], by_pid[targets[2].pid]
    for t in targets[:2]:
        assert t.command("check").startswith("OK")
        assert t.command("errors") == "ERRORS 0"
