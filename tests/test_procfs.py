"""procksm.procfs: parsers on fixture /proc text, readers against real processes."""

from __future__ import annotations

import ctypes
import dataclasses
import itertools
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from procksm import PAGE_SIZE, procfs
from procksm.errors import NoSuchProcess, ProcksmError, Unsupported, ZombieProcess
from procksm.procfs import (
    KPF_ANON,
    KPF_ZERO_PAGE,
    PM_EXCLUSIVE,
    PM_FILE,
    PM_PFN_MASK,
    PM_PRESENT,
    PM_SWAPPED,
    KPageFiles,
    PagemapFile,
    Vma,
)
from tests.conftest import LIBC, build_c_target, require_privileges, skip_or_fail

FIXTURES = Path(__file__).parent / "fixtures"


def fixture(name: str) -> str:
    return (FIXTURES / name).read_text()


# ------------------------------------------------------------------------------------
# Pure parsers
# ------------------------------------------------------------------------------------

# The READY line of the planted process whose /proc files are in fixtures/*_planted.txt
# (planted --zero 4 --unique 3 --threads 1).
PLANTED_ZERO = 0x7F09A1242000
PLANTED_UNIQUE = 0x7F09A123F000


def test_parse_smaps_of_a_real_process() -> None:
    vmas = procfs.parse_smaps(fixture("smaps_planted.txt"))
    assert len(vmas) == 27
    assert all(a.end <= b.start for a, b in itertools.pairwise(vmas))
    by_name = {v.name: v for v in vmas}
    heap = by_name["[heap]"]
    assert (heap.start, heap.end, heap.perms) == (0x55678D29D000, 0x55678D2BE000, "rw-p")
    assert heap.vmflags == frozenset({"rd", "wr", "mr", "mw", "me", "ac"})
    assert procfs.ineligibility(heap) is None
    # unique (3 pages) and zero (4 pages): adjacent anonymous mmaps the kernel merged.
    region = next(v for v in vmas if v.start <= PLANTED_ZERO < v.end)
    assert region.start == PLANTED_UNIQUE and region.npages == 7
    assert (region.rss_kb, region.anonymous_kb, region.swap_kb, region.locked_kb) == (28, 28, 0, 0)
    assert region.name == "[anon]" and region.is_anonymous
    assert procfs.ineligibility(region) is None
    # libc's .bss: the anonymous mapping right after libc's writable data.
    assert by_name["libc.so.6 (bss)"].start == 0x7F09A1230000
    assert procfs.ineligibility(by_name["libc.so.6"]) == "file-backed"
    assert procfs.ineligibility(by_name["[stack]"]) == "stack"
    assert procfs.ineligibility(by_name["[vdso]"]) == "kernel mapping [vdso]"
    assert procfs.ineligibility(by_name["[vvar]"]) == "kernel mapping [vvar]"
    assert procfs.ineligibility(by_name["[vsyscall]"]) == "kernel mapping [vsyscall]"
    # The thread stack's guard page.
    guard = next(v for v in vmas if v.start == 0x7F09A0857000)
    assert guard.perms == "---p" and procfs.ineligibility(guard) == "PROT_NONE"
    # smaps and smaps_rollup were read at the same moment: the Rss adds up.
    rollup = procfs.parse_smaps_rollup(fixture("smaps_rollup_planted.txt"))
    assert sum(v.rss_kb for v in vmas) == rollup["Rss"]
    assert sum(v.anonymous_kb for v in vmas) == rollup["Anonymous"]


def test_vma_table_holds_kinds_once_and_reads_as_the_records() -> None:
    """The columns parser (the one parser of smaps and maps): one VmaKind per distinct
    kind of VMA however many VMAs share it, addresses above 2**63 ([vsyscall]) kept."""
    text = fixture("smaps_planted.txt")
    table = procfs.parse_vma_lines(text.encode().splitlines())
    vmas = procfs.parse_smaps(text)
    assert len(table) == len(vmas) == 27
    assert table.start.tolist() == [v.start for v in vmas]
    assert table.rss_kb.tolist() == [v.rss_kb for v in vmas]
    assert table.start[-1] == 0xFFFFFFFFFF600000
    # many one-page anonymous VMAs (a scattered merge's heap): one kind
    many = "".join(
        f"{a:x}-{a + PAGE_SIZE:x} rw-p 00000000 00:00 0 \nRss: 4 kB\nVmFlags: rd wr mr mw me ac\n"
        for a in range(0x10000000, 0x10000000 + 5000 * 2 * PAGE_SIZE, 2 * PAGE_SIZE)
    )
    t = procfs.parse_vma_lines(("Rss: 9 kB\n" + many).encode().splitlines())  # no VMA yet
    assert len(t) == 5000 and len(t.kinds) == 1 and set(t.rss_kb.tolist()) == {4}
    assert t.kinds[0].name == "[anon]" and procfs.ineligibility(t.kinds[0]) is None
    assert t[4999].start == t[-1].start == 0x10000000 + 4999 * 2 * PAGE_SIZE
    # taken in blocks of rows: the same records as one by one
    assert [v.start for v in t] == [t[i].start for i in range(len(t))] == t.start.tolist()


def test_read_vma_table_of_a_live_process() -> None:
    """Read as it comes (never the whole text): the same VMAs as the text parsed at once."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        time.sleep(0.3)
        want = procfs.parse_maps(Path(f"/proc/{proc.pid}/maps").read_text())
        got = procfs.read_maps(proc.pid)
        assert [(v.start, v.end, v.path, v.name) for v in got] == [
            (v.start, v.end, v.path, v.name) for v in want
        ]
        table = procfs.read_vmas(proc.pid)
        assert table.start.tolist() == [v.start for v in want]
        assert any(k.vmflags for k in table.kinds)
    finally:
        proc.kill()
        proc.wait()
    with pytest.raises(NoSuchProcess):
        procfs.read_vmas(proc.pid)


_SEGMENT_LINES = (
    "7f1c0d000000-7f1c0d001000 rw-p 00000000 00:01 501"
    "                        /memfd:procksm-seg-1 (deleted)\n"
    "7f1c0d001000-7f1c0d003000 rw-p 00000000 00:00 0 \n"
    # the prefix inside another path: searched, parsed, not taken
    "7f1c0e000000-7f1c0e001000 r--p 00000000 fe:00 3003"
    "                       /tmp/x/memfd:procksm-seg-2\n"
    # the last line without its newline
    "7f1c0f000000-7f1c0f004000 rw-p 00003000 00:01 502"
    "                        /memfd:procksm-seg-2 (deleted)"
)


def test_parse_maps_with_path_parses_only_the_lines_asked_for() -> None:
    text = fixture("maps_handwritten.txt") + _SEGMENT_LINES
    prefix = "/memfd:procksm-seg-"
    found = procfs.parse_maps_with_path(text, prefix)
    assert found == [v for v in procfs.parse_maps(text) if v.path.startswith(prefix)]
    assert [(v.start, v.end, v.offset, v.inode) for v in found] == [
        (0x7F1C0D000000, 0x7F1C0D001000, 0, 501),
        (0x7F1C0F000000, 0x7F1C0F004000, 0x3000, 502),
    ]
    assert procfs.parse_maps_with_path(text, "[heap]")[0].start == 0x01C4A000
    # one per file: a second mapping of inode 501 is left out, inode 502 kept
    again = "7f1c10000000-7f1c10001000 rw-p 00000000 00:01 501    /memfd:procksm-seg-1 (deleted)\n"
    firsts = procfs.parse_maps_with_path(again + text, prefix, one_per_inode=True)
    assert [(v.start, v.inode) for v in firsts] == [(0x7F1C10000000, 501), (0x7F1C0F000000, 502)]
    assert procfs.parse_maps_with_path(fixture("maps_handwritten.txt"), prefix) == []


def test_maps_snapshot_reads_once_and_answers_from_that_read() -> None:
    code = (
        "import mmap, os, sys; fd = os.memfd_create('procksm-seg-test'); "
        "os.ftruncate(fd, 8192); m = mmap.mmap(fd, 8192); print('ok', flush=True); "
        "sys.stdin.readline(); m.close(); print('unmapped', flush=True); sys.stdin.readline()"
    )
    child = subprocess.Popen(
        [sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert child.stdin is not None and child.stdout is not None
    try:
        assert child.stdout.readline() == "ok\n"
        snap = procfs.MapsSnapshot(child.pid)
        ours = snap.with_path("/memfd:procksm-seg-")
        assert len(ours) == 1 and ours[0].size == 8192
        assert snap.vma_count == len(procfs.read_maps(child.pid))
        child.stdin.write("\n")
        child.stdin.flush()
        assert child.stdout.readline() == "unmapped\n"
        # the snapshot is as of its read; a new read sees the change
        assert snap.with_path("/memfd:procksm-seg-") == ours
        assert procfs.read_maps_with_path(child.pid, "/memfd:procksm-seg-") == []
    finally:
        child.kill()
        child.wait()


def test_maps_query_filters_on_kernels_without_procmap_query() -> None:
    # the fallback (a parse of maps, before 6.11) answers the kernel's query flags alike
    with procfs.MapsQuery(os.getpid()) as q:
        q._fallback = procfs.parse_maps(fixture("maps_handwritten.txt"))
        code = procfs.PROCMAP_VMA_READABLE | procfs.PROCMAP_VMA_EXECUTABLE
        only = code | procfs.PROCMAP_QUERY_FILE_BACKED_VMA
        found = list(q.vmas_in(0, 1 << 64, only=only))
        assert [(v.start, v.offset, v.name) for v in found] == [
            (0x401000, 0x1000, "/opt/my app/bin/server")
        ]
        shared = list(q.vmas_in(0, 1 << 64, only=procfs.PROCMAP_VMA_SHARED))
        assert [v.name for v in shared] == ["/memfd:shared buf (deleted)", "/[aio] (deleted)"]
        assert q.vma_at(0x400000, only=procfs.PROCMAP_VMA_EXECUTABLE) is None


def test_parse_smaps_rollup_skips_its_header() -> None:
    rollup = procfs.parse_smaps_rollup(fixture("smaps_rollup_planted.txt"))
    assert rollup["Rss"] == 1500 and rollup["Pss_Anon"] == 144 and rollup["Pss_Shmem"] == 0
    assert all(" " not in k for k in rollup)


def test_parse_maps_handwritten() -> None:
    vmas = procfs.parse_maps(fixture("maps_handwritten.txt"))
    assert [v.name for v in vmas] == [
        "server",
        "server",
        "server",
        "server (bss)",
        "[heap]",
        "[anon:arena 1]",
        "[anon]",
        "memfd:shared buf (deleted)",
        "LC_CTYPE",
        "[anon]",  # after a read-only file mapping: not a .bss
        "[aio] (deleted)",
        "[stack]",
        "[vsyscall]",
    ]
    assert vmas[0].path == "/opt/my app/bin/server"
    assert vmas[2].offset == 0x2000 and vmas[2].inode == 1001 and vmas[2].dev == "fe:00"
    assert vmas[3].follows_file == "/opt/my app/bin/server"
    assert vmas[5].is_anonymous and vmas[5].npages == 0x21
    assert vmas[7].shared and not vmas[7].is_anonymous
    assert all(v.vmflags == frozenset() for v in vmas)
    # maps has no VmFlags: an allowlist cannot pass anything.
    assert procfs.ineligibility(vmas[4]) == "VmFlags unknown (read smaps)"
    assert procfs.ineligibility(vmas[7]) == "shared mapping"


# Every reason, by the [anon:NAME] of its VMA in fixtures/smaps_vmflags.txt.
EXPECTED_REASONS: dict[str, str | None] = {
    "[heap]": None,
    "[anon]": None,
    "[anon:jemalloc]": None,
    "[anon:allowed-nr]": None,
    "[anon:allowed-sd]": None,
    "[anon:allowed-nh]": None,
    "[anon:allowed-sr]": None,
    "[anon:allowed-rr]": None,
    "[anon:flag-gd]": "stack (gd)",
    "[anon:flag-ss]": "shadow stack (ss)",
    "[anon:flag-sh]": "shared mapping",
    "[anon:flag-ms]": "shared mapping",
    "[anon:flag-lo]": "mlocked (lo)",
    "[anon:flag-lf]": "mlocked on fault (lf)",
    "[anon:flag-io]": "I/O mapping (io)",
    "[anon:flag-pf]": "pure PFN mapping (pf)",
    "[anon:flag-mm]": "mixed map (mm)",
    "[anon:flag-dw]": "deny-write mapping (dw)",
    "[anon:flag-dc]": "MADV_DONTFORK (dc): may be a DMA buffer",
    "[anon:flag-de]": "do not expand (de)",
    "[anon:flag-wf]": "MADV_WIPEONFORK (wf)",
    "[anon:flag-dd]": None,  # given again to the replacement (REAPPLIED_VMFLAGS)
    "[anon:flag-dp]": "droppable (dp)",
    "[anon:flag-ht]": "hugetlb (ht)",
    "[anon:flag-hg]": None,
    "[anon:flag-mg]": "registered with the kernel's KSM (mg)",
    "[anon:flag-um]": "userfaultfd missing (um)",
    "[anon:flag-uw]": "userfaultfd write-protect (uw)",
    "[anon:flag-ui]": "userfaultfd minor (ui)",
    "[anon:flag-sl]": "sealed (sl)",
    "[anon:flag-sf]": "synchronous page faults (sf)",
    "[anon:flag-ar]": "arch-specific flag (ar)",
    "[anon:flag-bt]": "arm64 BTI guarded (bt)",
    "[anon:flag-mt]": "arm64 MTE tags (mt)",
    "[anon:flag-ex]": "executable (ex)",
    "[anon:flag-zz]": "unknown VmFlag zz",
    "[anon:flag-??]": "unknown VmFlag ??",
    "[anon:pkey]": "protection key 3",
    "[anon:pkey0]": None,
    "[anon:missing-mw]": "cannot be made writable (no mw)",
    "[anon:missing-mr]": "cannot be made readable (no mr)",
    "[anon:no-vmflags]": "VmFlags unknown (read smaps)",
    "[anon:readonly]": "not writable",
    "[anon:writeonly]": "not readable",
    "[anon:protnone]": "PROT_NONE",
    "/dev/zero (deleted)": "shared mapping",
    "/memfd:procksm (deleted)": "file-backed",
    "/usr/lib/libfoo.so.1": "file-backed",
    "libfoo.so.1 (bss)": None,
    "[stack]": "stack",
    "[stack:1234]": "stack",
    "[vvar]": "kernel mapping [vvar]",
    "[vdso]": "kernel mapping [vdso]",
    "[uprobes]": "kernel mapping [uprobes]",
    "[vsyscall]": "kernel mapping [vsyscall]",
}


def test_every_vmflag_has_its_reason() -> None:
    vmas = procfs.parse_smaps(fixture("smaps_vmflags.txt"))

    def reason(v: procfs.Vma) -> str | None:
        # The fixture labels its VMAs with [anon:NAME]; a real named VMA is refused for
        # its name first (below), so the VmFlags rules are checked on the unnamed VMA.
        if v.path.startswith("[anon:"):
            return procfs.ineligibility(dataclasses.replace(v, path=""))
        return procfs.ineligibility(v)

    got = {(v.path if v.path.startswith("/") else v.name): reason(v) for v in vmas}
    assert got == EXPECTED_REASONS
    named = next(v for v in vmas if v.path == "[anon:jemalloc]")
    assert procfs.ineligibility(named) == "named anonymous mapping [anon:jemalloc]"
    # The table covers every mnemonic of show_smap_vma_flags() (fs/proc/task_mmu.c, 6.18).
    kernel_mnemonics = {
        *("rd", "wr", "ex", "sh", "mr", "mw", "me", "ms", "gd", "pf", "lo", "io", "sr", "rr"),
        *("dc", "de", "lf", "ac", "nr", "ht", "sf", "ar", "wf", "dd", "bt", "sd", "mm", "hg"),
        *("nh", "mg", "um", "uw", "mt", "ui", "ss", "dp", "sl", "dw"),
    }
    allowed, excluded = set(procfs.ALLOWED_VMFLAGS), set(procfs.EXCLUDED_VMFLAGS)
    reapplied = set(procfs.REAPPLIED_VMFLAGS)
    assert kernel_mnemonics == allowed | excluded | reapplied
    assert not allowed & excluded and not allowed & reapplied and not excluded & reapplied


def test_the_advice_a_replacement_gets_again() -> None:
    """A VMA's advice flags (hg, nh, sr, rr, dd) become the madvise calls that give the
    replacement mapping the same VmFlags; other flags give none."""
    vmas = {v.name: v for v in procfs.parse_smaps(fixture("smaps_vmflags.txt"))}
    assert vmas["[anon:flag-hg]"].advice == (14,)  # MADV_HUGEPAGE
    assert vmas["[anon:allowed-nh]"].advice == (15,)
    assert vmas["[anon:allowed-sr]"].advice == (2,)
    assert vmas["[anon:allowed-rr]"].advice == (1,)
    assert vmas["[anon:flag-dd]"].advice == (16,)
    assert vmas["[heap]"].advice == ()
    assert procfs.Vma(0, 4096, "rw-p", 0, "00:00", 0, "").advice == ()  # from maps: unknown


def test_smaps_fields_and_pkey() -> None:
    vmas = {v.name: v for v in procfs.parse_smaps(fixture("smaps_vmflags.txt"))}
    assert vmas["[anon:pkey]"].protection_key == 3
    assert vmas["[anon:flag-lo]"].locked_kb == 16
    bss = vmas["libfoo.so.1 (bss)"]
    assert (bss.rss_kb, bss.anonymous_kb, bss.swap_kb) == (4, 4, 4)
    assert bss.follows_file == "/usr/lib/libfoo.so.1"


def test_vma_properties() -> None:
    v = Vma(0x1000, 0x5000, "rw-p", 0, "00:00", 0, "")
    assert (v.npages, v.size, v.executable) == (4, 0x4000, False) and v.readable and v.writable
    assert v.private and not v.shared and v.is_anonymous and v.name == "[anon]"
    s = Vma(0x1000, 0x2000, "r--s", 0, "00:01", 5, "/dev/shm/x")
    assert s.shared and not s.private and not s.is_anonymous and s.name == "x"
    assert Vma(0, 0x1000, "rw-p", 0, "00:00", 0, "[anon:buf]").is_anonymous
    assert not Vma(0, 0x1000, "rw-s", 0, "00:01", 3, "[anon_shmem:buf]").is_anonymous


def test_parse_status_of_a_user_process() -> None:
    st_ = procfs.parse_status(fixture("status_planted.txt"))
    assert (st_.pid, st_.name, st_.state, st_.tgid, st_.ppid) == (5584, "planted", "S", 5584, 5582)
    assert (st_.uid_real, st_.uid_effective, st_.gid_real) == (0, 0, 0)
    assert st_.threads == 2 and st_.tracer_pid == 0 and st_.seccomp == 0
    assert st_.vm_rss_kb == st_.rss_anon_kb + st_.rss_file_kb + st_.rss_shmem_kb
    assert st_.rss_anon_kb == 144
    assert st_.nspid == (5584,) and not st_.in_child_pid_namespace
    assert not st_.is_kernel_thread and not st_.is_zombie


def test_parse_status_of_kernel_thread_and_zombie() -> None:
    kt = procfs.parse_status(fixture("status_kthreadd.txt"))
    assert kt.is_kernel_thread and kt.name == "kthreadd" and kt.vm_rss_kb == 0
    # Before 6.0 there is no Kthread line: no Vm* lines means no mm.
    old = "\n".join(x for x in fixture("status_kthreadd.txt").splitlines() if "Kthread" not in x)
    assert procfs.parse_status(old).is_kernel_thread
    z = procfs.parse_status(fixture("status_zombie.txt"))
    assert z.is_zombie and z.state == "Z" and not z.is_kernel_thread
    zold = "\n".join(x for x in fixture("status_zombie.txt").splitlines() if "Kthread" not in x)
    assert not procfs.parse_status(zold).is_kernel_thread


def test_parse_status_nested_namespace() -> None:
    text = fixture("status_planted.txt").replace("NSpid:\t5584", "NSpid:\t5584\t12")
    assert procfs.parse_status(text).nspid == (5584, 12)
    assert procfs.parse_status(text).in_child_pid_namespace


def test_parse_stat_flags() -> None:
    assert procfs.parse_stat_flags(fixture("stat_kthreadd.txt")) & procfs.PF_KTHREAD
    # A comm containing ") " must not shift the fields.
    flags = procfs.parse_stat_flags(fixture("stat_odd_comm.txt"))
    assert flags == 4194560 and not flags & procfs.PF_KTHREAD


def test_parse_meminfo() -> None:
    info = procfs.parse_meminfo(fixture("meminfo.txt"))
    assert info["MemTotal"] > info["MemFree"] > 0
    assert "AnonPages" in info and "Shmem" in info and "HugePages_Total" in info
    assert len(info) == len(fixture("meminfo.txt").splitlines())


def test_parse_cpu_list() -> None:
    assert procfs.parse_cpu_list("0-3,8,10-11\n") == [0, 1, 2, 3, 8, 10, 11]
    assert procfs.parse_cpu_list("0\n") == [0]
    # per-CPU map values have a slot per possible CPU, online or not
    assert procfs.possible_cpus() >= (os.cpu_count() or 1)


def test_parse_ksm_stat() -> None:
    assert procfs.parse_ksm_stat(fixture("ksm_stat.txt")) == {
        "ksm_rmap_items": 0,
        "ksm_zero_pages": 0,
        "ksm_merging_pages": 0,
        "ksm_process_profit": 0,
        "ksm_merge_any": 0,
        "ksm_mergeable": 0,
    }
    assert procfs.parse_ksm_stat("ksm_merge_any: yes\nksm_process_profit -4096\n") == {
        "ksm_merge_any": 1,
        "ksm_process_profit": -4096,
    }


def test_parse_io_uring_fdinfo() -> None:
    info = procfs.parse_fdinfo(fixture("fdinfo_io_uring.txt"))
    assert info["SqThread"] == "-1" and info["NAPI"] == "disabled"
    assert procfs.io_uring_buffers(info) == [(0x7FEC4A9DB000, 8192), (0x7FEC4A9E0000, 4096)]
    assert procfs.io_uring_buffers(procfs.parse_fdinfo("pos:\t0\nflags:\t02\n")) == []


def naive_runs(entries: np.ndarray, start: int, mask: np.ndarray | None) -> list[tuple[int, int]]:
    runs: list[tuple[int, int]] = []
    for i, e in enumerate(entries.tolist()):
        if e >> 63 and (mask is None or mask[i]):
            addr = start + i * PAGE_SIZE
            if runs and runs[-1][0] + runs[-1][1] * PAGE_SIZE == addr:
                runs[-1] = (runs[-1][0], runs[-1][1] + 1)
            else:
                runs.append((addr, 1))
    return runs


PRESENT = int(PM_PRESENT)
SWAPPED = int(PM_SWAPPED)


def test_present_runs_examples() -> None:
    e = np.array([PRESENT | 5, PRESENT | 6, 0, SWAPPED | 77, PRESENT, 0, PRESENT], np.uint64)
    assert procfs.present_runs(e, 0x10000) == [(0x10000, 2), (0x14000, 1), (0x16000, 1)]
    assert procfs.present_runs(np.zeros(0, np.uint64), 0) == []
    assert procfs.present_runs(np.zeros(9, np.uint64), 0) == []
    mask = np.array([True, False, True, True, True, True, True])
    assert procfs.present_runs(e, 0, mask) == [(0, 1), (0x4000, 1), (0x6000, 1)]


@given(
    st.lists(st.sampled_from([0, PRESENT, SWAPPED, PRESENT | 123, SWAPPED | 9]), max_size=300),
    st.integers(0, 2**30).map(lambda p: p * PAGE_SIZE),
    st.booleans(),
)
def test_present_runs_matches_naive(entries: list[int], start: int, masked: bool) -> None:
    e = np.array(entries, dtype=np.uint64)
    mask = (np.arange(len(e)) % 3 != 1) if masked else None
    assert procfs.present_runs(e, start, mask) == naive_runs(e, start, mask)


# ------------------------------------------------------------------------------------
# Live: a real anonymous mapping in this test process
# ------------------------------------------------------------------------------------

_libc = LIBC

PROT_READ, PROT_WRITE, PROT_EXEC = 1, 2, 4
MAP_SHARED, MAP_PRIVATE, MAP_ANONYMOUS, MAP_GROWSDOWN = 0x01, 0x02, 0x20, 0x100
MADV_NORMAL, MADV_MERGEABLE, MADV_HUGEPAGE, MADV_NOHUGEPAGE = 0, 12, 14, 15
MADV_DONTFORK, MADV_DONTDUMP, MADV_WIPEONFORK = 10, 16, 18


class AnonMapping:
    """An mmap made with libc so that its address is known and madvise/mlock apply."""

    def __init__(
        self,
        npages: int,
        prot: int = PROT_READ | PROT_WRITE,
        flags: int = MAP_PRIVATE | MAP_ANONYMOUS,
    ) -> None:
        self.size = npages * PAGE_SIZE
        addr = _libc.mmap(None, self.size, prot, flags, -1, 0)
        assert addr not in (None, ctypes.c_void_p(-1).value), os.strerror(ctypes.get_errno())
        self.addr: int = addr
        # Keep THP away: 4 KiB pages make PFNs and zero-page mappings deterministic.
        _libc.madvise(self.addr, self.size, MADV_NOHUGEPAGE)

    def madvise(self, advice: int) -> None:
        assert _libc.madvise(self.addr, self.size, advice) == 0, os.strerror(ctypes.get_errno())

    def write(self, page: int, value: int) -> None:
        ctypes.memset(self.addr + page * PAGE_SIZE, value, PAGE_SIZE)

    def read(self, page: int) -> bytes:
        return ctypes.string_at(self.addr + page * PAGE_SIZE, PAGE_SIZE)

    def vma(self) -> Vma:
        return next(v for v in procfs.read_vmas(os.getpid()) if v.start <= self.addr < v.end)

    def entries(self, pid: int | None = None) -> np.ndarray:
        return procfs.read_pagemap(pid or os.getpid(), self.addr, self.addr + self.size)

    def close(self) -> None:
        _libc.munmap(self.addr, self.size)


@pytest.fixture
def anon() -> object:
    made: list[AnonMapping] = []

    def make(*args: int) -> AnonMapping:
        m = AnonMapping(*args)
        made.append(m)
        return m

    yield make
    for m in made:
        m.close()


def test_real_vmflags_give_their_reasons(anon: Callable[..., AnonMapping]) -> None:
    """Each mapping is made for real; the kernel writes the VmFlags the reason rests on."""
    cases: list[tuple[AnonMapping, str | None]] = []
    for advice, reason in [
        (MADV_NORMAL, None),
        (MADV_DONTFORK, "MADV_DONTFORK (dc): may be a DMA buffer"),
        (MADV_WIPEONFORK, "MADV_WIPEONFORK (wf)"),
        (MADV_DONTDUMP, None),  # given again to the replacement (REAPPLIED_VMFLAGS)
        (MADV_HUGEPAGE, None),
        (MADV_MERGEABLE, "registered with the kernel's KSM (mg)"),
    ]:
        m = anon(4)
        m.madvise(advice)
        cases.append((m, reason))
    locked = anon(4)
    assert _libc.mlock(locked.addr, locked.size) == 0
    cases.append((locked, "mlocked (lo)"))
    cases.append((anon(4, PROT_READ), "not writable"))
    cases.append((anon(4, 0), "PROT_NONE"))
    cases.append((anon(4, PROT_READ | PROT_WRITE | PROT_EXEC), "executable (ex)"))
    cases.append((anon(4, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS), "shared mapping"))
    grows = anon(4, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_GROWSDOWN)
    cases.append((grows, "stack (gd)"))
    sealed = anon(4)
    if _libc.syscall(462, ctypes.c_void_p(sealed.addr), ctypes.c_size_t(sealed.size), 0) == 0:
        cases.append((sealed, "sealed (sl)"))  # mseal(2), 6.10+
    for m, reason in cases:
        assert procfs.ineligibility(m.vma()) == reason, m.vma()


def test_zero_page_and_private_page_in_pagemap_and_kpageflags(
    anon: Callable[..., AnonMapping],
) -> None:
    require_privileges()
    m = anon(2)
    assert m.read(0) == bytes(PAGE_SIZE)  # read fault: maps the shared zero page
    m.write(1, 0xAB)  # write fault: a private anonymous page
    e = m.entries()
    assert all(e & PM_PRESENT)
    zero_pfn, own_pfn = (int(x) for x in e & PM_PFN_MASK)
    assert zero_pfn and own_pfn and zero_pfn != own_pfn
    assert not e[0] & PM_EXCLUSIVE and e[1] & PM_EXCLUSIVE  # the zero page is nobody's
    assert not e[0] & PM_FILE and not e[1] & PM_FILE
    with KPageFiles() as kp:
        flags = kp.read_flags([zero_pfn, own_pfn])
        counts = kp.read_counts([own_pfn])
    assert flags[0] >> KPF_ZERO_PAGE & 1 and not flags[0] >> KPF_ANON & 1
    assert flags[1] >> KPF_ANON & 1 and not flags[1] >> KPF_ZERO_PAGE & 1
    assert counts[0] == 1
    assert procfs.pagemap_has_pfns()


def test_fork_shares_frames_until_written(anon: Callable[..., AnonMapping]) -> None:
    require_privileges()
    m = anon(8)
    for i in range(8):
        m.write(i, i + 1)
    before = m.entries()
    assert all(before & PM_EXCLUSIVE)
    r, w = os.pipe()
    child = os.fork()
    if child == 0:  # the child only waits: it must not touch the mapping
        os.read(r, 1)
        os._exit(0)
    try:
        mine, theirs = m.entries(), m.entries(child)
        pfns = mine & PM_PFN_MASK
        assert (pfns == (theirs & PM_PFN_MASK)).all() and (pfns == (before & PM_PFN_MASK)).all()
        assert not any(mine & PM_EXCLUSIVE) and not any(theirs & PM_EXCLUSIVE)
        with KPageFiles() as kp:
            assert (kp.read_counts(pfns) == 2).all()
            m.write(3, 0xEE)  # copy-on-write: page 3 gets a frame of its own
            after = m.entries() & PM_PFN_MASK
            assert after[3] != pfns[3] and (np.delete(after, 3) == np.delete(pfns, 3)).all()
            assert kp.read_counts([pfns[3], after[3], pfns[0]]).tolist() == [1, 1, 2]
    finally:
        os.write(w, b"x")
        os.waitpid(child, 0)
        os.close(r)
        os.close(w)


def test_kpage_batched_lookup_equals_one_by_one(anon: Callable[..., AnonMapping]) -> None:
    require_privileges()
    m = anon(64)
    for i in range(64):
        m.write(i, 1)
    own = (m.entries() & PM_PFN_MASK).astype(np.uint64)
    max_pfn = procfs.read_meminfo()["MemTotal"] // 4
    rng = np.random.default_rng(1)
    pfns = np.concatenate(
        [own, own[::-3], rng.integers(1, max_pfn, 500).astype(np.uint64), [1 << 40]]
    ).astype(np.uint64)

    def one_by_one() -> list[int]:
        fd = os.open("/proc/kpageflags", os.O_RDONLY)
        try:
            out = []
            for p in pfns.tolist():
                raw = os.pread(fd, 8, p * 8)
                out.append(int.from_bytes(raw, "little") if raw else 0)
            return out
        finally:
            os.close(fd)

    before = one_by_one()
    with KPageFiles() as kp:
        got = kp.read_flags(pfns)
        counts = kp.read_counts(pfns)
    after = one_by_one()
    # Frames may change between the reads: compare those that read the same before and
    # after, but for their LRU state, which moves even for our own pages (a new page
    # sits in a per-CPU batch until it drains onto the LRU, KPF_LRU; aging moves ACTIVE,
    # REFERENCED, IDLE): under load that happened between two reads (CI).
    lru_state = (1 << 2) | (1 << 5) | (1 << 6) | (1 << 25)
    steady = ~lru_state & ((1 << 64) - 1)
    stable = [i for i, (a, b) in enumerate(zip(before, after, strict=True)) if a == b]
    n = len(own) + len(own[::-3])
    assert len(stable) > len(pfns) // 2
    assert [int(got[i]) & steady for i in stable] == [before[i] & steady for i in stable]
    assert all((int(got[i]) ^ before[i]) & steady == 0 for i in range(n))  # ours: always
    assert got[-1] == 0 == before[-1]
    assert (counts[:n] == 1).all()
    assert len(got) == len(pfns) and kp.read_flags([]).size == 0


# ------------------------------------------------------------------------------------
# Live: against the planted target
# ------------------------------------------------------------------------------------


@pytest.fixture
def planted(spawn):  # type: ignore[no-untyped-def]
    require_privileges()
    return spawn([build_c_target("planted"), "--zero", 32, "--unique", 8, "--threads", 2])


def test_planted_zero_region_holds_private_zero_filled_pages(planted) -> None:  # type: ignore[no-untyped-def]
    zero, n = planted.int("zero"), planted.int("zero_pages")
    with PagemapFile(planted.pid) as pm:
        e = pm.read(zero, zero + n * PAGE_SIZE)
    assert all(e & PM_PRESENT) and all(e & PM_EXCLUSIVE)
    pfns = e & PM_PFN_MASK
    assert len(np.unique(pfns)) == n  # written-then-zeroed: each its own frame
    with KPageFiles() as kp:
        flags = kp.read_flags(pfns)
        assert (kp.read_counts(pfns) == 1).all()
    assert ((flags >> np.uint64(KPF_ANON)) & np.uint64(1)).all()
    assert not ((flags >> np.uint64(KPF_ZERO_PAGE)) & np.uint64(1)).any()


def test_read_vmas_status_threads_of_planted(planted) -> None:  # type: ignore[no-untyped-def]
    vmas = procfs.read_vmas(planted.pid)
    region = next(v for v in vmas if v.start <= planted.int("zero") < v.end)
    assert procfs.ineligibility(region) is None and region.rss_kb >= 32 * 4
    st_ = procfs.read_status(planted.pid)
    assert (st_.pid, st_.name, st_.threads, st_.state) == (planted.pid, "planted", 3, st_.state)
    assert not st_.is_kernel_thread and st_.ppid == os.getpid()
    tids = procfs.list_threads(planted.pid)
    assert len(tids) == 3 and planted.pid in tids
    rollup = procfs.read_smaps_rollup(planted.pid)
    assert rollup["Anonymous"] >= (32 + 8) * 4 and rollup["Rss"] >= rollup["Anonymous"]
    assert "ksm_merging_pages" in procfs.read_ksm_stat(planted.pid)
    assert len(procfs.read_maps(planted.pid)) == len(vmas)


def test_kernel_thread_has_no_memory_to_scan() -> None:
    kthreadd = procfs.read_status(2)
    assert kthreadd.is_kernel_thread
    with pytest.raises(Unsupported, match="kernel thread"):
        procfs.read_vmas(2)
    with pytest.raises(Unsupported, match="kernel thread"):
        procfs.read_smaps_rollup(2)


def test_machine_wide_readers() -> None:
    assert procfs.max_map_count() >= 65530 or procfs.max_map_count() > 0
    info = procfs.read_meminfo()
    assert info["MemTotal"] > 0 and "AnonPages" in info


# ------------------------------------------------------------------------------------
# Asynchronous I/O detection
# ------------------------------------------------------------------------------------


class _Iovec(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]


def test_uses_async_io_sees_io_uring_and_aio(anon: Callable[..., AnonMapping]) -> None:
    me = os.getpid()
    assert procfs.uses_async_io(me) is None
    params = (ctypes.c_char * 120)()
    ring = _libc.syscall(425, 4, params)  # io_uring_setup
    if ring < 0:
        skip_or_fail(f"io_uring_setup failed: {os.strerror(ctypes.get_errno())}")
    try:
        assert procfs.uses_async_io(me) == f"uses io_uring (fd {ring})"
        buf = anon(2)
        iov = _Iovec(buf.addr, buf.size)
        assert _libc.syscall(427, ring, 0, ctypes.byref(iov), 1) == 0  # REGISTER_BUFFERS
        assert procfs.io_uring_buffers(procfs.read_fdinfo(me, ring)) == [(buf.addr, buf.size)]
        assert procfs.uses_async_io(me) == f"uses io_uring (fd {ring}, 1 registered buffers)"
    finally:
        os.close(ring)
    assert procfs.uses_async_io(me) is None
    ctx = ctypes.c_ulong(0)
    assert _libc.syscall(206, 8, ctypes.byref(ctx)) == 0  # io_setup
    try:
        assert procfs.uses_async_io(me) == "has 1 AIO ring (io_setup)"
    finally:
        _libc.syscall(207, ctx)  # io_destroy
    assert procfs.uses_async_io(me) is None


# ------------------------------------------------------------------------------------
# Error translation
# ------------------------------------------------------------------------------------


def dead_pid() -> int:
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


READERS: list[tuple[str, Callable[[int], object]]] = [
    ("read_vmas", procfs.read_vmas),
    ("read_maps", procfs.read_maps),
    ("read_status", procfs.read_status),
    ("list_threads", procfs.list_threads),
    ("read_smaps_rollup", procfs.read_smaps_rollup),
    ("read_ksm_stat", procfs.read_ksm_stat),
    ("uses_async_io", procfs.uses_async_io),
    ("PagemapFile", PagemapFile),
    ("read_pagemap", lambda pid: procfs.read_pagemap(pid, 0x400000, 0x401000)),
]


@pytest.mark.parametrize("reader", [r for _, r in READERS], ids=[n for n, _ in READERS])
def test_nonexistent_pid_is_no_such_process(reader: Callable[[int], object]) -> None:
    pid = dead_pid()
    with pytest.raises(NoSuchProcess, match=f"pid={pid}"):
        reader(pid)


def test_zombie_is_reported_as_zombie() -> None:
    p = subprocess.Popen(["true"])
    try:
        deadline = time.monotonic() + 10
        while procfs.parse_status(Path(f"/proc/{p.pid}/status").read_text()).state != "Z":
            assert time.monotonic() < deadline
            time.sleep(0.01)
        for reader in (procfs.read_vmas, procfs.read_smaps_rollup):
            with pytest.raises(ZombieProcess, match="zombie"):
                reader(p.pid)
        assert procfs.read_status(p.pid).is_zombie
    finally:
        p.wait()


def test_pagemap_of_exited_process_is_no_such_process(spawn) -> None:  # type: ignore[no-untyped-def]
    require_privileges()
    t = spawn([build_c_target("planted"), "--zero", 4])
    with PagemapFile(t.pid) as pm:
        zero = t.int("zero")
        assert pm.read(zero, zero + PAGE_SIZE)[0] & PM_PRESENT
        t.kill()  # reaped: the open fd now reads nothing
        with pytest.raises(NoSuchProcess):
            pm.read(zero, zero + PAGE_SIZE)


NOBODY_PROBE = """
import json, os, sys
from procksm import procfs
pid = int(sys.argv[1])
os.setgid(65534); os.setuid(65534)
out = {}
for name, call in [
    ("read_vmas", lambda: procfs.read_vmas(pid)),
    ("PagemapFile", lambda: procfs.PagemapFile(pid)),
    ("read_smaps_rollup", lambda: procfs.read_smaps_rollup(pid)),
    ("list_fd_targets", lambda: procfs.list_fd_targets(pid)),
    ("kpageflags", lambda: procfs.KPageFiles().read_flags([1])),
]:
    try:
        call()
        out[name] = "no error"
    except Exception as e:
        out[name] = f"{type(e).__name__}: {e}"
out["has_pfns"] = procfs.pagemap_has_pfns()
print(json.dumps(out))
"""


def run_as_nobody(script: str, *args: object) -> dict[str, object]:
    """Run a Python snippet that drops to uid/gid nobody; its JSON answer."""
    proc = subprocess.run(
        [sys.executable, "-c", script, *map(str, args)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=Path(__file__).parent.parent,
    )
    assert proc.returncode == 0, proc.stderr
    result: dict[str, object] = json.loads(proc.stdout)
    return result


def test_unreadable_target_is_access_denied(planted) -> None:  # type: ignore[no-untyped-def]
    out = run_as_nobody(NOBODY_PROBE, planted.pid)
    for name in ("read_vmas", "PagemapFile", "read_smaps_rollup", "list_fd_targets"):
        assert str(out[name]).startswith("AccessDenied: cannot read /proc/"), (name, out[name])
        assert "run procksm as root" in str(out[name])
    assert str(out["kpageflags"]).startswith("AccessDenied: cannot read /proc/kpageflags")
    assert out["has_pfns"] is False


def test_parse_cgroup_file_v1_and_v2() -> None:
    v1 = "4:memory:/system.slice/svc\n3:cpu,cpuacct:/x\n0::/\n"
    assert procfs.parse_cgroup_file(v1)["memory"] == "/system.slice/svc"
    assert procfs.parse_cgroup_file(v1)["cpuacct"] == "/x"
    assert procfs.parse_cgroup_file("0::/user.slice/a.scope\n")[""] == "/user.slice/a.scope"
    own = procfs.memory_cgroup()
    assert own.path.startswith("/")


# --- processes, threads, namespaces, files: the readers attach, fdpass and unmerge use ---


def _gone_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_process_readers_on_procksm_itself() -> None:
    me = os.getpid()
    assert procfs.read_comm(me) == Path(f"/proc/{me}/comm").read_text().strip()
    assert procfs.owner_uid(me) == os.getuid() or os.getuid() == 0
    assert procfs.thread_exists(me, me)
    assert me in procfs.pids()
    assert procfs.namespace_link(me, "mnt") == procfs.namespace_link("self", "mnt")
    assert procfs.namespace_identity(me, "net") == procfs.namespace_identity(None, "net")
    assert procfs.read_wchan(me, me)  # "-" while running
    scope = procfs.yama_ptrace_scope()
    assert scope is None or scope in (0, 1, 2, 3)


def test_fd_readers_on_procksm_itself() -> None:
    r, w = os.pipe()
    try:
        st = os.fstat(r)
        assert procfs.fd_identity(os.getpid(), r) == (st.st_dev, st.st_ino)
        assert procfs.own_fd_path(r) == f"/proc/{os.getpid()}/fd/{r}"
        again = procfs.reopen_own_fd(r, os.O_RDONLY)
        os.close(again)
    finally:
        os.close(r)
        os.close(w)
    assert procfs.fd_identity(os.getpid(), r) is None  # closed: not open any more


def test_process_readers_translate_a_gone_process() -> None:
    pid = _gone_pid()
    for read in (procfs.read_comm, procfs.owner_uid, procfs.list_threads):
        with pytest.raises(NoSuchProcess):
            read(pid)
    with pytest.raises(NoSuchProcess):
        procfs.open_mem(pid, pid)
    with pytest.raises(NoSuchProcess):
        procfs.fd_identity(pid, 0)
    assert not procfs.thread_exists(pid, pid)
    assert procfs.namespace_link(pid, "net") is None
    assert procfs.open_mapped_file(pid, 0, PAGE_SIZE, "/bin/sh") is None


def test_executable_file_vmas_and_mapped_files_of_procksm_itself() -> None:
    me = os.getpid()
    found = procfs.executable_file_vmas(me)
    # what PROCMAP_QUERY's filters let through is what maps shows: r-x and a file
    expected = [
        (v.start, v.end, v.offset, v.path)
        for v in procfs.read_maps(me)
        if v.readable and v.executable and v.path.startswith("/")
    ]
    assert [(v.start, v.end, v.offset, v.name) for v in found] == expected
    libc = next(v for v in found if "libc" in v.name)
    fd = procfs.open_mapped_file(me, libc.start, libc.end, libc.name)
    assert fd is not None
    try:
        # the file at the mapping's offset holds the bytes mapped at its start
        with open(f"/proc/{me}/mem", "rb") as mem:
            mem.seek(libc.start)
            assert os.pread(fd, 4096, libc.offset) == mem.read(4096)
    finally:
        os.close(fd)


def test_pids_mapping_finds_a_mapping_by_name() -> None:
    code = (
        "import mmap, os, time; fd = os.memfd_create('procksm-test-pids-mapping'); "
        "os.ftruncate(fd, 4096); m = mmap.mmap(fd, 4096); print('ok', flush=True); "
        "time.sleep(30)"
    )
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE)
    try:
        assert child.stdout is not None and child.stdout.readline() == b"ok\n"
        assert procfs.pids_mapping("/memfd:procksm-test-pids-mapping") == [child.pid]
    finally:
        child.kill()
        child.wait()


def test_coredump_filter_parser() -> None:
    assert procfs.parse_coredump_filter("00000033\n") == 0x33
    with pytest.raises(ProcksmError):
        procfs.parse_coredump_filter("zz")
    assert procfs.read_coredump_filter(os.getpid()) == int(
        Path("/proc/self/coredump_filter").read_text(), 16
    )


def test_the_syscall_a_blocked_thread_is_in() -> None:
    child = subprocess.Popen(
        [sys.executable, "-c", "import os; os.read(0, 1)"], stdin=subprocess.PIPE
    )
    try:
        deadline = time.monotonic() + 10
        while procfs.read_thread_syscall(child.pid, child.pid) != 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert procfs.read_thread_syscall(child.pid, child.pid) == 0  # read
    finally:
        child.kill()
        child.wait()
    assert procfs.read_thread_syscall(child.pid, child.pid) is None  # gone


def test_a_mapping_name_matches_itself_and_shell_patterns() -> None:
    assert procfs.name_matches("[heap]", "[heap]")  # as a pattern it means "h, e, a or p"
    assert procfs.name_matches("[heap]", "*heap*")
    assert procfs.name_matches("/usr/lib/libc.so.6", "*/libc.so*")
    assert not procfs.name_matches("[stack]", "[heap]")
    assert not procfs.name_matches("h", "[heap]x")


def test_thread_sched_reads_cpu_time_and_last_cpu_of_a_thread() -> None:
    """procfs.ThreadSched, on this process's own main thread: its CPU time grows with
    work, the CPU it last ran on is one it may run on, a gone thread answers None."""
    pid = os.getpid()
    with procfs.ThreadSched(pid) as sched:
        before = sched.cpu_ns(pid)
        end = time.process_time() + 0.02
        while time.process_time() < end:
            pass
        after = sched.cpu_ns(pid)
        assert before is not None and after is not None
        assert after - before >= 10_000_000  # 20 ms of CPU spent, 10 ms at least seen
        assert sched.last_cpu(pid) in os.sched_getaffinity(0)
        gone = subprocess.Popen(["true"])
        gone.wait()
        assert sched.cpu_ns(gone.pid) is None and sched.last_cpu(gone.pid) is None
        assert sched.cpu_ns(pid) is not None  # and back to a live thread


def test_maps_query_fallback_sees_mappings_made_after_changed() -> None:
    """On kernels without PROCMAP_QUERY a window's MapsQuery answers from a table read
    once: after procksm's injected calls change the VMAs, changed() reads it again."""
    import mmap

    with procfs.MapsQuery(os.getpid()) as q:
        q._fallback = procfs.read_maps(os.getpid())  # as on a kernel without the ioctl
        m = mmap.mmap(-1, 4 * mmap.PAGESIZE)
        try:
            addr = ctypes.addressof(ctypes.c_char.from_buffer(m))  # the view is let go
            assert q.vma_at(addr) is None  # the stale table
            q.changed()
            v = q.vma_at(addr)
            assert v is not None and v.start <= addr < v.end
        finally:
            m.close()


def test_maps_query_keeps_an_answer_until_changed() -> None:
    """A window asks for the same address more than once (a thread's stack), and for
    many addresses of one VMA (its extents); the answer is kept for every address of the
    VMA until procksm's injected calls change the VMAs (changed())."""
    import mmap

    m = mmap.mmap(-1, 4 * mmap.PAGESIZE)
    addr = ctypes.addressof(ctypes.c_char.from_buffer(m))  # the view is let go
    with procfs.MapsQuery(os.getpid(), remember=True) as q:
        first = q.vma_at(addr)
        assert first is not None and first.start <= addr < first.end
        m.close()  # unmapped: a fresh query would find nothing here
        assert q.vma_at(addr) == first
        # another address of the VMA found: the same answer, not asked again
        assert q.vma_at(addr + 3 * mmap.PAGESIZE) == first
        q.changed()
        after = q.vma_at(addr)
        assert after is None or not (after.start <= addr < after.end and after == first)
