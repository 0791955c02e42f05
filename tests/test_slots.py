"""procksm.slots: real memfds, real seals, real child processes mapping them."""

from __future__ import annotations

import ctypes
import errno
import hashlib
import mmap
import os
import resource
import signal
import struct
import sys
import time
from collections.abc import Callable, Iterator

import pytest

from procksm import PAGE_SIZE, slots
from procksm.errors import ProcksmError
from procksm.slots import SEALS, FileIdentity, Segment, Slot, SlotRun, SlotStore
from tests.conftest import Target, require_privileges
from tests.test_fdpass import FAKE_TARGET, page_pattern

SpawnFn = Callable[..., Target]

_libc = ctypes.CDLL(None, use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02


def fallocate(fd: int, mode: int, offset: int, length: int) -> int:
    """0 or the errno."""
    return 0 if _libc.fallocate(fd, mode, offset, length) == 0 else ctypes.get_errno()


def errno_of(fn: Callable[[], object]) -> int:
    try:
        fn()
    except OSError as exc:
        return exc.errno or -1
    return 0


@pytest.fixture
def store() -> Iterator[SlotStore]:
    with SlotStore(segment_pages=16) as s:
        yield s


def sealed(store: SlotStore, content: bytes) -> tuple[Segment, SlotRun]:
    run = store.add_run(content)
    (seg,) = store.seal_pending()
    return seg, run


def fd_target(fd: int) -> str:
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return ""


# --------------------------------------------------------------------------------------
# Building, layout, reading
# --------------------------------------------------------------------------------------


def test_runs_get_contiguous_offsets_and_content(store: SlotStore) -> None:
    a, b, c = page_pattern(1, 3), page_pattern(2, 5), page_pattern(3, 10)
    run_a = store.add_run(a)
    run_b = store.add_run(memoryview(b))
    run_c = store.add_run(bytearray(c))  # 3 + 5 + 10 > 16: a new segment
    assert run_a == SlotRun(run_a.segment_id, 0, 3)
    assert run_b == SlotRun(run_a.segment_id, 3, 5)
    assert run_b.offset == 3 * PAGE_SIZE and run_b.length == 5 * PAGE_SIZE
    assert run_c.segment_id != run_a.segment_id and run_c.first_page == 0
    big = store.add_run(page_pattern(4, 40))  # larger than a segment: never split
    assert (big.first_page, big.npages) == (0, 40)
    assert store.stats().pending_segments == 3
    segs = store.seal_pending()
    assert [s.npages for s in segs] == [8, 10, 40]
    assert all(s.sealed for s in segs)
    assert store.read_run(run_b) == b
    assert store.read_run(big) == page_pattern(4, 40)
    assert bytes(store.read_slot(run_c.slot(9))) == c[9 * PAGE_SIZE :]
    assert bytes(store.read_slot(Slot(run_a.segment_id, 4))) == b[PAGE_SIZE : 2 * PAGE_SIZE]
    assert store.read_slot(run_a.slot(0)).readonly
    assert [s.page for s in run_b] == [3, 4, 5, 6, 7]
    with pytest.raises(IndexError):
        store.read_slot(Slot(run_a.segment_id, 8))
    with pytest.raises(IndexError):
        run_a.slot(3)
    st = store.stats()
    assert (st.segments, st.pending_segments, st.slots) == (3, 0, 58)
    assert st.bytes_held == 58 * PAGE_SIZE == st.unreferenced_bytes
    # The memfd really holds exactly that (no hidden buffer in procksm).
    assert [os.fstat(s.fd).st_size for s in segs] == [8 * PAGE_SIZE, 10 * PAGE_SIZE, 40 * PAGE_SIZE]


def test_bad_runs_refused(store: SlotStore) -> None:
    for bad in (b"", b"x" * 100, b"y" * (PAGE_SIZE + 1)):
        with pytest.raises(ValueError):
            store.add_run(bad)
    assert store.seal_pending() == []  # nothing written, no empty segment sealed


def test_sealed_segment_cannot_grow(store: SlotStore) -> None:
    seg, _ = sealed(store, page_pattern(1, 2))
    run = store.add_run(page_pattern(2, 2))  # goes to a new segment
    assert run.segment_id != seg.id and seg.npages == 2
    with pytest.raises(ProcksmError, match="sealed"):
        seg._append(memoryview(page_pattern(3, 1)))


def test_read_run_into_numpy_buffer(store: SlotStore) -> None:
    import numpy as np

    content = page_pattern(9, 4)
    _, run = sealed(store, content)
    buf = np.zeros(run.length, dtype=np.uint8)
    store.read_run_into(run, buf.data)
    assert buf.tobytes() == content
    with pytest.raises(ValueError):
        store.read_run_into(run, bytearray(PAGE_SIZE))


def test_write_failure_leaves_segment_unchanged() -> None:
    """pwrite fails part-way (RLIMIT_FSIZE stands in for a cgroup limit): the half-written
    run is cut off again and the error is a ProcksmError. In a child: rlimits are sticky."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        code = 1
        try:
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # get EFBIG, not a signal
            with SlotStore(segment_pages=16) as s:
                first = s.add_run(page_pattern(1, 2))
                resource.setrlimit(resource.RLIMIT_FSIZE, (3 * PAGE_SIZE, 3 * PAGE_SIZE))
                try:
                    s.add_run(page_pattern(2, 2))
                except ProcksmError:
                    seg = s.segment(first.segment_id)
                    ok = seg.npages == 2 and os.fstat(seg.fd).st_size == 2 * PAGE_SIZE
                    ok = ok and s.read_run(first) == page_pattern(1, 2)
                    code = 0 if ok else 3
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


# --------------------------------------------------------------------------------------
# Seals and the read-only fd
# --------------------------------------------------------------------------------------


def test_seals_enforced_on_the_original_fd(store: SlotStore) -> None:
    seg, _ = sealed(store, page_pattern(1, 2))
    fd = seg.fd
    assert seg.seals() & SEALS == SEALS
    assert errno_of(lambda: os.pwrite(fd, b"x", 0)) == errno.EPERM
    assert errno_of(lambda: os.write(fd, b"x")) == errno.EPERM
    assert errno_of(lambda: os.ftruncate(fd, PAGE_SIZE)) == errno.EPERM  # shrink
    assert errno_of(lambda: os.ftruncate(fd, 4 * PAGE_SIZE)) == errno.EPERM  # grow
    assert fallocate(fd, 0, 0, 4 * PAGE_SIZE) == errno.EPERM
    # No hole can ever be punched under a target's mapping.
    assert fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 0, PAGE_SIZE) == errno.EPERM
    shared_write = lambda: mmap.mmap(fd, PAGE_SIZE, mmap.MAP_SHARED, mmap.PROT_WRITE)  # noqa: E731
    assert errno_of(shared_write) == errno.EPERM
    import fcntl

    assert errno_of(lambda: fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_GROW)) == errno.EPERM
    assert store.read_run(SlotRun(seg.id, 0, 2)) == page_pattern(1, 2)


def test_unsealed_segment_is_not_handed_out(store: SlotStore) -> None:
    run = store.add_run(page_pattern(1, 1))
    seg = store.segment(run.segment_id)
    with pytest.raises(ProcksmError, match="not sealed"):
        seg.readonly_fd()
    with pytest.raises(ProcksmError, match="not sealed"):
        store.incref(run)


def test_readonly_fd_properties(store: SlotStore) -> None:
    content = page_pattern(7, 2)
    seg, _ = sealed(store, content)
    ro = seg.readonly_fd()
    try:
        assert FileIdentity.of_fd(ro) == seg.identity == FileIdentity.of_fd(seg.fd)
        import fcntl

        flags = fcntl.fcntl(ro, fcntl.F_GETFL)
        assert flags & os.O_ACCMODE == os.O_RDONLY
        assert fcntl.fcntl(ro, fcntl.F_GETFD) & fcntl.FD_CLOEXEC
        # A new open file description: changing its flags does not touch procksm's.
        fcntl.fcntl(ro, fcntl.F_SETFL, flags | os.O_NONBLOCK)
        assert not fcntl.fcntl(seg.fd, fcntl.F_GETFL) & os.O_NONBLOCK
        # F_SETFL cannot upgrade the access mode.
        fcntl.fcntl(ro, fcntl.F_SETFL, flags | os.O_RDWR)
        assert fcntl.fcntl(ro, fcntl.F_GETFL) & os.O_ACCMODE == os.O_RDONLY
        assert errno_of(lambda: os.pwrite(ro, b"x", 0)) == errno.EBADF
        assert errno_of(lambda: os.ftruncate(ro, 0)) in (errno.EINVAL, errno.EBADF)
        assert fallocate(ro, 0, 0, 8 * PAGE_SIZE) == errno.EBADF
        assert fallocate(ro, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 0, 4096) == errno.EBADF
        shared_write = lambda: mmap.mmap(ro, PAGE_SIZE, mmap.MAP_SHARED, mmap.PROT_WRITE)  # noqa: E731
        assert errno_of(shared_write) == errno.EACCES
        # What a merged target does: a private writable mapping; a write COWs.
        m = mmap.mmap(ro, 2 * PAGE_SIZE, mmap.MAP_PRIVATE, mmap.PROT_READ | mmap.PROT_WRITE)
        assert m[:] == content
        m[0:5] = b"HELLO"
        assert m[:5] == b"HELLO"
        m.close()
        assert store.read_run(SlotRun(seg.id, 0, 2)) == content
        # A privileged holder can reopen it read-write via /proc: the seals still hold.
        rw = os.open(f"/proc/self/fd/{ro}", os.O_RDWR)
        try:
            assert errno_of(lambda: os.pwrite(rw, b"x", 0)) == errno.EPERM
        finally:
            os.close(rw)
    finally:
        os.close(ro)


def test_memfd_name_and_noexec(store: SlotStore) -> None:
    seg, _ = sealed(store, page_pattern(1, 1))
    assert fd_target(seg.fd) == f"/memfd:procksm-seg-{seg.id} (deleted)"
    # MFD_NOEXEC_SEAL (6.3+): no exec bits; PROT_EXEC mappings still allowed (JIT pages).
    if slots._noexec_supported:
        assert os.fstat(seg.fd).st_mode & 0o111 == 0
    m = mmap.mmap(seg.fd, PAGE_SIZE, mmap.MAP_PRIVATE, mmap.PROT_READ | mmap.PROT_EXEC)
    m.close()


# --------------------------------------------------------------------------------------
# References and reclaim
# --------------------------------------------------------------------------------------


def test_refcounts_release_the_segment(store: SlotStore) -> None:
    seg, run = sealed(store, page_pattern(1, 6))
    fd = seg.fd
    first, last = SlotRun(seg.id, 0, 2), SlotRun(seg.id, 2, 4)
    store.incref(first)
    store.incref(first)
    store.incref(last)
    st = store.stats()
    assert (st.mapping_refs, st.referenced_slots, st.unreferenced_bytes) == (3, 6, 0)
    assert not store.decref(first)
    assert not store.decref(last)
    st = store.stats()
    assert (st.mapping_refs, st.referenced_slots) == (1, 2)
    assert st.unreferenced_bytes == 4 * PAGE_SIZE
    with pytest.raises(ValueError):
        store.decref(last)  # never more decrefs than increfs
    assert fd_target(fd).startswith("/memfd:procksm-seg-")
    assert store.decref(first)  # last reference: procksm's fd is closed
    assert seg.closed and run not in store
    assert not fd_target(fd).startswith(f"/memfd:procksm-seg-{seg.id} ")
    st = store.stats()
    assert (st.segments, st.released_segments, st.released_bytes) == (0, 1, 6 * PAGE_SIZE)
    with pytest.raises(ProcksmError, match="not held"):
        store.read_slot(run.slot(0))


def test_collect_releases_only_unmapped_sealed_segments(store: SlotStore) -> None:
    used, used_run = sealed(store, page_pattern(1, 1))
    unused, _ = sealed(store, page_pattern(2, 1))
    building = store.add_run(page_pattern(3, 1))
    store.incref(used_run)
    assert store.collect() == [unused.id]
    assert unused.closed and not used.closed
    assert building in store  # not sealed yet: not collectable
    store.close()
    assert used.closed and store.stats().segments == 0


# --------------------------------------------------------------------------------------
# Through real target mappings
# --------------------------------------------------------------------------------------


def _pfn(pid: int, addr: int) -> int:
    with open(f"/proc/{pid}/pagemap", "rb") as f:
        f.seek(addr // PAGE_SIZE * 8)
        (entry,) = struct.unpack("<Q", f.read(8))
    assert entry >> 63, f"page {addr:#x} of {pid} not present"
    return entry & ((1 << 55) - 1)


def _kpagecount(pfn: int) -> int:
    with open("/proc/kpagecount", "rb") as f:
        f.seek(pfn * 8)
        return int(struct.unpack("<Q", f.read(8))[0])


def _mapping_target(spawn: SpawnFn, ro: int) -> Target:
    return spawn([sys.executable, "-c", FAKE_TARGET], pass_fds=(ro,))


def test_targets_share_frames_and_cow_privately(spawn: SpawnFn, store: SlotStore) -> None:
    require_privileges()
    content = page_pattern(11, 4)
    seg, run = sealed(store, content)
    digest = hashlib.sha256(content).hexdigest()
    ro = seg.readonly_fd()
    try:
        a, b = _mapping_target(spawn, ro), _mapping_target(spawn, ro)
        addr_a = int(a.command(f"map {ro} {run.offset} {run.length}"))
        addr_b = int(b.command(f"map {ro} {run.offset} {run.length}"))
    finally:
        os.close(ro)
    assert addr_a > 0 and addr_b > 0
    for t, addr in ((a, addr_a), (b, addr_b)):
        assert t.command(f"sha {addr:#x} {run.length}") == digest
    # One physical frame per page, mapped by exactly the two targets: procksm itself holds
    # no mapping (kpagecount would be 3 with a MAP_SHARED view).
    for i in range(run.npages):
        pfn = _pfn(a.pid, addr_a + i * PAGE_SIZE)
        assert pfn == _pfn(b.pid, addr_b + i * PAGE_SIZE)
        assert _kpagecount(pfn) == 2
    # A writes: its page is copied; B, procksm and a newcomer still see the original.
    shared_pfn = _pfn(a.pid, addr_a)
    assert a.command(f"poke {addr_a:#x} 255") == "0"
    assert a.command(f"read {addr_a:#x} 2") == "ff" + content[1:2].hex()
    assert _pfn(a.pid, addr_a) != shared_pfn and _pfn(b.pid, addr_b) == shared_pfn
    assert _kpagecount(shared_pfn) == 1
    assert b.command(f"sha {addr_b:#x} {run.length}") == digest
    assert store.read_run(run) == content
    ro = seg.readonly_fd()
    try:
        c = _mapping_target(spawn, ro)
        addr_c = int(c.command(f"map {ro} {run.offset} {run.length}"))
    finally:
        os.close(ro)
    assert c.command(f"sha {addr_c:#x} {run.length}") == digest
    assert _pfn(c.pid, addr_c) == shared_pfn


def _shmem_bytes() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("Shmem:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no Shmem in /proc/meminfo")


def test_reclaim_frees_memory_only_after_the_last_mapping(spawn: SpawnFn) -> None:
    """64 MiB segment: Shmem rises by its size; procksm's release (close) frees nothing
    while a target maps it, and the target's content stays intact (no hole punched); when
    the target goes, Shmem drops by the segment size. Shmem is machine-wide, so the
    tolerance is a quarter of the segment."""
    require_privileges()
    size = 64 << 20
    tolerance = size // 4
    chunk = page_pattern(5, 256)  # 1 MiB of distinct pages, repeated
    content = chunk * (size // len(chunk))
    digest = hashlib.sha256(content).hexdigest()
    with SlotStore() as store:
        before = _shmem_bytes()
        t0 = time.perf_counter()
        run = store.add_run(content)
        (seg,) = store.seal_pending()
        build_s = time.perf_counter() - t0
        del content
        assert abs(_shmem_bytes() - before - size) < tolerance
        ro = seg.readonly_fd()
        try:
            target = _mapping_target(spawn, ro)
            addr = int(target.command(f"map {ro} 0 {size}"))
        finally:
            os.close(ro)
        assert addr > 0
        store.incref(run)
        assert store.decref(run)  # procksm lets go
        assert seg.closed and store.stats().bytes_held == 0
        assert abs(_shmem_bytes() - before - size) < tolerance  # still held by the target
        assert target.command(f"sha {addr:#x} {size}") == digest
        target.kill()
        deadline = time.monotonic() + 5
        while _shmem_bytes() - before > tolerance and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _shmem_bytes() - before < tolerance
    print(f"build+seal of a 64 MiB segment: {build_s * 1e3:.1f} ms")
