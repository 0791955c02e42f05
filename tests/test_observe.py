"""COW-break and lifecycle observation (procksm.observe, issue 6).

Pure logic (region bitmaps, the per-target ledger, event decoding, the header the BPF
side shares, the ring buffer's record framing, the loader's manifest) is tested without
privileges. Everything else runs real planted targets
merged by procksm.merge, writes their merged pages the three ways a page can be written
(user mode, the kernel in read(), get_user_pages), and checks the observer's counters
against what was written; the targets verify their own memory at the end.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from procksm import PAGE_SIZE, procfs
from procksm.merge import MergeOptions, merge
from procksm.observe import (
    CowBreak,
    CowLedger,
    CowObserver,
    Event,
    Lifecycle,
    cow_header,
    parse_event,
)
from procksm.observe.bitmaps import bitmap_pages, page_bitmaps
from procksm.observe.bpf_program import BPF_DIR, bpf_source, bpf_unavailable
from procksm.observe.manifest import Manifest, MapSpec, decode, encode, probe_of_function
from procksm.observe.ring_buffer import BUSY_BIT, DISCARD_BIT, take_records
from procksm.procfs import PM_FILE, PM_PRESENT, PM_SWAPPED
from procksm.scanner import AddressRange, ScanOptions
from procksm.unmerge import merged_ranges
from tests.conftest import ROOT, build_c_target, require_privileges, skip_or_fail

P = PAGE_SIZE
N, U = 96, 16  # identical (merged) and unique pages per target
# How long a test waits for an event before it fails. Not a goal: how soon events arrive
# is measured by benchmarks/observe_latency.py (tests assert what arrives, not when).
ARRIVAL_S = 10.0

# --------------------------------------------------------------------------------------
# pure logic
# --------------------------------------------------------------------------------------


def test_header_and_python_agree() -> None:
    """observe/cow_header.py mirrors cow.h: event kinds, counters, settings, the event layout."""
    header = (BPF_DIR / "cow.h").read_text()
    defines = dict(re.findall(r"#define ((?:EV|C|CFG)_[A-Z_]+) (\d+)", header))
    assert defines, "no constants found in cow.h"
    for name, value in defines.items():
        assert getattr(cow_header, name) == int(value), name
    assert f"#define PROCKSM_REGION_SHIFT {cow_header.REGION_SHIFT}" in header
    assert f"#define PROCKSM_BLOOM_BITS {cow_header.BLOOM_BITS}" in header
    assert f"#define PROCKSM_BLOOM_SHIFT {cow_header.BLOOM_SHIFT}" in header
    assert f"#define PROCKSM_BLOOM_MULT {cow_header.BLOOM_MULT:#X}ULL".replace("0X", "0x") in header
    assert cow_header.EVENT_SIZE == 32
    fields = re.search(r"struct procksm_event \{(.*?)\};", header, re.S)
    assert fields is not None
    types = re.findall(r"__([us]\d+) \w+;", fields.group(1))
    fmt = {"u64": "Q", "u32": "I", "s64": "q", "s32": "i"}
    assert "<" + "".join(fmt[t] for t in types) == cow_header.EVENT_FORMAT


def test_bpf_source_is_the_program_with_its_header() -> None:
    src = bpf_source()
    assert '#include "cow.h"' not in src
    assert "struct procksm_event {" in src and "RAW_TRACEPOINT_PROBE(page_fault_user)" in src
    res = subprocess.run(
        [sys.executable, "-m", "procksm.observe", "--ebpf"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
    )
    assert res.returncode == 0 and res.stdout == src


def test_page_bitmaps_layout_and_roundtrip() -> None:
    # page p of a region is bit p % 64 of little-endian word p // 64
    bm = page_bitmaps([512 * 3 + 0, 512 * 3 + 63, 512 * 3 + 64, 512 * 7 + 511])
    assert set(bm) == {3, 7}
    words = np.frombuffer(bm[3], dtype="<u8")
    assert words[0] == (1 | 1 << 63) and words[1] == 1 and not words[2:].any()
    assert np.frombuffer(bm[7], dtype="<u8")[7] == 1 << 63
    rng = np.random.default_rng(1)
    pages = np.unique(rng.integers(0, 1 << 36, 5000, dtype=np.uint64))
    pages = np.concatenate([pages, np.arange(1 << 30, (1 << 30) + 1500, dtype=np.uint64)])
    got = sorted(p for r, bits in page_bitmaps(pages).items() for p in bitmap_pages(r, bits))
    assert got == sorted(int(p) for p in pages)
    assert page_bitmaps([]) == {}


def _entries(*states: str) -> np.ndarray:
    """Pagemap entries: 'm' merged (present file page), 'a' private copy (present anon),
    's' swapped copy, '-' not present."""
    code = {
        "m": PM_PRESENT | PM_FILE,
        "a": PM_PRESENT,
        "s": PM_SWAPPED,
        "-": np.uint64(0),
    }
    return np.array([code[s] for s in states], dtype=np.uint64)


def test_ledger_counts_each_page_once() -> None:
    led = CowLedger(1)
    base = 0x10000000
    led.set_ranges([(base, base + 8 * P), (base + 16 * P, base + 20 * P)])
    assert led.record_fault(base + 3 * P + 17, kernel=False)  # any byte of the page
    assert not led.record_fault(base + 3 * P, kernel=False)  # the now-private page
    assert led.record_fault(base + 17 * P, kernel=True)
    assert not led.record_fault(base + 9 * P, kernel=False)  # between the ranges
    c = led.counters()
    assert (c.cow_breaks, c.user, c.kernel, c.reconciled) == (2, 1, 1, 0)
    assert [(r.pages, r.cow_breaks, r.broken) for r in c.ranges] == [(8, 1, 1), (4, 1, 1)]
    assert c.merged_pages == 10 and c.broken_pages == 2
    armed = set(led.armed_pages().tolist())
    assert base // P + 3 not in armed and base // P + 17 not in armed and len(armed) == 10


def test_ledger_reconcile_finds_silent_copies_and_rearms_dropped_ones() -> None:
    led = CowLedger(1)
    base = 0x20000000
    led.set_ranges([(base, base + 6 * P)])
    led.record_fault(base, kernel=False)  # page 0: counted from its fault, not copied yet
    # page 2 copied without a fault (process_vm_writev), page 4 copied and swapped out
    assert led.reconcile_chunk(base, _entries("m", "m", "a", "m", "s", "-")) == [
        base + 2 * P,
        base + 4 * P,
    ]
    led.end_reconcile()
    c = led.counters()
    assert (c.cow_breaks, c.user, c.reconciled, c.broken_pages) == (3, 1, 2, 3)
    # page 0 still reads as merged a whole period later: its write never copied it
    # (e.g. the fault ended in SIGSEGV) -> armed again; page 2 was dropped
    # (MADV_DONTNEED: not present) -> armed again; page 4 stays a copy
    assert led.reconcile_chunk(base, _entries("m", "m", "-", "m", "s", "-")) == []
    c = led.counters()
    assert c.broken_pages == 1 and c.cow_breaks == 3
    assert led.record_fault(base + 2 * P, kernel=False)  # a new break of page 2
    assert led.counters().ranges[0].cow_breaks == 4


def test_ledger_keeps_to_the_layout_and_forks() -> None:
    led = CowLedger(1)
    base = 0x30000000
    led.set_ranges([(base, base + 10 * P)])
    for i in (1, 5, 8):
        led.record_fault(base + i * P, kernel=False)
    # the layout says pages 4..5 are no procksm mapping any more (munmap, mremap away):
    # the range splits, page 5's state leaves
    assert led.restrict([(base, base + 4 * P), (base + 6 * P, base + 10 * P)])
    assert not led.restrict([(base, base + 4 * P), (base + 6 * P, base + 10 * P)])
    assert led.range_bounds() == [(base, base + 4 * P), (base + 6 * P, base + 10 * P)]
    assert not led.watches(base + 4 * P) and led.watches(base + 6 * P)
    assert not led.record_fault(base + 4 * P, kernel=False)  # not watched there
    assert not led.record_fault(base + 8 * P, kernel=False)  # counted already
    # a forked child: same mapping; pages the parent copied are private there too
    kid = led.child(2)
    assert kid.counters().cow_breaks == 0
    assert not kid.record_fault(base + P, kernel=False)
    assert kid.record_fault(base + 2 * P, kernel=False)
    # set_ranges keeps the state of pages that stay watched
    led.set_ranges([(base, base + 2 * P)])
    assert not led.record_fault(base + P, kernel=False)
    assert led.counters().cow_breaks == 3
    led.set_ranges([(base, base + 8 * P)])
    assert led.restrict([(base + 2 * P, base + 3 * P)])
    assert led.range_bounds() == [(base + 2 * P, base + 3 * P)]


def test_parse_event() -> None:
    def raw(kind: int, aux: int = 0, addr: int = 0) -> bytes:
        return struct.pack(cow_header.EVENT_FORMAT, 99, kind, 7, 8, aux, addr)

    assert parse_event(raw(cow_header.EV_COW_KERNEL, 3, 0x1000)) == CowBreak(
        7, 0x1000, kernel=True, tid=8, error_code=3, ts_ns=99
    )
    assert parse_event(raw(cow_header.EV_FORK, 1234)) == Lifecycle(
        "fork", 7, tid=8, child_pid=1234, ts_ns=99
    )
    assert parse_event(raw(cow_header.EV_EXEC, 9)) == Lifecycle("exec", 7, tid=9, ts_ns=99)
    assert parse_event(raw(cow_header.EV_EXIT)) == Lifecycle("exit", 7, tid=8, ts_ns=99)
    for kind in (6, 99):  # 6 was mmap: no memory-call events any more
        with pytest.raises(ValueError):
            parse_event(raw(kind))


def fake_ring(size: int, start: int, records: list[tuple[bytes, int]]) -> memoryview:
    """A ring buffer's data area as the kernel leaves it: ``records`` (payload, flag bits)
    written from byte position ``start`` on, each an 8-byte header (length | flags,
    page offset) and its payload padded to 8 bytes; mapped twice in a row, so a record
    that wraps around the end reads contiguously (kernel/bpf/ringbuf.c)."""
    ring = bytearray(size)
    pos = start
    for payload, flags in records:
        rec = struct.pack("=II", len(payload) | flags, 0) + payload
        rec += bytes(-len(rec) % 8)
        for i, b in enumerate(rec):
            ring[(pos + i) % size] = b
        pos += len(rec)
    return memoryview(bytes(ring * 2))


def take(ring: memoryview, cons: int, prod: int) -> tuple[list[bytes], int]:
    words = ring.cast("I")
    return take_records(
        words, lambda off, n: bytes(ring[off : off + n]), cons, prod, len(ring) // 2 - 1
    )


def test_ring_buffer_records_are_framed_as_the_kernel_writes_them() -> None:
    size = 256
    recs = [(b"a" * 5, 0), (b"b" * 64, DISCARD_BIT), (b"c" * 8, 0), (b"d" * 3, BUSY_BIT), (b"e", 0)]
    ring = fake_ring(size, 0, recs)
    # 5 + 8 -> 16 bytes, 64 + 8 -> 72, 8 + 8 -> 16: the busy one at 104 stops the batch
    got, pos = take(ring, 0, 130)
    assert got == [b"a" * 5, b"c" * 8] and pos == 104
    assert take(ring, 0, 16) == ([b"a" * 5], 16)  # the producer's position bounds it
    assert take(ring, 16, 16) == ([], 16)
    # counters only grow: position 3 * size + 16 is byte 16 of the ring
    assert take(ring, 3 * size + 16, 3 * size + 104) == ([b"c" * 8], 3 * size + 104)


def test_ring_buffer_record_wrapping_around_the_end() -> None:
    size = 128
    start = 5 * size - 24  # a 64-byte record from byte 104: its end is in the next lap
    ring = fake_ring(size, start, [(bytes(range(64)), 0), (b"next", 0)])
    got, pos = take(ring, start, start + 72 + 16)
    assert got == [bytes(range(64)), b"next"] and pos == start + 88


def test_loader_manifest_roundtrip_and_probe_names() -> None:
    probes = tuple(
        p
        for f in ("raw_tracepoint__page_fault_user", "tracepoint__sched__sched_process_fork",
                  "count", "tracepoint__nocategory")
        if (p := probe_of_function(f)) is not None
    )  # fmt: skip
    assert [(p.kind, p.target) for p in probes] == [
        ("raw_tracepoint", "page_fault_user"),
        ("tracepoint", "sched:sched_process_fork"),
    ]
    doc = Manifest(
        (MapSpec("events", 27, 0, 0, 1 << 18, 0), MapSpec("totals", 6, 4, 8, 6, 0)), probes
    )
    assert decode(encode(doc)) == doc and doc.fd_count == 4
    assert doc.map_named("totals").value_size == 8
    assert decode(encode("the BPF program did not load (x)")) == "the BPF program did not load (x)"
    for bad in (b"{}", b"[1]", b"not json", encode(doc).replace(b"tracepoint", b"kprobe")):
        with pytest.raises(ValueError):
            decode(bad)


# --------------------------------------------------------------------------------------
# real targets
# --------------------------------------------------------------------------------------


def require_bpf() -> None:
    require_privileges()
    reason = bpf_unavailable()
    if reason:
        skip_or_fail(f"eBPF observation unavailable: {reason}")


def region(t: Any, name: str) -> tuple[int, int]:
    start = t.int(name)
    return start, start + t.int(name + "_pages") * P


@pytest.fixture
def pair(spawn: Any) -> list[Any]:
    """Two planted targets whose identical regions are merged with each other."""
    require_privileges()
    exe = build_c_target("planted")
    ts = [spawn([exe, "--identical", N, "--unique", U, "--seed", 23]) for _ in range(2)]
    opts = ScanOptions(ranges=[AddressRange(*region(t, "identical")) for t in ts])
    assert merge([t.pid for t in ts], MergeOptions(selection=opts)).pages_merged == 2 * N
    for t in ts:
        assert watched(t) == [region(t, "identical")]
    return ts


def watched(t: Any) -> list[tuple[int, int]]:
    return [(v.start, v.end) for v in merged_ranges(t.pid)]


@pytest.fixture
def bpf_observer() -> Iterator[CowObserver]:
    require_bpf()
    with CowObserver(use_bpf=True, reconcile_interval_s=3600) as obs:
        assert obs.mode == "bpf" and obs.fallback_reason is None
        yield obs


def collect(
    obs: CowObserver, until: Callable[[list[Event]], bool], timeout: float
) -> tuple[list[Event], float]:
    """Poll until ``until(events so far)`` or the timeout; returns events and seconds."""
    t0 = time.monotonic()
    events: list[Event] = []
    while True:
        events += obs.poll(0.05)
        if until(events) or time.monotonic() - t0 > timeout:
            return events, time.monotonic() - t0


def breaks(events: list[Event], pid: int) -> list[CowBreak]:
    return [e for e in events if isinstance(e, CowBreak) and e.pid == pid]


def mem_write(pid: int, addr: int, value: int) -> None:
    """A write through get_user_pages (FOLL_FORCE): copies the page, no fault event."""
    fd = os.open(f"/proc/{pid}/mem", os.O_RDWR)
    try:
        assert os.pwrite(fd, bytes([value]), addr) == 1
    finally:
        os.close(fd)


class _Iovec(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]


def vm_write(pid: int, addr: int, value: int) -> None:
    """process_vm_writev: get_user_pages again, no fault in the target."""
    libc = ctypes.CDLL(None, use_errno=True)
    buf = ctypes.create_string_buffer(bytes([value]), 1)
    local, remote = _Iovec(ctypes.addressof(buf), 1), _Iovec(addr, 1)
    fn = libc.process_vm_writev
    fn.restype = ctypes.c_ssize_t
    n = fn(pid, ctypes.byref(local), 1, ctypes.byref(remote), 1, 0)
    assert n == 1, os.strerror(ctypes.get_errno())


def byte0(pid: int, addr: int) -> int:
    fd = os.open(f"/proc/{pid}/mem", os.O_RDONLY)
    try:
        return os.pread(fd, 1, addr)[0]
    finally:
        os.close(fd)


def write_pages(t: Any, pages: list[int]) -> None:
    for i in pages:
        assert t.command(f"write identical {i}") == "OK"


def gup_writes(t: Any, pages: list[int]) -> None:
    """Half through /proc/PID/mem, half with process_vm_writev; the target is told."""
    start, _ = region(t, "identical")
    for k, i in enumerate(pages):
        addr = start + i * P
        v = (byte0(t.pid, addr) + 1) & 0xFF
        (mem_write if k % 2 else vm_write)(t.pid, addr, v)
        assert t.command(f"expect identical {i} {v}") == "OK"


USER = [3, 4, 40, 41, 42, 95, 0]  # K = 7 distinct merged pages
KERNEL = [60, 61, 62]  # read() into these
GUP = [70, 80]


def test_user_writes_count_exactly_k(pair: Any, bpf_observer: CowObserver) -> None:
    a, b = pair
    obs = bpf_observer
    obs.set_ranges(a.pid, watched(a))
    obs.set_ranges(b.pid, watched(b))
    assert obs.counters(a.pid).cow_breaks == 0
    write_pages(a, USER)
    write_pages(a, [3, 4, 0])  # the same pages again: private now, not a break
    for i in range(4):  # pages that were never merged: not counted
        assert a.command(f"write unique {i}") == "OK"
    events, _ = collect(obs, lambda ev: len(breaks(ev, a.pid)) >= len(USER), ARRIVAL_S)
    start, end = region(a, "identical")
    got = breaks(events, a.pid)
    assert sorted(e.addr for e in got) == sorted(start + i * P for i in USER)
    assert not any(e.kernel or e.reconciled for e in got)
    assert {e.error_code for e in got} == {0x7}  # present | write | user
    events += obs.poll(0.3)  # nothing more arrives
    assert len(breaks(events, a.pid)) == len(USER) and not breaks(events, b.pid)
    c = obs.counters(a.pid)
    assert (c.cow_breaks, c.user, c.kernel, c.reconciled) == (len(USER), len(USER), 0, 0)
    assert [(r.start, r.end, r.cow_breaks, r.broken) for r in c.ranges] == [
        (start, end, len(USER), len(USER))
    ]
    assert c.merged_pages == N - len(USER)
    # pagemap agrees: nothing for reconciliation to add
    assert obs.reconcile(a.pid) == 0 and obs.counters(a.pid).cow_breaks == len(USER)
    assert obs.counters(b.pid).cow_breaks == 0
    totals = obs.kernel_totals()
    assert totals["cow_user"] == len(USER) and totals["lost"] == 0
    for t in pair:
        assert t.command("check").startswith("OK")


def test_read_into_merged_pages_counts_as_kernel_writes(
    pair: Any, bpf_observer: CowObserver
) -> None:
    a, _ = pair
    obs = bpf_observer
    obs.set_ranges(a.pid, watched(a))
    assert a.command(f"readinto identical {KERNEL[0]} {len(KERNEL)}") == "OK"
    assert a.command(f"readinto identical {KERNEL[0]} {len(KERNEL)}") == "OK"  # again
    events, _ = collect(obs, lambda ev: len(breaks(ev, a.pid)) >= len(KERNEL), ARRIVAL_S)
    start, _ = region(a, "identical")
    got = breaks(events, a.pid)
    assert sorted(e.addr for e in got) == [start + i * P for i in KERNEL]
    assert all(e.kernel for e in got)
    assert {e.error_code for e in got} == {0x3}  # present | write, from the kernel
    c = obs.counters(a.pid)
    assert (c.cow_breaks, c.user, c.kernel) == (len(KERNEL), 0, len(KERNEL))
    assert obs.reconcile(a.pid) == 0
    assert a.command("check").startswith("OK")


def test_gup_writes_are_found_by_reconcile(pair: Any, bpf_observer: CowObserver) -> None:
    a, _ = pair
    obs = bpf_observer
    obs.set_ranges(a.pid, watched(a))
    gup_writes(a, GUP)
    events, _ = collect(obs, lambda ev: False, 0.5)
    assert not breaks(events, a.pid), "a write through get_user_pages showed a fault"
    assert obs.counters(a.pid).cow_breaks == 0
    assert obs.reconcile(a.pid) == len(GUP)
    start, _ = region(a, "identical")
    got = breaks(obs.poll(0), a.pid)
    assert sorted(e.addr for e in got) == [start + i * P for i in GUP]
    assert all(e.reconciled for e in got)
    c = obs.counters(a.pid)
    assert (c.cow_breaks, c.reconciled, c.broken_pages) == (len(GUP), len(GUP), len(GUP))
    # a later user write to a copied page is not a break; a merged one is
    write_pages(a, [GUP[0], 1])
    collect(obs, lambda ev: len(breaks(ev, a.pid)) >= 1, ARRIVAL_S)
    assert obs.reconcile(a.pid) == 0
    assert obs.counters(a.pid).cow_breaks == len(GUP) + 1
    assert a.command("check").startswith("OK")


def test_dontneed_rearms_and_a_write_to_a_dropped_page_counts(spawn: Any) -> None:
    """Without procksm's madvise guard, MADV_DONTNEED on a merged range drops the PTEs:
    a copied page reads the memfd content again (so its next write is a new break, once a
    reconcile re-armed it; a write before that is not counted), and
    a write to a dropped page COWs from the memfd with a not-present fault (0x6)."""
    require_bpf()
    exe = build_c_target("planted")
    ts = [spawn([exe, "--identical", N, "--seed", 29]) for _ in range(2)]
    opts = ScanOptions(ranges=[AddressRange(*region(t, "identical")) for t in ts])
    merge([t.pid for t in ts], MergeOptions(selection=opts, guard=False))
    a = ts[0]
    start, _ = region(a, "identical")
    orig = byte0(a.pid, start + 8 * P)
    with CowObserver(use_bpf=True, reconcile_interval_s=3600) as obs:
        obs.set_ranges(a.pid, watched(a))
        write_pages(a, [8])
        ev, _ = collect(obs, lambda ev: bool(breaks(ev, a.pid)), ARRIVAL_S)
        assert [(e.addr, e.error_code) for e in breaks(ev, a.pid)] == [(start + 8 * P, 0x7)]
        for i in (7, 8):  # 7 never written, 8 a private copy
            assert a.command(f"madvise identical {i} 1 dontneed") == "OK"
        assert a.command(f"expect identical 8 {orig}") == "OK"  # the memfd's content
        # No event says the pages were dropped: the reconcile re-arms page 8 once it was
        # counted before the previous one (its copy may have been in flight), so two.
        assert obs.counters(a.pid).broken_pages == 1
        assert obs.reconcile(a.pid) == 0 and obs.counters(a.pid).broken_pages == 1
        assert obs.reconcile(a.pid) == 0 and obs.counters(a.pid).broken_pages == 0
        for i in (7, 8):  # a store without a read first: the page is not present
            assert a.command(f"set identical {i} 77") == "OK"
        ev, _ = collect(obs, lambda ev: len(breaks(ev, a.pid)) >= 2, ARRIVAL_S)
        got = sorted((e.addr, e.error_code) for e in breaks(ev, a.pid))
        assert got == [(start + 7 * P, 0x6), (start + 8 * P, 0x6)]  # not present | write | user
        assert obs.reconcile(a.pid) == 0
        c = obs.counters(a.pid)
        assert (c.cow_breaks, c.broken_pages, c.ranges[0].cow_breaks) == (3, 2, 3)
        assert a.command("check").startswith("OK")


def test_fresh_memory_where_merged_pages_were_is_no_break(
    pair: Any, bpf_observer: CowObserver
) -> None:
    """No event says that a target unmapped merged pages, so their bits stay armed until
    the next reconcile: a write to fresh memory mapped at the same address meanwhile
    faults on them. The observer checks the address: no break, and the ranges that went
    away leave the watch at once; a range unmapped without such a write leaves at the
    next reconcile, mremap'd pages too (they are watched again from the next
    set_ranges)."""
    a, b = pair
    obs = bpf_observer
    obs.set_ranges(a.pid, watched(a))
    start, end = region(a, "identical")
    write_pages(a, [3])  # a real break first
    ev, _ = collect(obs, lambda ev: bool(breaks(ev, a.pid)), ARRIVAL_S)
    assert [e.addr for e in breaks(ev, a.pid)] == [start + 3 * P]
    assert a.command("munmap identical 20 2") == "OK"  # no write follows
    assert a.command("munmap identical 10 2") == "OK"
    assert a.command("refill identical 10 2") == "OK"  # fresh pages, written
    # the kernel saw the armed bits of pages 10 and 11 (else this test shows nothing)
    assert obs.kernel_totals()["cow_user"] == 3
    ev, _ = collect(obs, lambda ev: False, 0.5)
    assert not breaks(ev, a.pid), "a write to fresh memory was counted as a COW break"
    c = obs.counters(a.pid)
    assert (c.cow_breaks, c.user) == (1, 1)
    # the write's check re-read the layout: both unmapped ranges left the watch
    assert [(r.start, r.end) for r in c.ranges] == [
        (start, start + 10 * P),
        (start + 12 * P, start + 20 * P),
        (start + 22 * P, end),
    ]
    assert c.merged_pages == N - 4 - 1
    # mremap away (the other target, whose merged region is whole): the pages leave at
    # the next reconcile; the new place is watched once set_ranges is called again (as
    # the daemon does after each merge)
    obs.set_ranges(b.pid, watched(b))
    reply = b.command("mremap identical move")
    assert reply.startswith("OK addr="), reply
    assert obs.counters(b.pid).merged_pages == N
    assert obs.reconcile(b.pid) == 0 and obs.counters(b.pid).ranges == ()
    new = int(reply.split("=")[1], 16)
    obs.set_ranges(b.pid, watched(b))
    assert obs.counters(b.pid).merged_pages == N
    write_pages(b, [40])
    ev, _ = collect(obs, lambda ev: bool(breaks(ev, b.pid)), ARRIVAL_S)
    assert [e.addr for e in breaks(ev, b.pid)] == [new + 40 * P]
    for t in pair:
        assert t.command("check").startswith("OK")


def _programs_run_counts(ids: set[int]) -> dict[int, tuple[str, int]]:
    """Program id -> (name, run_cnt) from bpftool (run_cnt counts with bpf_stats)."""
    out = subprocess.run(["bpftool", "-j", "prog", "show"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return {
        int(p["id"]): (p.get("name", ""), int(p.get("run_cnt", 0)))
        for p in json.loads(out.stdout)
        if int(p["id"]) in ids
    }


@contextlib.contextmanager
def bpf_stats() -> Iterator[None]:
    path = Path("/proc/sys/kernel/bpf_stats_enabled")
    old = path.read_text().strip()
    path.write_text("1")
    try:
        yield
    finally:
        path.write_text(old)


def test_other_processes_syscalls_run_no_program_and_no_syscall_tracepoint_is_on(
    pair: Any, bpf_observer: CowObserver
) -> None:
    """A syscalls:* tracepoint costs every system call of every process on the machine
    (+34 % per getppid, docs/design.md §11) even when its program returns at once: the
    observer attaches none. A process that is not a target makes the memory calls the
    observer once watched; no program of the observer runs for them."""
    if shutil.which("bpftool") is None:
        skip_or_fail("bpftool is not installed")
    a, _ = pair
    obs = bpf_observer
    obs.set_ranges(a.pid, watched(a))
    out = subprocess.run(["bpftool", "-j", "perf", "list"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    ours = [p for p in json.loads(out.stdout) if p["pid"] == os.getpid()]
    assert sorted(p.get("tracepoint", "") for p in ours) == [
        "page_fault_kernel",
        "page_fault_user",
        "sched_process_exec",
        "sched_process_exit",
        "sched_process_fork",
        "task_newtask",
    ]
    progs, _ = own_bpf_ids()
    calls = 200_000
    code = textwrap.dedent(
        f"""
        import ctypes, mmap
        libc = ctypes.CDLL(None)
        m = mmap.mmap(-1, 4096)
        addr = ctypes.addressof(ctypes.c_char.from_buffer(m))
        for _ in range({calls} // 2):
            libc.madvise(ctypes.c_void_p(addr), 4096, 0)  # MADV_NORMAL
            libc.brk(ctypes.c_void_p(0))  # the current break: changes nothing
        """
    )
    with bpf_stats():
        before = _programs_run_counts(progs)
        subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
        after = _programs_run_counts(progs)
    assert set(before) == progs
    # The fault programs run for every fault on the machine, the sched ones for every
    # fork/exec/exit: none of them for a system call. A program on a syscall tracepoint
    # would have run at least once per call.
    ran = {name: after[i][1] - before[i][1] for i, (name, _) in before.items()}
    assert sum(n for name, n in ran.items() if "page_fault" not in name) < calls // 10, ran
    assert a.command("check").startswith("OK")


def test_reconcile_within_its_period(pair: Any) -> None:
    """poll() reconciles by itself every reconcile_interval_s."""
    require_bpf()
    a, _ = pair
    with CowObserver(use_bpf=True, reconcile_interval_s=0.5) as obs:
        obs.set_ranges(a.pid, watched(a))
        gup_writes(a, GUP)
        # no explicit reconcile() here: poll() finds the GUP writes by itself
        events, _ = collect(obs, lambda ev: len(breaks(ev, a.pid)) >= len(GUP), ARRIVAL_S)
        got = breaks(events, a.pid)
        assert len(got) == len(GUP) and all(e.reconciled for e in got)


def test_detached_probes_cost_nothing_and_miss_nothing(pair: Any) -> None:
    """detach_probes: no fault event at all; attach_probes reconciles what was written."""
    require_bpf()
    a, _ = pair
    with CowObserver(use_bpf=True, reconcile_interval_s=3600) as obs:
        obs.set_ranges(a.pid, watched(a))
        obs.detach_probes()
        assert not obs.probes_attached
        progs, _ = own_bpf_ids()
        write_pages(a, USER)
        assert not obs.poll(0.3)
        assert obs.kernel_totals()["cow_user"] == 0  # the programs did not run
        obs.attach_probes()
        assert obs.probes_attached and own_bpf_ids()[0] >= progs
        got = breaks(obs.poll(0), a.pid)
        assert len(got) == len(USER) and all(e.reconciled for e in got)
        write_pages(a, [1])  # and faults count again
        ev, _ = collect(obs, lambda ev: bool(breaks(ev, a.pid)), ARRIVAL_S)
        assert [e.reconciled for e in breaks(ev, a.pid)] == [False]
        assert obs.counters(a.pid).cow_breaks == len(USER) + 1


def lifecycle(events: list[Event], kind: str, pid: int) -> list[Lifecycle]:
    return [e for e in events if isinstance(e, Lifecycle) and e.kind == kind and e.pid == pid]


def test_fork_cows_of_unrelated_pages_are_not_counted(pair: Any) -> None:
    require_bpf()
    a, _ = pair
    with CowObserver(use_bpf=True, reconcile_interval_s=3600) as obs:
        obs.set_ranges(a.pid, watched(a))
        # children that write: an unrelated page, and a merged page (the child is not
        # a target: its copy is its own)
        assert a.command("probe unique 0") == "CHILD exit=0"
        assert a.command("probe identical 5") == "CHILD exit=0"
        assert a.command("fork").startswith("CHILD exit=0 OK")
        # the parent after fork: its private pages are write-protected, so writing them
        # faults (a fork COW), and they are not merged pages
        for i in range(U):
            assert a.command(f"write unique {i}") == "OK"
        events, _ = collect(obs, lambda ev: len(lifecycle(ev, "fork", a.pid)) >= 3, ARRIVAL_S)
        assert len(lifecycle(events, "fork", a.pid)) == 3
        assert all(e.child_pid > 0 for e in lifecycle(events, "fork", a.pid))
        events += obs.poll(0.3)
        assert not [e for e in events if isinstance(e, CowBreak)]
        assert obs.reconcile(a.pid) == 0
        assert obs.counters(a.pid).cow_breaks == 0
        # and the parent's own write to a merged page still counts
        write_pages(a, [5])
        events, _ = collect(obs, lambda ev: bool(breaks(ev, a.pid)), ARRIVAL_S)
        assert [e.addr for e in breaks(events, a.pid)] == [region(a, "identical")[0] + 5 * P]
        assert a.command("check").startswith("OK")


def test_lifecycle_events_arrive(pair: Any) -> None:
    """Every lifecycle event (fork, exec, exit) of a target and of its followed child
    arrives, in order (how soon: benchmarks/observe_latency.py)."""
    require_bpf()
    a, _ = pair
    true = shutil.which("true")
    assert true
    with CowObserver(use_bpf=True, reconcile_interval_s=3600, follow_children=True) as obs:
        obs.set_ranges(a.pid, watched(a))

        def step(cmd: str, done: Callable[[list[Event]], bool]) -> list[Event]:
            reply = a.command(cmd)
            assert reply.startswith(("OK", "CHILD exit=0")), reply
            events, _ = collect(obs, done, ARRIVAL_S)
            assert done(events), (cmd, events)
            return events

        # exec and exit of a child: followed from its fork on, in the kernel
        def exited(ev: list[Event]) -> bool:
            return any(isinstance(e, Lifecycle) and e.kind == "exit" for e in ev)

        ev = step(f"exec {true}", exited)
        (fork,) = lifecycle(ev, "fork", a.pid)
        kid = fork.child_pid
        assert lifecycle(ev, "exec", kid) and lifecycle(ev, "exit", kid)
        assert ev.index(lifecycle(ev, "exec", kid)[0]) < ev.index(lifecycle(ev, "exit", kid)[0])
        # exit of the target itself
        a.proc.stdin.write("quit\n")
        a.proc.stdin.flush()
        ev, _ = collect(obs, lambda ev: bool(lifecycle(ev, "exit", a.pid)), ARRIVAL_S)
        assert lifecycle(ev, "exit", a.pid)
        assert a.pid not in obs.targets()
        assert obs.counters(a.pid).ranges == ()


def test_exec_and_exit_of_a_target() -> None:
    """A process made a target by set_ranges (not followed from a fork): exec, exit."""
    require_bpf()
    code = "import sys, os; sys.stdin.readline(); os.execv('/bin/true', ['true'])"
    sleeper = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE)
    try:
        with CowObserver(use_bpf=True, reconcile_interval_s=3600) as obs:
            obs.set_ranges(sleeper.pid, [])  # a target with nothing merged: lifecycle only
            assert sleeper.stdin is not None
            sleeper.stdin.write(b"\n")
            sleeper.stdin.flush()
            ev, _ = collect(obs, lambda ev: bool(lifecycle(ev, "exit", sleeper.pid)), ARRIVAL_S)
            assert lifecycle(ev, "exec", sleeper.pid) and lifecycle(ev, "exit", sleeper.pid)
    finally:
        sleeper.kill()
        sleeper.wait()


def test_pagemap_fallback_gives_the_same_counters(pair: Any) -> None:
    """BPF and pagemap observers side by side on one target: the same counts."""
    require_bpf()
    a, _ = pair
    warnings: list[str] = []
    with (
        CowObserver(use_bpf=True, reconcile_interval_s=3600) as fast,
        CowObserver(use_bpf=False, warn=warnings.append) as slow,
    ):
        assert slow.mode == "pagemap" and slow.fallback_reason
        assert len(warnings) == 1 and "--no-bpf" in warnings[0] and "\n" not in warnings[0]
        for obs in (fast, slow):
            obs.set_ranges(a.pid, watched(a))
        write_pages(a, USER)
        assert a.command(f"readinto identical {KERNEL[0]} {len(KERNEL)}") == "OK"
        gup_writes(a, GUP)
        want = len(USER) + len(KERNEL) + len(GUP)
        collect(fast, lambda ev: len(breaks(ev, a.pid)) >= len(USER) + len(KERNEL), ARRIVAL_S)
        fast.reconcile(a.pid)
        ev, _ = collect(slow, lambda ev: len(breaks(ev, a.pid)) >= want, ARRIVAL_S)
        assert len(breaks(ev, a.pid)) == want
        cf, cs = fast.counters(a.pid), slow.counters(a.pid)
        assert cf.cow_breaks == cs.cow_breaks == want
        assert (cf.user, cf.kernel, cf.reconciled) == (len(USER), len(KERNEL), len(GUP))
        assert cs.reconciled == want  # pagemap cannot tell who wrote
        assert [(r.start, r.end, r.cow_breaks, r.broken) for r in cf.ranges] == [
            (r.start, r.end, r.cow_breaks, r.broken) for r in cs.ranges
        ]
        # the pagemap observer sees an exit too
        a.kill()
        ev, _ = collect(slow, lambda ev: bool(lifecycle(ev, "exit", a.pid)), ARRIVAL_S)
        assert lifecycle(ev, "exit", a.pid)


def test_without_capabilities_it_falls_back_with_a_one_line_reason(tmp_path: Path) -> None:
    require_privileges()
    setpriv = shutil.which("setpriv")
    if not setpriv:
        skip_or_fail("setpriv (util-linux) is not installed")
    code = textwrap.dedent(
        """
        import json
        from procksm.observe import CowObserver
        with CowObserver() as obs:
            print(json.dumps([obs.mode, obs.fallback_reason]))
        """
    )
    drop = "-bpf,-perfmon,-sys_admin"
    res = subprocess.run(
        [setpriv, f"--inh-caps={drop}", f"--bounding-set={drop}", sys.executable, "-c", code],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
    )
    assert res.returncode == 0, res.stderr
    mode, reason = json.loads(res.stdout)
    assert mode == "pagemap" and "CAP_BPF" in reason
    (line,) = res.stderr.strip().splitlines()
    assert line.startswith("procksm: warning: no CAP_BPF") and "root" in line


def observer_process(code: str = "", env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    """A process (its own session: the whole group can be killed) that makes a
    CowObserver, prints its mode and reason as JSON once it is made, and waits."""
    code = code or textwrap.dedent(
        """
        import json, sys
        from procksm.observe import CowObserver
        obs = CowObserver()
        print(json.dumps([obs.mode, obs.fallback_reason, "bcc" in sys.modules]), flush=True)
        input()
        """
    )
    return subprocess.Popen(
        [sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True, cwd=ROOT, env=env, start_new_session=True,
    )  # fmt: skip


def is_loader(pid: int) -> bool:
    with contextlib.suppress(OSError):
        return b"procksm.observe.bcc_loader" in Path(f"/proc/{pid}/cmdline").read_bytes()
    return False


def loader_of(proc: subprocess.Popen[str], timeout: float = 30) -> int:
    """The pid of ``proc``'s loader child (procksm.observe.bcc_loader), once it runs."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for kid in procfs.children(proc.pid):
            if is_loader(kid):
                return kid
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.002)
    raise AssertionError("no loader child started")


def ended(proc: subprocess.Popen[str]) -> tuple[str, str, str]:
    """(mode, reason, stderr) of an observer_process that fell back, once it is told to end."""
    out, err = proc.communicate("\n", timeout=60)
    mode, reason, _bcc = json.loads(out)
    return mode, reason, err


def test_a_broken_bcc_in_the_loader_gives_the_one_line_reason(tmp_path: Path) -> None:
    """bcc's module is found but does not import (e.g. libbcc.so missing): the loader
    child says why, and the observer falls back to pagemap with that one line."""
    require_bpf()
    fake = tmp_path / "bcc"
    fake.mkdir()
    (fake / "__init__.py").write_text(
        "raise ImportError('libbcc.so.0: cannot open shared object file')\n"
    )
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{ROOT}"}
    mode, reason, err = ended(observer_process(env=env))
    assert mode == "pagemap"
    assert reason.startswith("bcc is not importable from") and "libbcc.so.0" in reason
    assert "python3-bpfcc" in reason and "\n" not in reason
    (line,) = err.strip().splitlines()
    tail = "; COW breaks are found by pagemap polling every 0.2 s instead of eBPF"
    assert line == f"procksm: warning: {reason}{tail}"


def test_a_killed_loader_gives_the_one_line_reason() -> None:
    require_bpf()
    proc = observer_process()
    os.kill(loader_of(proc), signal.SIGKILL)
    mode, reason, err = ended(proc)
    assert mode == "pagemap" and "\n" not in reason
    assert (
        reason.startswith("the BPF loader (")
        and "exited with status -9 before handing over" in reason
    )
    assert len(err.strip().splitlines()) == 1


def test_the_daemon_maps_no_bcc_or_llvm(spawn: Any, daemons: Any, tmp_path: Path) -> None:
    """The daemon's observer runs in bpf mode without bcc or LLVM in its process: the
    loader child compiled the program and is gone."""
    require_bpf()
    exe = build_c_target("planted")
    a, b = (spawn([exe, "--identical", 64, "--seed", 3]) for _ in range(2))
    d = daemons(tmp_path / "c.sock", [a.pid, b.pid], "--cpu-limit", 0, "-q")
    assert d.stats()["observer"] == "bpf"
    progs, maps = own_bpf_ids(d.proc.pid)  # the program runs from this process's fds
    assert len(progs) == 6 and len(maps) >= 7  # 2 raw tracepoints, 4 sched/task
    mapped = Path(f"/proc/{d.proc.pid}/maps").read_text()
    assert re.search(r"/libc\.so", mapped)  # the shared libraries it loaded are listed
    assert not re.findall(r"\S*(?:libbcc|libLLVM|libclang)\S*", mapped)
    assert not [k for k in procfs.children(d.proc.pid) if is_loader(k)]  # and gone


# --------------------------------------------------------------------------------------
# nothing left behind
# --------------------------------------------------------------------------------------


def own_bpf_ids(pid: int | str = "self") -> tuple[set[int], set[int]]:
    """(program ids, map ids) of the BPF objects whose fds ``pid`` holds."""
    progs: set[int] = set()
    maps: set[int] = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            info = Path(f"/proc/{pid}/fdinfo/{fd}").read_text()
        except OSError:
            continue
        if m := re.search(r"^prog_id:\s+(\d+)", info, re.M):
            progs.add(int(m.group(1)))
        if m := re.search(r"^map_id:\s+(\d+)", info, re.M):
            maps.add(int(m.group(1)))
    return progs, maps


def system_bpf_ids() -> tuple[set[int], set[int]] | None:
    """Every loaded program and map id (bpftool), or None without bpftool."""
    tool = shutil.which("bpftool")
    if tool is None:
        return None
    ids = []
    for what in ("prog", "map"):
        out = subprocess.run([tool, "-j", what, "list"], capture_output=True, text=True)
        assert out.returncode == 0, out.stderr
        ids.append({int(x["id"]) for x in json.loads(out.stdout or "[]")})
    return ids[0], ids[1]


def assert_freed(progs: set[int], maps: set[int]) -> None:
    """The kernel frees a program once its last fd and link are gone, after an RCU grace
    period: measured here, the raw tracepoint programs linger up to ~0.1 s after close."""
    deadline = time.monotonic() + 5
    while True:
        seen = system_bpf_ids()
        assert seen is not None
        left = (progs & seen[0], maps & seen[1])
        if left == (set(), set()):
            return
        assert time.monotonic() < deadline, f"still loaded after 5 s: {left}"
        time.sleep(0.05)


def test_close_detaches_probes_and_frees_maps() -> None:
    require_bpf()
    obs = CowObserver(use_bpf=True)
    progs, maps = own_bpf_ids()
    # 2 raw tracepoints, task_newtask, 3 sched
    assert len(progs) == 6 and len(maps) >= 7
    seen = system_bpf_ids()
    if seen is not None:
        assert progs <= seen[0] and maps <= seen[1]
    obs.close()
    obs.close()  # twice is harmless
    assert own_bpf_ids() == (set(), set())
    if system_bpf_ids() is not None:
        assert_freed(progs, maps)
    assert not [p for p in Path("/sys/fs/bpf").glob("*procksm*")]


def test_a_killed_observer_leaves_no_probes() -> None:
    """SIGKILL: nothing is pinned, so the kernel frees everything with the fds."""
    require_bpf()
    if shutil.which("bpftool") is None:
        skip_or_fail("bpftool is not installed (make setup installs it)")
    code = "from procksm.observe import CowObserver; o = CowObserver(use_bpf=True); print('up', flush=True); input()"  # noqa: E501
    proc = subprocess.Popen(
        [sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, cwd=ROOT
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline() == b"up\n"
        progs, maps = own_bpf_ids(proc.pid)
        assert progs and maps
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
        assert_freed(progs, maps)
    finally:
        proc.kill()
        proc.wait()


def loader_holding_objects(proc: subprocess.Popen[str]) -> int | None:
    """``proc``'s loader child once it holds BPF maps it has not handed over yet (it
    compiles first, then creates the maps and loads the programs one by one); None if
    it handed them over before it was seen holding one."""
    loader = loader_of(proc)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if own_bpf_ids(loader)[1]:
                return loader
        except FileNotFoundError:
            return None
    raise AssertionError("the loader held no BPF map for 60 s")


@pytest.mark.parametrize("killed", ["group", "observer"])
def test_a_kill_while_loading_leaves_nothing(killed: str) -> None:
    """SIGKILL of the observer's whole process group while its loader child holds maps
    and programs it has not handed over yet, or of the observer alone (the loader dies
    with it, PR_SET_PDEATHSIG, and its fds with it): the kernel frees every object."""
    require_bpf()
    if shutil.which("bpftool") is None:
        skip_or_fail("bpftool is not installed (make setup installs it)")
    for _attempt in range(5):
        proc = observer_process()
        try:
            loader = loader_holding_objects(proc)
            if loader is None:
                continue
            os.killpg(proc.pid, signal.SIGSTOP)  # nothing is made or handed over from now on
            held = [own_bpf_ids(pid) for pid in (proc.pid, loader)]
            progs, maps = held[0][0] | held[1][0], held[0][1] | held[1][1]
            assert maps
            if killed == "group":
                os.killpg(proc.pid, signal.SIGKILL)
            else:
                os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
            deadline = time.monotonic() + 10
            while os.path.exists(f"/proc/{loader}"):  # reaped once its parent died
                assert time.monotonic() < deadline, f"loader {loader} outlived the observer"
                time.sleep(0.01)
            assert_freed(progs, maps)
            return
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    raise AssertionError("5 loaders handed their program over before they were seen holding it")
