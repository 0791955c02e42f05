"""`procksm scan` against real targets with planted memory: exact counts."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from procksm import PAGE_SIZE
from procksm.analysis import analyse
from procksm.scanner import AddressRange, ScanOptions, collect
from tests.conftest import ROOT, build_c_target, require_privileges, run_procksm

PROCKSM = [sys.executable, "-m", "procksm"]
N, Z, U, D = 256, 64, 32, 16  # identical, zero, unique, intra pages per target
REGIONS = ("identical", "zero", "unique", "intra")


@pytest.fixture
def planted_trio(spawn):  # type: ignore[no-untyped-def]
    require_privileges()
    exe = build_c_target("planted")
    return [
        spawn([exe, "--identical", N, "--zero", Z, "--unique", U, "--intra", D, "--seed", 7])
        for _ in range(3)
    ]


def planted_ranges(targets) -> list[str]:  # type: ignore[no-untyped-def]
    out = []
    for t in targets:
        for r in REGIONS:
            start = t.int(r)
            out.append(f"{start:#x}+{t.int(r + '_pages') * PAGE_SIZE}")
    return out


def test_scan_counts_planted_regions_exactly(planted_trio) -> None:  # type: ignore[no-untyped-def]
    opts = ScanOptions(ranges=[AddressRange.parse(r) for r in planted_ranges(planted_trio)])
    rep = analyse(collect([t.pid for t in planted_trio], opts))
    per = N + Z + U + D
    t = rep.totals
    assert t.pages_scanned == 3 * per
    assert t.pages_zero == 3 * Z
    assert rep.distinct_frames == 3 * per
    # distinct non-zero contents: the identical region once, each unique page, intra once
    assert rep.distinct_contents == N + 3 * U + 1
    assert t.ideal_savings_pages == 3 * per - (N + 3 * U + 1)
    assert t.ideal_savings_bytes == t.ideal_savings_pages * PAGE_SIZE
    assert t.pages_volatile == 0
    assert t.pages_shared_frame == 0
    for p in rep.processes:
        assert p.counts.pages_scanned == per
        assert p.counts.pages_zero == Z
        assert p.counts.pages_dup_within == D
        assert p.counts.pages_dup_across == N + D
    # attribution adds up to the total
    assert sum(p.counts.ideal_savings_pages for p in rep.processes) == t.ideal_savings_pages
    for i in range(3):
        for j in range(3):
            assert rep.matrix[i][j] == (D if i == j else N + D)
    # the most duplicated content is the intra page: 3*D frames hold it
    assert rep.top[0].frames == 3 * D and rep.top[0].pids == sorted(x.pid for x in planted_trio)
    # the scan changed nothing
    for tgt in planted_trio:
        assert tgt.command("check") == f"OK pages={per}"


def scan_json_cli(targets, *flags: str) -> tuple[dict, str]:  # type: ignore[no-untyped-def, type-arg]
    """`procksm scan --json` over the planted regions of ``targets``: (document, stderr)."""
    args = ["scan", "--json", *flags, *(str(t.pid) for t in targets)]
    for r in planted_ranges(targets):
        args += ["--range", r]
    res = run_procksm(*args)
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout), res.stderr


def test_scan_json_cli(planted_trio) -> None:  # type: ignore[no-untyped-def]
    doc, stderr = scan_json_cli(planted_trio)
    per = N + Z + U + D
    assert doc["totals"]["pages_scanned"] == 3 * per
    assert doc["totals"]["pages_zero"] == 3 * Z
    assert doc["totals"]["ideal_savings_pages"] == 3 * per - (N + 3 * U + 1)
    assert doc["totals"]["ideal_savings_bytes"] == doc["totals"]["ideal_savings_pages"] * PAGE_SIZE
    assert [p["pid"] for p in doc["processes"]] == [t.pid for t in planted_trio]
    assert all(p["name"] == "planted" for p in doc["processes"])
    assert doc["matrix"]["pages"][0][1] == N + D
    assert len(doc["top"][0]["preview_hex"]) == 64
    assert stderr == ""  # no progress bar in --json mode


def test_scan_whole_process_rich_view(planted_trio) -> None:  # type: ignore[no-untyped-def]
    """Without restriction: all eligible memory, a table, exclusions with reasons."""
    res = run_procksm("scan", "--json", planted_trio[0].pid, planted_trio[1].pid)
    assert res.returncode == 0, res.stderr
    doc = json.loads(res.stdout)
    # at least the planted pages, and the stack is excluded with a reason
    assert doc["totals"]["pages_scanned"] >= 2 * (N + Z + U + D)
    assert "stack" in " ".join(doc["excluded_by_reason"])
    res = subprocess.run(
        [*PROCKSM, "scan", str(planted_trio[0].pid), str(planted_trio[1].pid)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
        env={**os.environ, "COLUMNS": "160"},
    )
    assert res.returncode == 0, res.stderr
    assert "Ideal saving" in res.stdout and "Top duplicated contents" in res.stdout
    assert "Not eligible" in res.stdout


FORKER = textwrap.dedent(
    """
    import mmap, os, sys, time
    n = int(sys.argv[1])
    m = mmap.mmap(-1, n * 4096, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    for i in range(n):
        m[i * 4096:(i + 1) * 4096] = bytes([i % 251 + 1]) * 4096
    import ctypes
    addr = ctypes.addressof(ctypes.c_char.from_buffer(m))
    pid = os.fork()
    if pid == 0:
        ctypes.CDLL(None).prctl(1, 9)  # PR_SET_PDEATHSIG: gone with its parent
        time.sleep(3600)
    print(f"READY child={pid} addr={addr:#x}", flush=True)
    sys.stdin.readline()
    os.kill(pid, 9)
    """
)


def test_pages_shared_after_fork_save_nothing(spawn) -> None:  # type: ignore[no-untyped-def]
    require_privileges()
    n = 100
    t = spawn([sys.executable, "-c", FORKER, str(n)])
    child = t.int("child")
    rng = f"{t.int('addr'):#x}+{n * PAGE_SIZE}"
    rep = analyse(collect([t.pid, child], ScanOptions(ranges=[AddressRange.parse(rng)])))
    assert rep.totals.pages_scanned == 2 * n
    assert rep.totals.pages_shared_frame == 2 * n
    assert rep.distinct_frames == n
    assert rep.totals.pages_dup_across == 2 * n  # same content in both...
    assert rep.totals.ideal_savings_pages == 0  # ...but already one frame each


def test_scan_does_not_fault_pages_in(spawn) -> None:  # type: ignore[no-untyped-def]
    """A mapping touched sparsely: the scan must not make the rest resident."""
    require_privileges()
    code = textwrap.dedent(
        """
        import mmap, sys, ctypes
        n = 4096
        m = mmap.mmap(-1, n * 4096, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        for i in range(0, n, 16):
            m[i * 4096] = 1
        addr = ctypes.addressof(ctypes.c_char.from_buffer(m))
        print(f"READY addr={addr:#x}", flush=True)
        sys.stdin.readline()
        """
    )
    t = spawn([sys.executable, "-c", code])

    def rss_of_mapping() -> int:
        text = Path(f"/proc/{t.pid}/smaps").read_text()
        head = f"{t.int('addr'):x}-"
        block = text[text.index(head) :]
        return int(block.split("Rss:")[1].split()[0])

    before = rss_of_mapping()
    rng = f"{t.int('addr'):#x}+{4096 * PAGE_SIZE}"
    rep = analyse(collect([t.pid], ScanOptions(ranges=[AddressRange.parse(rng)])))
    assert rep.totals.pages_scanned == 4096 // 16
    assert rss_of_mapping() == before == 4096 // 16 * 4


@pytest.mark.parametrize(
    ("argv", "code", "needle"),
    [
        (["scan", "4194303"], 3, "no such process"),
        (["scan", "abc"], 2, "bad PID 'abc'"),
        (["scan", "-5"], 2, ""),
        (["scan", "1", "--range", "zz"], 2, "bad address range"),
        (["scan", "1", "--range", "0x2000-0x1000"], 2, "end must be above start"),
        (["scan", "2"], 6, "kernel thread"),
    ],
)
def test_bad_input_one_line_error(argv: list[str], code: int, needle: str) -> None:
    require_privileges()
    res = run_procksm(*argv, timeout=60)
    assert res.returncode == code, (res.stdout, res.stderr)
    assert res.stdout == ""
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr
    assert needle in lines[0]


def test_scan_zombie_and_self(spawn) -> None:  # type: ignore[no-untyped-def]
    require_privileges()
    z = subprocess.Popen([sys.executable, "-c", "pass"])
    import time

    deadline = time.time() + 10
    while time.time() < deadline:
        if Path(f"/proc/{z.pid}/stat").read_text().split(") ")[1][0] == "Z":
            break
        time.sleep(0.05)
    res = run_procksm("scan", str(z.pid))
    z.wait()
    assert res.returncode == 3 and "zombie" in res.stderr, res.stderr


def test_scan_exact_mode_same_counts(planted_trio) -> None:  # type: ignore[no-untyped-def]
    """--exact compares bytes: on real data it finds the same duplicates as hashing."""
    doc, _ = scan_json_cli(planted_trio, "--exact")
    per = N + Z + U + D
    assert doc["totals"]["ideal_savings_pages"] == 3 * per - (N + 3 * U + 1)
    assert doc["matrix"]["pages"][0][1] == N + D
