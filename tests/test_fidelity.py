"""Issue 4: merged memory must behave like the anonymous memory it replaced.

Two planted targets with the same seed are merged (their identical regions then map the
same sealed memfd pages); then one of them forks, execs, remaps, changes protections,
unmaps, grows its heap, is written by a debugger, or is attacked through the memfd, and
the targets' own self-checks plus pagemap say whether anything leaked or changed.

Tests named ``test_without_the_guard_*`` merge with the madvise guard off (the naive
implementation) and pin what goes wrong then (docs/design.md §3.1, §3.2): the guard's tests next
to them show the difference.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from procksm import PAGE_SIZE
from procksm.merge import MergeEngine, MergeOptions, MergeResult
from procksm.procfs import PM_PFN_MASK, PM_PRESENT, PagemapFile, parse_smaps
from procksm.scanner import AddressRange, ScanOptions
from procksm.slots import SEGMENT_NAME_PREFIX
from procksm.unmerge import unmerge
from tests.conftest import Target, build_c_target, machine_lacks, require_privileges
from tests.daemon_helpers import Truth

N, U = 64, 8  # identical and unique pages per target
SEED = 23
_libc = ctypes.CDLL(None, use_errno=True)


# --------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------


def region(t: Target, name: str) -> tuple[int, int]:
    start = t.int(name)
    return start, start + t.int(name + "_pages") * PAGE_SIZE


def start_pair(spawn, *extra: object) -> list[Target]:  # type: ignore[no-untyped-def]
    require_privileges()
    exe = build_c_target("planted")
    return [spawn([exe, "--identical", N, "--unique", U, "--seed", SEED, *extra]) for _ in "ab"]


def merge(targets: list[Target], *, whole: bool = False, guard: bool = True) -> MergeResult:
    """One-shot merge of the targets' identical and unique regions (or of everything)."""
    ranges = [AddressRange(*region(t, r)) for t in targets for r in ("identical", "unique")]
    sel = ScanOptions() if whole else ScanOptions(ranges=ranges)
    eng = MergeEngine([t.pid for t in targets], MergeOptions(selection=sel, guard=guard))
    try:
        return eng.run()
    finally:
        eng.close()  # procksm keeps no fd: the targets' mappings are the only users left


@pytest.fixture
def pair(spawn):  # type: ignore[no-untyped-def]
    targets = start_pair(spawn)
    res = merge(targets)
    assert res.pages_merged == 2 * N
    return targets


def pfns(pid: int, start: int, end: int) -> np.ndarray:
    with PagemapFile(pid) as pm:
        ent = pm.read(start, end)
    assert ((ent & PM_PRESENT) != 0).all()
    return ent & PM_PFN_MASK


def smaps_at(pid: int, addr: int):  # type: ignore[no-untyped-def]
    for v in parse_smaps(Path(f"/proc/{pid}/smaps").read_text()):
        if v.start <= addr < v.end:
            return v
    raise AssertionError(f"no VMA at {addr:#x} in pid {pid}")


def memfd_vmas(pid: int, start: int, end: int) -> list[tuple[int, int, int]]:
    """(start, end, inode) of procksm's memfd mappings overlapping [start, end)."""
    out = []
    for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
        f = line.split(None, 5)
        if len(f) > 5 and f[5].startswith(SEGMENT_NAME_PREFIX):
            a, b = (int(x, 16) for x in f[0].split("-"))
            if a < end and start < b:
                out.append((a, b, int(f[4])))
    return out


def read_mem(pid: int, addr: int, length: int) -> bytes:
    fd = os.open(f"/proc/{pid}/mem", os.O_RDONLY)
    try:
        return os.pread(fd, length, addr)
    finally:
        os.close(fd)


def assert_all_ok(*targets: Target) -> None:
    for t in targets:
        assert t.command("check").startswith("OK"), t.pid


# --------------------------------------------------------------------------------------
# 1. fork / exec / exit / mremap / mprotect / munmap / brk
# --------------------------------------------------------------------------------------


def test_forked_child_sees_merged_content_and_its_writes_stay_its_own(pair) -> None:  # type: ignore[no-untyped-def]
    a, b = pair
    before_b = pfns(b.pid, *region(b, "identical"))
    assert (pfns(a.pid, *region(a, "identical")) == before_b).all()  # really merged
    assert a.command("fork") == f"CHILD exit=0 OK pages={N + U}"
    # the child writes into a merged page: COW in the child only
    assert a.command("probe identical 5") == "CHILD exit=0"
    assert (pfns(a.pid, *region(a, "identical")) == before_b).all()
    assert (pfns(b.pid, *region(b, "identical")) == before_b).all()
    assert_all_ok(a, b)


def test_exec_from_a_merged_process(pair) -> None:  # type: ignore[no-untyped-def]
    a, b = pair
    assert a.command("exec /bin/true") == "CHILD exit=0"
    assert a.command("exec /bin/false") == "CHILD exit=1"  # the exit status comes through
    assert_all_ok(a, b)
    assert memfd_vmas(a.pid, *region(a, "identical"))


def test_segments_are_freed_when_the_last_user_exits(spawn) -> None:  # type: ignore[no-untyped-def]
    targets = start_pair(spawn)
    merge(targets)
    inodes = {ino for t in targets for _, _, ino in memfd_vmas(t.pid, *region(t, "identical"))}
    assert len(inodes) == 1  # both targets map the same segment
    # a forked child shares the mapping too; it must go with its parent
    assert targets[0].command("fork").startswith("CHILD exit=0")
    for t in targets:
        t.kill()
    holders = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
                f = line.split(None, 5)
                if len(f) > 5 and f[5].startswith(SEGMENT_NAME_PREFIX) and int(f[4]) in inodes:
                    holders.append((pid, line))
            for fd in os.listdir(f"/proc/{pid}/fd"):
                with_fd = os.stat(f"/proc/{pid}/fd/{fd}")
                if with_fd.st_ino in inodes and "procksm" in os.readlink(f"/proc/{pid}/fd/{fd}"):
                    holders.append((pid, f"fd {fd}"))
        except OSError:
            continue  # exited meanwhile
    # no mapping and no fd left: the kernel has freed the memfd and its pages
    assert holders == []


def test_mremap_move_keeps_merged_content(pair) -> None:  # type: ignore[no-untyped-def]
    a, b = pair
    old = region(a, "identical")
    shared = pfns(b.pid, *region(b, "identical"))
    answer = a.command("mremap identical move")
    assert answer.startswith("OK addr=")
    new = int(answer.split("=")[1], 16)
    assert new != old[0]
    moved = (new, new + N * PAGE_SIZE)
    assert memfd_vmas(a.pid, *moved)  # still the memfd mapping, now elsewhere
    assert (pfns(a.pid, *moved) == shared).all()  # still sharing B's frames
    assert_all_ok(a, b)
    assert a.command("write identical 3") == "OK"  # COW still works at the new address
    assert (pfns(b.pid, *region(b, "identical")) == shared).all()
    assert_all_ok(a, b)


def test_mremap_shrink_of_a_merged_range(pair) -> None:  # type: ignore[no-untyped-def]
    a, b = pair
    assert a.command(f"mremap identical {N // 2}").startswith("OK addr=")
    assert_all_ok(a, b)


def test_mremap_grow_of_a_merged_range_reads_zeros(pair) -> None:  # type: ignore[no-untyped-def]
    """Growing a merged range (glibc realloc of an mmapped chunk does it) maps the memfd
    offsets after the extent: procksm ends every extent's memfd with a hole, so the new
    pages read zeros like a grown anonymous mapping (no SIGBUS, no other slot's data)."""
    a, b = pair
    answer = a.command(f"mremap identical {4 * N}")
    assert answer.startswith("OK addr="), answer
    assert_all_ok(a, b)  # a expects zeros in the grown pages and checks them
    assert a.command(f"write identical {3 * N}") == "OK"  # a grown page copies on write
    assert_all_ok(a, b)


def test_mremap_grow_of_a_range_followed_by_other_slots_reads_zeros(spawn) -> None:  # type: ignore[no-untyped-def]
    """With the guard a memfd holds several extents, with no hole after each
    (plan.split_at_extent_ends): growing a merged range whose memfd continues with other
    slots maps those slots unless the guard unmerges first. The grown pages must read
    zeros, as a grown anonymous mapping does."""
    require_privileges()
    exe = build_c_target("planted")
    # slots are numbered in the order pages are first seen (a's identical region, then
    # b's intra pages): a's identical extent is followed by b's intra slot in one memfd
    a = spawn([exe, "--identical", N, "--seed", SEED])
    b = spawn([exe, "--identical", N, "--intra", 8, "--seed", SEED])
    ranges = [AddressRange(*region(a, "identical"))] + [
        AddressRange(*region(b, r)) for r in ("identical", "intra")
    ]
    eng = MergeEngine([a.pid, b.pid], MergeOptions(selection=ScanOptions(ranges=ranges)))
    try:
        eng.run()
    finally:
        eng.close()
    ((lo, hi, _ino),) = memfd_vmas(a.pid, *region(a, "identical"))
    assert (lo, hi) == region(a, "identical")
    name = f"{lo:x}-{hi:x}"
    fd = os.open(f"/proc/{a.pid}/map_files/{name}", os.O_RDONLY)
    try:
        data_pages = os.lseek(fd, 0, os.SEEK_HOLE) // PAGE_SIZE
    finally:
        os.close(fd)
    line = next(
        x for x in Path(f"/proc/{a.pid}/maps").read_text().splitlines() if x.startswith(name)
    )
    assert int(line.split()[2], 16) // PAGE_SIZE + N < data_pages, "other slots follow"
    assert a.command(f"mremap identical {4 * N}").startswith("OK addr=")
    assert_all_ok(a, b)  # a expects zeros in the grown pages and checks them


def test_mprotect_read_only_faults_like_anonymous_memory(pair) -> None:  # type: ignore[no-untyped-def]
    a, b = pair
    # the reference: anonymous memory made read-only faults on write
    assert a.command("mprotect unique 0 2 r") == "OK"
    assert a.command("probe unique 1") == "CHILD signal=11"
    assert a.command("mprotect identical 0 4 r") == "OK"
    assert a.command("probe identical 1") == "CHILD signal=11"
    assert a.command("probe identical 4") == "CHILD exit=0"  # outside the protected pages
    assert a.command("mprotect identical 0 4 none") == "OK"
    assert a.command("probe identical 1") == "CHILD signal=11"
    assert a.command("mprotect identical 0 4 rw") == "OK"
    assert a.command("mprotect unique 0 2 rw") == "OK"
    assert a.command("write identical 1") == "OK"
    assert_all_ok(a, b)
    assert smaps_at(a.pid, a.int("identical")).perms == "rw-p"


def test_munmap_part_of_a_merged_range(pair) -> None:  # type: ignore[no-untyped-def]
    a, b = pair
    start = a.int("identical")
    assert a.command("munmap identical 10 5") == "OK"
    hole = (start + 10 * PAGE_SIZE, start + 15 * PAGE_SIZE)
    assert memfd_vmas(a.pid, *hole) == []
    assert memfd_vmas(a.pid, start, hole[0]) and memfd_vmas(a.pid, hole[1], start + N * PAGE_SIZE)
    assert a.command("mmap 32") == "OK"
    assert_all_ok(a, b)


def test_brk_after_merging_whole_processes(spawn) -> None:  # type: ignore[no-untyped-def]
    """Everything eligible merged, the heap included; then the heap grows and shrinks."""
    targets = start_pair(spawn)
    res = merge(targets, whole=True)
    assert res.pages_merged >= 2 * N
    assert sum(Truth([t.pid for t in targets]).sites.values()) >= 2 * N  # pagemap agrees
    for t in targets:
        assert t.command("brk 16") == "OK"
        assert t.command("brk 300") == "OK"  # > 1 MiB: past the heap's first VMA
        assert t.command("fork").startswith("CHILD exit=0 OK")
        assert t.command("check").startswith("OK")


# --------------------------------------------------------------------------------------
# 2. GUP writers: a debugger writes into a merged page
# --------------------------------------------------------------------------------------


class _IoVec(ctypes.Structure):
    _fields_ = [("iov_base", ctypes.c_void_p), ("iov_len", ctypes.c_size_t)]


def _process_vm_writev(pid: int, addr: int, data: bytes) -> None:
    buf = ctypes.create_string_buffer(data, len(data))
    local = _IoVec(ctypes.cast(buf, ctypes.c_void_p), len(data))
    remote = _IoVec(addr, len(data))
    fn = _libc.process_vm_writev
    fn.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_ulong, ctypes.c_void_p,
                   ctypes.c_ulong, ctypes.c_ulong]  # fmt: skip
    fn.restype = ctypes.c_ssize_t
    n = fn(pid, ctypes.byref(local), 1, ctypes.byref(remote), 1, 0)
    if n != len(data):
        raise OSError(ctypes.get_errno(), "process_vm_writev")


def _proc_mem_write(pid: int, addr: int, data: bytes) -> None:
    fd = os.open(f"/proc/{pid}/mem", os.O_RDWR)
    try:
        assert os.pwrite(fd, data, addr) == len(data)
    finally:
        os.close(fd)


@pytest.mark.parametrize("writer", [_process_vm_writev, _proc_mem_write], ids=["vm_writev", "mem"])
def test_debugger_write_into_merged_page_changes_only_that_target(pair, writer) -> None:  # type: ignore[no-untyped-def]
    a, b = pair
    shared = pfns(b.pid, *region(b, "identical"))
    page = 9
    addr = a.int("identical") + page * PAGE_SIZE
    old = read_mem(a.pid, addr, 1)[0]
    value = old ^ 0xA5
    writer(a.pid, addr, bytes([value]))
    # A sees exactly the written byte (and nothing else) ...
    assert a.command("check") == (
        f"CORRUPT region=identical page={page} offset=0 expected={old} got={value}"
    )
    assert a.command(f"expect identical {page} {value}") == "OK"
    assert a.command("check") == f"OK pages={N + U}"
    # ... in a private copy of that one page; B and the slot are untouched
    after = pfns(a.pid, *region(a, "identical"))
    assert list(np.flatnonzero(after != shared)) == [page]
    assert (pfns(b.pid, *region(b, "identical")) == shared).all()
    assert b.command("check") == f"OK pages={N + U}"
    assert read_mem(b.pid, b.int("identical") + page * PAGE_SIZE, 1)[0] == old


# --------------------------------------------------------------------------------------
# 3. Security: nobody can change the sealed memfd (docs/design.md §3.6)
# --------------------------------------------------------------------------------------

# Run as a separate root process against another process's map_files: every way to get a
# writable handle on the segment, or to change its size or content, is tried.
_ATTACKER = r"""
import errno, fcntl, json, mmap, os, sys
path = sys.argv[1]
out = {}
def attempt(name, fn):
    try:
        fn()
        out[name] = "ok"
    except OSError as e:
        out[name] = errno.errorcode.get(e.errno, str(e.errno))
F_ADD_SEALS, F_GET_SEALS = 1033, 1034
size = os.stat(path).st_size
def rw_open():
    return os.open(path, os.O_RDWR)
attempt("open_rdwr", lambda: os.close(rw_open()))
ro = os.open(path, os.O_RDONLY)
out["seals"] = fcntl.fcntl(ro, F_GET_SEALS)
def with_rw(fn):
    def go():
        fd = rw_open()
        try:
            fn(fd)
        finally:
            os.close(fd)
    return go
attempt("rdwr_pwrite", with_rw(lambda fd: os.pwrite(fd, b"X", 0)))
attempt("rdwr_write", with_rw(lambda fd: os.write(fd, b"X")))
attempt("rdwr_ftruncate_shrink", with_rw(lambda fd: os.ftruncate(fd, 0)))
attempt("rdwr_ftruncate_grow", with_rw(lambda fd: os.ftruncate(fd, size + 4096)))
attempt("rdwr_punch_hole", with_rw(lambda fd: fallocate(fd, 3, 0, 4096)))
attempt("rdwr_fallocate_grow", with_rw(lambda fd: fallocate(fd, 0, size, 4096)))
attempt("rdwr_mmap_shared_write", with_rw(
    lambda fd: mmap.mmap(fd, 4096, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)))
attempt("rdwr_remove_seals", with_rw(lambda fd: fcntl.fcntl(fd, F_ADD_SEALS, 0x10)))
attempt("ro_pwrite", lambda: os.pwrite(ro, b"X", 0))
attempt("ro_ftruncate", lambda: os.ftruncate(ro, 0))
attempt("ro_punch_hole", lambda: fallocate(ro, 3, 0, 4096))
attempt("ro_mmap_shared_write", lambda: mmap.mmap(
    ro, 4096, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE))
def mprotect_up():
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                          ctypes.c_int, ctypes.c_long]
    p = libc.mmap(None, 4096, 1, 1, ro, 0)  # PROT_READ, MAP_SHARED
    if p == ctypes.c_void_p(-1).value:
        raise OSError(ctypes.get_errno(), "mmap")
    if libc.mprotect(ctypes.c_void_p(p), 4096, 3) != 0:  # PROT_READ | PROT_WRITE
        raise OSError(ctypes.get_errno(), "mprotect")
attempt("ro_mmap_shared_then_mprotect_write", mprotect_up)
# re-open the read-only fd read-write through /proc/self/fd
attempt("reopen_fd_rdwr_pwrite", lambda: os.pwrite(
    os.open(f"/proc/self/fd/{ro}", os.O_RDWR), b"X", 0))
print(json.dumps(out))
"""
_FALLOCATE = r"""
import ctypes
_libc = ctypes.CDLL(None, use_errno=True)
def fallocate(fd, mode, off, length):
    if _libc.fallocate(fd, mode, ctypes.c_long(off), ctypes.c_long(length)) != 0:
        raise OSError(ctypes.get_errno(), "fallocate")
"""

# F_SEAL_SEAL | F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_WRITE
_ALL_SEALS = 0x1 | 0x2 | 0x4 | 0x8


def test_nobody_can_write_the_sealed_memfd(pair) -> None:  # type: ignore[no-untyped-def]
    a, b = pair
    assert memfd_vmas(b.pid, *region(b, "identical"))  # B maps the segment too
    before_b = read_mem(b.pid, b.int("identical"), N * PAGE_SIZE)
    # the attacker goes through A's mapping of the segment B maps too
    ((a_start, a_end, _),) = memfd_vmas(a.pid, *region(a, "identical"))
    path = f"/proc/{a.pid}/map_files/{a_start:x}-{a_end:x}"
    res = subprocess.run(
        [sys.executable, "-c", _FALLOCATE + _ATTACKER, path],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    got = json.loads(res.stdout)
    assert got.pop("seals") & _ALL_SEALS == _ALL_SEALS
    denied = {"EPERM", "EACCES", "EBADF", "EINVAL"}
    # open O_RDWR itself succeeds (a memfd's inode is mode 0777, and root may open
    # map_files); what matters is that every change through it is refused
    assert got.pop("open_rdwr") == "ok"
    changed = {k: v for k, v in got.items() if v not in denied}
    assert changed == {}, got
    # B (and A) see exactly what they saw
    assert read_mem(b.pid, b.int("identical"), N * PAGE_SIZE) == before_b
    with open(path, "rb") as f:
        assert f.read(N * PAGE_SIZE) == before_b
    assert_all_ok(a, b)


# --------------------------------------------------------------------------------------
# 4. Attributes: those madvise can give the replacement again are kept; the others are
#    never merged
# --------------------------------------------------------------------------------------

ATTRS = {
    "mlock": ("lo", "mlocked (lo)"),
    "wipeonfork": ("wf", "MADV_WIPEONFORK (wf)"),
    "dontfork": ("dc", "MADV_DONTFORK (dc): may be a DMA buffer"),
}

# --attr of planted -> the VmFlags the region then carries (planted gives every region
# MADV_NOHUGEPAGE first: nh stays unless hugepage replaces it)
KEPT_ATTRS = {
    "hugepage": {"hg"},
    "dontdump": {"dd", "nh"},
    "sequential": {"sr", "nh"},
    "random": {"rr", "nh"},
}
ADVICE_FLAGS = {"hg", "nh", "sr", "rr", "dd"}


def _advice_flags(pid: int, addr: int) -> set[str]:
    return set(smaps_at(pid, addr).vmflags) & ADVICE_FLAGS


@pytest.mark.parametrize("attr", sorted(KEPT_ATTRS))
def test_advice_is_kept_by_merge_fork_and_unmerge(spawn, attr: str) -> None:  # type: ignore[no-untyped-def]
    """A region with advice is merged, and its replacement carries the same VmFlags in
    smaps; a child forked then sees its memory; unmerged, the
    anonymous memory has them again (numpy's MADV_HUGEPAGE arrays, issue 15)."""
    want = KEPT_ATTRS[attr]
    targets = start_pair(spawn, "--attr", attr)
    for t in targets:
        assert _advice_flags(t.pid, t.int("identical")) == want
    res = merge(targets)
    assert res.pages_merged == 2 * N, res.as_json()["refused"]
    for t in targets:
        start, end = region(t, "identical")
        vmas = memfd_vmas(t.pid, start, end)
        assert vmas and vmas[0][0] == start, vmas
        for a, _b, _ino in vmas:
            assert _advice_flags(t.pid, a) == want, smaps_at(t.pid, a)
        assert t.command("fork") == f"CHILD exit=0 OK pages={N + U}"
        assert t.command("check").startswith("OK")
    assert unmerge(targets[0].pid).pages_unmerged == N
    t = targets[0]
    start, end = region(t, "identical")
    assert memfd_vmas(t.pid, start, end) == []
    assert _advice_flags(t.pid, start) == want, smaps_at(t.pid, start)
    assert t.command("check").startswith("OK")
    assert_all_ok(*targets)


def _assert_refused(targets: list[Target], res: MergeResult, reason: str) -> None:
    refused = res.as_json()["refused"]
    for t in targets:
        start, end = region(t, "identical")
        assert memfd_vmas(t.pid, start, end) == [], f"pid {t.pid}: region merged"
        assert any(
            r["pid"] == t.pid
            and r["reason"] == reason
            and int(r["start"], 16) <= start
            and end <= int(r["end"], 16)
            for r in refused
        ), refused
        assert t.command("check").startswith("OK")


@pytest.mark.parametrize("attr", sorted(ATTRS))
def test_attribute_lost_by_replacement_is_never_merged(spawn, attr: str) -> None:  # type: ignore[no-untyped-def]
    flag, reason = ATTRS[attr]
    targets = start_pair(spawn, "--attr", attr)
    res = merge(targets)
    _assert_refused(targets, res, reason)
    for t in targets:
        assert flag in smaps_at(t.pid, t.int("identical")).vmflags
    # the unique regions were scanned too (nothing to merge there): the refusal is the
    # attribute, not an empty selection
    assert res.pages_merged == 0


SYS_pkey_alloc, SYS_pkey_free = 330, 331
PR_SET_VMA, PR_SET_VMA_ANON_NAME = 0x53564D41, 0


def _pkey_alloc_errno() -> int:
    """0 if this CPU/kernel hands out protection keys (the key is freed again)."""
    key = _libc.syscall(SYS_pkey_alloc, 0, 0)
    if key < 0:
        return ctypes.get_errno()
    _libc.syscall(SYS_pkey_free, key)
    return 0


def test_pkey_region_is_never_merged(spawn) -> None:  # type: ignore[no-untyped-def]
    """On CPUs without pkeys (this VM: no `pku` in cpuinfo) pkey_alloc fails, no target
    can carry a key, and the test is skipped (also under CI=true, see machine_lacks)."""
    err = _pkey_alloc_errno()
    if err:
        assert err in (errno.ENOSPC, errno.EINVAL, errno.ENOSYS)
        machine_lacks(
            f"protection keys (pkey_alloc: {errno.errorcode[err]})",
            "tests/test_procfs.py::test_every_vmflag_has_its_reason ([anon:pkey])",
        )
    targets = start_pair(spawn, "--attr", "pkey")
    res = merge(targets)
    key = smaps_at(targets[0].pid, targets[0].int("identical")).protection_key
    assert key != 0
    _assert_refused(targets, res, f"protection key {key}")


def test_named_anon_region_is_never_merged(spawn) -> None:  # type: ignore[no-untyped-def]
    """On kernels without CONFIG_ANON_VMA_NAME (this one) PR_SET_VMA_ANON_NAME fails
    with EINVAL, no VMA can carry a name, and the test is skipped (also under CI=true,
    see machine_lacks)."""
    import mmap

    m = mmap.mmap(-1, PAGE_SIZE)
    addr = ctypes.addressof(ctypes.c_char.from_buffer(m))
    name = ctypes.c_char_p(b"probe")
    rc = _libc.prctl(PR_SET_VMA, PR_SET_VMA_ANON_NAME, ctypes.c_ulong(addr),
                     ctypes.c_ulong(PAGE_SIZE), name)  # fmt: skip
    err = ctypes.get_errno()
    del addr
    if rc != 0:
        assert err == errno.EINVAL
        machine_lacks(
            "named anonymous VMAs (CONFIG_ANON_VMA_NAME)",
            "tests/test_procfs.py::test_every_vmflag_has_its_reason ([anon:jemalloc])",
        )
    targets = start_pair(spawn, "--attr", "anonname")
    res = merge(targets)
    _assert_refused(targets, res, "named anonymous mapping")


# --------------------------------------------------------------------------------------
# 5. The madvise guard (docs/design.md §3.1, §3.2; procksm.guard): madvise and mremap on merged
#    pages behave as on anonymous memory. Each case also runs with the guard off
#    (MergeOptions(guard=False), the naive implementation) to show what it prevents.
# --------------------------------------------------------------------------------------


@pytest.fixture
def naive_pair(spawn):  # type: ignore[no-untyped-def]
    targets = start_pair(spawn)
    res = merge(targets, guard=False)
    assert res.pages_merged == 2 * N
    return targets


def _guarded(pid: int) -> bool:
    return any(
        line.split()[1] != "0"
        for line in Path(f"/proc/{pid}/status").read_text().splitlines()
        if line.startswith("Seccomp_filters:")
    )


def test_dontneed_on_a_merged_page_reads_zeros(pair) -> None:  # type: ignore[no-untyped-def]
    a, b = pair
    assert _guarded(a.pid) and _guarded(b.pid)
    page = 2
    addr = a.int("identical") + page * PAGE_SIZE
    assert a.command(f"write identical {page}") == "OK"  # A's own copy of the page
    assert a.command(f"dontneed identical {page} 3") == "OK"  # COWed + 2 merged pages
    assert read_mem(a.pid, addr, 3 * PAGE_SIZE) == bytes(3 * PAGE_SIZE)
    assert_all_ok(a, b)  # a expects zeros there, b its own content
    # a range spanning anon | merged: every page zero afterwards, the neighbours intact
    assert a.command(f"dontneed identical {N - 2} 2") == "OK"
    assert_all_ok(a, b)
    assert a.command("write identical 1") == "OK"
    assert_all_ok(a, b)


def test_the_guard_covers_children_and_threads_created_after_the_merge(pair) -> None:  # type: ignore[no-untyped-def]
    """The filter is inherited by every later thread (TSYNC, then clone) and child (fork):
    their DONTNEED on merged pages reads zeros too."""
    a, b = pair
    assert a.command("forkdontneed identical 4 3") == f"CHILD exit=0 OK pages={N + U}"
    assert memfd_vmas(a.pid, *region(a, "identical"))  # the parent's pages are still merged
    assert a.command("threaddontneed identical 10 2") == "OK"
    assert read_mem(a.pid, a.int("identical") + 10 * PAGE_SIZE, 2 * PAGE_SIZE) == bytes(
        2 * PAGE_SIZE
    )
    assert_all_ok(a, b)


def test_without_the_guard_dontneed_reads_slot_content(naive_pair) -> None:  # type: ignore[no-untyped-def]
    a, b = naive_pair
    page = 2
    addr = a.int("identical") + page * PAGE_SIZE
    slot = read_mem(b.pid, b.int("identical") + page * PAGE_SIZE, PAGE_SIZE)
    assert a.command(f"write identical {page}") == "OK"
    assert a.command(f"dontneed identical {page} 1") == "OK"
    # anonymous memory would now read zeros; the merged range reads the slot again
    assert a.command("check").startswith(f"CORRUPT region=identical page={page} offset=0 ")
    assert read_mem(a.pid, addr, PAGE_SIZE) == slot != bytes(PAGE_SIZE)
    assert b.command("check") == f"OK pages={N + U}"


@pytest.mark.parametrize(
    ("advice", "anon_answer", "naive_answer"),
    [
        ("free", "OK", f"ERR errno={errno.EINVAL}"),
        ("wipeonfork", "OK", f"ERR errno={errno.EINVAL}"),
        # refused on both, with EINVAL on anonymous memory, EACCES on a private file map
        ("remove", f"ERR errno={errno.EINVAL}", f"ERR errno={errno.EACCES}"),
    ],
)
def test_madvise_on_merged_pages_answers_like_anonymous_memory(  # type: ignore[no-untyped-def]
    spawn, advice: str, anon_answer: str, naive_answer: str
) -> None:
    guarded, naive = start_pair(spawn), start_pair(spawn)
    merge(guarded)
    merge(naive, guard=False)
    for t, want in ((guarded[0], anon_answer), (naive[0], naive_answer)):
        assert t.command(f"madvise unique 0 2 {advice}") == anon_answer  # the reference
        # a merged range, and one spanning unique | merged pages
        assert t.command(f"madvise identical 0 2 {advice}") == want
        assert t.command(f"madvise identical {N - 4} 4 {advice}") == want
    assert_all_ok(*guarded, *naive)


def test_mremap_shrink_then_grow_reads_zeros(pair) -> None:  # type: ignore[no-untyped-def]
    """Shrinking a merged range and growing it back: the regrown pages read zeros, like
    anonymous memory (without the guard they map the same memfd offsets again)."""
    a, b = pair
    assert a.command(f"mremap identical {N // 2}").startswith("OK addr=")
    assert a.command(f"mremap identical {N}").startswith("OK addr=")
    assert_all_ok(a, b)


def test_without_the_guard_mremap_regrow_reads_old_content(naive_pair) -> None:  # type: ignore[no-untyped-def]
    a, b = naive_pair
    assert a.command(f"mremap identical {N // 2}").startswith("OK addr=")
    assert a.command(f"mremap identical {N}").startswith("OK addr=")
    assert a.command("check").startswith("CORRUPT region=identical page=")
    assert b.command("check").startswith("OK")


def test_guarded_calls_that_touch_no_merged_page_run_unchanged(pair) -> None:  # type: ignore[no-untyped-def]
    a, b = pair
    assert a.command("dontneed unique 0 2") == "OK"
    assert a.command("madvise unique 2 2 free") == "OK"
    assert a.command("mmap 64") == "OK"
    assert_all_ok(a, b)
    # still merged: nothing outside the calls' ranges was unmerged
    assert memfd_vmas(a.pid, *region(a, "identical"))
