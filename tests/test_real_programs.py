"""Issues 4 and 15: real programs and runtimes under procksm.

* Redis (links jemalloc, which assumes zero-after-MADV_DONTNEED): several instances
  with the same dataset are merged, then driven with writes, deletes, key expiry,
  redis-benchmark on another database and MEMORY PURGE (jemalloc purges with
  MADV_DONTNEED); every instance's DEBUG DIGEST must equal that of an instance that was
  never merged, and none may crash.
* Python workers building the same numpy arrays and objects, merged, then computing
  on; results must equal those of an un-merged worker.
* JVMs (OpenJDK 17, G1, 256 MiB pre-touched heaps) and node processes holding the same
  data, churning their heaps, each checking its own data every second
  (tests/targets/runtimes/, issue 15).

Each goes through procksm's whole life: the daemon (`procksm attach`) until pagemap shows
the saving, stopped, its merges unmerged (``attach_then_unmerge``); `procksm merge`, then
`procksm unmerge`; the programs' own checks after every step. Savings are judged from
pagemap (``tests/daemon_helpers.py``), not from procksm's counters.

Each test prints what it saved (bytes, % of the scan's ideal) and what was refused.
"""

from __future__ import annotations

import json
import random
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import (
    ROOT,
    Target,
    assert_not_held,
    require_privileges,
    run_procksm,
    skip_or_fail,
)
from tests.daemon_helpers import PAGE, Truth, frames_in_use, merged_vmas, wait_for
from tests.runtime_workers import (
    NUMPY_WORKER_DATA,
    RUNTIMES,
    parse_status,
    runtime_exe,
    worker_argv,
)

Check = Callable[[str], None]  # the programs' own verdict, asserted; the argument says when


def _ideal(pids: list[int]) -> int:
    proc = run_procksm("scan", "--json", *pids)
    assert proc.returncode == 0, proc.stderr
    return int(json.loads(proc.stdout)["totals"]["ideal_savings_bytes"])


def _report(what: str, doc: dict, ideal: int) -> None:  # type: ignore[type-arg]
    saved = doc["totals"]["saved_bytes"]
    reasons: dict[str, int] = {}
    for r in doc["refused"]:
        reasons[r["reason"]] = reasons.get(r["reason"], 0) + 1
    print(
        f"\n{what}: saved {saved / 2**20:.1f} MiB = {100 * saved / max(ideal, 1):.1f} % of "
        f"the ideal {ideal / 2**20:.1f} MiB; pauses p99 {doc['pauses']['p99_ms']} ms; "
        f"refused: {reasons or 'nothing'}"
    )


# --------------------------------------------------------------------------------------
# merge, the daemon and unmerge, judged by pagemap and by the programs themselves
# --------------------------------------------------------------------------------------


def _pagemap_shares(pids: list[int], min_shared: int, who: str) -> None:
    """pagemap: at least ``min_shared`` bytes of the targets' pages are on frames they
    share through procksm's segments (beyond one mapping per frame)."""
    shared = Truth(pids).pages_sharing * PAGE
    print(f"{who}: pagemap shows {shared / 2**20:.1f} MiB shared (floor {min_shared / 2**20:.1f})")
    assert shared >= min_shared, (who, shared, min_shared)


def merge_checked(pids: list[int], min_shared: int, check: Check) -> dict[str, Any]:
    """`procksm merge --json PIDS`, judged by pagemap: ``min_shared`` bytes shared, and
    the targets' private memory costs at least that many frames fewer right after it
    (dropped zero pages count there too; later, a JVM's collector fills the dropped
    pages of its heap again); then the programs' own check. Returns merge's JSON."""
    before = frames_in_use(pids)
    proc = run_procksm("merge", "--json", *pids, timeout=300)
    assert proc.returncode == 0, proc.stderr
    freed = (before - frames_in_use(pids)) * PAGE
    doc = dict(json.loads(proc.stdout))
    print(f"merge: {freed / 2**20:.1f} MiB of frames freed (pagemap), "
          f"{doc['totals']['saved_bytes'] / 2**20:.1f} MiB by procksm's count")  # fmt: skip
    _pagemap_shares(pids, min_shared, "merge")
    # the programs allocate while the merge runs (a JVM's G1 churn refills its heap:
    # seen 35.8 MiB freed against a 36.0 floor with 50.6 MiB shared by pagemap), so the
    # frames freed get 10 % of slack; the pagemap check above keeps the whole floor
    assert freed >= 0.9 * min_shared, freed
    check("after merge")
    return doc


def unmerge_checked(pids: list[int], check: Check, what: str) -> None:
    """`procksm unmerge PIDS`: no segment of procksm's left mapped, no thread held,
    then the programs' own check."""
    proc = run_procksm("unmerge", *pids, timeout=300)
    assert proc.returncode == 0, proc.stderr
    for pid in pids:
        assert merged_vmas(pid) == [], f"pid {pid} still maps procksm's segments ({what})"
        assert_not_held(pid)
    check(f"after unmerging {what}")


def attach_then_unmerge(
    pids: list[int], tmp_path: Path, min_shared: int, check: Check, daemons: Any
) -> None:
    """`procksm attach PIDS` until pagemap shows ``min_shared`` bytes shared, the
    programs' check while it runs; SIGTERM (it detaches, pages stay merged), check;
    unmerge, check. Run first, on fresh programs, as the daemon is deployed: after a
    merge and an unmerge a numpy worker has ~3,700 VMAs instead of ~190 (unmerged pieces
    do not coalesce with their neighbours, docs/design.md §10), and the daemon then
    merges ~100 pages/s instead of ~10,000 (a merge round per small window, §11)."""
    # no CPU cap: this test waits for the saving; how fast the daemon gets there at its
    # defaults is benchmarks/runtimes.py's business
    d = daemons(tmp_path / "attach.sock", pids, "--cpu-limit", 0, "-q")
    wait_for(
        lambda: Truth(pids).pages_sharing * PAGE >= min_shared,
        180,
        f"the daemon to share {min_shared / 2**20:.0f} MiB (pagemap)",
    )
    _pagemap_shares(pids, min_shared, "daemon")
    check("with the daemon running")
    stats = d.fresh_stats()
    print(f"daemon: pauses p50/p99/max {stats['pause_p50_ms']}/{stats['pause_p99_ms']}/"
          f"{stats['pause_max_ms']} ms, observer {stats['observer']}")  # fmt: skip
    assert d.stop() == 0, d.stderr()
    for pid in pids:
        assert_not_held(pid)
    check("after the daemon stopped")
    unmerge_checked(pids, check, "the daemon's merges")


# --------------------------------------------------------------------------------------
# Redis
# --------------------------------------------------------------------------------------


class Redis:
    def __init__(self, exe: str, directory: Path, name: str) -> None:
        self.sock = str(directory / f"{name}.sock")
        self.proc = subprocess.Popen(
            [exe, "--port", "0", "--unixsocket", self.sock, "--save", "", "--appendonly",
             "no", "--dir", str(directory), "--enable-debug-command", "yes"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        self.pid = self.proc.pid
        deadline = time.monotonic() + 10
        while not Path(self.sock).exists():
            assert self.proc.poll() is None, "redis-server exited"
            assert time.monotonic() < deadline, "redis-server did not start"
            time.sleep(0.02)

    def cli(self, *args: object, stdin: str | None = None) -> str:
        out = subprocess.run(
            ["redis-cli", "-s", self.sock, *(str(a) for a in args)],
            input=stdin, capture_output=True, text=True, timeout=60, check=True,
        )  # fmt: skip
        return out.stdout.strip()

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


class RedisChecks:
    """The programs' own verdict on a set of servers: each is given the same small write,
    delete and MEMORY PURGE (through jemalloc, and the guard for its DONTNEEDs), then all
    must be alive and hold the same dataset (DEBUG DIGEST)."""

    def __init__(self, servers: list[Redis]) -> None:
        self.servers = servers
        self.step = 0

    def __call__(self, when: str) -> None:
        self.step += 1
        assert all(r.alive() for r in self.servers), when
        for r in self.servers:
            r.cli("SET", f"step:{self.step}", "x" * (self.step * 100))
            r.cli("DEL", f"step:{self.step - 1}")
            r.cli("MEMORY", "PURGE")
        digests = {r.cli("DEBUG", "DIGEST") for r in self.servers}
        assert len(digests) == 1, (when, digests)


def _workload(r: Redis, keys: int) -> None:
    """The same deterministic changes to db 0 in every instance, and random load on
    db 1 (redis-benchmark), flushed afterwards: jemalloc frees and purges a lot."""
    cmds = []
    # a contiguous third of the dataset: whole pages of it become free, and jemalloc
    # purges them (MADV_DONTNEED) -- over merged pages
    for i in range(0, keys // 3):
        cmds.append(f"DEL key:{i}")
    for i in range(keys // 3, keys, 3):
        cmds.append(f"DEL key:{i}")
    for i in range(1, keys, 5):
        cmds.append(f"SET key:{i} {'n' * (100 + i % 900)}")
    for i in range(2, keys, 7):
        cmds.append(f"PEXPIRE key:{i} 300")
    r.cli("--pipe", stdin="\n".join(cmds) + "\n")
    subprocess.run(
        ["redis-benchmark", "-s", r.sock, "--dbnum", "1", "-n", "20000", "-r", "5000",
         "-d", "700", "-t", "set,lpush,lpop,get", "-q"],
        capture_output=True, timeout=120, check=True,
    )  # fmt: skip
    r.cli("MEMORY", "PURGE")
    time.sleep(0.6)  # the expiries fall due (active expiry deletes them)
    r.cli("-n", "1", "FLUSHDB")
    r.cli("MEMORY", "PURGE")


def test_redis_instances_merged_keep_their_data_under_load(tmp_path, daemons) -> None:  # type: ignore[no-untyped-def]
    require_privileges()
    exe = shutil.which("redis-server")
    if exe is None or shutil.which("redis-benchmark") is None:
        skip_or_fail("redis-server/redis-benchmark not installed (make setup installs them)")
        return
    keys = 60_000
    servers = [Redis(exe, tmp_path, name) for name in ("a", "b", "c", "reference")]
    try:
        for r in servers:
            assert r.cli("DEBUG", "POPULATE", keys, "key", 600) == "OK"
        merged, reference = servers[:3], servers[3]
        pids = [r.pid for r in merged]
        check = RedisChecks(servers)
        # half of the values: 2 x 60,000 x 600 bytes are duplicated across the three
        min_shared = keys * 600
        attach_then_unmerge(pids, tmp_path, min_shared, check, daemons)
        ideal = _ideal(pids)
        doc = merge_checked(pids, min_shared, check)
        _report("redis x3", doc, ideal)
        assert doc["totals"]["pages_merged"] > 0
        assert doc["totals"]["saved_bytes"] >= 0.5 * ideal
        assert not doc["refused"] or all("jemalloc" not in r["reason"] for r in doc["refused"])
        guard_before = json.loads(run_procksm("guard", "--list", "--json").stdout)
        for r in servers:
            _workload(r, keys)
        time.sleep(0.5)
        for r in servers:
            _workload(r, keys // 2)
        digests = {r.sock: r.cli("DEBUG", "DIGEST") for r in servers}
        assert all(r.alive() for r in servers)
        assert len(set(digests.values())) == 1, digests
        assert int(reference.cli("DBSIZE")) > 0
        guard_after = json.loads(run_procksm("guard", "--list", "--json").stdout)
        # jemalloc's purges went through the guard, and some touched merged pages
        assert guard_after["notifications"] > guard_before["notifications"]
        print(
            f"guard: {guard_after['notifications'] - guard_before['notifications']} calls, "
            f"{guard_after['pages_unmerged'] - guard_before['pages_unmerged']} pages "
            "unmerged first"
        )
        assert guard_after["pages_unmerged"] > guard_before["pages_unmerged"]
        unmerge_checked(pids, check, "the merge")
    finally:
        for r in servers:
            r.stop()


# the daemon's own anonymous memory (issue 15): a fixed part and a part per page it tracks
DAEMON_FIXED_BYTES = 32 << 20
DAEMON_BYTES_PER_PAGE = 32


def anon_private_dirty(pid: int) -> int:
    """Bytes of Private_Dirty in the anonymous mappings of ``pid`` (unnamed, [heap],
    [stack], [anon:...]): what the process itself costs the machine."""
    total, anon = 0, False
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        head = line.split(None, 5)
        if head and "-" in head[0] and not head[0].endswith(":"):
            path = head[5] if len(head) > 5 else ""
            anon = path == "" or path.startswith(("[heap]", "[stack", "[anon:"))
        elif anon and line.startswith("Private_Dirty:"):
            total += int(line.split()[1]) * 1024
    return total


def rss_anon_kib(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(next(ln for ln in status.splitlines() if ln.startswith("RssAnon:")).split()[1])


def test_the_daemons_memory_stays_in_its_budget_on_scattered_redis(tmp_path, daemons) -> None:  # type: ignore[no-untyped-def]
    """Issue 15: ``procksm attach`` on four redis-servers with the same 400,000 keys
    (DEBUG POPULATE): their duplicates are scattered (~21,000 merged runs and ~9,000
    VMAs each once merged); the daemon's Private_Dirty in anonymous memory, sampled
    every second from the moment pagemap shows most of the saving through two more full
    scans, stays at most 32 MiB + 32 bytes per page it tracks (the targets' anonymous
    pages). Before: ~50-70 MiB (a Part object per heap fragment and a Vma object per
    VMA each full scan, smaps held as text and lines; the goal is ~36.8 MiB here)."""
    require_privileges()
    exe = shutil.which("redis-server")
    if exe is None:
        skip_or_fail("redis-server not installed (make setup installs it)")
        return
    servers = [Redis(exe, tmp_path, f"r{i}") for i in range(4)]
    try:
        for r in servers:
            assert r.cli("DEBUG", "POPULATE", 400_000, "key", 256) == "OK"
        pids = [r.pid for r in servers]
        tracked = sum(rss_anon_kib(p) for p in pids) // (PAGE // 1024)
        budget = DAEMON_FIXED_BYTES + DAEMON_BYTES_PER_PAGE * tracked
        d = daemons(tmp_path / "mem.sock", pids, "--cpu-limit", 0, "-q")
        # ~85,000 pages are shared once converged (measured); most of it first
        wait_for(lambda: Truth(pids).pages_sharing >= 60_000, 300, "the daemon to merge")
        samples: list[int] = []
        scans = d.stats()["full_scans"]
        deadline = time.monotonic() + 300
        while d.stats()["full_scans"] < scans + 2:
            assert time.monotonic() < deadline, "two full scans took over 300 s"
            samples.append(anon_private_dirty(d.proc.pid))
            time.sleep(1)
        samples.append(anon_private_dirty(d.proc.pid))
        sharing = Truth(pids).pages_sharing
        print(
            f"daemon: {tracked} pages tracked, {sharing} shared; anonymous Private_Dirty "
            f"{min(samples) / 2**20:.1f}-{max(samples) / 2**20:.1f} MiB over {len(samples)} "
            f"samples, budget {budget / 2**20:.1f} MiB"
        )
        assert max(samples) <= budget, (max(samples), budget)
    finally:
        for r in servers:
            r.stop()


# --------------------------------------------------------------------------------------
# Python workers
# --------------------------------------------------------------------------------------

WORKER = (
    NUMPY_WORKER_DATA
    + r"""print("READY", flush=True)
for line in sys.stdin:
    step = int(line)
    # compute on everything, write some of it: COW after the merge
    table[step % 2048, :] += 1.0
    ints[step::97] += step
    objects[f"k{step}"] = ("changed", step, 0.0)
    del objects[f"k{step + 1}"]
    zeros[step * 4096] = 1
    h = hashlib.sha256()
    h.update(table.tobytes()); h.update(ints.tobytes()); h.update(zeros.tobytes())
    h.update(repr(sorted(objects.items())[::1000]).encode())
    print(h.hexdigest(), float(table.sum()), flush=True)
"""
)


def _start_workers(tmp_path: Path, n: int) -> list[subprocess.Popen[str]]:
    """``n`` numpy workers (WORKER) with numpy's defaults: arrays of 4 MiB or more are
    madvise(MADV_HUGEPAGE)d (THP-backed here, THP is "madvise"); each prints READY once
    its data is built."""
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = {"PATH": "/usr/bin:/bin", "OPENBLAS_NUM_THREADS": "1"}
    return [
        subprocess.Popen(
            [sys.executable, str(script)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
            cwd=ROOT,
        )
        for _ in range(n)
    ]


class NumpyChecks:
    """The programs' own verdict on a set of WORKERs: each computes the next step on
    everything it holds (writing some of it), and all must give the same answer."""

    def __init__(self, workers: list[subprocess.Popen[str]]) -> None:
        self.workers = workers
        self.step = 0

    def __call__(self, when: str) -> None:
        self.step += 1
        answers = []
        for w in self.workers:
            assert w.poll() is None, when
            assert w.stdin is not None and w.stdout is not None
            w.stdin.write(f"{self.step}\n")
            w.stdin.flush()
            answers.append(w.stdout.readline().strip())
        assert len(set(answers)) == 1, (when, answers)


def test_python_workers_merged_compute_what_unmerged_ones_do(tmp_path, daemons) -> None:  # type: ignore[no-untyped-def]
    require_privileges()
    workers = _start_workers(tmp_path, 4)
    try:
        for w in workers:
            assert w.stdout is not None and w.stdout.readline().strip() == "READY"
        merged = workers[:3]  # workers[3] stays unmerged: the reference
        pids = [w.pid for w in merged]
        check = NumpyChecks(workers)
        # the arrays alone are ~2 x 62 MiB of duplicates across three workers
        attach_then_unmerge(pids, tmp_path, 100 << 20, check, daemons)
        ideal = _ideal(pids)
        doc = merge_checked(pids, 100 << 20, check)
        _report("python x3", doc, ideal)
        assert doc["totals"]["saved_bytes"] >= 0.8 * ideal
        for step in range(10):
            check(f"step {step} after merge")
        unmerge_checked(pids, check, "the merge")
    finally:
        for w in workers:
            w.kill()
            w.wait()


# --------------------------------------------------------------------------------------
# JVMs and node processes (issue 15)
# --------------------------------------------------------------------------------------

WORKERS = 3
DATA_MIB = 32
# the part of a worker's data that its runtime never moves: the JVM's blob and longs
# (humongous arrays, 3/4 of it), node's Buffers (outside the V8 heap, 1/2 of it)
STILL_DATA_MIB = {"jvm": DATA_MIB * 3 // 4, "node": DATA_MIB // 2}


class SelfChecks:
    """The verdicts of workers that check their own data every second
    (tests/runtime_workers.py): each call waits for every worker's next completed check
    (so that one ran since the previous call) and asserts that none ever failed."""

    def __init__(self, workers: list[Target]) -> None:
        self.workers = workers
        self.seen = {w.pid: 0 for w in workers}

    def _next_check(self, w: Target, when: str) -> int:
        assert w.alive(), f"worker {w.pid} died ({when})"
        checks, mismatches = parse_status(w.command("status"))
        assert mismatches == 0, f"worker {w.pid} found its data changed {mismatches} times ({when})"
        return checks if checks > self.seen[w.pid] else 0

    def __call__(self, when: str) -> None:
        for w in self.workers:
            what = f"a check of worker {w.pid} ({when})"
            self.seen[w.pid] = wait_for(partial(self._next_check, w, when), 30, what)


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_runtime_workers_keep_their_data_through_merge_daemon_unmerge(  # type: ignore[no-untyped-def]
    runtime, tmp_path, spawn, daemons
) -> None:
    require_privileges()
    if runtime_exe(runtime) is None:
        skip_or_fail(f"{runtime}: not installed (make setup installs it)")
        return
    argv = worker_argv(runtime, 15, DATA_MIB)

    # started together (a JVM compiles Worker.java first: seconds each); a crash log
    # (hs_err_pid*.log) would land in tmp_path
    def start(_: int) -> Target:
        return spawn(argv, cwd=tmp_path)  # type: ignore[no-any-return]

    with ThreadPoolExecutor(WORKERS) as pool:
        workers = list(pool.map(start, range(WORKERS)))
    check = SelfChecks(workers)
    check("at start")
    pids = [w.pid for w in workers]
    min_shared = int(0.75 * (WORKERS - 1) * STILL_DATA_MIB[runtime]) << 20
    attach_then_unmerge(pids, tmp_path, min_shared, check, daemons)
    ideal = _ideal(pids)
    doc = merge_checked(pids, min_shared, check)
    _report(f"{runtime} x{WORKERS}", doc, ideal)
    unmerge_checked(pids, check, "the merge")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-s", "-q"]))


# --------------------------------------------------------------------------------------
# Real programs survive SIGKILLs of procksm's whole process group (issue 13)
# --------------------------------------------------------------------------------------

KILL_ROUNDS = 9  # 3 each of merge, unmerge, the daemon


def _kill_rounds(pids: list[int], tmp_path: Path, check: Any, seed: int) -> None:
    """Kill procksm's process group at a random moment of a merge, an unmerge or the
    daemon; after each kill `check()` (the programs' own answer) and a clean unmerge."""
    from tests.test_kill_steps import (
        AFTER_KILL_S,
        kill_procksm,
        start_procksm,
        unmerge_when_free,
    )

    rng = random.Random(seed)
    for r in range(KILL_ROUNDS):
        kind = ("merge", "unmerge", "daemon")[r % 3]
        if kind == "merge":
            pid = start_procksm(["merge", *pids])
            time.sleep(rng.uniform(0.1, 1.0))
        elif kind == "unmerge":
            merged = run_procksm("merge", *pids, timeout=300)
            assert merged.returncode == 0, merged.stderr
            pid = start_procksm(["unmerge", *pids])
            time.sleep(rng.uniform(0.05, 0.6))
        else:
            pid = start_procksm(["attach", "--no-bpf", "--control", tmp_path / f"k{r}.sock", *pids])
            time.sleep(rng.uniform(0.3, 2.0))
        kill_procksm(pid)
        time.sleep(AFTER_KILL_S)
        check(f"round {r} ({kind}) after the kill")
        for pid in pids:
            unmerge_when_free(pid)
        check(f"round {r} ({kind}) after unmerge")


def test_redis_and_python_workers_survive_group_kills(tmp_path) -> None:  # type: ignore[no-untyped-def]
    require_privileges()
    exe = shutil.which("redis-server")
    if exe is None:
        skip_or_fail("redis-server not installed (make setup installs it)")
        return
    servers = [Redis(exe, tmp_path, name) for name in ("a", "b", "reference")]
    workers = _start_workers(tmp_path, 3)
    try:
        for r in servers:
            assert r.cli("DEBUG", "POPULATE", 30_000, "key", 600) == "OK"
        for w in workers:
            assert w.stdout is not None and w.stdout.readline().strip() == "READY"
        redis_check, numpy_check = RedisChecks(servers), NumpyChecks(workers)

        def check(when: str) -> None:
            redis_check(when)
            numpy_check(when)

        pids = [r.pid for r in servers[:2]] + [w.pid for w in workers[:2]]
        _kill_rounds(pids, tmp_path, check, seed=13)
    finally:
        for r in servers:
            r.stop()
        for w in workers:
            w.kill()
            w.wait()
