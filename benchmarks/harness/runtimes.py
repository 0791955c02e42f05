"""benchmarks/runtimes.py's runs (issue 15): real runtimes under `procksm attach` and
under the kernel's KSM, each for a fixed time, in the same run.

Rows: JVMs (OpenJDK 17, G1, 256 MiB pre-touched heaps), node processes, CPython workers
holding the same numpy arrays (numpy's defaults, and NUMPY_MADVISE_HUGEPAGE=0),
redis-servers with the same dataset. Per row, on fresh processes each time:

  none           no tool for ``run_s``: the frames the programs free or take by themselves
  procksm        `procksm attach PIDS` at its defaults for ``run_s``
  ksmd_defaults  the targets opted in with prctl(PR_SET_MEMORY_MERGE) (a wrapper that sets
                 it and execs the runtime), ksmd at 100 pages / 20 ms, for ``run_s``
  ksmd_max       the same at 100000 pages / 0 ms

All with use_zero_pages=1 for ksmd, as in suite.py. Saved, at ``early_s`` and at the end,
from pagemap over the targets' private anonymous memory of the start (``Baseline``): the
pages that share a frame (KSM's pages, procksm's segments) plus the zero-filled pages of the
start that have no frame any more (dropped, or KSM's zero page), whatever the programs
allocate or free meanwhile (frames freed, which counts that too, is in the JSON: node
returns 50-85 MiB of its start-up garbage to the kernel at a moment of its choosing, in
one run and not the next). procksm's cost: CPU of its whole process tree (the daemon, its
children, both madvise guards and their unmerge helper) over the last half of the run,
its private memory at the end (smaps, by kind); net = saved - that memory.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from benchmarks.harness.common import MIB_PAGES, Json
from benchmarks.harness.ksm import KsmControl
from benchmarks.harness.runners import ChildTracker, run_daemon, run_ksm
from benchmarks.harness.suite_runs import RUN_ERRORS
from benchmarks.harness.targets import (
    Target,
    fresh_targets,
    start_numpy,
    start_redis,
    start_runtime,
    verify_targets,
)
from benchmarks.harness.truth import (
    PrivateMemory,
    census,
    comm,
    content_census,
    cpu_with_reaped,
    ksm_stat,
    private_memory,
    process_tree,
    read_thread_cpu,
    shared_ptes,
    zero_pages_gone,
)
from procksm import PAGE_SIZE
from procksm.attach.locks import lock_dir
from tests.conftest import guard_pids

ROWS = ("jvm", "node", "numpy", "numpy_nohuge", "redis")
# "none": the same programs with no tool: what they free by themselves, and a check that
# the saving measured is the tools' (it is ~0 there)
VARIANTS = ("none", "procksm", "ksmd_defaults", "ksmd_max")
# the runners stop at the ideal saving; these runs last their whole time, and what the
# runners report about reaching it means nothing here
NEVER_REACHED = 1 << 60
UNTIL_IDEAL = ("converged", "t95_s", "t100_s", "cpu_s", "cpu_s_t95", "fraction")


@dataclass(frozen=True)
class RuntimeSizes:
    run_s: float  # each run's length
    early_s: float  # when the early saving is read
    jvm: tuple[int, int]  # workers, MiB of data each (and a 256 MiB heap)
    node: tuple[int, int]  # workers, MiB of data each
    numpy: tuple[int, int]  # workers, MiB of array each
    redis: tuple[int, int, int]  # servers, keys, value bytes

    @property
    def cpu_from_s(self) -> float:
        """procksm's and ksmd's CPU is measured over the second half of a run."""
        return self.run_s / 2


FULL = RuntimeSizes(60.0, 10.0, (3, 64), (3, 128), (4, 64), (4, 150_000, 500))
QUICK = RuntimeSizes(20.0, 5.0, (2, 32), (2, 32), (2, 16), (2, 20_000, 300))


@dataclass(frozen=True)
class Row:
    name: str
    description: str
    start: Callable[[bool], list[Target]]  # mergeable -> started targets


def make_rows(s: RuntimeSizes, tmp: Path) -> dict[str, Row]:
    (jn, jm), (nn, nm), (pn, pm), (rn, rk, rv) = s.jvm, s.node, s.numpy, s.redis
    rows = (
        Row("jvm", f"{jn} JVMs, OpenJDK G1, 256 MiB pre-touched heap, {jm} MiB of data each",
            lambda m: start_runtime("jvm", jn, jm, m, tmp)),
        Row("node", f"{nn} node, {nm // 2} MiB of Buffers + {nm // 2} MiB of objects each",
            lambda m: start_runtime("node", nn, nm, m, tmp)),
        Row("numpy", f"{pn} CPython, the same {pm} MiB numpy array each, numpy's defaults",
            lambda m: start_numpy(pn, pm, m)),
        Row("numpy_nohuge", "the same with NUMPY_MADVISE_HUGEPAGE=0",
            lambda m: start_numpy(pn, pm, m, hugepage_advice=False)),
        Row("redis", f"{rn} redis-server, DEBUG POPULATE {rk} keys x {rv} B each",
            lambda m: start_redis(rn, rk, rv, m, tmp)),
    )  # fmt: skip
    return {r.name: r for r in rows}


@dataclass
class RuntimeRun:
    """What every run of one invocation shares."""

    ctl: KsmControl
    procksm: Sequence[str]
    sizes: RuntimeSizes
    poll_s: float = 0.5


@dataclass(frozen=True)
class Baseline:
    """The targets' memory when a run starts: its census (truth.census), the pages that
    shared a frame then, the zero-filled pages that had a frame of their own."""

    census: Json
    shared: int
    zeros: dict[int, np.ndarray]  # pid -> addresses

    @staticmethod
    def of(targets: Sequence[Target], zeros: dict[int, np.ndarray]) -> Baseline:
        c = census(targets)
        return Baseline(c, shared_ptes(c), zeros)

    def measure(self, targets: Sequence[Target]) -> Json:
        """Now: saved (pages sharing a frame, and zero pages gone, since the start) and
        frames freed (whatever freed them)."""
        c = census(targets)
        shared = shared_ptes(c) - self.shared
        zero = zero_pages_gone(targets, self.zeros)
        freed = int(self.census["distinct_frames"] - c["distinct_frames"])
        return {"saved": shared + zero, "shared": shared, "zero_gone": zero, "frames_freed": freed}


def procksm_pids(daemon_pid: int) -> list[int]:
    """procksm's whole process tree: the daemon and its children, both madvise guards
    (of this lock directory) and their unmerge helper."""
    pids = process_tree(daemon_pid)
    for g in guard_pids(Path(lock_dir())):
        pids += [p for p in process_tree(g) if p not in pids]
    return pids


@dataclass
class Marks:
    """What a run records while it runs, once each, when ``probe(t)`` first sees t past
    its time: the saving at ``early_s``, the tool's CPU at ``cpu_from_s`` and at
    ``run_s`` (the runners' last sample)."""

    targets: Sequence[Target]
    sizes: RuntimeSizes
    cpu: Callable[[], float]  # the CPU seconds of the tool so far
    baseline: Baseline
    found: Json = field(default_factory=dict)
    cpu_marks: dict[str, tuple[float, float]] = field(default_factory=dict)  # (wall, CPU s)

    def probe(self, t: float) -> None:
        if "early" not in self.found and t >= self.sizes.early_s:
            self.found["early"] = {"at_s": t, **self.baseline.measure(self.targets)}
        for key, at in (("cpu_from", self.sizes.cpu_from_s), ("cpu_to", self.sizes.run_s)):
            if key not in self.cpu_marks and t >= at:
                self.cpu_marks[key] = (time.perf_counter(), self.cpu())

    def cpu_share_pct(self) -> float | None:
        """The tool's CPU from ``cpu_from_s`` to ``run_s`` (or now), in % of one CPU."""
        if "cpu_from" not in self.cpu_marks:
            return None
        t0, c0 = self.cpu_marks["cpu_from"]
        t1, c1 = self.cpu_marks.get("cpu_to") or (time.perf_counter(), self.cpu())
        return float(100 * (c1 - c0) / max(t1 - t0, 1e-9))


def _procksm_run(rr: RuntimeRun, targets: Sequence[Target], base: Baseline) -> Json:
    """`procksm attach` at its defaults for run_s; before it stops: the saving, its CPU
    over the second half, its private memory."""

    def tool_cpu() -> float:
        return cpu_with_reaped(procksm_pids(ChildTracker.pid)) if ChildTracker.pid else 0.0

    marks = Marks(targets, rr.sizes, tool_cpu, base)

    def before_stop(r: Json) -> None:
        assert ChildTracker.pid is not None
        r["end"] = base.measure(targets)
        r["cpu_share_pct_second_half"] = marks.cpu_share_pct()
        pids = procksm_pids(ChildTracker.pid)
        mem = PrivateMemory()
        r["procksm_private_by_pid"] = {}
        for pid in pids:
            own = private_memory(pid)
            mem = mem.plus(own)
            r["procksm_private_by_pid"][pid] = {"comm": comm(pid), **asdict(own)}
        r["private_anonymous_bytes"] = mem.anonymous
        r["private_file_backed_bytes"] = mem.file_backed
        r["private_shmem_bytes"] = mem.shmem
        r["private_total_pages"] = mem.total // PAGE_SIZE

    r = run_daemon(targets, NEVER_REACHED, rr.procksm, poll_s=rr.poll_s, bound_s=rr.sizes.run_s,
                   before_stop=before_stop, probe=marks.probe)  # fmt: skip
    r.update(marks.found)
    return r


def _ksmd_run(rr: RuntimeRun, targets: Sequence[Target], base: Baseline, fast: bool) -> Json:
    """ksmd at its defaults or at full speed for run_s (the targets opted in)."""
    marks = Marks(targets, rr.sizes, lambda: read_thread_cpu(rr.ctl.ksmd_pid).stat_s, base)
    r = run_ksm(rr.ctl, targets, NEVER_REACHED, True, pages_to_scan=100000 if fast else 100,
                sleep_ms=0 if fast else 20, use_zero_pages=1, timeout_s=rr.sizes.run_s,
                poll_s=rr.poll_s, probe=marks.probe)  # fmt: skip
    r["cpu_share_pct_second_half"] = marks.cpu_share_pct()
    r.update(marks.found)
    r["end"] = base.measure(targets)  # ksmd stopped, its pages still merged
    r["merge_any"] = [ksm_stat(t.pid).get("ksm_merge_any") for t in targets]
    return r


def _control_run(rr: RuntimeRun, targets: Sequence[Target], base: Baseline) -> Json:
    """No tool for run_s: what the programs free (or take) by themselves."""
    marks = Marks(targets, rr.sizes, lambda: 0.0, base)
    t0 = time.perf_counter()
    while (t := time.perf_counter() - t0) < rr.sizes.run_s:
        marks.probe(t)
        time.sleep(rr.poll_s)
    r: Json = {"end": base.measure(targets), **marks.found}
    r["memory_check"] = verify_targets(targets)
    return r


def run_variant(rr: RuntimeRun, row: Row, variant: str) -> Json:
    """One run on fresh targets, stopped afterwards; after a ksmd run everything is
    unmerged (run=2) and ksmd idle before the next."""
    is_ksm = variant.startswith("ksmd")
    r: Json
    try:
        with fresh_targets(lambda: row.start(is_ksm)) as targets:
            time.sleep(1.0)
            ideal, zeros = content_census(targets)
            base = Baseline.of(targets, zeros)
            if is_ksm:
                r = _ksmd_run(rr, targets, base, variant == "ksmd_max")
            elif variant == "procksm":
                r = _procksm_run(rr, targets, base)
            else:
                r = _control_run(rr, targets, base)
            r["content_ideal"] = ideal
            if "private_total_pages" in r:
                r["net_pages"] = r["end"]["saved"] - r["private_total_pages"]
    except RUN_ERRORS as exc:
        r = {"error": f"{type(exc).__name__}: {exc}"}
    finally:
        if is_ksm:
            rr.ctl.unmerge_all()
            rr.ctl.wait_idle()
    for k in ("census_before", "census_after"):
        if k in r:
            r[k].pop("regions", None)
    for k in UNTIL_IDEAL:
        r.pop(k, None)
    r["loadavg_after"] = os.getloadavg()  # the machine is shared
    return r


def _mib(pages: float | None) -> str:
    return "-" if pages is None else f"{pages / MIB_PAGES:.1f}"


def one_line(row: str, variant: str, r: Json, took: float) -> str:
    if "error" in r:
        return f"{row:13} {variant:14} ERROR {r['error']}"
    cpu = r.get("cpu_share_pct_second_half")
    early, end = r.get("early", {}), r.get("end", {})
    return (
        f"{row:13} {variant:14} saved {_mib(early.get('saved'))} / {_mib(end.get('saved'))} "
        f"MiB (frames freed {_mib(early.get('frames_freed'))} / "
        f"{_mib(end.get('frames_freed'))}), CPU {'-' if cpu is None else f'{cpu:.1f}'} %, "
        f"check {r.get('memory_check')} ({took:.0f} s)"
    )


def run_rows(rr: RuntimeRun, rows: dict[str, Row], names: Sequence[str]) -> Json:
    """Every variant of every row asked for, in order."""
    out: Json = {"sizes": asdict(rr.sizes), "rows": {}}
    for name in names:
        row = rows[name]
        print(f"\n{name}: {row.description}", flush=True)
        res: Json = {"description": row.description}
        for v in VARIANTS:
            t0 = time.perf_counter()
            res[v] = run_variant(rr, row, v)
            print(one_line(name, v, res[v], time.perf_counter() - t0), flush=True)
        out["rows"][name] = res
    return out


def run_runtimes(ctl: KsmControl, procksm: Sequence[str], quick: bool, rows: Sequence[str],
                 poll_s: float) -> Json:  # fmt: skip
    """The rows asked for (FULL or QUICK sizes), inside the caller's ``ksm_guarded``:
    runtimes.py and suite.py's `runtimes` part."""
    tmp = Path(tempfile.mkdtemp(prefix="procksm-runtimes-"))
    Path("/run/procksm").mkdir(parents=True, exist_ok=True)  # the daemon's control socket
    sizes = QUICK if quick else FULL
    try:
        return run_rows(RuntimeRun(ctl, procksm, sizes, poll_s), make_rows(sizes, tmp), rows)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
