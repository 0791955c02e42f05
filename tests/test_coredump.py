"""Core dumps of merged targets hold the merged pages (docs/design.md §3.8, procksm.coredump).

The truth is the core file itself: its PT_LOAD segment covering the identical region must
hold the bytes the target had there before merging (read through /proc/PID/mem).
"""

from __future__ import annotations

import os
import resource
import shutil
import struct
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from procksm import PAGE_SIZE, coredump
from procksm.errors import ProcksmError
from procksm.merge import MergeEngine, MergeOptions
from procksm.scanner import AddressRange, ScanOptions
from procksm.unmerge import merged_ranges, unmerge
from tests.conftest import Target, build_c_target, require_privileges, skip_or_fail

NPAGES = 64
PT_LOAD = 1


# --- pure parsing --------------------------------------------------------------------


def test_parse_and_format_filter() -> None:
    assert coredump.parse_filter("00000033\n") == 0x33 == coredump.DEFAULT_FILTER
    assert coredump.parse_filter("000001ff") == 0x1FF
    assert coredump.format_filter(0x37) == "00000037"
    assert coredump.DEFAULT_FILTER & coredump.DUMP_MAPPED_PRIVATE == 0
    with pytest.raises(ProcksmError, match="coredump_filter"):
        coredump.parse_filter("zz")


# --- helpers ---------------------------------------------------------------------------


def core_bytes(core: Path, addr: int, length: int) -> bytes | None:
    """The bytes an ELF64 core holds for [addr, addr+length), or None if no PT_LOAD
    segment carries them in the file (left out: p_filesz 0 or short)."""
    data = core.read_bytes()
    assert data[:4] == b"\x7fELF" and data[4] == 2, "not an ELF64 file"
    (phoff,) = struct.unpack_from("<Q", data, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", data, 0x36)
    for i in range(phnum):
        p_type, _flags, off, vaddr, _paddr, filesz, memsz, _align = struct.unpack_from(
            "<IIQQQQQQ", data, phoff + i * phentsize
        )
        if p_type == PT_LOAD and vaddr <= addr < vaddr + memsz:
            if addr + length > vaddr + filesz:
                return None
            return data[off + addr - vaddr : off + addr - vaddr + length]
    return None


def _unlimited_core() -> None:
    resource.setrlimit(resource.RLIMIT_CORE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))


@pytest.fixture
def lock_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Locks and coredump state files of this test in its own directory (inherited by
    the procksm CLI it runs), not in the machine's /run/procksm."""
    d = tmp_path / "run"
    monkeypatch.setenv("PROCKSM_LOCK_DIR", str(d))
    return d


@pytest.fixture
def core_dir(tmp_path: Path) -> Iterator[Path]:
    """A directory the kernel writes this test's cores into.

    kernel.core_pattern is machine-wide. A plain relative name ("core", "core.%p") is
    written into the crashing process's cwd: the target is started in this directory
    and the pattern is left alone. A pipe ("|/usr/lib/systemd/systemd-coredump ...") or
    a path elsewhere is replaced by a file pattern here for the test's duration and
    restored afterwards, even if the test fails.
    """
    d = tmp_path / "cores"
    d.mkdir()
    pattern_file = Path("/proc/sys/kernel/core_pattern")
    original = pattern_file.read_text().rstrip("\n")
    replaced = original.startswith("|") or "/" in original
    if replaced:
        pattern_file.write_text(f"{d}/core.%p\n")
    try:
        yield d
    finally:
        if replaced:
            pattern_file.write_text(original + "\n")


def start_and_merge(spawn, cwd: Path) -> tuple[Target, int, bytes]:  # type: ignore[no-untyped-def]
    """Two planted targets (same seed) merged; returns the first, the address of its
    identical region and that region's bytes read before the merge."""
    exe = build_c_target("planted")
    targets = [
        spawn(
            [exe, "--identical", NPAGES, "--seed", 23],
            preexec_fn=_unlimited_core,
            cwd=str(cwd),
        )
        for _ in range(2)
    ]
    first = targets[0]
    addr = first.int("identical")
    fd = os.open(f"/proc/{first.pid}/mem", os.O_RDONLY)
    try:
        before = os.pread(fd, NPAGES * PAGE_SIZE, addr)
    finally:
        os.close(fd)
    assert len(before) == NPAGES * PAGE_SIZE
    sel = ScanOptions(
        ranges=[
            AddressRange(t.int("identical"), t.int("identical") + NPAGES * PAGE_SIZE)
            for t in targets
        ]
    )
    eng = MergeEngine([t.pid for t in targets], MergeOptions(selection=sel))
    try:
        res = eng.run()
    finally:
        eng.close()
    assert res.pages_merged == 2 * NPAGES
    ranges = merged_ranges(first.pid)
    assert [(v.start, v.end) for v in ranges] == [(addr, addr + NPAGES * PAGE_SIZE)]
    return first, addr, before


# --- the rule --------------------------------------------------------------------------


def test_merge_sets_mapped_private_and_unmerge_restores(spawn, tmp_path, lock_dir) -> None:  # type: ignore[no-untyped-def]
    require_privileges()
    exe = build_c_target("planted")
    plain = spawn([exe, "--identical", NPAGES, "--seed", 29])
    # a target whose user already asked for file-backed private memory in its cores
    user_set = spawn([exe, "--identical", NPAGES, "--seed", 29])
    coredump.write_filter(user_set.pid, 0x37)
    assert coredump.read_filter(plain.pid) == coredump.DEFAULT_FILTER
    sel = ScanOptions(
        ranges=[
            AddressRange(t.int("identical"), t.int("identical") + NPAGES * PAGE_SIZE)
            for t in (plain, user_set)
        ]
    )
    eng = MergeEngine([plain.pid, user_set.pid], MergeOptions(selection=sel))
    try:
        assert eng.run().pages_merged == 2 * NPAGES
    finally:
        eng.close()
    assert coredump.read_filter(plain.pid) == 0x37
    assert coredump.original_filter(plain.pid) == 0x33
    state = Path(coredump.state_path(plain.pid))
    assert state.parent == lock_dir and state.read_text() == "00000033\n"
    assert coredump.original_filter(user_set.pid) is None  # procksm changed nothing there
    # the state of a process that exited is removed by the next merge
    stale = lock_dir / f"{coredump.STATE_PREFIX}{2**22 + 1}-12345"
    stale.write_text("00000033\n")
    # meanwhile the user also asks for ELF headers off: that choice must survive
    coredump.write_filter(plain.pid, 0x37 & ~coredump.DUMP_ELF_HEADERS)
    # a second merge does not overwrite the remembered original
    assert coredump.keep_merged_in_cores(plain.pid) is False
    assert coredump.original_filter(plain.pid) == 0x33
    assert coredump.remove_stale_state(str(lock_dir)) == 1
    assert not stale.exists() and state.exists()

    for t in (plain, user_set):
        assert unmerge(t.pid).pages_unmerged == NPAGES
        assert t.command("check") == f"OK pages={NPAGES}"
    assert coredump.read_filter(plain.pid) == 0x23  # bit 2 cleared, the user's change kept
    assert not state.exists()
    assert coredump.read_filter(user_set.pid) == 0x37  # the user's bit 2 stays


# --- the cores -------------------------------------------------------------------------


def test_gcore_contains_merged_pages(spawn, tmp_path, lock_dir) -> None:  # type: ignore[no-untyped-def]
    """gdb's gcore follows coredump_filter; with procksm's rule the merged range is in
    its core. (gdb 13 also dumps it under 0x33: it takes "/memfd:... (deleted)" for
    anonymous memory, so here the filter is not what decides; measured.)"""
    require_privileges()
    gcore = shutil.which("gcore")
    if gcore is None:
        skip_or_fail("gcore (package gdb) is not installed")
    assert gcore is not None
    target, addr, before = start_and_merge(spawn, tmp_path)
    assert coredump.read_filter(target.pid) & coredump.DUMP_MAPPED_PRIVATE
    out = subprocess.run(
        [gcore, "-o", str(tmp_path / "gcore"), str(target.pid)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    core = tmp_path / f"gcore.{target.pid}"
    assert core_bytes(core, addr, len(before)) == before
    assert target.command("check") == f"OK pages={NPAGES}"  # gcore detached cleanly


@pytest.mark.parametrize("rule", ["procksm", "bit2-cleared"])
def test_kernel_core_contains_merged_pages(spawn, core_dir, lock_dir, rule: str) -> None:  # type: ignore[no-untyped-def]
    """A crash after merging: the kernel's core holds the merged pages. With bit 2
    cleared after the merge (what a naive procksm would leave: the default 0x33) the
    kernel leaves the never-written merged range out, so this check would fail."""
    require_privileges()
    target, addr, before = start_and_merge(spawn, core_dir)
    if rule == "bit2-cleared":
        filt = coredump.read_filter(target.pid)
        coredump.write_filter(target.pid, filt & ~coredump.DUMP_MAPPED_PRIVATE)
    with pytest.raises(RuntimeError, match="signal 6"):
        target.command("crash")
    cores = [p for p in core_dir.iterdir() if p.is_file()]
    assert len(cores) == 1, f"no single core in {core_dir}: {cores}"
    got = core_bytes(cores[0], addr, len(before))
    if rule == "procksm":
        assert got == before
    else:
        assert got is None
