"""The runners: one tool on started targets, until the ideal saving or a bound.

- ``run_procksm``: one ``procksm merge PID... --json``, to completion;
- ``run_ksm``: the kernel's ksmd at a given speed (through ``ksm.KsmControl``);
- ``run_daemon``: ``procksm attach PID...``.

Each returns a JSON-ready dict: times to 95 % and 100 % of the ideal, CPU seconds, the
saving by each truth source (pagemap decides), pauses, samples, the targets' own memory
check. ``ksm_guarded`` wraps a benchmark's runs so that any exit restores KSM's settings
and leaves no procksm child or target behind.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from typing import Any

from benchmarks.harness.common import ROOT, Json, interrupts_raise, thin
from benchmarks.harness.ksm import KsmControl, KsmCounters, read_counters
from benchmarks.harness.targets import Running, Target, stop_targets, verify_targets
from benchmarks.harness.truth import (
    ThreadCpu,
    census,
    exited,
    guards_cpu_s,
    memfd_pages,
    meminfo,
    meminfo_saving,
    proc_status,
    process_tree,
    read_thread_cpu,
    rss_anon_pages,
    shared_memfd_pages,
    targets_cpu_s,
    tree_cpu,
)
from procksm import PAGE_SIZE

# the KSM counters a ksmd run records (general_profit is in the savings instead)
REPORTED_COUNTERS = (
    "pages_shared",
    "pages_sharing",
    "ksm_zero_pages",
    "pages_unshared",
    "pages_volatile",
    "full_scans",
    "pages_scanned",
)


# called with the seconds since a run started, after each of its samples
Probe = Callable[[float], None]


class ChildTracker:
    """The procksm child currently running, so that an interrupt can kill it (by pid)."""

    pid: int | None = None


@contextmanager
def ksm_guarded(ctl: KsmControl | None) -> Iterator[None]:
    """Around a benchmark's runs: refuse while other processes have KSM pages (before
    anything is written: run=2 would unmerge theirs), stop ksmd and wait until it is idle;
    on every exit (also SIGINT/SIGTERM/SIGHUP) kill the procksm child, stop the targets of
    the run in progress (``targets.Running``), unmerge and restore the KSM settings found.
    ``ctl`` None: a benchmark that does not touch KSM."""
    touched_ksm = False
    with interrupts_raise():
        try:
            if ctl is not None:
                ctl.check_unused()
                touched_ksm = True
                ctl.stop()
                ctl.wait_idle()
            yield
        finally:
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            if ChildTracker.pid is not None:
                with suppress(ProcessLookupError):
                    os.kill(ChildTracker.pid, signal.SIGKILL)
            stop_targets(Running.targets)
            if ctl is not None and touched_ksm:
                try:
                    ctl.unmerge_all()
                finally:
                    ctl.restore()
            signal.signal(signal.SIGINT, signal.default_int_handler)
            signal.signal(signal.SIGTERM, signal.SIG_DFL)


# --------------------------------------------------------------------------------------
# procksm merge
# --------------------------------------------------------------------------------------


@dataclass
class _MergeExit:
    """How a `procksm merge` child ended, and what was sampled while it ran."""

    wall: float
    usage: Any  # os.wait4's rusage: the truth for its CPU time and peak RSS
    exit_code: int
    stdout: str
    stderr: str
    after: dict[str, int]  # meminfo at its exit
    samples: list[list[float]]  # [t, targets' saving, machine saving (meminfo)] in pages


def _merge_to_exit(
    cmd: Sequence[str], targets: Sequence[Target], before: dict[str, int], poll_s: float
) -> _MergeExit:
    """Run the child to its exit, sampling the targets' saving every ``poll_s``."""
    anon_before = sum(rss_anon_pages(t.pid) for t in targets)
    samples: list[list[float]] = []
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
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
    return _MergeExit(wall, usage, child.returncode, stdout, stderr, after, samples)


def run_procksm(
    procksm: Sequence[str], targets: Sequence[Target], ideal: int, poll_s: float
) -> Json:
    """``procksm merge PID... --json`` to completion; ``ideal``: pages an ideal merge saves."""
    start_census = census(targets)
    before = meminfo()
    cmd = [*procksm, "merge", *map(str, (t.pid for t in targets)), "--json"]
    targets_cpu0, guards_cpu0 = targets_cpu_s(targets), guards_cpu_s()
    ex = _merge_to_exit(cmd, targets, before, poll_s)
    run: Json = {
        "wall_s": ex.wall, "exit_code": ex.exit_code, "cmd": " ".join(cmd),
        "targets_cpu_s": targets_cpu_s(targets) - targets_cpu0,
        "guards_cpu_s": max(0.0, guards_cpu_s() - guards_cpu0),
    }  # fmt: skip
    try:
        doc = json.loads(ex.stdout)
    except ValueError:
        doc = None
    if ex.exit_code != 0 or doc is None:
        run["error"] = (ex.stderr.strip() or ex.stdout.strip() or "no output")[-2000:]
        if doc is None:
            return run
    run.update(_merge_result(ex, doc, targets, ideal, before, start_census))
    return run


def _merge_result(
    ex: _MergeExit, doc: Json, targets: Sequence[Target], ideal: int, before: dict[str, int],
    start_census: Json,
) -> Json:  # fmt: skip
    end_census = census(targets)
    saving_pagemap = end_census["saved_pages"]
    # The 95 % time comes from the targets' own counters (RssAnon, and the memfd pages
    # procksm holds), not from /proc/meminfo: on a shared machine other processes move
    # AnonPages by hundreds of MiB within a second. Neither counts procksm's own memory,
    # as ksmd's counters do not count its rmap_items.
    t95 = next((t for t, saved, _machine in ex.samples if saved >= 0.95 * ideal), None)
    if t95 is None and saving_pagemap >= 0.95 * ideal:
        t95 = ex.wall  # crossed between the last sample and the exit
    totals = doc.get("totals", {})
    return {
        "t95_s": t95,
        "t100_s": ex.wall if saving_pagemap >= ideal else None,
        "cpu_s": ex.usage.ru_utime + ex.usage.ru_stime,
        "cpu_s_procksm_json": doc.get("cpu_s"),
        "target_cpu_s_procksm_json": doc.get("target_cpu_s"),
        "elapsed_s_procksm_json": doc.get("elapsed_s"),
        "max_rss_mib": ex.usage.ru_maxrss / 1024,
        "saved_pages_meminfo": meminfo_saving(before, ex.after),
        "saved_pages_pagemap": saving_pagemap,
        "saved_pages_claimed": totals.get("saved_pages"),
        "saved_pages_memfree": ex.after["MemFree"] - before["MemFree"],
        # pagemap decides: exact and about the planted ranges only; meminfo is
        # machine-wide (see saved_pages_meminfo for how far it agrees)
        "fraction": saving_pagemap / ideal,
        "totals": totals,
        "pauses": doc.get("pauses", {}),
        "busy_pauses": busy_pauses(doc, targets),
        "census_before": start_census,
        "census_after": end_census,
        "samples": thin(ex.samples),
        "memory_check": verify_targets(targets),
    }


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


# --------------------------------------------------------------------------------------
# ksmd
# --------------------------------------------------------------------------------------


@dataclass
class _Progress:
    """When a run reached 95 % and 100 % of the ideal, and its CPU seconds by then."""

    samples: list[list[float]] = field(default_factory=list)
    t95: float | None = None
    cpu95: float | None = None
    t100: float | None = None
    cpu100: float | None = None


def _ksmd_until(
    ctl: KsmControl, base: KsmCounters, cpu0: ThreadCpu, t0: float, ideal: int, reachable: int,
    timeout_s: float, poll_s: float, probe: Probe | None,
) -> _Progress:  # fmt: skip
    """Start ksmd and sample its counters (deltas from ``base``, ``cpu0``; times from
    ``t0``) until ``reachable`` pages are saved or timeout; samples [t, saved pages,
    ksmd CPU s (stat), ksmd runtime s (schedstat)]; ``probe(t)`` after each."""
    p = _Progress()
    ctl.start()
    tick = 0
    while True:
        now = time.perf_counter() - t0
        c = read_counters().minus(base)
        cpu = read_thread_cpu(ctl.ksmd_pid)
        cpu_s = cpu.stat_s - cpu0.stat_s
        p.samples.append([now, c.saved_pages, cpu_s, cpu.runtime_s - cpu0.runtime_s])
        if p.t95 is None and c.saved_pages >= 0.95 * ideal:
            p.t95, p.cpu95 = now, cpu_s
        if probe is not None:
            probe(now)
        if c.saved_pages >= reachable:
            p.t100, p.cpu100 = now, cpu_s
            break
        if now >= timeout_s:
            break
        tick += 1
        time.sleep(max(0.0, t0 + tick * poll_s - time.perf_counter()))
    return p


def run_ksm(
    ctl: KsmControl,
    targets: Sequence[Target],
    ideal: int,
    has_zero_pages: bool,
    pages_to_scan: int,
    sleep_ms: int,
    use_zero_pages: int,
    timeout_s: float,
    poll_s: float,
    probe: Probe | None = None,
) -> Json:
    """ksmd at the given speed until ``ideal`` pages are saved (KSM counters) or timeout;
    ``probe(seconds since start)`` after every sample."""
    # Without use_zero_pages the zero pages merge into one KSM page, which stays: one page
    # short of the ideal, whose zero pages cost no frame at all.
    reachable = ideal - (1 if has_zero_pages and not use_zero_pages else 0)
    start_census = census(targets)
    ctl.configure(pages_to_scan, sleep_ms, use_zero_pages)
    ctl.wait_idle()
    base = read_counters()
    cpu0 = read_thread_cpu(ctl.ksmd_pid)
    targets_cpu0 = targets_cpu_s(targets)
    before = meminfo()
    t0 = time.perf_counter()
    p = _ksmd_until(ctl, base, cpu0, t0, ideal, reachable, timeout_s, poll_s, probe)
    ctl.stop()  # merged pages stay merged
    stopped = time.perf_counter() - t0
    targets_cpu = targets_cpu_s(targets) - targets_cpu0
    end = read_counters().minus(base)
    cpu_end = read_thread_cpu(ctl.ksmd_pid)
    after = meminfo()
    end_census = census(targets)
    last = p.samples[-1]
    return {
        "pages_to_scan": pages_to_scan,
        "sleep_millisecs": sleep_ms,
        "use_zero_pages": use_zero_pages,
        "timeout_s": timeout_s,
        "converged": p.t100 is not None,
        "t95_s": p.t95,
        "t100_s": p.t100,
        "cpu_s": p.cpu100 if p.cpu100 is not None else last[2],
        "cpu_s_t95": p.cpu95,
        "cpu_s_schedstat": last[3],
        "cpu_s_until_stopped": cpu_end.stat_s - cpu0.stat_s,
        "targets_cpu_s": targets_cpu,
        "stopped_at_s": stopped,
        "saved_pages_counters": end.saved_pages,
        "saved_pages_pagemap": end_census["saved_pages"],
        "saved_pages_general_profit": end.general_profit // PAGE_SIZE,
        "saved_pages_memfree": after["MemFree"] - before["MemFree"],
        "fraction": end.saved_pages / ideal,
        "counters": {k: getattr(end, k) for k in REPORTED_COUNTERS},
        "census_before": start_census,
        "census_after": end_census,
        "samples": thin(p.samples),
        "memory_check": verify_targets(targets),
    }


# --------------------------------------------------------------------------------------
# procksm attach (the daemon)
# --------------------------------------------------------------------------------------


@dataclass
class _DaemonProgress(_Progress):
    """Samples [t, saved pages, CPU s, RSS MiB] of the daemon's process tree."""

    t_ready: float | None = None  # start-up done (Python, numpy, the eBPF observer)
    cpu_ready: float | None = None
    peak_rss: float = 0.0
    pids: list[int] = field(default_factory=list)  # the tree at the last sample

    def cpu_s(self) -> float | None:
        """CPU seconds at 100 %, or at the last sample."""
        if self.cpu100 is not None:
            return self.cpu100
        return self.samples[-1][2] if self.samples else None

    def cpu_share(self) -> float | None:
        """The share of a CPU while scanning, after start-up: what ksmd gets in "equal"."""
        cpu_s = self.cpu_s()
        t_end = (
            self.t100 if self.t100 is not None else (self.samples[-1][0] if self.samples else None)
        )
        if cpu_s is not None and t_end and self.t_ready is not None and self.cpu_ready is not None:
            return (
                (cpu_s - self.cpu_ready) / (t_end - self.t_ready) if t_end > self.t_ready else None
            )
        return cpu_s / t_end if cpu_s is not None and t_end else None


@dataclass
class _DaemonWatch:
    """What the sampling of a daemon run compares against."""

    targets: Sequence[Target]
    ideal: int
    sock: str
    truth: Callable[[Json, Json], int]  # (census at start, census now) -> saved pages
    start_census: Json
    anon_before: int
    probe: Probe | None = None


def _sample_daemon(
    child: subprocess.Popen[bytes], w: _DaemonWatch, t0: float, poll_s: float, bound_s: float
) -> _DaemonProgress:
    """Every ``poll_s`` until the ideal (confirmed by pagemap), the bound, or its exit."""
    p = _DaemonProgress()
    while True:
        now = time.perf_counter() - t0
        if exited(child.pid):
            break
        p.pids = process_tree(child.pid)
        anon = sum(rss_anon_pages(t.pid) for t in w.targets)
        saved = w.anon_before - anon - shared_memfd_pages(w.targets, p.pids)
        cpu = tree_cpu(p.pids)
        rss = sum(proc_status(pid, "VmRSS") for pid in p.pids) / 2**20
        p.peak_rss = max(p.peak_rss, rss)
        p.samples.append([now, saved, cpu, rss])
        if p.t_ready is None and os.path.exists(w.sock):
            p.t_ready, p.cpu_ready = now, cpu
        if p.t95 is None and saved >= 0.95 * w.ideal:
            p.t95, p.cpu95 = now, cpu
        if w.probe is not None:
            w.probe(now)
        # 100 %: when pagemap confirms what the counters above suggest
        if saved >= w.ideal and w.truth(w.start_census, census(w.targets)) >= w.ideal:
            p.t100, p.cpu100 = now, cpu
            break
        if now >= bound_s:
            break
        time.sleep(poll_s)
    return p


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


@dataclass
class _DaemonEnd:
    """What the end of a daemon run leaves: its stats, CPU time until stopped, exit."""

    stats: Json
    cpu_end: float
    exit_code: int
    usage: Any  # os.wait4's rusage


def _end_daemon(
    child: subprocess.Popen[bytes], procksm: Sequence[str], sock: str, p: _DaemonProgress,
    before_stop: Callable[[Json], None] | None, r: Json,
) -> _DaemonEnd:  # fmt: skip
    """Its `procksm stats --json` and ``before_stop(r)`` while it still runs; SIGTERM;
    wait for all of it to be gone."""
    stats: Json = {}
    pids = p.pids
    if not exited(child.pid):
        stats = daemon_stats(procksm, sock, child)
        if before_stop is not None:
            before_stop(r)
        pids = process_tree(child.pid)
        r["vm_hwm_mib"] = {pid: proc_status(pid, "VmHWM") / 2**20 for pid in pids}
        cpu_end = tree_cpu(pids)
        child.send_signal(signal.SIGTERM)
    else:
        cpu_end = p.samples[-1][2] if p.samples else 0.0
    exit_code, usage = stop_daemon(child, pids, r)
    return _DaemonEnd(stats, cpu_end, exit_code, usage)


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
    probe: Probe | None = None,
) -> Json:
    """`procksm attach PID...` until the ideal saving or ``bound_s`` seconds.

    Every ``poll_s``: the targets' RssAnon drop minus the pages of procksm's memfd
    segments (95 %, and a candidate for 100 % that pagemap must confirm:
    ``saved_truth(census at start, census now)``, by default the census's saved pages),
    the CPU time and summed VmRSS of the daemon's process tree (the supervisor and the
    worker it forks), then ``probe(seconds since start)``. At the end: its own `procksm
    stats --json`; ``before_stop(r)`` runs while it still runs (W3's thrash window); then
    SIGTERM. The result goes into ``into`` (a new dict by default), which is returned."""
    r: Json = {} if into is None else into
    watch = _DaemonWatch(
        targets,
        ideal,
        f"/run/procksm/bench-{os.getpid()}.sock",
        saved_truth or (lambda before, after: int(after["saved_pages"])),
        census(targets),
        0,
        probe,
    )
    before = meminfo()
    watch.anon_before = sum(rss_anon_pages(t.pid) for t in targets)
    cmd = [*procksm, "attach", *(str(t.pid) for t in targets), "--control", watch.sock, "-q"]
    cmd += extra
    with tempfile.TemporaryFile() as err:
        t0 = time.perf_counter()
        child = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, cwd=ROOT)
        ChildTracker.pid = child.pid
        try:
            p = _sample_daemon(child, watch, t0, poll_s, bound_s)
            end = _end_daemon(child, procksm, watch.sock, p, before_stop, r)
        finally:
            if child.returncode is None:  # an exception: do not leave it running
                with suppress(ProcessLookupError):
                    os.kill(child.pid, signal.SIGKILL)
                child.wait()
            ChildTracker.pid = None
        err.seek(0)
        stderr = err.read().decode(errors="replace")
    wall = time.perf_counter() - t0
    r.update(_daemon_result(cmd, end, p, wall, before, watch))
    r["stderr_head"] = stderr[:1000]
    if not end.stats:
        r["error"] = (stderr.strip() or "procksm stats gave no answer")[-2000:]
    return r


def _daemon_result(
    cmd: Sequence[str], end: _DaemonEnd, p: _DaemonProgress, wall: float,
    before: dict[str, int], watch: _DaemonWatch,
) -> Json:  # fmt: skip
    after = meminfo()
    end_census = census(watch.targets)
    ideal = watch.ideal
    return {
        "cmd": " ".join(cmd),
        "exit_code": end.exit_code,
        "converged": p.t100 is not None,
        "t95_s": p.t95,
        "t100_s": p.t100,
        "cpu_s": p.cpu_s(),
        "cpu_s_t95": p.cpu95,
        "cpu_s_total": end.usage.ru_utime + end.usage.ru_stime,
        "cpu_s_until_stopped": end.cpu_end,
        "cpu_share": p.cpu_share(),
        "ready_s": p.t_ready,
        "cpu_s_startup": p.cpu_ready,
        "wall_s": wall,
        # peak of the summed VmRSS of the daemon and its worker, sampled every poll_s
        "max_rss_mib": p.peak_rss,
        "saved_pages_pagemap": end_census["saved_pages"],
        "saved_pages_meminfo": meminfo_saving(before, after),
        "fraction": end_census["saved_pages"] / ideal if ideal else None,
        "pauses": {
            "p50_ms": end.stats.get("pause_p50_ms"),
            "p99_ms": end.stats.get("pause_p99_ms"),
            "max_ms": end.stats.get("pause_max_ms"),
        },
        "stats": {k: v for k, v in end.stats.items() if k not in ("targets", "history")},
        "census_before": watch.start_census,
        "census_after": end_census,
        "samples": thin(p.samples),
        "memory_check": verify_targets(watch.targets),
    }
