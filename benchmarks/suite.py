"""The benchmark suite of issue 8: procksm against the kernel's KSM, one command.

    make bench                                   # = .venv/bin/python benchmarks/suite.py
    .venv/bin/python benchmarks/suite.py --quick [--only W1]   # small sizes, 1 rep

Workloads, each started as real processes (fresh ones for every run, killed afterwards):

  W1 workers     planted: N x (identical + zero + unique) pages
  W2 scattered   planted --alternate: every other page duplicated across processes
  W3 volatile    planted --identical I --churn I: half the identical pages are stored
                 to every ~10 ms (content identical across processes, changing once a
                 second): merging them only buys copy-on-write breaks
  W4 zero-heavy  planted, mostly zero-filled pages (a heap pre-touched like a JVM with
                 AlwaysPreTouch) plus a little shared and unique data
  W5 numpy       Python interpreters holding the same numpy array (NUMPY_MADVISE_HUGEPAGE=0)
  W5 redis       redis-server instances with the same dataset (DEBUG POPULATE)

Each workload runs, in the same run, alternating the order per repetition, under

  merge          `procksm merge PID... --json` (one shot: procksm at full speed)
  ksmd_max       the kernel's KSM, pages_to_scan=100000, sleep_millisecs=0
  daemon         `procksm attach PID...` at its defaults (cpu_limit 25 %), bounded time
  ksmd_defaults  the kernel's KSM at its defaults (100 pages / 20 ms), bounded time
  daemon_eqcpu   W1 only, right after ksmd_defaults: `procksm attach --cpu-limit P` with P
                 the share of a CPU ksmd used in that ksmd_defaults run (equal CPU budget)

The kernel's KSM runs with use_zero_pages=1. Its targets opt in: planted with --mergeable
(MADV_MERGEABLE on the planted regions), the real programs through a wrapper that calls
prctl(PR_SET_MEMORY_MERGE, 1) and execs them (inherited across exec). procksm's targets
do not opt in.

Then the scaling runs (merge and ksmd_max; W1's shape): 1, 4, 16, 64 targets at a fixed
total, and 0.25 -> 8 GiB of target memory over 4 targets.

Truth sources (see benchmarks/README.md, "suite.py"):
  saving reached   pagemap of the targets (planted regions, or the private anonymous VMAs
                   the real programs had at start): pages - distinct frames, for both
                   tools; /proc/meminfo (AnonPages drop - Shmem growth) alongside
  time to 95/100 % procksm: targets' RssAnon drop - pages of the memfds procksm holds,
                   sampled every --poll s (merge: 100 % = its exit if pagemap then shows
                   the ideal); ksmd: pages_sharing + ksm_zero_pages, same sampling
  CPU s            merge: the child's rusage; daemon: utime+stime of its process at the
                   100 % sample (or at the timeout); ksmd: utime+stime of ksmd, same
  pauses           procksm's own JSON (merge --json, stats --json); ksmd stops no target
  RSS              merge: ru_maxrss; daemon: VmHWM; per GiB of the targets' RssAnon
  thrash (W3)      minor faults of the churn threads (/proc/PID/task/TID/stat): those
                   threads only store to pages they faulted in long ago, so each minor
                   fault is a copy-on-write break of a merged page, whoever merged it

KSM settings are machine-wide: ksmlib restores the values found at start on every exit
path (also SIGINT/SIGTERM/SIGHUP); the suite refuses to start while other processes have
KSM pages. Writes benchmarks/results/suite.json (suite-quick.json with --quick, or
--output) and saving_over_time.svg next to it.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from contextlib import suppress
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import ksmlib
import merge_vs_ksm as mvk

from procksm import PAGE_SIZE
from procksm.procfs import KPF_ZERO_PAGE, KPageFiles, PagemapFile, pfns_of

ROOT = mvk.ROOT
RESULTS = ROOT / "benchmarks" / "results"
MIB = mvk.MIB_PAGES  # pages per MiB
GIB = 1024 * MIB
Json = dict[str, Any]

# Goals of issue 8
GOAL_SPEEDUP = 3.0
GOAL_SAVING = 0.99
GOAL_P99_MS = 1.0
GOAL_BYTES_PER_PAGE = 32.0

# prctl(PR_SET_MEMORY_MERGE=67, 1), then exec: the flag is inherited across exec (6.7+)
MERGE_ANY_WRAPPER = (
    "import ctypes, os, sys\n"
    "libc = ctypes.CDLL(None, use_errno=True)\n"
    "if libc.prctl(67, 1, 0, 0, 0) != 0:\n"
    "    sys.exit(f'prctl(PR_SET_MEMORY_MERGE): {os.strerror(ctypes.get_errno())}')\n"
    "os.execv(sys.argv[1], sys.argv[1:])\n"
)

NUMPY_WORKER = (
    "import hashlib, os, sys\n"
    "import numpy as np\n"
    "a = np.random.default_rng(int(sys.argv[2])).random(int(sys.argv[1]) * 131072)\n"
    "names = {f'key{i}': str(i) * 5 for i in range(50000)}\n"
    "digest = hashlib.sha256(a.data).hexdigest()\n"
    "print(f'READY pid={os.getpid()}', flush=True)\n"
    "for line in sys.stdin:\n"
    "    if line.strip() == 'check':\n"
    "        ok = hashlib.sha256(a.data).hexdigest() == digest and len(names) == 50000\n"
    "        print(f'OK pages={a.nbytes // 4096}' if ok else 'CORRUPT array', flush=True)\n"
    "    elif line.strip() == 'quit':\n"
    "        break\n"
)


# --------------------------------------------------------------------------------------
# Sizes
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Sizes:
    reps: int
    w1: tuple[int, int, int, int]  # targets, identical, zero, unique (pages per target)
    w2: tuple[int, int]  # targets, alternate pages
    w3: tuple[int, int]  # targets, identical pages (as many churn pages)
    w4: tuple[int, int, int, int]  # targets, zero, identical, unique
    numpy: tuple[int, int]  # workers, MiB of array each
    redis: tuple[int, int, int]  # servers, keys, value bytes
    max_timeout_s: float  # ksmd_max
    bounded_s: float  # daemon, ksmd_defaults, daemon_eqcpu
    w1_bounded_s: float  # the same on W1: long enough for ksmd's defaults to reach 95 %
    thrash_window_s: float
    scaling_targets: tuple[int, ...]
    scaling_targets_gib: float
    scaling_gib: tuple[float, ...]
    scaling_gib_targets: int
    scaling_daemon_bound_s: float


FULL = Sizes(
    reps=3,
    w1=(4, 64 * MIB, 16 * MIB, 16 * MIB),
    w2=(4, 32 * MIB),
    w3=(4, 32 * MIB),
    w4=(4, 56 * MIB, 4 * MIB, 4 * MIB),
    numpy=(4, 64),
    redis=(4, 100_000, 500),
    max_timeout_s=30.0,
    bounded_s=45.0,
    w1_bounded_s=120.0,
    thrash_window_s=15.0,
    scaling_targets=(1, 4, 16, 64),
    scaling_targets_gib=1.0,
    scaling_gib=(0.25, 0.5, 1.0, 2.0, 4.0, 8.0),
    scaling_gib_targets=4,
    scaling_daemon_bound_s=180.0,
)

QUICK = Sizes(
    reps=1,
    w1=(3, 8 * MIB, 2 * MIB, 2 * MIB),
    w2=(3, 8 * MIB),
    w3=(3, 4 * MIB),
    w4=(3, 8 * MIB, 1 * MIB, 1 * MIB),
    numpy=(2, 16),
    redis=(2, 20_000, 300),
    max_timeout_s=10.0,
    bounded_s=6.0,
    w1_bounded_s=10.0,
    thrash_window_s=2.0,
    scaling_targets=(1, 4),
    scaling_targets_gib=1 / 32,
    scaling_gib=(1 / 32, 1 / 16),
    scaling_gib_targets=2,
    scaling_daemon_bound_s=20.0,
)

REAL_IDEAL = (
    "per run, from the fresh targets' memory before the tool starts: distinct frames - "
    "distinct non-zero contents over their private anonymous VMAs (content_ideal)"
)
WORKLOADS = ("W1", "W2", "W3", "W4", "W5numpy", "W5redis")
BASE_VARIANTS = ("merge", "ksmd_max", "daemon", "ksmd_defaults")


# --------------------------------------------------------------------------------------
# Workloads
# --------------------------------------------------------------------------------------


class RealTarget(mvk.Target):
    """A real program: its regions are the private anonymous VMAs it had at start."""

    checker: Callable[[], str] | None = None

    def ask(self, command: str) -> str:
        if command == "check" and self.checker is not None:
            return self.checker()
        return super().ask(command)


def anon_vmas(pid: int) -> dict[str, tuple[int, int]]:
    """Private anonymous read-write VMAs (heap included, stacks not): name -> (start, pages)."""
    out: dict[str, tuple[int, int]] = {}
    with open(f"/proc/{pid}/maps") as f:
        for line in f:
            parts = line.split()
            path = parts[5] if len(parts) > 5 else ""
            if parts[1][:2] != "rw" or parts[1][3] != "p" or path not in ("", "[heap]"):
                continue
            a, b = (int(x, 16) for x in parts[0].split("-"))
            out[f"vma{len(out)}"] = (a, (b - a) // PAGE_SIZE)
    return out


@dataclass
class Workload:
    name: str
    description: str
    ideal_pages: int  # real programs: set per run by content_ideal()
    has_zero_pages: bool
    start: Callable[[bool], list[mvk.Target]]  # mergeable -> started targets
    volatile_region: str | None = None  # W3: the churn region
    stable_regions: tuple[str, ...] = ()  # W3: what the ideal counts
    real: bool = False
    ideal_source: str = "workload formula"


def planted_workload(
    exe: Path, name: str, desc: str, targets: int, args: Sequence[str], ideal: int, zero: bool
) -> Workload:
    def start(mergeable: bool) -> list[mvk.Target]:
        cmd = [str(exe), *args, "--seed", "7"] + (["--mergeable"] if mergeable else [])
        return mvk.spawn_planted([cmd] * targets)

    return Workload(name, desc, ideal, zero, start)


def make_workloads(exe: Path, s: Sizes, tmp: Path) -> dict[str, Workload]:
    t, i, z, u = s.w1
    w1 = planted_workload(
        exe,
        "W1",
        f"workers: {t} x ({i // MIB} MiB identical + {z // MIB} MiB zero + {u // MIB} MiB unique)",
        t,
        ["--identical", str(i), "--zero", str(z), "--unique", str(u)],
        t * (i + z + u) - (i + t * u),
        z > 0,
    )
    t2, a = s.w2
    w2 = planted_workload(
        exe,
        "W2",
        f"scattered: {t2} x {a // MIB} MiB, every other page identical across processes",
        t2,
        ["--alternate", str(a)],
        (t2 - 1) * ((a + 1) // 2),
        False,
    )
    t3, i3 = s.w3
    w3 = planted_workload(
        exe,
        "W3",
        f"volatile: {t3} x ({i3 // MIB} MiB identical + {i3 // MIB} MiB identical but stored "
        "to every ~10 ms); ideal = the stable half",
        t3,
        ["--identical", str(i3), "--churn", str(i3)],
        (t3 - 1) * i3,
        False,
    )
    w3.volatile_region, w3.stable_regions = "churn", ("identical",)
    t4, z4, i4, u4 = s.w4
    w4 = planted_workload(
        exe,
        "W4",
        f"zero-heavy: {t4} x ({z4 // MIB} MiB zero + {i4 // MIB} MiB identical + "
        f"{u4 // MIB} MiB unique)",
        t4,
        ["--zero", str(z4), "--identical", str(i4), "--unique", str(u4)],
        t4 * z4 + (t4 - 1) * i4,
        True,
    )
    nw, nmib = s.numpy
    w5n = Workload(
        "W5numpy",
        f"{nw} Python interpreters, each the same {nmib} MiB numpy array + a dict of 50k str",
        0,
        True,
        lambda mergeable: start_numpy(nw, nmib, mergeable),
        real=True,
        ideal_source=REAL_IDEAL,
    )
    rn, keys, size = s.redis
    w5r = Workload(
        "W5redis",
        f"{rn} redis-server, each DEBUG POPULATE {keys} keys x {size} B",
        0,
        True,
        lambda mergeable: start_redis(rn, keys, size, mergeable, tmp),
        real=True,
        ideal_source=REAL_IDEAL,
    )
    return {w.name: w for w in (w1, w2, w3, w4, w5n, w5r)}


def _wrapped(cmd: list[str], mergeable: bool) -> list[str]:
    return [sys.executable, "-c", MERGE_ANY_WRAPPER, *cmd] if mergeable else cmd


def start_numpy(workers: int, mib: int, mergeable: bool) -> list[mvk.Target]:
    env = {**os.environ, "NUMPY_MADVISE_HUGEPAGE": "0", "OPENBLAS_NUM_THREADS": "1"}
    cmd = _wrapped([sys.executable, "-c", NUMPY_WORKER, str(mib), "11"], mergeable)
    procs = [
        subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
        for _ in range(workers)
    ]
    targets: list[mvk.Target] = []
    try:
        for p in procs:
            assert p.stdout is not None
            line = p.stdout.readline()
            if not line.startswith("READY"):
                raise RuntimeError(f"numpy worker (pid {p.pid}) did not start: {line!r}")
            targets.append(RealTarget(p, anon_vmas(p.pid)))
    except BaseException:
        mvk.stop_targets([mvk.Target(p, {}) for p in procs])
        raise
    return targets


def _redis_cli(sock: str, *args: object) -> str:
    out = subprocess.run(
        ["redis-cli", "-s", sock, *(str(a) for a in args)],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    return out.stdout.strip()


def start_redis(n: int, keys: int, size: int, mergeable: bool, tmp: Path) -> list[mvk.Target]:
    exe = shutil.which("redis-server")
    if exe is None or shutil.which("redis-cli") is None:
        raise RuntimeError("redis-server/redis-cli not installed (make setup installs them)")
    procs = []
    socks = []
    for k in range(n):
        sock = str(tmp / f"redis-{os.getpid()}-{k}-{time.monotonic_ns()}.sock")
        cmd = [exe, "--port", "0", "--unixsocket", sock, "--save", "", "--appendonly", "no"]
        cmd += ["--dir", str(tmp), "--enable-debug-command", "yes"]
        procs.append(
            subprocess.Popen(
                _wrapped(cmd, mergeable),
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                text=True,
            )
        )
        socks.append(sock)
    targets: list[mvk.Target] = []
    try:
        for p, sock in zip(procs, socks, strict=True):
            deadline = time.monotonic() + 20
            while not Path(sock).exists():
                if p.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"redis-server (pid {p.pid}) did not start")
                time.sleep(0.02)
            if _redis_cli(sock, "DEBUG", "POPULATE", keys, "key", size) != "OK":
                raise RuntimeError("DEBUG POPULATE failed")
            digest = _redis_cli(sock, "DEBUG", "DIGEST")
            t = RealTarget(p, anon_vmas(p.pid))

            def check(sock: str = sock, digest: str = digest, p: subprocess.Popen[str] = p) -> str:
                if p.poll() is not None:
                    return f"CORRUPT exited {p.returncode}"
                now = _redis_cli(sock, "DEBUG", "DIGEST")
                return "OK digest" if now == digest else f"CORRUPT digest {now} != {digest}"

            t.checker = check
            targets.append(t)
    except BaseException:
        mvk.stop_targets([mvk.Target(p, {}) for p in procs])
        raise
    return targets


def content_ideal(targets: Sequence[mvk.Target]) -> Json:
    """The ideal saving of real programs, measured here from their memory, not by either
    tool: over the regions (private anonymous VMAs at start) of all targets, distinct
    frames - distinct non-zero contents. Present pages only (pagemap), read through
    /proc/PID/mem; contents compared by two independent 64-bit multilinear hashes."""
    rng = np.random.default_rng(20261126)
    mults = rng.integers(1, 2**63, size=(512, 2), dtype=np.uint64) | np.uint64(1)
    pfn_chunks, key_chunks = [], []
    zero_pages = 0
    for t in targets:
        with PagemapFile(t.pid) as pm, open(f"/proc/{t.pid}/mem", "rb", buffering=0) as mem:
            for start, n in t.regions.values():
                pfns = pfns_of(pm.read(start, start + n * PAGE_SIZE))
                idx = np.flatnonzero(pfns)
                if idx.size == 0:
                    continue
                # runs of present pages, read in pieces of at most 4 MiB
                breaks = np.flatnonzero(np.diff(idx) != 1) + 1
                for run in np.split(idx, breaks):
                    for lo in range(0, run.size, 1024):
                        part = run[lo : lo + 1024]
                        try:
                            addr = start + int(part[0]) * PAGE_SIZE
                            data = os.pread(mem.fileno(), part.size * PAGE_SIZE, addr)
                        except OSError:
                            continue
                        if len(data) != part.size * PAGE_SIZE:
                            continue
                        words = np.frombuffer(data, dtype=np.uint64).reshape(part.size, 512)
                        nonzero = words.any(axis=1)
                        zero_pages += int(np.count_nonzero(~nonzero))
                        keys = words[nonzero] @ mults  # wraps mod 2**64: a multilinear hash
                        pfn_chunks.append(pfns[part])
                        key_chunks.append(keys)
    all_pfns = np.concatenate(pfn_chunks) if pfn_chunks else np.zeros(0, np.uint64)
    with KPageFiles() as kpf:
        flags = kpf.read_flags(all_pfns) if all_pfns.size else np.zeros(0, np.uint64)
    not_zero_page = (flags >> np.uint64(KPF_ZERO_PAGE)) & np.uint64(1) == 0
    frames = int(np.unique(all_pfns[not_zero_page]).size)
    keys = np.concatenate(key_chunks) if key_chunks else np.zeros((0, 2), np.uint64)
    contents = int(np.unique(keys, axis=0).shape[0])
    return {
        "present_pages": int(all_pfns.size),
        "distinct_frames": frames,
        "distinct_nonzero_contents": contents,
        "zero_content_pages": zero_pages,
        "ideal_pages": max(0, frames - contents),
    }


# --------------------------------------------------------------------------------------
# Runs
# --------------------------------------------------------------------------------------


def proc_status(pid: int, field_name: str) -> int:
    """A kB line of /proc/PID/status, in bytes (0 if gone)."""
    with suppress(OSError), open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field_name + ":"):
                return int(line.split()[1]) * 1024
    return 0


def minflt(pid: int, tid: int) -> int:
    with suppress(OSError):
        stat = Path(f"/proc/{pid}/task/{tid}/stat").read_text()
        return int(stat.rsplit(")", 1)[1].split()[7])  # field 10 of proc(5)
    return 0


def churn_threads(targets: Sequence[mvk.Target]) -> list[tuple[int, int]]:
    """(pid, tid) of each planted target's churn writer: its only thread besides main."""
    out = []
    for t in targets:
        tids = [int(x) for x in os.listdir(f"/proc/{t.pid}/task") if int(x) != t.pid]
        out += [(t.pid, tid) for tid in tids]
    return out


def region_saved(census: Json, names: Sequence[str]) -> int:
    regions = census.get("regions", {})
    return sum(regions[r]["pages"] - regions[r]["distinct_frames"] for r in names if r in regions)


def thrash_window(w: Workload, targets: Sequence[mvk.Target], window_s: float, r: Json) -> None:
    """W3: with the tool still at work (or after a one-shot merge), count the copy-on-write
    breaks in the churn region for window_s: minor faults of the churn threads."""
    assert w.volatile_region is not None
    ths = r["churn_threads"]
    f0 = sum(minflt(p, t) for p, t in ths)
    t0 = time.perf_counter()
    merged: list[int] = []
    while time.perf_counter() - t0 < window_s:
        merged.append(region_saved(mvk.census(targets), [w.volatile_region]))
        time.sleep(0.5)
    f1 = sum(minflt(p, t) for p, t in ths)
    elapsed = time.perf_counter() - t0
    end = mvk.census(targets)
    saved_end = end["saved_pages"]
    breaks = f1 - f0
    r["thrash"] = {
        "window_s": elapsed,
        "cow_breaks": breaks,
        "cow_breaks_since_start": f1 - r["churn_minflt_start"],
        "cow_breaks_per_min": breaks / elapsed * 60,
        "churn_saved_pages_mean": statistics.mean(merged) if merged else 0,
        "saved_pages_end": saved_end,
        "stable_saved_pages_end": region_saved(end, w.stable_regions),
        # the issue's unit: COW breaks per merged page per minute
        "breaks_per_merged_page_per_min": breaks / elapsed * 60 / max(saved_end, 1),
    }


def _prepare(w: Workload, targets: Sequence[mvk.Target]) -> Json:
    r: Json = {"targets_rss_anon_pages": sum(mvk.rss_anon_pages(t.pid) for t in targets)}
    if w.volatile_region:
        r["churn_threads"] = churn_threads(targets)
        r["churn_minflt_start"] = sum(minflt(p, t) for p, t in r["churn_threads"])
    return r


def saved_truth(w: Workload, before: Json, after: Json) -> int:
    """Pages saved by pagemap: planted pages - distinct frames (W3: the stable regions
    only); real programs: frames freed (their VMAs also hold non-present pages)."""
    if w.real:
        return int(before["distinct_frames"] - after["distinct_frames"])
    if w.stable_regions:
        return region_saved(after, w.stable_regions)
    return int(after["saved_pages"])


def process_tree(pid: int) -> list[int]:
    """pid and its descendants (procksm attach forks a worker that does the work)."""
    out = [pid]
    i = 0
    while i < len(out):
        p = out[i]
        i += 1
        with suppress(OSError):
            for tid in os.listdir(f"/proc/{p}/task"):
                with suppress(OSError):
                    kids = Path(f"/proc/{p}/task/{tid}/children").read_text().split()
                    out += [int(c) for c in kids]
    return out


def tree_cpu(pids: Sequence[int]) -> float:
    """utime+stime of the live processes (each /proc/PID/stat covers all its threads)."""
    total = 0.0
    for p in pids:
        with suppress(OSError):
            total += ksmlib.read_thread_cpu(p).stat_s
    return total


def exited(pid: int) -> bool:
    """Gone or a zombie; unlike Popen.poll this does not reap it (wait4 then gives rusage)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def stop_daemon(child: subprocess.Popen[bytes], pids: Sequence[int], r: Json) -> tuple[int, Any]:
    """After SIGTERM: wait for the daemon; past 20 s, SIGKILL it (safe at any instant:
    docs/kill-safety.md); then wait until all of it is gone, so that nothing changes the
    targets while they are counted.
    Returns the exit code and the rusage of wait4."""
    t0 = time.monotonic()
    while not exited(child.pid) and time.monotonic() - t0 < 20.0:
        time.sleep(0.05)
    if not exited(child.pid):
        r["killed_after_s"] = time.monotonic() - t0
        with suppress(ProcessLookupError):
            os.kill(child.pid, signal.SIGKILL)
    _, status, usage = os.wait4(child.pid, 0)
    child.returncode = os.waitstatus_to_exitcode(status)
    r["stop_s"] = time.monotonic() - t0
    deadline = time.monotonic() + 120
    while any(not exited(p) for p in pids[1:]) and time.monotonic() < deadline:
        time.sleep(0.05)
    return child.returncode, usage


def shared_memfd_pages(targets: Sequence[mvk.Target], tool_pids: Sequence[int]) -> int:
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
        with suppress(OSError):
            for fd in os.listdir(f"/proc/{tool_pid}/fd"):
                path = f"/proc/{tool_pid}/fd/{fd}"
                with suppress(OSError):
                    if os.readlink(path).startswith("/memfd:"):
                        st = os.stat(path)
                        blocks.setdefault(st.st_ino, st.st_blocks)
    return sum(blocks.values()) * 512 // PAGE_SIZE


def _finish(w: Workload, r: Json) -> Json:
    """Pagemap decides the saving reached, for every tool."""
    after = r.get("census_after")
    if after is not None:
        saved = saved_truth(w, r["census_before"], after)
        r["saved_pages_truth"] = saved
        r["fraction_pagemap"] = saved / w.ideal_pages if w.ideal_pages else None
    gib = r.get("targets_rss_anon_pages", 0) / GIB
    if r.get("max_rss_mib") is not None and gib:
        r["rss_mib_per_gib"] = r["max_rss_mib"] / gib
    if w.real:  # per-VMA census detail of real programs: not worth the JSON size
        for k in ("census_before", "census_after"):
            if k in r:
                r[k].pop("regions", None)
    return r


def run_merge(w: Workload, targets: Sequence[mvk.Target], procksm: Sequence[str], a: Any) -> Json:
    pre = _prepare(w, targets)
    r = mvk.run_procksm(procksm, targets, w.ideal_pages, a.poll)
    r.update(pre)
    if "error" not in r and w.volatile_region:
        thrash_window(w, targets, a.sizes.thrash_window_s, r)
    r = _finish(w, r)
    if w.real and "error" not in r:  # 100 %: the exit, if the frames freed reach the ideal
        r["t100_s"] = r["wall_s"] if r["saved_pages_truth"] >= w.ideal_pages else None
    return r


def run_ksmd(
    w: Workload, targets: Sequence[mvk.Target], ctl: ksmlib.KsmControl, fast: bool, a: Any
) -> Json:
    pre = _prepare(w, targets)
    r = mvk.run_ksm(
        ctl,
        targets,
        w.ideal_pages,
        w.has_zero_pages,
        pages_to_scan=100000 if fast else 100,
        sleep_ms=0 if fast else 20,
        use_zero_pages=1,
        timeout_s=a.sizes.max_timeout_s if fast else bound_of(a.sizes, w.name),
        poll_s=a.poll,
    )
    r.update(pre)
    r["cpu_share_pct"] = 100 * r["cpu_s_until_stopped"] / max(r["stopped_at_s"], 1e-9)
    if w.real:
        r["merge_any"] = [_ksm_stat(t.pid).get("ksm_merge_any") for t in targets]
    if w.volatile_region:
        ctl.start()  # ksmd goes on at the same speed (run=0 kept everything merged)
        try:
            thrash_window(w, targets, a.sizes.thrash_window_s, r)
        finally:
            ctl.stop()
    return _finish(w, r)


def _ksm_stat(pid: int) -> dict[str, str]:
    with suppress(OSError):
        return dict(
            line.split(None, 1) for line in Path(f"/proc/{pid}/ksm_stat").read_text().splitlines()
        )
    return {}


def daemon_stats(procksm: Sequence[str], sock: str, child: subprocess.Popen[bytes]) -> Json:
    """`procksm stats --json`, retried for a few seconds (the control socket may not be
    listening yet right after start); {} if the daemon never answered."""
    deadline = time.monotonic() + 10
    while not exited(child.pid):
        out = subprocess.run(
            [*procksm, "stats", "--json", "--control", sock],
            capture_output=True,
            text=True,
            timeout=30,
        )
        if out.returncode == 0:
            doc: Json = json.loads(out.stdout)
            return doc
        if time.monotonic() > deadline:
            break
        time.sleep(0.3)
    return {}


def run_daemon(
    w: Workload,
    targets: Sequence[mvk.Target],
    procksm: Sequence[str],
    a: Any,
    extra: Sequence[str] = (),
    bound_s: float | None = None,
) -> Json:
    """`procksm attach` until the ideal (RssAnon drop - its memfd pages) or the bound."""
    bound = bound_of(a.sizes, w.name) if bound_s is None else bound_s
    r = _prepare(w, targets)
    ideal = w.ideal_pages
    start_census = mvk.census(targets)
    before = mvk.meminfo()
    anon_before = sum(mvk.rss_anon_pages(t.pid) for t in targets)
    sock = f"/run/procksm/bench-{os.getpid()}.sock"
    cmd = [*procksm, "attach", *(str(t.pid) for t in targets), "--control", sock, "-q", *extra]
    # [t, saved pages, CPU s, RSS MiB] of the daemon's process tree (it forks a worker)
    samples: list[list[float]] = []
    t95 = t100 = cpu100 = None
    peak_rss = 0.0
    pids: list[int] = []
    with tempfile.TemporaryFile() as err:
        t0 = time.perf_counter()
        child = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err)
        mvk.ChildTracker.pid = child.pid
        stats: Json = {}
        try:
            while True:
                now = time.perf_counter() - t0
                if exited(child.pid):
                    break
                pids = process_tree(child.pid)
                anon = sum(mvk.rss_anon_pages(t.pid) for t in targets)
                saved = anon_before - anon - shared_memfd_pages(targets, pids)
                cpu = tree_cpu(pids)
                rss = sum(proc_status(p, "VmRSS") for p in pids) / 2**20
                peak_rss = max(peak_rss, rss)
                samples.append([now, saved, cpu, rss])
                if t95 is None and saved >= 0.95 * ideal:
                    t95 = now
                # 100 %: when pagemap confirms what the counters above suggest
                if saved >= ideal and saved_truth(w, start_census, mvk.census(targets)) >= ideal:
                    t100, cpu100 = now, cpu
                    break
                if now >= bound:
                    break
                time.sleep(a.poll)
            if not exited(child.pid):
                stats = daemon_stats(procksm, sock, child)
                if w.volatile_region:
                    thrash_window(w, targets, a.sizes.thrash_window_s, r)
                pids = process_tree(child.pid)
                r["vm_hwm_mib"] = {p: proc_status(p, "VmHWM") / 2**20 for p in pids}
                cpu_end = tree_cpu(pids)
                child.send_signal(signal.SIGTERM)
            else:
                cpu_end = samples[-1][2] if samples else 0.0
            exit_code, usage = stop_daemon(child, pids, r)
        finally:
            if child.returncode is None:  # an exception: do not leave it running
                with suppress(ProcessLookupError):
                    os.kill(child.pid, signal.SIGKILL)
                child.wait()
            mvk.ChildTracker.pid = None
        err.seek(0)
        stderr = err.read().decode(errors="replace")
    wall = time.perf_counter() - t0
    after = mvk.meminfo()
    end_census = mvk.census(targets)
    r.update(
        {
            "cmd": " ".join(cmd),
            "exit_code": exit_code,
            "t95_s": t95,
            "t100_s": t100,
            "cpu_s": cpu100 if cpu100 is not None else (samples[-1][2] if samples else None),
            "cpu_s_total": usage.ru_utime + usage.ru_stime,
            "cpu_s_until_stopped": cpu_end,
            "wall_s": wall,
            # peak of the summed VmRSS of the daemon's process tree, sampled every --poll s
            "max_rss_mib": peak_rss,
            "saved_pages_pagemap": end_census["saved_pages"],
            "saved_pages_meminfo": mvk.meminfo_saving(before, after),
            "fraction": end_census["saved_pages"] / ideal if ideal else None,
            "pauses": {
                "p50_ms": stats.get("pause_p50_ms"),
                "p99_ms": stats.get("pause_p99_ms"),
                "max_ms": stats.get("pause_max_ms"),
            },
            "stats": {k: v for k, v in stats.items() if k not in ("targets", "history")},
            "census_before": start_census,
            "census_after": end_census,
            "samples": mvk.thin(samples),
            "memory_check": mvk.verify_targets(targets),
        }
    )
    r["stderr_head"] = stderr[:1000]
    if not stats:
        r["error"] = (stderr.strip() or "procksm stats gave no answer")[-2000:]
    return _finish(w, r)


# --------------------------------------------------------------------------------------
# Statistics
# --------------------------------------------------------------------------------------


def _get(r: Json, path: str) -> Any:
    cur: Any = r
    for part in path.split("."):
        if not isinstance(cur, dict) or part not in cur:
            return None
        cur = cur[part]
    return cur


KEYS = {
    "t95_s": "t95_s",
    "t100_s": "t100_s",
    "cpu_s": "cpu_s",
    "fraction": "fraction_pagemap",
    "saved_pages_meminfo": "saved_pages_meminfo",
    "p50_ms": "pauses.p50_ms",
    "p99_ms": "pauses.p99_ms",
    "max_ms": "pauses.max_ms",
    "max_rss_mib": "max_rss_mib",
    "rss_mib_per_gib": "rss_mib_per_gib",
    "thrash": "thrash.breaks_per_merged_page_per_min",
    "cow_breaks_per_min": "thrash.cow_breaks_per_min",
    "churn_saved_pages_mean": "thrash.churn_saved_pages_mean",
    "cpu_share_pct": "cpu_share_pct",
    "stopped_at_s": "stopped_at_s",
}


def summarize(runs: Sequence[Json]) -> Json:
    ok = [r for r in runs if "error" not in r]
    s: Json = {"reps": len(runs), "failed": len(runs) - len(ok)}
    for name, path in KEYS.items():
        vals = [v for r in ok if (v := _get(r, path)) is not None]
        s[name] = statistics.median(vals) if vals else None
    s["reached_95_in"] = sum(r.get("t95_s") is not None for r in ok)
    s["reached_100_in"] = sum(r.get("t100_s") is not None for r in ok)
    s["checks"] = sorted({str(r.get("memory_check")) for r in ok})
    return s


def ratio(
    slow: Json, fast: Json, key: str, bound: float | None, fast_bound: float | None = None
) -> tuple[float | None, str]:
    """slow[key] / fast[key], for times: when one side never got there within its time
    limit, a bound on the ratio: (bound / fast, ">") when slow did not, (slow / fast_bound,
    "<") when fast did not; (None, "") when neither, or the side has no limit, or no data."""
    f, sl = fast.get(key), slow.get(key)
    if not fast.get("reps") or not slow.get("reps"):
        return None, ""
    if f is None and sl is None:
        return None, ""
    if f is None:
        return (sl / fast_bound, "<") if fast_bound else (None, "")
    if f <= 0:
        return None, ""
    if sl is None:
        return (bound / f, ">") if bound else (None, "")
    return sl / f, ""


def fmt(v: float | None, spec: str = ".2f") -> str:
    return "-" if v is None else f"{v:{spec}}"


def fmt_ratio(rv: tuple[float | None, str]) -> str:
    v, bound = rv
    return "-" if v is None else f"{bound}{v:.2f}x"


# --------------------------------------------------------------------------------------
# Scaling
# --------------------------------------------------------------------------------------


def bound_of(s: Sizes, wname: str) -> float:
    """The bound of the daemon and ksmd-defaults runs of a workload."""
    return s.w1_bounded_s if wname == "W1" else s.bounded_s


def scaling_points(s: Sizes) -> list[tuple[str, int, int]]:
    """(series, targets, pages per target) in W1's shape 4:1:1."""
    pts = []
    for n in s.scaling_targets:
        pts.append(("targets", n, int(s.scaling_targets_gib * GIB) // n))
    for g in s.scaling_gib:
        pts.append(("size", s.scaling_gib_targets, int(g * GIB) // s.scaling_gib_targets))
    return pts


def run_scaling(exe: Path, ctl: ksmlib.KsmControl, procksm: Sequence[str], a: Any) -> Json:
    """merge and ksmd max at every point; the daemon (no CPU cap) on the size series, for
    its memory per page (it keeps per-page state between scans, merge does not)."""
    rows = []
    for series, n, per in scaling_points(a.sizes):
        i, z = per * 4 // 6, per // 6
        u = per - i - z
        w = mvk.Workload(n, i, z, u, 7)
        sw = planted_workload(
            exe,
            "scaling",
            "",
            n,
            ["--identical", str(i), "--zero", str(z), "--unique", str(u)],
            w.ideal_pages,
            z > 0,
        )
        row: Json = {"series": series, "targets": n, "pages": w.planted_pages}
        row["gib"] = w.planted_pages / GIB
        row["ideal_pages"] = w.ideal_pages
        tools = ["merge", "ksmd_max"] + (["daemon"] if series == "size" else [])
        for tool in tools:
            runs = []
            for _ in range(a.scaling_reps):
                targets: list[mvk.Target] = []
                try:
                    targets = sw.start(tool == "ksmd_max")
                    if tool == "merge":
                        r = mvk.run_procksm(procksm, targets, w.ideal_pages, a.poll)
                    elif tool == "daemon":
                        bound = a.sizes.scaling_daemon_bound_s
                        r = run_daemon(sw, targets, procksm, a, ["--cpu-limit", "0"], bound)
                    else:
                        r = mvk.run_ksm(
                            ctl, targets, w.ideal_pages, z > 0, 100000, 0, 1, 300.0, a.poll
                        )
                except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
                    r = {"error": f"{type(exc).__name__}: {exc}"}
                finally:
                    mvk.stop_targets(targets)
                    if tool == "ksmd_max":
                        ctl.unmerge_all()
                        ctl.wait_idle()
                for k in ("census_before", "census_after", "samples", "totals", "stats"):
                    r.pop(k, None)
                runs.append(r)
            ok = [r for r in runs if "error" not in r]
            med: Json = {"reps": len(runs), "failed": len(runs) - len(ok)}
            for k in ("t100_s", "t95_s", "cpu_s", "fraction", "max_rss_mib", "wall_s"):
                vals = [r[k] for r in ok if r.get(k) is not None]
                med[k] = statistics.median(vals) if vals else None
            t = med["t100_s"]
            med["s_per_gib"] = None if t is None else t / row["gib"]
            med["cpu_s_per_gib"] = None if med["cpu_s"] is None else med["cpu_s"] / row["gib"]
            if med.get("max_rss_mib") is not None:
                med["rss_bytes_per_page"] = med["max_rss_mib"] * 2**20 / w.planted_pages
            row[tool] = med
            row[f"{tool}_runs"] = runs
        print(_scaling_line(row), flush=True)
        rows.append(row)
    out: Json = {"rows": rows}
    # procksm's memory per page: the slope of its peak RSS over the size series (what
    # grows with the pages, without the interpreter's fixed ~40-70 MiB)
    for tool in ("merge", "daemon"):
        size_rows = [
            r for r in rows if r["series"] == "size" and r.get(tool, {}).get("max_rss_mib")
        ]
        slope = None
        if len(size_rows) >= 2:
            lo, hi = size_rows[0], size_rows[-1]
            dp = hi["pages"] - lo["pages"]
            if dp > 0:
                slope = (hi[tool]["max_rss_mib"] - lo[tool]["max_rss_mib"]) * 2**20 / dp
        out[f"{tool}_rss_bytes_per_page_slope"] = slope
    return out


def _scaling_line(row: Json) -> str:
    m, k, d = row.get("merge", {}), row.get("ksmd_max", {}), row.get("daemon")
    line = (
        f"scaling {row['series']:7} {row['targets']:3} targets {row['gib']:6.2f} GiB: merge "
        f"{fmt(m.get('s_per_gib'))} s/GiB {fmt(m.get('cpu_s_per_gib'))} CPU s/GiB "
        f"RSS {fmt(m.get('max_rss_mib'), '.0f')} MiB | ksmd {fmt(k.get('s_per_gib'))} s/GiB "
        f"{fmt(k.get('cpu_s_per_gib'))} CPU s/GiB"
    )
    if d is not None:
        line += (
            f" | daemon {fmt(d.get('s_per_gib'))} s/GiB {fmt(d.get('cpu_s_per_gib'))} CPU s/GiB"
            f" VmHWM {fmt(d.get('max_rss_mib'), '.0f')} MiB"
        )
    return line


# --------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------


def goals_of(res: Json, a: Any) -> Json:
    wl = res["workloads"]
    g: Json = {}

    def put(name: str, goal: str, value: Any, shown: str, met: bool | None) -> None:
        g[name] = {"goal": goal, "value": value, "shown": shown, "met": met}

    w1 = wl.get("W1", {}).get("medians", {})
    m, km = w1.get("merge", {}), w1.get("ksmd_max", {})
    sp = ratio(km, m, "t100_s", a.sizes.max_timeout_s) if m and km else (None, "")
    put(
        "speed_max",
        "W1: ksmd max time to 100 % / procksm merge's >= 3",
        sp[0],
        fmt_ratio(sp),
        _speed_met(sp),
    )
    cpu = ratio(m, km, "cpu_s", None) if m and km else (None, "")
    put(
        "cpu_max",
        "W1: procksm merge CPU s <= ksmd max CPU s (to 100 %)",
        cpu[0],
        fmt_ratio(cpu) + " (procksm/ksmd)",
        None if cpu[0] is None else cpu[0] <= 1.0,
    )
    kd, de = w1.get("ksmd_defaults", {}), w1.get("daemon_eqcpu", {})
    b1 = bound_of(a.sizes, "W1")
    eq = ratio(kd, de, "t95_s", b1, b1) if kd and de else (None, "")
    met = _speed_met(eq)
    shown = f"{fmt_ratio(eq)} (CPU s {fmt(de.get('cpu_s'))} vs {fmt(kd.get('cpu_s'))})"
    if eq[0] is None and de.get("fraction") is not None and kd.get("fraction") is not None:
        # neither reached 95 % within the bound: compare what each had saved by then
        shown = (
            f"neither at 95 % in {b1:.0f} s; saved {_cell(de, 'fraction', '%')} "
            f"vs ksmd {_cell(kd, 'fraction', '%')} % (CPU s {fmt(de.get('cpu_s'))} vs "
            f"{fmt(kd.get('cpu_s'))})"
        )
        met = False if de["fraction"] < kd["fraction"] else None
    put(
        "speed_equal_cpu",
        "W1: at ksmd defaults' CPU share, ksmd time to 95 % / procksm daemon's >= 3",
        eq[0],
        shown,
        met,
    )
    fr = [w1.get(v, {}).get("fraction") for v in ("merge", "daemon")]
    put(
        "saving_W1",
        "W1: procksm saving >= 99 % of the ideal (pagemap), merge and daemon",
        fr,
        " / ".join("-" if f is None else f"{100 * f:.2f} %" for f in fr),
        None if None in fr else all(f >= GOAL_SAVING for f in fr if f is not None),
    )
    w3 = wl.get("W3", {}).get("medians", {})
    if w3:
        d3 = w3.get("daemon", {})
        ks = [w3.get(k, {}) for k in ("ksmd_max", "ksmd_defaults")]
        oks = []
        for k in ks:
            if d3.get("fraction") is None or k.get("fraction") is None:
                oks.append(None)
                continue
            more = d3["fraction"] > k["fraction"]
            th_d, th_k = d3.get("thrash"), k.get("thrash")
            less = th_d is not None and th_k is not None and th_d < th_k
            oks.append(more and less)
        put(
            "W3_volatile",
            "W3: procksm daemon saves more than ksmd (max and defaults) with less thrash",
            oks,
            "saving "
            + " vs ".join(f"{_cell(x, 'fraction', '%')} %" for x in (d3, *ks))
            + ", thrash "
            + " vs ".join(fmt(x.get("thrash"), ".3f") for x in (d3, *ks)),
            None if None in oks else all(oks),
        )
    worst = None
    where = ""
    for wname, wd in wl.items():
        for v in ("merge", "daemon"):
            p99 = wd.get("medians", {}).get(v, {}).get("p99_ms")
            if p99 is not None and (worst is None or p99 > worst):
                worst, where = p99, f"{wname} {v}"
    put(
        "pause_p99",
        "pause p99 <= 1 ms (worst median over workloads, merge and daemon)",
        worst,
        f"{fmt(worst, '.2f')} ms ({where})",
        None if worst is None else worst <= GOAL_P99_MS,
    )
    sc = res.get("scaling", {})
    slopes = [sc.get(f"{t}_rss_bytes_per_page_slope") for t in ("merge", "daemon")]
    put(
        "memory_per_page",
        "procksm memory <= 32 bytes per scanned page (slope of peak RSS over the size series; "
        "merge / daemon)",
        slopes,
        " / ".join(f"{fmt(x, '.1f')}" for x in slopes) + " B/page",
        None if None in slopes else all(x <= GOAL_BYTES_PER_PAGE for x in slopes if x is not None),
    )
    return g


def _speed_met(rv: tuple[float | None, str]) -> bool | None:
    """>= GOAL_SPEEDUP; undecided when only a bound on the wrong side of it is known."""
    v, bound = rv
    if v is None or (bound == ">" and v < GOAL_SPEEDUP) or (bound == "<" and v >= GOAL_SPEEDUP):
        return None
    return v >= GOAL_SPEEDUP


ROWS = (
    # label, key, format, ratio: "time" (ksmd / procksm, lower bound at the time limit),
    # "cpu" (ksmd / procksm), "saving" (procksm / ksmd), "" (none)
    ("time to 95 % (s)", "t95_s", ".2f", "time"),
    ("time to 100 % (s)", "t100_s", ".2f", "time"),
    ("saving reached (% ideal, pagemap)", "fraction", "%", "saving"),
    ("CPU s (to 100 % or the bound)", "cpu_s", ".2f", "cpu"),
    ("pause p50 (ms)", "p50_ms", ".3f", ""),
    ("pause p99 (ms)", "p99_ms", ".3f", ""),
    ("pause max (ms)", "max_ms", ".3f", ""),
    ("procksm RSS (MiB per GiB of targets)", "rss_mib_per_gib", ".1f", ""),
)
W3_ROWS = (
    ("thrash (COW breaks/merged page/min)", "thrash", ".4f"),
    ("COW breaks per minute (churn)", "cow_breaks_per_min", ".0f"),
    ("churn pages merged (mean, pagemap)", "churn_saved_pages_mean", ".0f"),
)


def _cell(s: Json, key: str, spec: str) -> str:
    v = s.get(key)
    if v is None:
        return "-"
    return f"{100 * v:.1f}" if spec == "%" else f"{v:{spec}}"


def _pair_ratio(
    kind: str, ksm: Json, tool: Json, key: str, bound: float, tool_bound: float | None
) -> str:
    if kind == "time":
        return fmt_ratio(ratio(ksm, tool, key, bound, tool_bound))
    if kind == "cpu":
        return fmt_ratio(ratio(ksm, tool, key, None))
    if kind == "saving":
        return fmt_ratio(ratio(tool, ksm, key, None))
    return ""


def print_table(res: Json, a: Any) -> list[str]:
    lines = [
        f"{'':9}{'':38}{'merge':>10}{'ksmd max':>10}{'ratio':>10}"
        f"{'daemon':>10}{'ksmd dflt':>10}{'ratio':>10}"
    ]
    for wname, wd in res["workloads"].items():
        md = wd.get("medians", {})
        m, k, d, kd = (md.get(v, {}) for v in ("merge", "ksmd_max", "daemon", "ksmd_defaults"))
        rows = [(label, key, spec, kind) for label, key, spec, kind in ROWS]
        if wname == "W3":
            rows += [(label, key, spec, "") for label, key, spec in W3_ROWS]
        for label, key, spec, kind in rows:
            r1 = _pair_ratio(kind, k, m, key, a.sizes.max_timeout_s, None)
            b = bound_of(a.sizes, wname)
            r2 = _pair_ratio(kind, kd, d, key, b, b)
            lines.append(
                f"{wname:9}{label:38}{_cell(m, key, spec):>10}{_cell(k, key, spec):>10}"
                f"{r1:>10}{_cell(d, key, spec):>10}{_cell(kd, key, spec):>10}{r2:>10}"
            )
        eq = md.get("daemon_eqcpu")
        if eq:
            lines.append(
                f"{wname:9}{'daemon at ksmd dflt CPU share':38}t95 {fmt(eq.get('t95_s'))} s, "
                f"t100 {fmt(eq.get('t100_s'))} s, CPU {fmt(eq.get('cpu_s'))} s, saving "
                f"{_cell(eq, 'fraction', '%')} % (ksmd dflt used "
                f"{fmt(kd.get('cpu_share_pct'), '.1f')} % of a CPU)"
            )
        lines.append("")
    lines.append(
        "ratio: ksmd / procksm for times and CPU ('>' = ksmd had not got there when stopped), "
        "procksm / ksmd for the saving"
    )
    for line in lines:
        print(line)
    return lines


def markdown(res: Json) -> str:
    """The README's tables from a results file (suite.py --markdown FILE)."""
    sizes = {"w1_bounded_s": res["sizes"]["bounded_s"], **res["sizes"]}
    a = argparse.Namespace(sizes=Sizes(**sizes))
    out = [
        "| workload | number | merge | ksmd max | ksmd max / merge | daemon | ksmd defaults "
        "| ksmd defaults / daemon |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for wname, wd in res["workloads"].items():
        md = wd.get("medians", {})
        m, k, d, kd = (md.get(v, {}) for v in ("merge", "ksmd_max", "daemon", "ksmd_defaults"))
        rows = [(label, key, spec, kind) for label, key, spec, kind in ROWS]
        if wname == "W3":
            rows += [(label, key, spec, "") for label, key, spec in W3_ROWS]
        for label, key, spec, kind in rows:
            if key in ("p50_ms", "max_ms", "rss_mib_per_gib") and wname not in ("W1", "W2"):
                continue
            r1 = _pair_ratio(kind, k, m, key, a.sizes.max_timeout_s, None)
            b = bound_of(a.sizes, wname)
            r2 = _pair_ratio(kind, kd, d, key, b, b)
            cells = [_cell(x, key, spec) for x in (m, k)] + [r1]
            cells += [_cell(x, key, spec) for x in (d, kd)] + [r2]
            out.append(f"| {wname} | {label} | " + " | ".join(c or "" for c in cells) + " |")
        eq = md.get("daemon_eqcpu")
        if eq:
            out.append(
                f"| {wname} | daemon at ksmd defaults' CPU share "
                f"({fmt(kd.get('cpu_share_pct'), '.1f')} %) | | | | "
                f"t95 {fmt(eq.get('t95_s'))} s, saving {_cell(eq, 'fraction', '%')} %, "
                f"CPU {fmt(eq.get('cpu_s'))} s | | |"
            )
    sc = res.get("scaling")
    if sc:
        out += [
            "",
            "| series | targets | GiB | merge s/GiB | merge CPU s/GiB | merge peak RSS MiB "
            "| ksmd max s/GiB | ksmd CPU s/GiB | daemon s/GiB | daemon CPU s/GiB "
            "| daemon peak RSS MiB |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        for row in sc["rows"]:
            mm, kk, dd = row.get("merge", {}), row.get("ksmd_max", {}), row.get("daemon", {})
            out.append(
                f"| {row['series']} | {row['targets']} | {row['gib']:.2f} | "
                f"{fmt(mm.get('s_per_gib'))} | {fmt(mm.get('cpu_s_per_gib'))} | "
                f"{fmt(mm.get('max_rss_mib'), '.0f')} | {fmt(kk.get('s_per_gib'))} | "
                f"{fmt(kk.get('cpu_s_per_gib'))} | {fmt(dd.get('s_per_gib'))} | "
                f"{fmt(dd.get('cpu_s_per_gib'))} | {fmt(dd.get('max_rss_mib'), '.0f')} |"
            )
    out += ["", "| goal | value | verdict |", "| --- | --- | --- |"]
    for g in res.get("goals", {}).values():
        met = "n/a" if g["met"] is None else ("met" if g["met"] else "**MISSED**")
        out.append(f"| {g['goal']} | {g['shown']} | {met} |")
    return "\n".join(out) + "\n"


LABELS = {
    "merge": "procksm merge",
    "daemon": "procksm attach",
    "daemon_eqcpu": "attach, ksmd's CPU",
    "ksmd_max": "ksmd max speed",
    "ksmd_defaults": "ksmd defaults",
}


def write_svg(res: Json, path: Path) -> None:
    """Saving over time on W1 (first repetition): procksm vs ksmd, log time axis."""
    w1 = res["workloads"].get("W1")
    if not w1 or not w1.get("reps"):
        return
    rep = w1["reps"][0]
    ideal = w1["ideal_pages"]
    colours = {
        "merge": "#1f77b4",
        "daemon": "#2ca02c",
        "daemon_eqcpu": "#98df8a",
        "ksmd_max": "#d62728",
        "ksmd_defaults": "#ff9896",
    }
    series = {v: rep[v]["samples"] for v in colours if v in rep and rep[v].get("samples")}
    if not series:
        return
    W, H, L, R, T, B = 780, 450, 70, 170, 66, 50
    tmax = max(s[-1][0] for s in series.values())
    tmin = 0.05
    lo, hi = math.log10(tmin), math.log10(max(tmax, 1.0) * 1.1)

    def x(t: float) -> float:
        return L + (math.log10(max(t, tmin)) - lo) / (hi - lo) * (W - L - R)

    def y(f: float) -> float:
        return T + (1 - min(max(f, 0.0), 1.05) / 1.05) * (H - T - B)

    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" '
        'font-family="sans-serif" font-size="12">',
        f'<rect width="{W}" height="{H}" fill="white"/>',
        f'<text x="{L}" y="20" font-size="14">Saving over time, % of the ideal: W1, '
        "repetition 1</text>",
        f'<text x="{L}" y="37" font-size="11" fill="#555">{_esc(w1["description"])}</text>',
        f'<text x="{L}" y="52" font-size="11" fill="#555">{_esc(res["machine"])}, '
        f"{_esc(res.get('started', ''))}</text>",
    ]
    for f in (0, 0.25, 0.5, 0.75, 0.95, 1.0):
        out.append(
            f'<line x1="{L}" x2="{W - R}" y1="{y(f):.1f}" y2="{y(f):.1f}" stroke="#ddd"/>'
            f'<text x="{L - 6}" y="{y(f) + 4:.1f}" text-anchor="end">{100 * f:.0f} %</text>'
        )
    t = tmin
    for t in (0.1, 0.3, 1, 3, 10, 30, 100, 300):
        if math.log10(t) > hi:
            break
        out.append(
            f'<line x1="{x(t):.1f}" x2="{x(t):.1f}" y1="{T}" y2="{H - B}" stroke="#eee"/>'
            f'<text x="{x(t):.1f}" y="{H - B + 16}" text-anchor="middle">{t:g} s</text>'
        )
    out.append(
        f'<text x="{(L + W - R) / 2}" y="{H - 12}" text-anchor="middle">time since start '
        "(log scale)</text>"
    )
    for i, (v, samples) in enumerate(series.items()):
        pts = " ".join(f"{x(s[0]):.1f},{y(s[1] / ideal):.1f}" for s in samples if s[0] > 0)
        out.append(f'<polyline fill="none" stroke="{colours[v]}" stroke-width="2" points="{pts}"/>')
        ly = T + 16 * i + 8
        out.append(
            f'<line x1="{W - R + 10}" x2="{W - R + 30}" y1="{ly}" y2="{ly}" '
            f'stroke="{colours[v]}" stroke-width="3"/>'
            f'<text x="{W - R + 35}" y="{ly + 4}">{LABELS[v]}</text>'
        )
    out.append("</svg>")
    path.write_text("\n".join(out) + "\n")


def _esc(s: str) -> str:
    return s.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


# --------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--quick", action="store_true", help="small sizes, 1 rep (development)")
    ap.add_argument("--reps", type=int, help="repetitions (default 3; --quick 1)")
    ap.add_argument(
        "--only",
        action="append",
        choices=(*WORKLOADS, "W5", "scaling"),
        help="run only these parts (repeatable); default: all workloads and scaling",
    )
    ap.add_argument("--no-scaling", action="store_true")
    ap.add_argument("--scaling-reps", type=int, default=1)
    ap.add_argument("--poll", type=float, default=0.05, help="sampling period, s")
    ap.add_argument("--bounded", type=float, help="bound on daemon / ksmd defaults runs, s")
    ap.add_argument("--scaling-gib", type=float, nargs="+", help="override the size series")
    ap.add_argument("--scaling-targets", type=int, nargs="+", help="override the target series")
    ap.add_argument("--procksm", default=str(ROOT / ".venv" / "bin" / "procksm"))
    ap.add_argument("--output", type=Path)
    ap.add_argument(
        "--markdown", type=Path, metavar="JSON", help="print the README tables of a results file"
    )
    ap.add_argument("--replot", type=Path, metavar="JSON", help="redraw a results file's SVG")
    a = ap.parse_args(argv)
    sizes = QUICK if a.quick else FULL
    if a.reps:
        sizes = _replace(sizes, reps=a.reps)
    if a.bounded:
        sizes = _replace(sizes, bounded_s=a.bounded, w1_bounded_s=a.bounded)
    if a.scaling_gib:
        sizes = _replace(sizes, scaling_gib=tuple(a.scaling_gib))
    if a.scaling_targets:
        sizes = _replace(sizes, scaling_targets=tuple(a.scaling_targets))
    a.sizes = sizes
    only = set(a.only or [*WORKLOADS, "scaling"])
    if "W5" in only:
        only |= {"W5numpy", "W5redis"}
    if a.no_scaling:
        only.discard("scaling")
    a.parts = only
    if a.output is None:
        name = "suite-quick" if a.quick else ("suite" if a.only is None else "suite-partial")
        a.output = RESULTS / f"{name}.json"
    return a


def git_state() -> Json:
    """The commit measured, and the files that differed from it (a shared checkout)."""

    def git(*args: str) -> str:
        out = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True)
        return out.stdout.strip()

    return {"commit": git("rev-parse", "HEAD"), "dirty": git("status", "--short").splitlines()}


def svg_path(output: Path) -> Path:
    """results/suite.json -> results/saving_over_time.svg; X.json -> X.svg."""
    return output.with_name(
        "saving_over_time.svg" if output.name == "suite.json" else output.stem + ".svg"
    )


def _replace(s: Sizes, **kw: Any) -> Sizes:
    return Sizes(**{**asdict(s), **kw})


def order_for(rep: int, wname: str) -> list[str]:
    base = list(BASE_VARIANTS) if rep % 2 == 0 else mvk._swap_pairs(BASE_VARIANTS)
    if wname == "W1":
        base.insert(base.index("ksmd_defaults") + 1, "daemon_eqcpu")
    return base


def main(argv: Sequence[str] | None = None) -> int:
    a = parse_args(argv)
    if a.markdown:
        print(markdown(json.loads(a.markdown.read_text())), end="")
        return 0
    if a.replot:
        svg = svg_path(a.replot)
        write_svg(json.loads(a.replot.read_text()), svg)
        print(f"wrote {svg}")
        return 0
    if os.geteuid() != 0:
        print("suite: needs root (ptrace, pagemap PFNs, KSM sysfs)", file=sys.stderr)
        return 1
    procksm = [a.procksm]
    exe = mvk.build_planted()
    machine = mvk.machine_line()
    print(f"machine {machine}\nsizes {'quick' if a.quick else 'full'}: {a.sizes}", flush=True)
    ctl = ksmlib.KsmControl()
    tmp = Path(tempfile.mkdtemp(prefix="procksm-bench-"))
    Path("/run/procksm").mkdir(parents=True, exist_ok=True)
    workloads = make_workloads(exe, a.sizes, tmp)
    res: Json = {
        "machine": machine,
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "quick": a.quick,
        "sizes": asdict(a.sizes),
        "ksm_settings_found": ctl.found,
        "git": git_state(),
        "workloads": {},
    }
    targets: list[mvk.Target] = []
    t_start = time.perf_counter()
    touched_ksm = False
    with mvk.interrupts_raise():
        try:
            ctl.check_unused()  # before anything is written: run=2 would unmerge others' pages
            touched_ksm = True
            ctl.stop()
            ctl.wait_idle()
            for wname in WORKLOADS:
                if wname not in a.parts:
                    continue
                w = workloads[wname]
                print(
                    f"\n{wname}: {w.description}; ideal {w.ideal_pages:,} pages "
                    f"({w.ideal_pages / MIB:.0f} MiB, {w.ideal_source})",
                    flush=True,
                )
                reps: list[Json] = []
                for rep in range(a.sizes.reps):
                    results: Json = {}
                    for v in order_for(rep, wname):
                        t0 = time.perf_counter()
                        is_ksm = v.startswith("ksmd")
                        targets = w.start(is_ksm)
                        ideal_info = None
                        try:
                            time.sleep(0.3 if not w.real else 1.0)
                            if w.real:
                                ideal_info = content_ideal(targets)
                                w.ideal_pages = ideal_info["ideal_pages"]
                            if v == "merge":
                                r = run_merge(w, targets, procksm, a)
                            elif v == "daemon":
                                r = run_daemon(w, targets, procksm, a)
                            elif v == "daemon_eqcpu":
                                share = results.get("ksmd_defaults", {}).get("cpu_share_pct")
                                pct = max(0.5, round(share or 2.0, 1))
                                r = run_daemon(w, targets, procksm, a, ["--cpu-limit", str(pct)])
                                r["cpu_limit_pct"] = pct
                            else:
                                r = run_ksmd(w, targets, ctl, v == "ksmd_max", a)
                        except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
                            r = {"error": f"{type(exc).__name__}: {exc}"}
                        finally:
                            mvk.stop_targets(targets)
                            targets = []
                            if is_ksm:
                                ctl.unmerge_all()
                                ctl.wait_idle()
                        r["ideal_pages"] = w.ideal_pages
                        r["loadavg_after"] = os.getloadavg()  # the machine is shared
                        if ideal_info is not None:
                            r["content_census"] = ideal_info
                        results[v] = r
                        print(_one_line(wname, rep, v, r, time.perf_counter() - t0), flush=True)
                    reps.append(results)
                meds = {v: summarize([r[v] for r in reps if v in r]) for v in reps[0]}
                res["workloads"][wname] = {
                    "description": w.description,
                    "ideal_pages": statistics.median(
                        r[v]["ideal_pages"] for r in reps for v in r if "ideal_pages" in r[v]
                    ),
                    "ideal_source": w.ideal_source,
                    "medians": meds,
                    "reps": reps,
                }
            if "scaling" in a.parts:
                print("\nscaling (merge and ksmd max, W1's shape 4:1:1)", flush=True)
                res["scaling"] = run_scaling(exe, ctl, procksm, a)
        finally:
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            if mvk.ChildTracker.pid is not None:
                with suppress(ProcessLookupError):
                    os.kill(mvk.ChildTracker.pid, signal.SIGKILL)
            mvk.stop_targets(targets)
            try:
                if touched_ksm:
                    ctl.unmerge_all()
            finally:
                ctl.restore()
                shutil.rmtree(tmp, ignore_errors=True)
            signal.signal(signal.SIGINT, signal.default_int_handler)
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
    res["elapsed_s"] = time.perf_counter() - t_start
    print(f"\nmachine {machine}; medians of {a.sizes.reps} reps\n")
    res["table"] = print_table(res, a)
    if "scaling" in res:
        sc = res["scaling"]
        print(
            f"peak RSS slope over the size series: merge "
            f"{fmt(sc['merge_rss_bytes_per_page_slope'], '.1f')}, daemon "
            f"{fmt(sc['daemon_rss_bytes_per_page_slope'], '.1f')} bytes per page"
        )
    res["goals"] = goals_of(res, a)
    print("\ngoals:")
    for name, g in res["goals"].items():
        met = "n/a" if g["met"] is None else ("met" if g["met"] else "MISSED")
        print(f"  {name:16} {met:7} {g['shown']:44} {g['goal']}")
    a.output.parent.mkdir(parents=True, exist_ok=True)
    a.output.write_text(json.dumps(res, indent=1, default=str) + "\n")
    svg = svg_path(a.output)
    write_svg(res, svg)
    print(f"\nwrote {a.output} and {svg} ({res['elapsed_s'] / 60:.1f} min)")
    return 0


def _one_line(wname: str, rep: int, v: str, r: Json, took: float) -> str:
    if "error" in r:
        return f"{wname} rep {rep + 1} {v:14} ERROR: {str(r['error'])[-300:]}  ({took:.0f} s)"
    p = r.get("pauses") or {}
    th = r.get("thrash")
    extra = f" thrash {fmt(th['breaks_per_merged_page_per_min'], '.3f')}" if th else ""
    frac = r.get("fraction_pagemap")
    ideal = f" ideal {r['ideal_pages']:,}" if "content_census" in r else ""
    return (
        f"{wname} rep {rep + 1} {v:14} t95 {fmt(r.get('t95_s'))} t100 {fmt(r.get('t100_s'))} s "
        f"CPU {fmt(r.get('cpu_s'))} s saving {fmt(None if frac is None else 100 * frac, '.1f')} % "
        f"p99 {fmt(p.get('p99_ms'), '.2f')} ms{extra} check {r.get('memory_check')} "
        f"{ideal} ({took:.0f} s)"
    )


if __name__ == "__main__":
    try:
        raise SystemExit(main())
    except ksmlib.KsmError as exc:
        print(f"suite: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    except KeyboardInterrupt:
        print("suite: interrupted; targets killed, KSM settings restored", file=sys.stderr)
        raise SystemExit(130) from None
