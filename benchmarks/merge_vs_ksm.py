"""procksm merge against the kernel's KSM, on the same planted workload, in the same run.

    .venv/bin/python benchmarks/merge_vs_ksm.py [--reps 3]
        [--ksm-defaults [--ksm-defaults-timeout 180]] [--busy-threads 7] [--only ksmd]

Workload: --targets (4) planted processes, each with --identical (65536 = 256 MiB) pages
equal across processes, --zero (16384 = 64 MiB) zero-filled pages, and --unique (16384)
pages nobody else has. Every run starts fresh targets and kills them afterwards. Per
repetition, alternating the order (procksm first in repetitions 1, 3, ...):

  procksm          `procksm merge PID... --json`, one shot, to completion
  ksmd max         kernel KSM at pages_to_scan=100000, sleep_millisecs=0, until 100 %
  procksm busy     procksm again, with --busy-targets (1) of the targets running
                   --busy-threads (7) spinning threads + main = 8 threads, for the pause goal
                   (the busy targets' own pauses, from procksm's per-process JSON);
                   --busy-threads 0 skips it. All 4 targets busy = 28 spinning threads on
                   2 CPUs: procksm then gets ~1/15 of a CPU and one run takes minutes
  ksmd defaults    only with --ksm-defaults: pages_to_scan=100, sleep_millisecs=20, bounded
                   by --ksm-defaults-timeout (it needs minutes)

The kernel's KSM runs with use_zero_pages=1 (its counterpart of dropping zero pages); the
targets opt in with planted --mergeable (MADV_MERGEABLE on the planted regions only).

Truth sources (each printed number says which):
  ideal saving   from the workload: distinct frames - distinct non-zero contents
                 = T*(I+Z+U) - (I + T*U) pages; the distinct frames are checked in pagemap
  pagemap        for both tools: planted pages - distinct PFNs mapped over the planted
                 ranges of all targets (/proc/PID/pagemap; the zero page, found with
                 KPF_ZERO_PAGE in /proc/kpageflags, and non-present pages cost no frame).
                 Exact and blind to other processes: it decides "saving reached"
  procksm        also (AnonPages_before - AnonPages_now) - (Shmem_now - Shmem_before) from
                 /proc/meminfo: machine-wide, so other processes' allocations show in it
  ksmd           saving = delta of pages_sharing + ksm_zero_pages in /sys/kernel/mm/ksm;
                 cross-checked with the same pagemap count, KPF_KSM in /proc/kpageflags,
                 general_profit and MemFree
  times          procksm: wall time of the child (100 %: if pagemap then shows the ideal)
                 and the first sample (every --poll s) where the targets' RssAnon drop
                 minus the pages of the memfds procksm holds is >= 95 % (the machine-wide
                 meminfo saving is sampled too, in the JSON); ksmd: first counter sample
                 (every --poll s after run=1 is written) at >= 95 % / 100 %
  CPU            procksm: the child's rusage (os.wait4), its JSON cpu_s alongside;
                 ksmd: utime+stime of the ksmd thread (/proc/PID/stat) up to the 100 % sample
  pauses         procksm's own measurement (JSON "pauses"); ksmd never stops a target

KSM settings are machine-wide: the ones written are restored to the values found at start
on every exit path (also SIGINT/SIGTERM/SIGHUP); the benchmark refuses to run while other
processes have KSM pages. Writes benchmarks/results/merge_vs_ksm.json (raw reps, medians).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import statistics
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
# Goals of issue 3.
GOAL_SPEEDUP = 3.0  # ksmd (max speed) time to 100 % / procksm's
GOAL_SAVING = 0.99  # of the ideal saving
GOAL_P99_MS = 1.0
GOAL_MAX_MS = 5.0

Json = dict[str, Any]


# --------------------------------------------------------------------------------------
# Targets
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
class Workload:
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


def start_targets(exe: Path, w: Workload, busy: int, threads: int, mergeable: bool) -> list[Target]:
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


# --------------------------------------------------------------------------------------
# Statistics and report
# --------------------------------------------------------------------------------------


def med(runs: Sequence[Json], key: Callable[[Json], float | None]) -> float | None:
    values = [v for r in runs if "error" not in r and (v := key(r)) is not None]
    return statistics.median(values) if values else None


def summarize(runs: Sequence[Json], kind: str, pauses: str = "pauses") -> Json:
    ok = [r for r in runs if "error" not in r]
    s: Json = {"reps": len(runs), "failed": len(runs) - len(ok)}
    if not ok:
        return s
    s["t95_s"] = med(ok, lambda r: r["t95_s"])
    s["t100_s"] = med(ok, lambda r: r["t100_s"])
    s["reached_100_in"] = sum(r["t100_s"] is not None for r in ok)
    s["cpu_s"] = med(ok, lambda r: r["cpu_s"])
    s["fraction"] = med(ok, lambda r: r["fraction"])
    s["wall_s"] = med(ok, lambda r: r.get("wall_s"))
    s["checks"] = sorted({r["memory_check"] for r in ok})
    if kind == "procksm":
        s["saved_pages_meminfo"] = med(ok, lambda r: r["saved_pages_meminfo"])
        s["saved_pages_pagemap"] = med(ok, lambda r: r["saved_pages_pagemap"])
        s["cpu_s_procksm_json"] = med(ok, lambda r: r["cpu_s_procksm_json"])
        for k in ("p50_ms", "p99_ms", "max_ms"):
            s[k] = med(ok, _pause_getter(pauses, k))
        s["worst_max_ms"] = max(r[pauses].get("max_ms", 0.0) for r in ok)
        s["pause_count"] = med(ok, _pause_getter(pauses, "count"))
        s["pauses_from"] = pauses
        if pauses == "busy_pauses":
            s["threads"] = max(r[pauses].get("threads", 1) for r in ok)
        s["max_rss_mib"] = med(ok, lambda r: r["max_rss_mib"])
    else:
        s["saved_pages_counters"] = med(ok, lambda r: r["saved_pages_counters"])
        s["saved_pages_pagemap"] = med(ok, lambda r: r["saved_pages_pagemap"])
        s["cpu_s_until_stopped"] = med(ok, lambda r: r["cpu_s_until_stopped"])
        s["converged_in"] = sum(r["converged"] for r in ok)
    return s


def _pause_getter(field: str, key: str) -> Callable[[Json], float | None]:
    return lambda r: r[field].get(key)


def fmt(v: float | None, spec: str = ".2f", unit: str = "") -> str:
    return "-" if v is None else f"{v:{spec}}{unit}"


def ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b == 0 else a / b


def goal(ok: bool | None) -> str:
    return "n/a" if ok is None else ("met" if ok else "MISSED")


def evaluate(meds: Json, w: Workload) -> Json:
    p, k = meds.get("procksm", {}), meds.get("ksmd_max", {})
    busy = meds.get("procksm_busy", {})
    goals: Json = {}
    p_time = p.get("t100_s")
    speedup = ratio(k.get("t100_s"), p_time)
    goals["speed"] = {
        "goal": f"ksmd max time to 100 % / procksm's >= {GOAL_SPEEDUP:.0f}",
        "value": speedup,
        "shown": fmt(speedup, ".2f", "x"),
        "met": None if speedup is None else speedup >= GOAL_SPEEDUP,
    }
    cpu = ratio(p.get("cpu_s"), k.get("cpu_s"))
    goals["cpu"] = {
        "goal": "procksm CPU s / ksmd CPU s (to 100 %) <= 1",
        "value": cpu,
        "shown": fmt(cpu, ".2f", "x"),
        "met": None if cpu is None else cpu <= 1.0,
    }
    frac = p.get("fraction")
    goals["saving"] = {
        "goal": f"procksm saving >= {GOAL_SAVING:.0%} of the ideal (pagemap)",
        "value": frac,
        "shown": "-" if frac is None else f"{100 * frac:.2f} %",
        "met": None if frac is None else frac >= GOAL_SAVING,
    }
    for name, s in (("pauses", p), ("pauses_busy", busy)):
        p99, mx = s.get("p99_ms"), s.get("max_ms")
        who = "main run" if name == "pauses" else f"busy target, {s.get('threads', '?')} threads"
        goals[name] = {
            "goal": f"p99 <= {GOAL_P99_MS:g} ms, max <= {GOAL_MAX_MS:g} ms ({who})",
            "value": {"p99_ms": p99, "max_ms": mx, "worst_max_ms": s.get("worst_max_ms")},
            "shown": f"p99 {fmt(p99, '.2f')} max {fmt(mx, '.2f')} "
            f"(worst {fmt(s.get('worst_max_ms'), '.2f')}) ms",
            "met": None if p99 is None or mx is None else p99 <= GOAL_P99_MS and mx <= GOAL_MAX_MS,
        }
    return goals


def print_report(machine: str, w: Workload, meds: Json, goals: Json, a: argparse.Namespace) -> None:
    ideal = w.ideal_pages
    p = meds.get("procksm", {})
    k = meds.get("ksmd_max", {})
    d = meds.get("ksmd_defaults")
    busy = meds.get("procksm_busy")
    print(f"\nmachine   {machine}")
    print(
        f"workload  {w.targets} targets x ({w.identical / MIB_PAGES:.0f} MiB identical + "
        f"{w.zero / MIB_PAGES:.0f} MiB zero + {w.unique / MIB_PAGES:.0f} MiB unique) = "
        f"{w.planted_pages / MIB_PAGES:.0f} MiB planted"
    )
    print(
        f"ideal     {ideal:,} pages = {ideal / MIB_PAGES:.0f} MiB saved (distinct frames "
        f"{w.planted_pages:,} - distinct non-zero contents {w.distinct_contents:,})"
    )
    print(f"medians of {a.reps} reps; ksmd with use_zero_pages={a.use_zero_pages}\n")

    cols = ["procksm", "ksmd max", "ksmd/procksm"]
    if d is not None:
        cols += ["ksmd defaults", "defaults/procksm"]
    print(f"{'':34}" + "".join(f"{c:>17}" for c in cols))

    def row(label: str, pv: float | None, kv: float | None, dv: float | None, spec: str) -> None:
        cells = [fmt(pv, spec), fmt(kv, spec), fmt(ratio(kv, pv), ".2f", "x")]
        if d is not None:
            cells += [fmt(dv, spec), fmt(ratio(dv, pv), ".2f", "x")]
        print(f"{label:34}" + "".join(f"{c:>17}" for c in cells))

    dd: Json = d or {}
    row("time to 95 % (s)", p.get("t95_s"), k.get("t95_s"), dd.get("t95_s"), ".2f")
    row("time to 100 % (s)", p.get("t100_s"), k.get("t100_s"), dd.get("t100_s"), ".2f")
    row("CPU s (rusage / ksmd stat)", p.get("cpu_s"), k.get("cpu_s"), dd.get("cpu_s"), ".2f")
    pr, kr, dr = (
        None if s.get("t100_s") is None else ideal / MIB_PAGES / s["t100_s"] for s in (p, k, dd)
    )
    row("saving rate to 100 % (MiB/s)", pr, kr, dr, ".0f")
    pf, kf, df = (None if s.get("fraction") is None else 100 * s["fraction"] for s in (p, k, dd))
    row("saving reached (% of ideal)", pf, kf, df, ".2f")
    print(
        f"{'pauses p50/p99/max (ms)':34}{fmt(p.get('p50_ms'), '.3f')}/{fmt(p.get('p99_ms'), '.3f')}"
        f"/{fmt(p.get('max_ms'), '.3f')}   (ksmd stops no target)"
    )
    if d is not None and dd.get("reps") and dd.get("converged_in", 0) < dd["reps"]:
        print(
            f"  ksmd defaults: not converged in {a.ksm_defaults_timeout:.0f} s in "
            f"{dd['reps'] - dd.get('converged_in', 0)} of {dd['reps']} reps; reached "
            f"{fmt(100 * (dd.get('fraction') or 0), '.1f')} % (median)"
        )
    if busy:
        print(
            f"\nprocksm with {a.busy_targets} of {w.targets} targets running "
            f"{a.busy_threads + 1} threads ({a.busy_threads} spinning): wall "
            f"{fmt(busy.get('wall_s'))} s, CPU {fmt(busy.get('cpu_s'))} s, saving "
            f"{fmt(100 * (busy.get('fraction') or 0), '.2f')} %;\n  the busy targets' pauses "
            f"p50/p99/max {fmt(busy.get('p50_ms'), '.3f')}/{fmt(busy.get('p99_ms'), '.3f')}/"
            f"{fmt(busy.get('max_ms'), '.3f')} ms "
            f"(worst max of {busy.get('reps')} reps {fmt(busy.get('worst_max_ms'), '.3f')})"
        )
    print("\nsources (procksm | ksmd):")
    print(
        "  time to 100 %   child wall time, if pagemap then shows the ideal | first 50-ms "
        "sample of /sys/kernel/mm/ksm pages_sharing + ksm_zero_pages >= ideal"
    )
    print(
        "  time to 95 %    first 50-ms sample of the targets' RssAnon drop (/proc/PID/status) "
        "- pages of procksm's memfds | same KSM counters"
    )
    print(
        "  CPU s           child's rusage (os.wait4) | ksmd's utime+stime "
        "(/proc/PID/stat) at the 100 % sample"
    )
    print(
        "  saving reached  pagemap: planted pages - distinct PFNs (zero page excluded) | "
        "KSM counters"
    )
    print("  pauses          procksm's own JSON | - (ksmd stops no target)")
    print("cross-checks:")
    if p:
        print(
            f"  procksm  saving: pagemap {fmt(p.get('saved_pages_pagemap'), ',.0f')}, "
            f"/proc/meminfo {fmt(p.get('saved_pages_meminfo'), ',.0f')} (machine-wide) "
            f"pages; CPU: rusage {fmt(p.get('cpu_s'))} s, its JSON cpu_s "
            f"{fmt(p.get('cpu_s_procksm_json'))} s; max RSS {fmt(p.get('max_rss_mib'), '.0f')} MiB"
        )
    if k:
        print(
            f"  ksmd     saving: counters {fmt(k.get('saved_pages_counters'), ',.0f')}, pagemap "
            f"{fmt(k.get('saved_pages_pagemap'), ',.0f')} pages; CPU until run=0 "
            f"{fmt(k.get('cpu_s_until_stopped'))} s"
        )
    checks = {name: s.get("checks") for name, s in meds.items()}
    print(f"  targets' own memory check after merging: {checks}")
    failed = {name: s["failed"] for name, s in meds.items() if s.get("failed")}
    if failed:
        print(f"  FAILED runs: {failed} (see the JSON file for the errors)")
    print("\ngoals:")
    for name, g in goals.items():
        print(f"  {name:12} {goal(g['met']):7} {g['shown']:38} {g['goal']}")


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


# --------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------


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


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--targets", type=int, default=4)
    ap.add_argument("--identical", type=int, default=65536, help="pages (65536 = 256 MiB)")
    ap.add_argument("--zero", type=int, default=16384, help="pages")
    ap.add_argument("--unique", type=int, default=16384, help="pages")
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument(
        "--busy-threads",
        type=int,
        default=7,
        help="spinning threads per busy target in the extra procksm run (0: skip that run)",
    )
    ap.add_argument("--busy-targets", type=int, default=1, help="how many targets spin in that run")
    ap.add_argument("--ksm-timeout", type=float, default=120.0, help="bound on a ksmd max run")
    ap.add_argument("--ksm-defaults", action="store_true", help="also run ksmd at its defaults")
    ap.add_argument("--ksm-defaults-timeout", type=float, default=180.0)
    ap.add_argument("--use-zero-pages", type=int, choices=(0, 1), default=1)
    ap.add_argument("--poll", type=float, default=0.05, help="sampling period, s")
    ap.add_argument("--only", choices=("all", "procksm", "ksmd"), default="all")
    ap.add_argument(
        "--procksm",
        default=str(ROOT / ".venv" / "bin" / "procksm"),
        help="the procksm executable (extra arguments for merge: --procksm-arg)",
    )
    ap.add_argument("--procksm-arg", action="append", default=[], help="passed to merge")
    ap.add_argument(
        "--output", type=Path, default=ROOT / "benchmarks" / "results" / "merge_vs_ksm.json"
    )
    a = ap.parse_args(argv)
    if a.reps < 1 or a.targets < 2:
        ap.error("--reps >= 1 and --targets >= 2")
    return a


def main(argv: Sequence[str] | None = None) -> int:
    a = parse_args(argv)
    if os.geteuid() != 0:
        print("merge_vs_ksm: needs root (ptrace, pagemap PFNs, KSM sysfs)", file=sys.stderr)
        return 1
    w = Workload(a.targets, a.identical, a.zero, a.unique, a.seed)
    exe = build_planted()
    machine = machine_line()
    procksm_cmd = [a.procksm, *a.procksm_arg]
    variants: list[str] = []
    if a.only in ("all", "procksm"):
        variants.append("procksm")
    if a.only in ("all", "ksmd"):
        variants.append("ksmd_max")
    if a.only in ("all", "procksm") and a.busy_threads > 0:
        variants.append("procksm_busy")
    if a.only in ("all", "ksmd") and a.ksm_defaults:
        variants.append("ksmd_defaults")

    uses_ksm = any(v.startswith("ksmd") for v in variants)
    ctl = ksmlib.KsmControl() if uses_ksm else None
    ksm_found = ctl.found if ctl else None
    targets: list[Target] = []
    reps: list[Json] = []
    touched_ksm = False
    with interrupts_raise():
        try:
            if ctl:
                ctl.check_unused()
                touched_ksm = True
                ctl.stop()
                ctl.wait_idle()
            for rep in range(a.reps):
                # alternate which tool goes first, so neither always gets the cooler machine
                order = variants if rep % 2 == 0 else _swap_pairs(variants)
                results: Json = {}
                for v in order:
                    t0 = time.perf_counter()
                    kind = "ksmd" if v.startswith("ksmd") else "procksm"
                    busy = a.busy_targets if v == "procksm_busy" else 0
                    targets = start_targets(exe, w, busy, a.busy_threads, mergeable=kind == "ksmd")
                    try:
                        if v == "procksm" or v == "procksm_busy":
                            r = run_procksm(procksm_cmd, targets, w.ideal_pages, a.poll)
                        else:
                            assert ctl is not None
                            fast = v == "ksmd_max"
                            r = run_ksm(
                                ctl,
                                targets,
                                w.ideal_pages,
                                w.zero > 0,
                                pages_to_scan=100000 if fast else 100,
                                sleep_ms=0 if fast else 20,
                                use_zero_pages=a.use_zero_pages,
                                timeout_s=a.ksm_timeout if fast else a.ksm_defaults_timeout,
                                poll_s=a.poll,
                            )
                    finally:
                        stop_targets(targets)
                        targets = []
                        if ctl and kind == "ksmd":
                            # drop what is left (stale stable nodes) and stop, so that the
                            # next run starts from an empty, idle KSM
                            ctl.unmerge_all()
                            ctl.wait_idle()
                    results[v] = r
                    print(_one_line(rep, v, r, time.perf_counter() - t0), flush=True)
                reps.append(results)
        finally:
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            if ChildTracker.pid is not None:
                with suppress(ProcessLookupError):
                    os.kill(ChildTracker.pid, signal.SIGKILL)
            stop_targets(targets)
            if ctl and touched_ksm:
                try:
                    ctl.unmerge_all()
                finally:
                    ctl.restore()
            signal.signal(signal.SIGINT, signal.default_int_handler)
            signal.signal(signal.SIGTERM, signal.SIG_DFL)

    meds = {
        v: summarize(
            [r[v] for r in reps],
            "ksmd" if v.startswith("ksmd") else "procksm",
            "busy_pauses" if v == "procksm_busy" else "pauses",
        )
        for v in variants
    }
    goals = evaluate(meds, w)
    print_report(machine, w, meds, goals, a)
    doc = {
        "machine": machine,
        "workload": {**w.as_json(), "planted_pages": w.planted_pages},
        "ideal_saved_pages": w.ideal_pages,
        "ideal_formula": "targets*(identical+zero+unique) - (identical + targets*unique)",
        "options": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(a).items()},
        "ksm_settings_found": ksm_found,
        "truth_sources": {
            "saving_reached": "pagemap: planted pages - distinct PFNs over the planted ranges "
            "(zero page excluded via kpageflags), both tools",
            "procksm_saving_meminfo": "/proc/meminfo (AnonPages drop - Shmem growth), "
            "machine-wide: other processes' allocations show in it",
            "ksmd_saving_counters": "/sys/kernel/mm/ksm pages_sharing + ksm_zero_pages (deltas);"
            " also general_profit, MemFree, KPF_KSM frames in the census",
            "ksmd_fraction": "counters (they agree with pagemap when nobody else uses KSM)",
            "procksm_cpu": "rusage of the child from os.wait4 (ru_utime + ru_stime)",
            "ksmd_cpu": "utime+stime of ksmd in /proc/PID/stat, at the first sample >= 100 %",
            "procksm_times": "child wall time (100 %, if pagemap shows the ideal), first "
            "sample >= 95 % of targets' RssAnon drop - pages of memfds procksm holds",
            "ksmd_times": "first counter sample >= 95 % / 100 % after run=1 was written",
            "pauses": "procksm's own JSON 'pauses'",
        },
        "medians": meds,
        "goals": goals,
        "reps": reps,
    }
    a.output.parent.mkdir(parents=True, exist_ok=True)
    a.output.write_text(json.dumps(doc, indent=1) + "\n")
    print(f"\nwrote {a.output}")
    return 0


def _swap_pairs(variants: Sequence[str]) -> list[str]:
    """procksm, ksmd, procksm_busy, ksmd_defaults -> ksmd, procksm, ksmd_defaults, procksm_busy."""
    out = list(variants)
    for i in range(0, len(out) - 1, 2):
        out[i], out[i + 1] = out[i + 1], out[i]
    return out


def _one_line(rep: int, variant: str, r: Json, took: float) -> str:
    if "error" in r:
        return f"rep {rep + 1} {variant:14} ERROR (exit {r.get('exit_code')}): {r['error'][-300:]}"
    if "counters" in r:
        extra = f" full_scans {r['counters']['full_scans']}"
    else:
        pauses = r.get("busy_pauses") or r.get("pauses") or {}
        who = "busy target" if r.get("busy_pauses") else "pauses"
        extra = f" {who} p99 {pauses.get('p99_ms')} max {pauses.get('max_ms')} ms"
    return (
        f"rep {rep + 1} {variant:14} t95 {fmt(r['t95_s'])} s  t100 {fmt(r['t100_s'])} s  "
        f"CPU {fmt(r['cpu_s'])} s  saving {100 * r['fraction']:.2f} %{extra}  "
        f"check {r['memory_check']}  ({took:.0f} s)"
    )


if __name__ == "__main__":
    try:
        raise SystemExit(main())
    except KeyboardInterrupt:
        print("merge_vs_ksm: interrupted; targets killed, KSM settings restored", file=sys.stderr)
        raise SystemExit(130) from None
