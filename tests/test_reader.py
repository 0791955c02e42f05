"""procksm.reader and procksm.hashing against real processes."""

from __future__ import annotations

import ctypes
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import xxhash

from procksm import PAGE_SIZE, procfs
from procksm.errors import NoSuchProcess
from procksm.hashing import hash_page, hash_pages
from procksm.procfs import PM_PRESENT, PagemapFile
from procksm.reader import IOV_MAX, PageReader, PartialRead, read_pages_into
from tests.conftest import LIBC, build_c_target, require_privileges


def sparse_page(i: int) -> bytes:
    """What planted --sparse writes into page i (i % 4 == 0)."""
    words = np.arange(PAGE_SIZE // 8, dtype=np.uint64) ^ np.uint64((i << 32) ^ 0x5350415253450000)
    return words.tobytes()


class Mem:
    """/proc/PID/mem: an independent way to read the target (for present pages only)."""

    def __init__(self, pid: int) -> None:
        self.fd = os.open(f"/proc/{pid}/mem", os.O_RDONLY)

    def read(self, addr: int, length: int) -> bytes:
        return os.pread(self.fd, length, addr)

    def close(self) -> None:
        os.close(self.fd)


def present_count(pid: int, start: int, end: int) -> int:
    return int(np.count_nonzero(procfs.read_pagemap(pid, start, end) & PM_PRESENT))


def rss_by_vma(pid: int) -> dict[int, int]:
    return {v.start: v.rss_kb for v in procfs.read_vmas(pid)}


SPARSE = 4096  # pages in planted's sparse mapping; every 4th is touched


@pytest.fixture
def sparse_target(spawn):  # type: ignore[no-untyped-def]
    require_privileges()
    return spawn([build_c_target("planted"), "--sparse", SPARSE, "--identical", 300, "--zero", 16])


def test_scanning_everything_present_changes_nothing_in_the_target(sparse_target) -> None:  # type: ignore[no-untyped-def]
    t = sparse_target
    sparse = t.int("sparse")
    sparse_end = sparse + SPARSE * PAGE_SIZE
    assert t.int("sparse_touched") == SPARSE // 4
    assert present_count(t.pid, sparse, sparse_end) == SPARSE // 4
    # planted allocates its stdin buffer after READY: measure once it answers commands.
    assert t.command("errors") == "ERRORS 0"
    rss_before = procfs.read_status(t.pid).vm_rss_kb
    vma_rss_before = rss_by_vma(t.pid)

    reader = PageReader(t.pid)
    mem = Mem(t.pid)
    pages_read = present = 0
    sparse_seen: dict[int, bytes] = {}
    try:
        with PagemapFile(t.pid) as pm:
            for vma in procfs.read_vmas(t.pid):
                if procfs.ineligibility(vma) is not None:
                    continue
                runs = pm.present_runs(vma.start, vma.end)
                present += sum(n for _, n in runs)
                for addr, view in reader.read_runs(runs):
                    assert len(view) % PAGE_SIZE == 0 and len(view) <= reader.chunk_bytes
                    assert bytes(view) == mem.read(addr, len(view))
                    pages_read += len(view) // PAGE_SIZE
                    for k in range(len(view) // PAGE_SIZE):
                        a = addr + k * PAGE_SIZE
                        if sparse <= a < sparse_end:
                            sparse_seen[a] = bytes(view[k * PAGE_SIZE : (k + 1) * PAGE_SIZE])
    finally:
        mem.close()
    assert pages_read == present and reader.unreadable_pages == 0
    # Exactly the touched pages of the sparse mapping, with the target's content.
    assert sorted(sparse_seen) == [sparse + i * PAGE_SIZE for i in range(0, SPARSE, 4)]
    for a, data in sparse_seen.items():
        assert data == sparse_page((a - sparse) // PAGE_SIZE)
    # Nothing was faulted in: untouched pages are still not present (a read fault would
    # map the zero page there, which RSS does not even count), RSS is unchanged.
    assert present_count(t.pid, sparse, sparse_end) == SPARSE // 4
    assert rss_by_vma(t.pid) == vma_rss_before
    assert procfs.read_status(t.pid).vm_rss_kb == rss_before
    assert t.command("check") == f"OK pages={300 + 16}"


def test_reading_an_untouched_page_would_map_it(sparse_target) -> None:  # type: ignore[no-untyped-def]
    """Why read_runs must be given present runs only: process_vm_readv faults pages in."""
    t = sparse_target
    untouched = t.int("sparse") + PAGE_SIZE  # page 1: never written
    assert present_count(t.pid, untouched, untouched + PAGE_SIZE) == 0
    assert PageReader(t.pid).read_page(untouched) == bytes(PAGE_SIZE)
    assert present_count(t.pid, untouched, untouched + PAGE_SIZE) == 1


def test_read_runs_gathers_scattered_pages_into_few_calls(spawn) -> None:  # type: ignore[no-untyped-def]
    require_privileges()
    n = 8 * IOV_MAX
    t = spawn([build_c_target("planted"), "--sparse", n])
    sparse = t.int("sparse")
    with PagemapFile(t.pid) as pm:
        runs = pm.present_runs(sparse, sparse + n * PAGE_SIZE)
    assert runs == [(sparse + i * PAGE_SIZE, 1) for i in range(0, n, 4)]
    reader = PageReader(t.pid)  # 4 MiB buffer: IOV_MAX pages per call
    got = [(a, bytes(v)) for a, v in reader.read_runs(runs)]
    assert reader.calls == len(runs) // IOV_MAX == 2
    assert [a for a, _ in got] == [a for a, _ in runs]
    assert all(data == sparse_page((a - sparse) // PAGE_SIZE) for a, data in got)
    # The same pages as whole batches: one hash_pages call per process_vm_readv.
    hashes = {xxhash.xxh3_64_intdigest(d): a for a, d in got}
    batches = 0
    for addrs, view in reader.read_batches(runs):
        batches += 1
        assert [hashes[h] for h in hash_pages(view).tolist()] == addrs.tolist()
    assert batches == 2


def test_read_runs_splits_long_runs_into_chunks(spawn) -> None:  # type: ignore[no-untyped-def]
    require_privileges()
    t = spawn([build_c_target("planted"), "--identical", 100])
    ident = t.int("identical")
    reader = PageReader(t.pid, chunk_bytes=16 * PAGE_SIZE + 123)  # rounded down to 16 pages
    assert reader.chunk_bytes == 16 * PAGE_SIZE
    pieces = [(a, bytes(v)) for a, v in reader.read_runs([(ident, 40), (ident + 50 * 4096, 50)])]
    assert [(a - ident) // PAGE_SIZE for a, _ in pieces] == [0, 16, 32, 50, 58, 74, 90]
    assert [len(d) // PAGE_SIZE for _, d in pieces] == [16, 16, 8, 8, 16, 16, 10]
    mem = Mem(t.pid)
    try:
        assert all(d == mem.read(a, len(d)) for a, d in pieces)
    finally:
        mem.close()
    assert reader.bytes_read == 90 * PAGE_SIZE


# ------------------------------------------------------------------------------------
# Partial reads: memory unmapped under the reader (in this test process)
# ------------------------------------------------------------------------------------

_libc = LIBC


@pytest.fixture
def holey() -> Iterator[int]:
    """Five written pages with pages 1 and 3 unmapped: [A][hole][B][hole][C]."""
    size = 5 * PAGE_SIZE
    addr = _libc.mmap(None, size, 3, 0x22, -1, 0)  # rw, MAP_PRIVATE | MAP_ANONYMOUS
    assert addr not in (None, ctypes.c_void_p(-1).value)
    for i in range(5):
        ctypes.memset(addr + i * PAGE_SIZE, 0x41 + i, PAGE_SIZE)
    _libc.munmap(addr + PAGE_SIZE, PAGE_SIZE)
    _libc.munmap(addr + 3 * PAGE_SIZE, PAGE_SIZE)
    yield addr
    for i in (0, 2, 4):
        _libc.munmap(addr + i * PAGE_SIZE, PAGE_SIZE)


def test_read_stops_at_an_unmapped_page(holey: int) -> None:
    reader = PageReader(os.getpid())
    view = reader.read(holey, 3 * PAGE_SIZE)
    assert bytes(view) == b"A" * PAGE_SIZE  # shorter: the length is the signal
    assert len(reader.read(holey + PAGE_SIZE, PAGE_SIZE)) == 0
    with pytest.raises(PartialRead, match="could read only 0 of 4096 bytes"):
        reader.read_page(holey + PAGE_SIZE)
    assert reader.read_page(holey + 2 * PAGE_SIZE) == b"C" * PAGE_SIZE


def test_read_runs_skips_pages_that_vanished(holey: int) -> None:
    reader = PageReader(os.getpid())
    got = [(a - holey, bytes(v)) for a, v in reader.read_runs([(holey, 5)])]
    assert got == [
        (0, b"A" * PAGE_SIZE),
        (2 * PAGE_SIZE, b"C" * PAGE_SIZE),
        (4 * PAGE_SIZE, b"E" * PAGE_SIZE),
    ]
    assert reader.unreadable_pages == 2


def test_read_batches_packs_what_was_read(holey: int) -> None:
    reader = PageReader(os.getpid())
    runs = [(holey, 3), (holey + 4 * PAGE_SIZE, 1)]
    batches = [(addrs.copy(), bytes(view)) for addrs, view in reader.read_batches(runs)]
    assert len(batches) == 1 and reader.unreadable_pages == 1
    addrs, data = batches[0]
    assert (addrs - holey).tolist() == [0, 2 * PAGE_SIZE, 4 * PAGE_SIZE]
    assert data == b"A" * PAGE_SIZE + b"C" * PAGE_SIZE + b"E" * PAGE_SIZE


def test_read_pages_into_any_order(holey: int) -> None:
    out = np.zeros((6, PAGE_SIZE // 8), dtype=np.uint64)
    addrs = [holey + 4 * PAGE_SIZE, holey + PAGE_SIZE, holey, holey + 2 * PAGE_SIZE]
    ok = read_pages_into(os.getpid(), addrs, out, [5, 0, 1, 3])
    assert ok.tolist() == [True, False, True, True]
    rows = [out[i].tobytes() for i in range(6)]
    assert rows[5] == b"E" * PAGE_SIZE and rows[1] == b"A" * PAGE_SIZE
    assert rows[3] == b"C" * PAGE_SIZE and rows[0] == rows[2] == rows[4] == bytes(PAGE_SIZE)
    with pytest.raises(ValueError, match="rows of one page"):
        read_pages_into(os.getpid(), addrs, np.zeros((4, 100), np.uint8))


def test_read_pages_into_many_pages_of_a_target(spawn) -> None:  # type: ignore[no-untyped-def]
    require_privileges()
    n = IOV_MAX + 300  # more than one call
    t = spawn([build_c_target("planted"), "--identical", n])
    ident = t.int("identical")
    order = np.random.default_rng(3).permutation(n)
    addrs = ident + order.astype(np.uint64) * np.uint64(PAGE_SIZE)
    out = np.empty((n, PAGE_SIZE), dtype=np.uint8)
    reader = PageReader(t.pid)
    assert reader.read_pages_into(addrs, out).all()
    assert reader.calls == 2
    mem = Mem(t.pid)
    try:
        for k in (0, 1, n // 2, n - 1):
            assert out[k].tobytes() == mem.read(int(addrs[k]), PAGE_SIZE)
    finally:
        mem.close()


# ------------------------------------------------------------------------------------
# Errors
# ------------------------------------------------------------------------------------


def test_exited_target_is_no_such_process() -> None:
    p = subprocess.Popen(["true"])
    p.wait()
    reader = PageReader(p.pid)
    with pytest.raises(NoSuchProcess, match=f"pid={p.pid}"):
        reader.read(0x400000, PAGE_SIZE)
    with pytest.raises(NoSuchProcess):
        list(reader.read_runs([(0x400000, 1)]))


NOBODY_READ = """
import json, os, sys
from procksm.reader import PageReader
pid, addr = int(sys.argv[1]), int(sys.argv[2])
os.setgid(65534); os.setuid(65534)
try:
    PageReader(pid).read(addr, 4096)
    print(json.dumps("no error"))
except Exception as e:
    print(json.dumps(f"{type(e).__name__}: {e}"))
"""


def test_unreadable_target_is_access_denied(spawn) -> None:  # type: ignore[no-untyped-def]
    require_privileges()
    t = spawn([build_c_target("planted"), "--zero", 1])
    proc = subprocess.run(
        [sys.executable, "-c", NOBODY_READ, str(t.pid), str(t.int("zero"))],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=Path(__file__).parent.parent,
    )
    assert proc.returncode == 0, proc.stderr
    answer = json.loads(proc.stdout)
    assert answer.startswith(f"AccessDenied: cannot read the memory of pid {t.pid}"), answer
    assert "run procksm as root" in answer


# ------------------------------------------------------------------------------------
# Hashing
# ------------------------------------------------------------------------------------


def test_hash_pages_is_xxh3_of_each_page() -> None:
    rng = np.random.default_rng(0)
    data = rng.integers(0, 256, 37 * PAGE_SIZE, dtype=np.uint8)
    data[5 * PAGE_SIZE : 6 * PAGE_SIZE] = 0
    data[9 * PAGE_SIZE : 10 * PAGE_SIZE] = data[20 * PAGE_SIZE : 21 * PAGE_SIZE]
    raw = data.tobytes()
    h = hash_pages(memoryview(raw))
    assert h.dtype == np.uint64 and len(h) == 37
    expected = [xxhash.xxh3_64_intdigest(raw[i : i + PAGE_SIZE]) for i in range(0, len(raw), 4096)]
    assert h.tolist() == expected
    assert h[5] == hash_page(bytes(PAGE_SIZE)) and h[9] == h[20]
    assert len(set(h.tolist())) == 36
    assert hash_pages(bytearray(raw)).tolist() == expected
    assert hash_pages(b"").size == 0
    with pytest.raises(ValueError, match="multiple of the page size"):
        hash_pages(raw[:-1])


def test_hash_pages_of_views_from_the_reader(holey: int) -> None:
    reader = PageReader(os.getpid())
    view = reader.read(holey, PAGE_SIZE)
    assert hash_pages(view).tolist() == [xxhash.xxh3_64_intdigest(b"A" * PAGE_SIZE)]
