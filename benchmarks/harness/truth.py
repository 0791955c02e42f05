"""Truth sources: what the benchmarks' numbers are read from.

- pagemap and kpageflags: ``census`` (distinct frames behind the targets' regions) and
  ``content_ideal`` (the ideal saving of real programs, from their memory);
- /proc/meminfo (machine-wide), the targets' RssAnon and procksm's memfd pages
  (per process: what other processes on the machine cannot disturb);
- CPU time and memory of a process tree, copy-on-write faults of a thread.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from benchmarks.harness.common import Json
from benchmarks.harness.targets import Target
from procksm import PAGE_SIZE
from procksm.procfs import (
    KPF_KSM,
    KPF_ZERO_PAGE,
    PM_FILE,
    KPageFiles,
    PagemapFile,
    pfns_of,
)

REGIONS = ("identical", "zero", "unique")
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


# --------------------------------------------------------------------------------------
# Memory counters
# --------------------------------------------------------------------------------------


def meminfo() -> dict[str, int]:
    """/proc/meminfo in pages."""
    out = {}
    with open("/proc/meminfo") as f:
        for line in f:
            name, _, rest = line.partition(":")
            fields = rest.split()
            if len(fields) == 2 and fields[1] == "kB":
                out[name] = int(fields[0]) * 1024 // PAGE_SIZE
    return out


def meminfo_saving(before: dict[str, int], now: dict[str, int]) -> int:
    """Pages procksm saved: anon pages gone, minus the shared (memfd) pages replacing them."""
    return (before["AnonPages"] - now["AnonPages"]) - (now["Shmem"] - before["Shmem"])


def proc_status(pid: int, field_name: str) -> int:
    """A kB line of /proc/PID/status, in bytes (0 if gone)."""
    with suppress(OSError), open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field_name + ":"):
                return int(line.split()[1]) * 1024
    return 0


def rss_anon_pages(pid: int) -> int:
    return proc_status(pid, "RssAnon") // PAGE_SIZE


def _add_open_memfds(pid: int, blocks: dict[int, int]) -> None:
    """st_blocks of each memfd a process holds open, into ``blocks`` by inode (once each)."""
    with suppress(OSError):
        for fd in os.listdir(f"/proc/{pid}/fd"):
            path = f"/proc/{pid}/fd/{fd}"
            with suppress(OSError):
                if os.readlink(path).startswith("/memfd:"):
                    st = os.stat(path)
                    blocks.setdefault(st.st_ino, st.st_blocks)


def memfd_pages(pid: int) -> int:
    """Pages allocated in the memfds a process holds open (st_blocks of each, once per inode).

    procksm keeps its sealed segments open until it exits; with the targets' RssAnon this
    gives a per-process saving that other processes on the machine cannot disturb.
    """
    blocks: dict[int, int] = {}
    _add_open_memfds(pid, blocks)
    return sum(blocks.values()) * 512 // PAGE_SIZE


def shared_memfd_pages(targets: Sequence[Target], tool_pids: Sequence[int]) -> int:
    """Pages of procksm's memfd segments: those mapped in the targets (maps, map_files)
    and those the tool holds open, each inode once. The daemon does not keep its
    segments open as `procksm merge` does, so its own fds alone would miss them."""
    blocks: dict[int, int] = {}
    for t in targets:
        with suppress(OSError), open(f"/proc/{t.pid}/maps") as f:
            for line in f:
                parts = line.split()
                if len(parts) < 6 or not parts[5].startswith("/memfd:procksm-seg"):
                    continue
                ino = int(parts[4])
                if ino not in blocks:
                    with suppress(OSError):
                        st = os.stat(f"/proc/{t.pid}/map_files/{parts[0]}")
                        blocks[ino] = st.st_blocks
    for tool_pid in tool_pids:
        _add_open_memfds(tool_pid, blocks)
    return sum(blocks.values()) * 512 // PAGE_SIZE


# --------------------------------------------------------------------------------------
# pagemap
# --------------------------------------------------------------------------------------


def _region_census(kpf: KPageFiles, pfns: np.ndarray) -> tuple[Json, np.ndarray]:
    """One region's PFNs (all targets): its counts, and the frames it costs (the zero page
    and non-present pages cost none)."""
    present = pfns[pfns != 0]
    flags = kpf.read_flags(present)
    is_zero = (flags >> np.uint64(KPF_ZERO_PAGE)) & np.uint64(1) != 0
    is_ksm = (flags >> np.uint64(KPF_KSM)) & np.uint64(1) != 0
    frames = present[~is_zero]
    counts = {
        "pages": len(pfns),
        "not_present": len(pfns) - len(present),
        "zero_page_ptes": int(np.count_nonzero(is_zero)),
        "distinct_frames": int(np.unique(frames).size),
        "ksm_ptes": int(np.count_nonzero(is_ksm)),
        "ksm_frames": int(np.unique(present[is_ksm]).size),
    }
    return counts, frames


def census(targets: Sequence[Target]) -> Json:
    """Frames behind the planted ranges, from pagemap and kpageflags (root only).

    saved_pages = planted pages - distinct frames mapped there, not counting the kernel's
    zero page: a page that is not present (dropped) or maps the zero page costs no frame.
    """
    per_region: Json = {}
    all_frames = []
    file_ptes = 0
    with KPageFiles() as kpf:
        region_pfns: dict[str, list[np.ndarray]] = {r: [] for r in REGIONS}
        for t in targets:
            with PagemapFile(t.pid) as pm:
                for r, (start, n) in t.regions.items():
                    entries = pm.read(start, start + n * PAGE_SIZE)
                    file_ptes += int(np.count_nonzero(entries & PM_FILE))
                    region_pfns.setdefault(r, []).append(pfns_of(entries))
        planted = 0
        for r, chunks in region_pfns.items():
            if not chunks:
                continue
            pfns = np.concatenate(chunks)
            planted += len(pfns)
            per_region[r], frames = _region_census(kpf, pfns)
            all_frames.append(frames)
    frames = np.unique(np.concatenate(all_frames)) if all_frames else np.zeros(0, np.uint64)
    ksm_frames = sum(v["ksm_frames"] for v in per_region.values())
    return {
        "planted_pages": planted,
        "distinct_frames": int(frames.size),
        "saved_pages": planted - int(frames.size),
        "file_backed_ptes": file_ptes,
        "ksm_frames": ksm_frames,
        "regions": per_region,
    }


def region_saved(census: Json, names: Sequence[str]) -> int:
    """Pages saved in the named regions of a census: pages - distinct frames."""
    regions = census.get("regions", {})
    return sum(regions[r]["pages"] - regions[r]["distinct_frames"] for r in names if r in regions)


class _ContentTally:
    """Present pages, their PFNs and content hashes, gathered over the targets' regions."""

    def __init__(self) -> None:
        rng = np.random.default_rng(20261126)
        self.mults = rng.integers(1, 2**63, size=(512, 2), dtype=np.uint64) | np.uint64(1)
        self.pfn_chunks: list[np.ndarray] = []
        self.key_chunks: list[np.ndarray] = []
        self.zero_pages = 0
        self.zero_addr_chunks: list[np.ndarray] = []  # addresses of the zero-filled pages
        self.zero_pfn_chunks: list[np.ndarray] = []  # and their frames

    def add_region(self, pm: PagemapFile, mem_fd: int, start: int, n: int) -> None:
        """Runs of present pages, read in pieces of at most 4 MiB."""
        pfns = pfns_of(pm.read(start, start + n * PAGE_SIZE))
        idx = np.flatnonzero(pfns)
        if idx.size == 0:
            return
        breaks = np.flatnonzero(np.diff(idx) != 1) + 1
        for run in np.split(idx, breaks):
            for lo in range(0, run.size, 1024):
                part = run[lo : lo + 1024]
                try:
                    addr = start + int(part[0]) * PAGE_SIZE
                    data = os.pread(mem_fd, part.size * PAGE_SIZE, addr)
                except OSError:
                    continue
                if len(data) != part.size * PAGE_SIZE:
                    continue
                addrs = np.uint64(start) + part.astype(np.uint64) * np.uint64(PAGE_SIZE)
                self._add_pages(pfns[part], data, addrs)

    def _add_pages(self, pfns: np.ndarray, data: bytes, addrs: np.ndarray) -> None:
        words = np.frombuffer(data, dtype=np.uint64).reshape(addrs.size, 512)
        nonzero = words.any(axis=1)
        self.zero_pages += int(np.count_nonzero(~nonzero))
        self.zero_addr_chunks.append(addrs[~nonzero])
        self.zero_pfn_chunks.append(pfns[~nonzero])
        self.key_chunks.append(words[nonzero] @ self.mults)  # wraps mod 2**64: multilinear
        self.pfn_chunks.append(pfns)


def _is_zero_page(kpf: KPageFiles, pfns: np.ndarray) -> np.ndarray:
    flags = kpf.read_flags(pfns) if pfns.size else np.zeros(0, np.uint64)
    return np.asarray((flags >> np.uint64(KPF_ZERO_PAGE)) & np.uint64(1) != 0)


def content_census(targets: Sequence[Target]) -> tuple[Json, dict[int, np.ndarray]]:
    """``content_ideal``'s numbers, and each target's zero-filled pages that have a frame
    of their own (their addresses): what a merging tool can drop."""
    tally = _ContentTally()
    zeros: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    for t in targets:
        first = len(tally.zero_addr_chunks)
        with PagemapFile(t.pid) as pm, open(f"/proc/{t.pid}/mem", "rb", buffering=0) as mem:
            for start, n in t.regions.values():
                tally.add_region(pm, mem.fileno(), start, n)
        zeros[t.pid] = (
            np.concatenate([np.zeros(0, np.uint64), *tally.zero_addr_chunks[first:]]),
            np.concatenate([np.zeros(0, np.uint64), *tally.zero_pfn_chunks[first:]]),
        )
    pfn_chunks, key_chunks = tally.pfn_chunks, tally.key_chunks
    all_pfns = np.concatenate(pfn_chunks) if pfn_chunks else np.zeros(0, np.uint64)
    with KPageFiles() as kpf:
        not_zero_page = ~_is_zero_page(kpf, all_pfns)
        own_frame = {pid: a[~_is_zero_page(kpf, f)] for pid, (a, f) in zeros.items()}
    frames = int(np.unique(all_pfns[not_zero_page]).size)
    keys = np.concatenate(key_chunks) if key_chunks else np.zeros((0, 2), np.uint64)
    contents = int(np.unique(keys, axis=0).shape[0])
    doc = {
        "present_pages": int(all_pfns.size),
        "distinct_frames": frames,
        "distinct_nonzero_contents": contents,
        "zero_content_pages": tally.zero_pages,
        "ideal_pages": max(0, frames - contents),
    }
    return doc, own_frame


def content_ideal(targets: Sequence[Target]) -> Json:
    """The ideal saving of real programs, measured here from their memory, not by either
    tool: over the regions (private anonymous VMAs at start) of all targets, distinct
    frames - distinct non-zero contents. Present pages only (pagemap), read through
    /proc/PID/mem; contents compared by two independent 64-bit multilinear hashes."""
    return content_census(targets)[0]


def shared_ptes(c: Json) -> int:
    """From a census (with its regions): present pages, the zero page aside, minus the
    distinct frames behind them: the pages that share a frame with another one there
    (KSM pages, procksm's segments, fork)."""
    regions = c["regions"].values()
    present = sum(r["pages"] - r["not_present"] - r["zero_page_ptes"] for r in regions)
    return int(present - c["distinct_frames"])


def zero_pages_gone(targets: Sequence[Target], zeros: dict[int, np.ndarray]) -> int:
    """How many of ``zeros`` (per target: addresses of zero-filled pages that had a frame
    of their own) have none now: not present, or the kernel's zero page."""
    gone = 0
    with KPageFiles() as kpf:
        for t in targets:
            addrs = zeros.get(t.pid)
            if addrs is None or addrs.size == 0:
                continue
            with PagemapFile(t.pid) as pm:
                for start, n in t.regions.values():
                    mine = addrs[(addrs >= start) & (addrs < start + n * PAGE_SIZE)]
                    if mine.size == 0:
                        continue
                    pfns = pfns_of(pm.read(start, start + n * PAGE_SIZE))
                    now = pfns[((mine - np.uint64(start)) // np.uint64(PAGE_SIZE)).astype(int)]
                    gone += int(np.count_nonzero(now == 0))
                    present = now[now != 0]
                    gone += int(np.count_nonzero(_is_zero_page(kpf, present)))
    return gone


# --------------------------------------------------------------------------------------
# Processes: CPU time, process trees, faults
# --------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ThreadCpu:
    """CPU time of one task: utime+stime of /proc/PID/stat, and schedstat's runtime."""

    stat_s: float  # utime + stime (clock ticks / SC_CLK_TCK): what top and ps show
    runtime_s: float  # /proc/PID/schedstat field 1, nanoseconds on the CPU: finer grained
    state: str  # R, S, D, ...


def _stat_fields(path: str) -> list[str]:
    """The fields of a /proc/.../stat file after the command name: [0] is field 3 (state)."""
    return Path(path).read_text().rsplit(")", 1)[1].split()


def read_thread_cpu(pid: int) -> ThreadCpu:
    fields = _stat_fields(f"/proc/{pid}/stat")
    # utime and stime are fields 14 and 15 of proc(5)
    utime, stime = int(fields[11]), int(fields[12])
    runtime_ns = int(Path(f"/proc/{pid}/schedstat").read_text().split()[0])
    return ThreadCpu((utime + stime) / CLOCK_TICKS, runtime_ns / 1e9, fields[0])


def targets_cpu_s(targets: Sequence[Target]) -> float:
    """CPU time of the targets' threads so far (schedstat, ns): read before and after a
    run, it is what the run cost the targets themselves; idle targets spend nothing of
    their own, so under procksm it is the calls procksm makes them run (the mmaps and
    populates ksmd makes in its own time), its stops and its resumes."""
    total = 0
    for t in targets:
        with suppress(OSError):
            for tid in os.listdir(f"/proc/{t.pid}/task"):
                with suppress(OSError, ValueError, IndexError):
                    stat = Path(f"/proc/{t.pid}/task/{tid}/schedstat").read_text()
                    total += int(stat.split()[0])
    return total / 1e9


def guards_cpu_s() -> float:
    """CPU time of the madvise guards so far, their reaped unmerge helpers included
    (utime+stime+cutime+cstime): read before and after a merge, what answering the
    target's guarded calls made in procksm's batches cost (the guards serve every
    procksm and are not children of the merge, so its rusage leaves them out)."""
    total = 0.0
    for pid in filter(str.isdigit, os.listdir("/proc")):
        with suppress(OSError, ValueError, IndexError):
            if not _is_guard(int(pid)):
                continue
            fields = _stat_fields(f"/proc/{pid}/stat")
            total += sum(int(f) for f in fields[11:15]) / CLOCK_TICKS
    return total


def parent_pid(pid: int) -> int:
    return int(_stat_fields(f"/proc/{pid}/stat")[1])


def exited(pid: int) -> bool:
    """Gone or a zombie; unlike Popen.poll this does not reap it (wait4 then gives rusage)."""
    try:
        return _stat_fields(f"/proc/{pid}/stat")[0] == "Z"
    except OSError:
        return True


def _is_guard(pid: int) -> bool:
    try:
        return b"procksm.guardd" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def process_tree(pid: int) -> list[int]:
    """pid and its descendants (procksm attach forks a worker that does the work), but
    not the madvise guard processes a merge may start: they serve every procksm and
    outlive the daemon by design (docs/design.md §9), so they are neither its cost nor
    something to wait for when it stops (waiting for them cost 120 s per daemon run)."""
    out = [pid]
    i = 0
    while i < len(out):
        p = out[i]
        i += 1
        with suppress(OSError):
            for tid in os.listdir(f"/proc/{p}/task"):
                with suppress(OSError):
                    kids = Path(f"/proc/{p}/task/{tid}/children").read_text().split()
                    out += [int(c) for c in kids if not _is_guard(int(c))]
    return out


def tree_cpu(pids: Sequence[int]) -> float:
    """utime+stime of the live processes (each /proc/PID/stat covers all its threads)."""
    total = 0.0
    for p in pids:
        with suppress(OSError):
            total += read_thread_cpu(p).stat_s
    return total


def comm(pid: int) -> str:
    """A process's command name plus its module for Python (procksm's processes are all
    "python"), "" if gone."""
    with suppress(OSError):
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        module = argv[argv.index(b"-m") + 1].decode() if b"-m" in argv else ""
        return " ".join(x for x in (Path(f"/proc/{pid}/comm").read_text().strip(), module) if x)
    return ""


def cpu_with_reaped(pids: Sequence[int]) -> float:
    """utime+stime of the live processes plus cutime+cstime, the CPU of the children
    each has reaped: over a process tree, the difference of two readings counts a child
    that ran and exited between them (its time moves into its parent's)."""
    total = 0
    for p in pids:
        with suppress(OSError):
            # fields 14-17 of proc(5): utime, stime, cutime, cstime
            total += sum(int(f) for f in _stat_fields(f"/proc/{p}/stat")[11:15])
    return total / CLOCK_TICKS


@dataclass(frozen=True, slots=True)
class PrivateMemory:
    """Memory only one process maps (smaps Private_Clean + Private_Dirty), by kind of
    mapping, in bytes."""

    anonymous: int = 0  # unnamed, [heap], [stack], [anon:NAME]
    file_backed: int = 0  # mappings of files: libraries (bcc's LLVM), bytecode caches
    shmem: int = 0  # memfd and /dev/shm mappings (procksm's segments only it maps)

    @property
    def total(self) -> int:
        return self.anonymous + self.file_backed + self.shmem

    def plus(self, other: PrivateMemory) -> PrivateMemory:
        return PrivateMemory(
            self.anonymous + other.anonymous,
            self.file_backed + other.file_backed,
            self.shmem + other.shmem,
        )


def _mapping_kind(path: str) -> str:
    if path.startswith(("/memfd:", "/dev/shm/", "/SYSV")):
        return "shmem"
    if path.startswith("/"):
        return "file_backed"
    return "anonymous"  # "", [heap], [stack], [anon:NAME], [vdso] (never private)


def private_memory(pid: int) -> PrivateMemory:
    """/proc/PID/smaps: each mapping's Private_Clean + Private_Dirty, summed by kind
    (smaps_rollup has the total only). Zero for a process that is gone."""
    sums = {"anonymous": 0, "file_backed": 0, "shmem": 0}
    kind = "anonymous"
    with suppress(OSError), open(f"/proc/{pid}/smaps") as f:
        for line in f:
            key, _, rest = line.partition(" ")
            if not key.endswith(":"):  # a mapping's header: "start-end perms off dev inode path"
                fields = line.split(None, 5)
                kind = _mapping_kind(fields[5].strip() if len(fields) > 5 else "")
            elif key in ("Private_Clean:", "Private_Dirty:"):
                sums[kind] += int(rest.split()[0]) * 1024
    return PrivateMemory(**sums)


def minflt(pid: int, tid: int) -> int:
    """Minor faults of one thread (field 10 of proc(5)), 0 if gone."""
    with suppress(OSError):
        return int(_stat_fields(f"/proc/{pid}/task/{tid}/stat")[7])
    return 0


def churn_threads(targets: Sequence[Target]) -> list[tuple[int, int]]:
    """(pid, tid) of each planted target's churn writer: its only thread besides main."""
    out = []
    for t in targets:
        tids = [int(x) for x in os.listdir(f"/proc/{t.pid}/task") if int(x) != t.pid]
        out += [(t.pid, tid) for tid in tids]
    return out


def ksm_stat(pid: int) -> dict[str, str]:
    """/proc/PID/ksm_stat as a dict ({} if unreadable). Its lines are "ksm_rmap_items 0"
    and, on 6.7+, "ksm_merge_any: yes": the keys lose that colon."""
    with suppress(OSError):
        lines = Path(f"/proc/{pid}/ksm_stat").read_text().splitlines()
        return {k.rstrip(":"): v for k, v in (line.split(None, 1) for line in lines)}
    return {}
