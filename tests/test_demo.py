"""`procksm demo` end to end: workers start, are scanned and merged, and clean up."""

from __future__ import annotations

import json
from pathlib import Path

from tests.conftest import require_privileges, run_procksm


def test_demo_merges_its_workers_and_cleans_up() -> None:
    require_privileges()
    res = run_procksm(
        "demo", "--json", "--workers", 3, "--shared-mib", 8, "--zero-mib", 2,
        "--unique-mib", 2, "--volatile-mib", 1, timeout=180,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    doc = json.loads(res.stdout)
    shared_pages = 8 * 256
    # the analysis found the shared data and the zero pages, the merge shared them
    assert doc["totals"]["ideal_savings_pages"] >= 2 * shared_pages + 3 * 2 * 256
    merge = doc["merge"]["totals"]
    assert merge["pages_merged"] >= 3 * shared_pages
    assert merge["pages_zeroed"] >= 3 * 2 * 256
    # the kernel's view (smaps_rollup) agrees: PSS fell by at least the shared copies
    before, after = doc["memory_kb"]["before"], doc["memory_kb"]["after"]
    assert before["Pss"] - after["Pss"] >= (2 * shared_pages + 3 * 2 * 256) * 4 * 0.95
    assert doc["workers_self_check"] == ["OK", "OK", "OK"]
    # no worker outlives the demo
    pids = [p["pid"] for p in doc["processes"]]
    assert not [p for p in pids if Path(f"/proc/{p}").exists()]
