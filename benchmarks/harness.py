"""The benchmarks' harness: targets, truth sources and tool runners, shared by
suite.py, merge_vs_ksm.py and daemon_vs_ksm.py (their CLIs and outputs are their own).

- Targets: planted processes (tests/targets/planted.c) as ``Target``; a ``Planted`` shape
  (targets × identical/zero/unique pages) with its ideal saving; ``Workload``, what a run
  starts and how its saving is judged.
- Truth sources: pagemap (``census``: distinct frames over the targets' regions),
  /proc/meminfo, RssAnon, procksm's memfd pages.
- Runners: ``run_procksm`` (one `procksm merge`), ``run_ksm`` (the kernel's ksmd through
  ksmlib.KsmControl, the one way to talk to it), ``run_daemon`` (`procksm attach` until the
  ideal or a bound).
"""

from __future__ import annotations

import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import ksmlib  # noqa: E402

from procksm import PAGE_SIZE  # noqa: E402
from procksm.procfs import (  # noqa: E402
    KPF_KSM,
    KPF_ZERO_PAGE,
    PM_FILE,
    KPageFiles,
    PagemapFile,
    pfns_of,
)

REGIONS = ("identical", "zero", "unique")
MIB_PAGES = (1 << 20) // PAGE_SIZE
Json = dict[str, Any]


# --------------------------------------------------------------------------------------
# Targets and workloads
# --------------------------------------------------------------------------------------


def build_planted() -> Path:
    """Compile tests/targets/planted.c like tests/conftest.py's build_c_target."""
    src = ROOT / "tests" / "targets" / "planted.c"
    out = ROOT / "build" / "targets" / "planted"
    out.parent.mkdir(parents=True, exist_ok=True)
    if not out.exists() or out.stat().st_mtime < src.stat().st_mtime:
        tmp = out.with_suffix(f".tmp{os.getpid()}")
        cmd = ["gcc", "-O2", "-g", "-Wall", "-pthread", "-o", str(tmp), str(src)]
        subprocess.run(cmd, check=True)
        os.replace(tmp, out)
    return out


@dataclass(frozen=True)
class Planted:
    """The shape of a planted workload: ``targets`` processes, each with ``identical``
    pages equal across them, ``zero`` zero-filled and ``unique`` pages (tests/targets/
    planted.c), and its ideal saving by formula."""

    targets: int
    identical: int
    zero: int
    unique: int
    seed: int

    @property
    def planted_pages(self) -> int:
        """Distinct frames: every planted page is its own private frame at start (checked)."""
        return self.targets * (self.identical + self.zero + self.unique)

    @property
    def distinct_contents(self) -> int:
        """Distinct non-zero contents: the identical set once, each target's unique pages."""
        return self.identical + self.targets * self.unique

    @property
    def ideal_pages(self) -> int:
        return self.planted_pages - self.distinct_contents

    def as_json(self) -> dict[str, int]:
        """The workload as the results files record it."""
        return {
            "targets": self.targets,
            "identical_pages": self.identical,
            "zero_pages": self.zero,
            "unique_pages": self.unique,
            "seed": self.seed,
        }


@dataclass
class Target:
    proc: subprocess.Popen[str]
    regions: dict[str, tuple[int, int]]  # name -> (start address, pages)
    threads: int = 1

    @property
    def pid(self) -> int:
        return self.proc.pid

    def ask(self, command: str) -> str:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        return self.proc.stdout.readline().strip()


@dataclass
class Workload:
    """What a run starts (``start(mergeable)``) and how its saving is judged."""

    name: str
    description: str
    ideal_pages: int  # real programs: set per run by content_ideal()
    has_zero_pages: bool
    start: Callable[[bool], list[Target]]  # mergeable -> started targets
    volatile_region: str | None = None  # W3: the churn region
    stable_regions: tuple[str, ...] = ()  # W3: what the ideal counts
    real: bool = False
    ideal_source: str = "workload formula"


def start_targets(exe: Path, w: Planted, busy: int, threads: int, mergeable: bool) -> list[Target]:
    """w.targets fresh planted processes; the first ``busy`` spin ``threads`` extra threads."""
    cmd = [str(exe), "--identical", str(w.identical), "--zero", str(w.zero)]
    cmd += ["--unique", str(w.unique), "--seed", str(w.seed)]
    if mergeable:
        cmd.append("--mergeable")
    return spawn_planted(
        [[*cmd, "--threads", str(threads if i < busy else 0)] for i in range(w.targets)]
    )


def spawn_planted(cmds: Sequence[Sequence[str]]) -> list[Target]:
    """One planted process per command line, started together; each READY line's regions
    (every ``NAME=addr NAME_pages=n`` pair with n > 0) become the Target's regions."""
    procs = [
        subprocess.Popen(list(cmd), stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        for cmd in cmds
    ]
    targets = []
    try:
        for p in procs:
            assert p.stdout is not None
            line = p.stdout.readline()
            if not line.startswith("READY"):
                raise RuntimeError(f"planted (pid {p.pid}) did not start: {line!r}")
            info = dict(kv.split("=", 1) for kv in line.split()[1:])
            regions = {
                r: (int(info[r], 16), int(info[f"{r}_pages"]))
                for r in info
                if f"{r}_pages" in info and r != "sparse"
            }
            nthreads = 1 + int(info.get("threads", "0"))
            targets.append(Target(p, {r: v for r, v in regions.items() if v[1]}, nthreads))
    except BaseException:
        stop_targets([Target(p, {}) for p in procs])
        raise
    return targets


def stop_targets(targets: Sequence[Target]) -> None:
    for t in targets:
        if t.proc.poll() is None:
            t.proc.kill()
    for t in targets:
        t.proc.wait()
        for f in (t.proc.stdin, t.proc.stdout):
            if f is not None:
                f.close()


def verify_targets(targets: Sequence[Target]) -> str:
    """Each target re-generates its expected content and compares (planted's `check`)."""
    bad = [f"pid {t.pid}: {r}" for t in targets if not (r := t.ask("check")).startswith("OK")]
    return "; ".join(bad) if bad else "OK"


# --------------------------------------------------------------------------------------
# Truth sources
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


def rss_anon_pages(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) * 1024 // PAGE_SIZE
    except OSError:
        pass
    return 0


def memfd_pages(pid: int) -> int:
    """Pages allocated in the memfds a process holds open (st_blocks of each, once per inode).

    procksm keeps its sealed segments open until it exits; with the targets' RssAnon this
    gives a per-process saving that other processes on the machine cannot disturb.
    """
    seen: dict[int, int] = {}
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return 0
    for fd in fds:
        path = f"/proc/{pid}/fd/{fd}"
        try:
            if not os.readlink(path).startswith("/memfd:"):
                continue
            st = os.stat(path)
        except OSError:
            continue
        seen[st.st_ino] = st.st_blocks * 512 // PAGE_SIZE
    return sum(seen.values())


def census(targets: Sequence[Target]) -> Json:
    """Frames behind the planted ranges, from pagemap and kpageflags (root only).

    saved_pages = planted pages - distinct frames mapped there, not counting the kernel's
    zero page: a page that is not present (dropped) or maps the zero page costs no frame.
    """
    per_region: Json = {}
    all_pfns = []
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
            present = pfns[pfns != 0]
            flags = kpf.read_flags(present)
            is_zero = (flags >> np.uint64(KPF_ZERO_PAGE)) & np.uint64(1) != 0
            is_ksm = (flags >> np.uint64(KPF_KSM)) & np.uint64(1) != 0
            frames = present[~is_zero]
            all_pfns.append(frames)
            per_region[r] = {
                "pages": len(pfns),
                "not_present": len(pfns) - len(present),
                "zero_page_ptes": int(np.count_nonzero(is_zero)),
                "distinct_frames": int(np.unique(frames).size),
                "ksm_ptes": int(np.count_nonzero(is_ksm)),
                "ksm_frames": int(np.unique(present[is_ksm]).size),
            }
    frames = np.unique(np.concatenate(all_pfns)) if all_pfns else np.zeros(0, np.uint64)
    ksm_frames = sum(v["ksm_frames"] for v in per_region.values())
    return {
        "planted_pages": planted,
        "distinct_frames": int(frames.size),
        "saved_pages": planted - int(frames.size),
        "file_backed_ptes": file_ptes,
        "ksm_frames": ksm_frames,
        "regions": per_region,
    }


def thin(samples: list[list[float]], keep: int = 120) -> list[list[float]]:
    """At most ``keep`` evenly spread samples (and always the last) for the JSON file."""
    if len(samples) <= keep:
        return samples
    step = len(samples) / keep
    picked = [samples[int(i * step)] for i in range(keep)]
    return [*picked, samples[-1]] if picked[-1] is not samples[-1] else picked


def proc_status(pid: int, field_name: str) -> int:
    """A kB line of /proc/PID/status, in bytes (0 if gone)."""
    with suppress(OSError), open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field_name + ":"):
                return int(line.split()[1]) * 1024
    return 0


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
            total += ksmlib.read_thread_cpu(p).stat_s
    return total


def exited(pid: int) -> bool:
    """Gone or a zombie; unlike Popen.poll this does not reap it (wait4 then gives rusage)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


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
        with suppress(OSError):
            for fd in os.listdir(f"/proc/{tool_pid}/fd"):
                path = f"/proc/{tool_pid}/fd/{fd}"
                with suppress(OSError):
                    if os.readlink(path).startswith("/memfd:"):
                        st = os.stat(path)
                        blocks.setdefault(st.st_ino, st.st_blocks)
    return sum(blocks.values()) * 512 // PAGE_SIZE


# --------------------------------------------------------------------------------------
# Runs
# --------------------------------------------------------------------------------------


class ChildTracker:
    """The procksm child currently running, so that an interrupt can kill it (by pid)."""

    pid: int | None = None


def run_procksm(
    procksm: Sequence[str], targets: Sequence[Target], ideal: int, poll_s: float
) -> Json:
    """``procksm merge PID... --json`` to completion; ``ideal``: pages an ideal merge saves."""
    start_census = census(targets)
    before = meminfo()
    anon_before = sum(rss_anon_pages(t.pid) for t in targets)
    # [t, targets' saving, machine saving (meminfo)] in pages
    samples: list[list[float]] = []
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        cmd = [*procksm, "merge", *map(str, (t.pid for t in targets)), "--json"]
        t0 = time.perf_counter()
        child = subprocess.Popen(cmd, stdout=out, stderr=err)
        ChildTracker.pid = child.pid
        done = threading.Event()

        def sample() -> None:
            while not done.is_set():
                anon = sum(rss_anon_pages(t.pid) for t in targets)
                shared = memfd_pages(child.pid)
                machine = meminfo_saving(before, meminfo())
                samples.append([time.perf_counter() - t0, anon_before - anon - shared, machine])
                done.wait(poll_s)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        # wait4, not Popen.wait: it gives the child's rusage, the truth for its CPU time.
        _, status, usage = os.wait4(child.pid, 0)
        wall = time.perf_counter() - t0
        after = meminfo()
        ChildTracker.pid = None
        child.returncode = os.waitstatus_to_exitcode(status)
        done.set()
        sampler.join()
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read().decode(errors="replace"), err.read().decode(errors="replace")
    run: Json = {"wall_s": wall, "exit_code": child.returncode, "cmd": " ".join(cmd)}
    try:
        doc = json.loads(stdout)
    except ValueError:
        doc = None
    if child.returncode != 0 or doc is None:
        run["error"] = (stderr.strip() or stdout.strip() or "no output")[-2000:]
        if doc is None:
            return run
    end_census = census(targets)
    saving_meminfo = meminfo_saving(before, after)
    saving_pagemap = end_census["saved_pages"]

    # The 95 % time comes from the targets' own counters (RssAnon, and the memfd pages
    # procksm holds), not from /proc/meminfo: on a shared machine other processes move
    # AnonPages by hundreds of MiB within a second. Neither counts procksm's own memory,
    # as ksmd's counters do not count its rmap_items.
    t95 = next((t for t, saved, _machine in samples if saved >= 0.95 * ideal), None)
    if t95 is None and saving_pagemap >= 0.95 * ideal:
        t95 = wall  # crossed between the last sample and the exit
    totals = doc.get("totals", {})
    run.update(
        {
            "t95_s": t95,
            "t100_s": wall if saving_pagemap >= ideal else None,
            "cpu_s": usage.ru_utime + usage.ru_stime,
            "cpu_s_procksm_json": doc.get("cpu_s"),
            "elapsed_s_procksm_json": doc.get("elapsed_s"),
            "max_rss_mib": usage.ru_maxrss / 1024,
            "saved_pages_meminfo": saving_meminfo,
            "saved_pages_pagemap": saving_pagemap,
            "saved_pages_claimed": totals.get("saved_pages"),
            "saved_pages_memfree": after["MemFree"] - before["MemFree"],
            # pagemap decides: exact and about the planted ranges only; meminfo is
            # machine-wide (see saved_pages_meminfo for how far it agrees)
            "fraction": saving_pagemap / ideal,
            "totals": totals,
            "pauses": doc.get("pauses", {}),
            "busy_pauses": busy_pauses(doc, targets),
            "census_before": start_census,
            "census_after": end_census,
            "samples": thin(samples),
            "memory_check": verify_targets(targets),
        }
    )
    return run


def busy_pauses(doc: Json, targets: Sequence[Target]) -> Json:
    """The pauses of the targets with extra threads, from procksm's per-process JSON
    (the worst of them if several); empty when no target is busy."""
    busy = {t.pid: t.threads for t in targets if t.threads > 1}
    stats = [p["pauses"] for p in doc.get("processes", []) if p.get("pid") in busy]
    if not stats:
        return {}
    worst: Json = {k: max(s.get(k, 0) for s in stats) for k in ("p50_ms", "p99_ms", "max_ms")}
    worst["count"] = sum(s.get("count", 0) for s in stats)
    worst["threads"] = max(busy.values())
    return worst


def run_ksm(
    ctl: ksmlib.KsmControl,
    targets: Sequence[Target],
    ideal: int,
    has_zero_pages: bool,
    pages_to_scan: int,
    sleep_ms: int,
    use_zero_pages: int,
    timeout_s: float,
    poll_s: float,
) -> Json:
    """ksmd at the given speed until ``ideal`` pages are saved (KSM counters) or timeout."""
    # Without use_zero_pages the zero pages merge into one KSM page, which stays: one page
    # short of the ideal, whose zero pages cost no frame at all.
    reachable = ideal - (1 if has_zero_pages and not use_zero_pages else 0)
    start_census = census(targets)
    ctl.configure(pages_to_scan, sleep_ms, use_zero_pages)
    ctl.wait_idle()
    base = ksmlib.read_counters()
    cpu0 = ksmlib.read_thread_cpu(ctl.ksmd_pid)
    before = meminfo()
    samples: list[list[float]] = []  # [t, saved pages, ksmd CPU s (stat), ksmd runtime s]
    t95 = t100 = cpu95 = cpu100 = None
    t0 = time.perf_counter()
    ctl.start()
    tick = 0
    while True:
        now = time.perf_counter() - t0
        c = ksmlib.read_counters().minus(base)
        cpu = ksmlib.read_thread_cpu(ctl.ksmd_pid)
        cpu_s = cpu.stat_s - cpu0.stat_s
        samples.append([now, c.saved_pages, cpu_s, cpu.runtime_s - cpu0.runtime_s])
        if t95 is None and c.saved_pages >= 0.95 * ideal:
            t95, cpu95 = now, cpu_s
        if c.saved_pages >= reachable:
            t100, cpu100 = now, cpu_s
            break
        if now >= timeout_s:
            break
        tick += 1
        time.sleep(max(0.0, t0 + tick * poll_s - time.perf_counter()))
    ctl.stop()  # merged pages stay merged
    stopped = time.perf_counter() - t0
    end = ksmlib.read_counters().minus(base)
    cpu_end = ksmlib.read_thread_cpu(ctl.ksmd_pid)
    after = meminfo()
    end_census = census(targets)
    last = samples[-1]
    return {
        "pages_to_scan": pages_to_scan,
        "sleep_millisecs": sleep_ms,
        "use_zero_pages": use_zero_pages,
        "timeout_s": timeout_s,
        "converged": t100 is not None,
        "t95_s": t95,
        "t100_s": t100,
        "cpu_s": cpu100 if cpu100 is not None else last[2],
        "cpu_s_t95": cpu95,
        "cpu_s_schedstat": last[3],
        "cpu_s_until_stopped": cpu_end.stat_s - cpu0.stat_s,
        "stopped_at_s": stopped,
        "saved_pages_counters": end.saved_pages,
        "saved_pages_pagemap": end_census["saved_pages"],
        "saved_pages_general_profit": end.general_profit // PAGE_SIZE,
        "saved_pages_memfree": after["MemFree"] - before["MemFree"],
        "fraction": end.saved_pages / ideal,
        "counters": {
            "pages_shared": end.pages_shared,
            "pages_sharing": end.pages_sharing,
            "ksm_zero_pages": end.ksm_zero_pages,
            "pages_unshared": end.pages_unshared,
            "pages_volatile": end.pages_volatile,
            "full_scans": end.full_scans,
            "pages_scanned": end.pages_scanned,
        },
        "census_before": start_census,
        "census_after": end_census,
        "samples": thin(samples),
        "memory_check": verify_targets(targets),
    }


def stop_daemon(child: subprocess.Popen[bytes], pids: Sequence[int], r: Json) -> tuple[int, Any]:
    """After SIGTERM: wait for the daemon; past 20 s, SIGKILL the supervisor only (its
    documented safe path: the worker finishes its stop window and exits); then wait until
    the worker is gone too, so that nothing changes the targets while they are counted.
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
    targets: Sequence[Target],
    ideal: int,
    procksm: Sequence[str],
    *,
    poll_s: float,
    bound_s: float,
    extra: Sequence[str] = (),
    saved_truth: Callable[[Json, Json], int] | None = None,
    before_stop: Callable[[Json], None] | None = None,
    into: Json | None = None,
) -> Json:
    """`procksm attach PID...` until the ideal saving or ``bound_s`` seconds.

    Every ``poll_s``: the targets' RssAnon drop minus the pages of procksm's memfd
    segments (95 %, and a candidate for 100 % that pagemap must confirm:
    ``saved_truth(census at start, census now)``, by default the census's saved pages),
    the CPU time and summed VmRSS of the daemon's process tree (the supervisor and the
    worker it forks). At the end: its own `procksm stats --json`; ``before_stop(r)`` runs
    while it still runs (W3's thrash window); then SIGTERM. The result goes into
    ``into`` (a new dict by default), which is returned."""
    truth = saved_truth or (lambda before, after: int(after["saved_pages"]))
    r: Json = {} if into is None else into
    start_census = census(targets)
    before = meminfo()
    anon_before = sum(rss_anon_pages(t.pid) for t in targets)
    sock = f"/run/procksm/bench-{os.getpid()}.sock"
    cmd = [*procksm, "attach", *(str(t.pid) for t in targets), "--control", sock, "-q", *extra]
    # [t, saved pages, CPU s, RSS MiB] of the daemon's process tree
    samples: list[list[float]] = []
    t95 = t100 = cpu95 = cpu100 = None
    t_ready = cpu_ready = None  # start-up done (Python, numpy, the eBPF observer)
    peak_rss = 0.0
    pids: list[int] = []
    with tempfile.TemporaryFile() as err:
        t0 = time.perf_counter()
        child = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, cwd=ROOT)
        ChildTracker.pid = child.pid
        stats: Json = {}
        try:
            while True:
                now = time.perf_counter() - t0
                if exited(child.pid):
                    break
                pids = process_tree(child.pid)
                anon = sum(rss_anon_pages(t.pid) for t in targets)
                saved = anon_before - anon - shared_memfd_pages(targets, pids)
                cpu = tree_cpu(pids)
                rss = sum(proc_status(p, "VmRSS") for p in pids) / 2**20
                peak_rss = max(peak_rss, rss)
                samples.append([now, saved, cpu, rss])
                if t_ready is None and os.path.exists(sock):
                    t_ready, cpu_ready = now, cpu
                if t95 is None and saved >= 0.95 * ideal:
                    t95, cpu95 = now, cpu
                # 100 %: when pagemap confirms what the counters above suggest
                if saved >= ideal and truth(start_census, census(targets)) >= ideal:
                    t100, cpu100 = now, cpu
                    break
                if now >= bound_s:
                    break
                time.sleep(poll_s)
            if not exited(child.pid):
                stats = daemon_stats(procksm, sock, child)
                if before_stop is not None:
                    before_stop(r)
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
            ChildTracker.pid = None
        err.seek(0)
        stderr = err.read().decode(errors="replace")
    wall = time.perf_counter() - t0
    after = meminfo()
    end_census = census(targets)
    cpu_s = cpu100 if cpu100 is not None else (samples[-1][2] if samples else None)
    t_end = t100 if t100 is not None else (samples[-1][0] if samples else None)
    if cpu_s is not None and t_end and t_ready is not None and cpu_ready is not None:
        # the share of a CPU while scanning, after start-up: what ksmd gets in "equal"
        share = (cpu_s - cpu_ready) / (t_end - t_ready) if t_end > t_ready else None
    else:
        share = cpu_s / t_end if cpu_s is not None and t_end else None
    r.update(
        {
            "cmd": " ".join(cmd),
            "exit_code": exit_code,
            "converged": t100 is not None,
            "t95_s": t95,
            "t100_s": t100,
            "cpu_s": cpu_s,
            "cpu_s_t95": cpu95,
            "cpu_s_total": usage.ru_utime + usage.ru_stime,
            "cpu_s_until_stopped": cpu_end,
            "cpu_share": share,
            "ready_s": t_ready,
            "cpu_s_startup": cpu_ready,
            "wall_s": wall,
            # peak of the summed VmRSS of the daemon and its worker, sampled every poll_s
            "max_rss_mib": peak_rss,
            "saved_pages_pagemap": end_census["saved_pages"],
            "saved_pages_meminfo": meminfo_saving(before, after),
            "fraction": end_census["saved_pages"] / ideal if ideal else None,
            "pauses": {
                "p50_ms": stats.get("pause_p50_ms"),
                "p99_ms": stats.get("pause_p99_ms"),
                "max_ms": stats.get("pause_max_ms"),
            },
            "stats": {k: v for k, v in stats.items() if k not in ("targets", "history")},
            "census_before": start_census,
            "census_after": end_census,
            "samples": thin(samples),
            "memory_check": verify_targets(targets),
        }
    )
    r["stderr_head"] = stderr[:1000]
    if not stats:
        r["error"] = (stderr.strip() or "procksm stats gave no answer")[-2000:]
    return r


def machine_line() -> str:
    model = ""
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    mem = meminfo()["MemTotal"] / MIB_PAGES / 1024
    return (
        f"{platform.node()}: Linux {platform.release()} {platform.machine()}, "
        f"{os.cpu_count()} CPUs ({model}), {mem:.1f} GiB RAM"
    )


@contextmanager
def interrupts_raise() -> Iterator[None]:
    """SIGTERM/SIGHUP raise SystemExit (SIGINT raises KeyboardInterrupt) so finally runs."""

    def handler(signum: int, frame: FrameType | None) -> None:
        raise SystemExit(128 + signum)

    old = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def swap_pairs(variants: Sequence[str]) -> list[str]:
    """procksm, ksmd, procksm_busy, ksmd_defaults -> ksmd, procksm, ksmd_defaults, procksm_busy."""
    out = list(variants)
    for i in range(0, len(out) - 1, 2):
        out[i], out[i + 1] = out[i + 1], out[i]
    return out
