"""The reliability suite (issue 8): kill the tool, integrity fuzz, misbehaving targets,
bad input. Each test prints its totals so they can be quoted.

Longer variants: ``pytest tests/test_reliability.py --long`` (or PROCKSM_LONG=1)
multiplies the rounds by 10.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from procksm.merge import MergeEngine, MergeOptions
from procksm.unmerge import merged_ranges, unmerge
from tests.conftest import (
    ROOT,
    Target,
    build_c_target,
    require_privileges,
    run_procksm,
    spawn_planted,
    thread_states,
)

PROCKSM = [sys.executable, "-m", "procksm"]
LONG = 10 if os.environ.get("PROCKSM_LONG") == "1" else 1


def assert_intact(t: Target) -> int:
    """Alive, nothing stopped or traced, self-check and blockers clean; pages verified."""
    assert t.alive(), f"target {t.pid} died"
    states = thread_states(t.pid)
    assert all(s not in ("t", "T") and tr == "0" for s, tr in states.values()), states
    answer = t.command("check")
    assert answer.startswith("OK"), (t.pid, answer)
    assert t.command("errors") == "ERRORS 0"
    return int(answer.split("pages=")[1])


def seccomp_filters(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Seccomp_filters:"):
            return int(line.split()[1])
    return 0


# --------------------------------------------------------------------------------------
# kill the tool: the daemon (merge and unmerge: tests/test_kill_group.py, every step of
# every kind of window: tests/test_kill_steps.py)
# --------------------------------------------------------------------------------------


def test_sigkill_of_the_daemon_leaves_targets_intact(spawn, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """`procksm attach`'s whole process group SIGKILLed at random moments of its scan
    loop: targets run on, merged or not, and a new daemon attaches to the same processes
    at once (the dead one's locks went with it) and keeps them merged."""
    require_privileges()
    from tests.daemon_helpers import DaemonProc, wait_for

    rng = random.Random(int(os.environ.get("PROCKSM_KILL_SEED", "2025")))
    rounds = 10 * LONG
    merged_when_killed = 0
    verified = 0
    for k in range(rounds):
        targets = spawn_planted(spawn, 2, 8192, 1024, 128, 6, "--blockers")
        d = DaemonProc(tmp_path / f"d{k}.sock", [t.pid for t in targets], "--no-bpf")
        time.sleep(rng.uniform(0.0, 1.5))
        merged_when_killed += bool(merged_ranges(targets[0].pid))
        d.stop(signal.SIGKILL)
        for t in targets:
            verified += assert_intact(t)
        # the daemon's lock went with it: a new one attaches at once and converges
        d2 = DaemonProc(tmp_path / f"e{k}.sock", [t.pid for t in targets], "--no-bpf")
        wait_for(lambda d2=d2: d2.stats()["pages_sharing"] >= 8192, 60, "merged by a new daemon")
        assert d2.stop() == 0
        for t in targets:
            verified += assert_intact(t)
            t.kill()
    print(f"\ndaemon kill: {rounds} rounds survived ({merged_when_killed} with pages merged "
          f"when killed), {verified:,} page verifications")  # fmt: skip
    assert merged_when_killed >= 1


# --------------------------------------------------------------------------------------
# integrity fuzz
# --------------------------------------------------------------------------------------

REGIONS = ("identical", "zero", "unique", "intra")


def _random_command(rng: random.Random, t: Target, sizes: dict[str, int]) -> str | None:
    r = rng.choice(REGIONS)
    n = sizes[r]
    i = rng.randrange(n)
    k = rng.randint(1, min(8, n - i))
    choice = rng.randrange(12)
    if choice <= 3:
        return f"write {r} {i}"
    if choice == 4:
        return f"dontneed {r} {i} {k}"
    if choice == 5:
        return f"madvise {r} {i} {k} {rng.choice(['cold', 'pageout', 'free'])}"
    if choice == 6:
        return "fork"
    if choice == 7:
        return f"brk {rng.randint(1, 64)}"
    if choice == 8:
        return f"mmap {rng.randint(1, 64)}"
    if choice == 9:
        return f"forkdontneed {r} {i} {k}"
    if choice == 10:
        return f"threaddontneed {r} {i} {k}"
    return f"mremap {r} move"


def test_integrity_fuzz_across_merge_unmerge_cycles(spawn) -> None:  # type: ignore[no-untyped-def]
    """Random writes, DONTNEED (from the process, a new thread, a child), MADV_FREE,
    fork, brk, mmap, mremap between merges and unmerges of three targets with a thread
    rewriting pages all the time: every self-check clean (the targets keep the expected
    content of every page: the shadow checksums), reported as page-verifications done."""
    require_privileges()
    seed = int(os.environ.get("PROCKSM_FUZZ_SEED", "4242"))
    rng = random.Random(seed)
    targets = spawn_planted(
        spawn, 3, 1024, 256, 64, 9, "--intra", 64, "--volatile", 16, "--blockers"
    )
    sizes = {r: targets[0].int(f"{r}_pages") for r in REGIONS}
    cycles, ops, verified, merged = 8 * LONG, 0, 0, 0
    for cycle in range(cycles):
        with MergeEngine([t.pid for t in targets], MergeOptions()) as eng:
            res = eng.run()
        assert all(tr.error is None for tr in res.targets), res.as_json()
        merged += res.pages_merged
        for t in targets:
            verified += assert_intact(t)
        for _ in range(30):
            t = rng.choice(targets)
            cmd = _random_command(rng, t, sizes)
            if cmd is None:
                continue
            answer = t.command(cmd)
            ops += 1
            assert answer.startswith(("OK", "CHILD exit=0")), (seed, cycle, cmd, answer)
        for t in targets:
            verified += assert_intact(t)
        if cycle % 2:
            for t in targets:
                unmerge(t.pid)
                assert merged_ranges(t.pid) == []
                verified += assert_intact(t)
    print(f"\nfuzz (seed {seed}): {cycles} merge cycles, {merged:,} pages merged, {ops} random "
          f"operations, {verified:,} page verifications, 0 corrupted")  # fmt: skip


# --------------------------------------------------------------------------------------
# misbehaving targets
# --------------------------------------------------------------------------------------

PY_TARGET = textwrap.dedent(
    r"""
    import mmap, os, signal, sys, threading, time
    mode = sys.argv[1]
    PRIV = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS
    data = mmap.mmap(-1, 32 << 20, flags=PRIV)
    for i in range(0, 32 << 20, 4096):
        data[i:i + 8] = (i // 4096).to_bytes(8, "little")
    if mode == "blocksignals":
        signal.pthread_sigmask(signal.SIG_BLOCK, set(signal.Signals) - {signal.SIGKILL,
                                                                       signal.SIGSTOP})
    if mode == "threads":
        stop = False
        def spawner():
            while not stop:
                t = threading.Thread(target=lambda: time.sleep(0.001))
                t.start(); t.join()
        threading.Thread(target=spawner, daemon=True).start()
    if mode in ("exec", "exit"):  # on SIGUSR1, which the test sends mid-merge
        def go(*_):
            if mode == "exec":
                os.execv("/bin/sleep", ["sleep", "100"])
            os._exit(0)
        signal.signal(signal.SIGUSR1, go)
    print("READY pid=%d" % os.getpid(), flush=True)
    for line in sys.stdin:
        ok = all(data[i:i + 8] == (i // 4096).to_bytes(8, "little")
                 for i in range(0, 32 << 20, 4096))
        print("OK" if ok else "CORRUPT", flush=True)
    """
)


def _py_target(spawn, mode: str, *extra: object) -> Target:  # type: ignore[no-untyped-def]
    return spawn([sys.executable, "-c", PY_TARGET, mode, *extra])


@pytest.mark.parametrize("mode", ["blocksignals", "threads"])
def test_targets_that_block_signals_or_spawn_threads_in_a_loop_merge(spawn, mode: str) -> None:  # type: ignore[no-untyped-def]
    require_privileges()
    pair = [_py_target(spawn, mode) for _ in range(2)]
    res = run_procksm("merge", "--json", *(t.pid for t in pair), timeout=120)
    assert res.returncode == 0, res.stderr
    doc = json.loads(res.stdout)
    assert doc["totals"]["pages_merged"] >= 2 * 8000, doc["totals"]
    for t in pair:
        assert t.command("check") == "OK"
        assert all(s not in ("t", "T") for s, _ in thread_states(t.pid).values())
    print(f"\n{mode}: merged {doc['totals']['pages_merged']} pages, "
          f"pauses p99 {doc['pauses']['p99_ms']} ms")  # fmt: skip


@pytest.mark.parametrize("mode", ["exec", "exit"])
def test_a_target_that_execs_or_exits_during_the_merge(spawn, mode: str) -> None:  # type: ignore[no-untyped-def]
    """procksm survives, reports the target, merges the others; nothing is left behind
    in the exec'd program (it maps nothing of procksm's). The target execs or exits on
    a signal sent once procksm merges the first target (not after a guessed delay), so
    the outcome, exit code included, is one."""
    require_privileges()
    stable = _py_target(spawn, "plain")
    flaky = _py_target(spawn, mode)
    other = _py_target(spawn, "plain")
    pids = [str(t.pid) for t in (stable, flaky, other)]
    proc = subprocess.Popen(
        [sys.executable, "-m", "procksm", "merge", "--json", *pids],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
    )  # fmt: skip
    # mid-merge, deterministically: all checks passed, the first target is being merged
    while proc.poll() is None and not merged_ranges(stable.pid):
        time.sleep(0.002)
    os.kill(flaky.pid, signal.SIGUSR1)
    out, err = proc.communicate(timeout=120)
    assert "Traceback" not in err, err
    doc = json.loads(out)
    by_pid = {p["pid"]: p for p in doc["processes"]}
    assert by_pid[stable.pid]["pages_merged"] >= 8000 and by_pid[other.pid]["pages_merged"] >= 8000
    gone = by_pid[flaky.pid]
    assert gone["pages_merged"] == 0, gone
    if mode == "exec":  # the new program's memory equals nothing: every page changed
        assert proc.returncode == 0, err
        assert gone["pages_volatile"] > 0 and "error" not in gone, gone
    else:  # exit: one target failed (exit code 1), said in the JSON
        assert proc.returncode == 1, err
        assert "exited" in gone["error"], gone
    for t in (stable, other):
        assert t.command("check") == "OK"
    if mode == "exec":
        # the new program runs on, untouched by the windows around its execve
        assert flaky.alive()
        assert Path(f"/proc/{flaky.pid}/comm").read_text().strip() == "sleep"
        assert all(s not in ("t", "T") and tr == "0" for s, tr in thread_states(flaky.pid).values())


def test_a_stopped_target_is_merged_and_stays_stopped(spawn) -> None:  # type: ignore[no-untyped-def]
    require_privileges()
    exe = build_c_target("planted")
    pair = [spawn([exe, "--identical", 2048, "--seed", 2]) for _ in range(2)]
    os.kill(pair[0].pid, signal.SIGSTOP)
    deadline = time.monotonic() + 5
    while thread_states(pair[0].pid)[pair[0].pid][0] != "T":
        assert time.monotonic() < deadline
        time.sleep(0.01)
    res = run_procksm("merge", "--json", *(t.pid for t in pair), timeout=120)
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["totals"]["pages_merged"] >= 2 * 2048
    assert all(s == "T" for s, _ in thread_states(pair[0].pid).values())  # still stopped
    os.kill(pair[0].pid, signal.SIGCONT)
    for t in pair:
        assert t.command("check").startswith("OK")


def test_an_already_traced_target_is_refused_and_left_alone(spawn) -> None:  # type: ignore[no-untyped-def]
    require_privileges()
    exe = build_c_target("planted")
    pair = [spawn([exe, "--identical", 512, "--seed", 2]) for _ in range(2)]
    tracer = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(f"""
            import ctypes, sys, time
            libc = ctypes.CDLL(None, use_errno=True)
            assert libc.ptrace(0x4206, {pair[0].pid}, 0, 0) == 0  # PTRACE_SEIZE
            print("SEIZED", flush=True)
            sys.stdin.readline()
        """)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert tracer.stdout is not None and tracer.stdout.readline().strip() == "SEIZED"
        res = run_procksm("merge", *(t.pid for t in pair))
        assert res.returncode == 5, (res.returncode, res.stderr)
        assert f"traced by pid {tracer.pid}" in res.stderr or str(tracer.pid) in res.stderr
        assert len(res.stderr.strip().splitlines()) == 1
        for t in pair:
            assert merged_ranges(t.pid) == [] and seccomp_filters(t.pid) == 0
    finally:
        tracer.kill()
        tracer.wait()
    for t in pair:
        assert t.command("check").startswith("OK")


# --------------------------------------------------------------------------------------
# bad input: every CLI input class -> one line, non-zero exit, nothing changed
# --------------------------------------------------------------------------------------

BAD_INPUTS: list[tuple[list[str], int, str]] = [
    # (arguments with {pid} = a live target, expected exit code, words in the message)
    (["scan"], 2, "the following arguments are required"),
    (["merge"], 2, "the following arguments are required"),
    (["unmerge"], 2, "no PID given"),
    (["frobnicate"], 2, "invalid choice"),
    (["merge", "abc"], 2, "bad PID"),
    (["merge", "-7"], 2, ""),
    (["merge", "0"], 2, "PID"),
    (["merge", "1" + "0" * 30], 2, "at most"),
    (["merge", "4194305"], 2, "at most"),
    (["merge", "4194303"], 3, "no such process"),
    (["merge", "{pid}", "--batch-pages", "0"], 2, "--batch-pages"),
    (["merge", "{pid}", "--batch-pages", "x"], 2, "invalid int"),
    (["merge", "{pid}", "--pause-budget-ms", "0"], 2, "--pause-budget-ms"),
    (["merge", "{pid}", "--pause-budget-ms", "nan"], 2, "--pause-budget-ms"),
    (["attach", "{pid}", "--pause-budget-ms", "-1"], 2, "--pause-budget-ms"),
    (["merge", "{pid}", "--range", "zz"], 2, "bad address range"),
    (["merge", "{pid}", "--range", "0x2000-0x1000"], 2, "end must be above start"),
    (["merge", "{pid}", "--no-such-flag"], 2, "unrecognized arguments"),
    (["merge", "2"], 6, "kernel thread"),
    (["unmerge", "abc"], 2, "bad PID"),
    (["unmerge", "4194303"], 3, "no such process"),
    (["scan", "{pid}", "--top", "x"], 2, "invalid int"),
    (["scan", "{pid}", "--range", "1-2-3"], 2, "bad address range"),
    (["guard", "--idle-exit", "-1"], 2, "--idle-exit"),
    (["guard", "--idle-exit", "soon"], 2, "invalid float"),
    (["merge", "{pid}", "x" * 100_000], 2, "bad PID"),
]


def test_bad_cli_input_is_one_line_and_changes_nothing(spawn) -> None:  # type: ignore[no-untyped-def]
    require_privileges()
    exe = build_c_target("planted")
    t = spawn([exe, "--identical", 64, "--seed", 2])
    tried = 0
    for args, code, words in BAD_INPUTS:
        argv = [a.replace("{pid}", str(t.pid)) for a in args]
        res = run_procksm(*argv, timeout=60)
        tried += 1
        assert res.returncode == code, (argv[:4], res.returncode, res.stderr)
        lines = res.stderr.strip().splitlines()
        assert len(lines) == 1 and "Traceback" not in res.stderr, (argv[:4], res.stderr)
        assert words.lower() in lines[0].lower(), (argv[:4], lines[0])
        assert len(lines[0]) < 400, argv[:4]
        assert res.stdout == ""
        assert merged_ranges(t.pid) == [] and seccomp_filters(t.pid) == 0, argv[:4]
    assert t.command("check").startswith("OK")
    print(f"\nbad input: {tried} CLI inputs tried, all one-line errors, nothing changed")


def test_a_procksm_of_another_user_cannot_touch_roots_targets(spawn) -> None:  # type: ignore[no-untyped-def]
    require_privileges()
    exe = build_c_target("planted")
    t = spawn([exe, "--identical", 64, "--seed", 2])
    for cmd in ("scan", "merge", "unmerge"):
        res = subprocess.run(
            ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
             *PROCKSM, cmd, str(t.pid)],
            capture_output=True, text=True, cwd=ROOT, timeout=60,
            env={**os.environ, "HOME": "/tmp", "PROCKSM_LOCK_DIR": "/tmp/procksm-nobody"},
        )  # fmt: skip
        assert res.returncode == 4, (cmd, res.returncode, res.stderr)
        assert len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert merged_ranges(t.pid) == [] and seccomp_filters(t.pid) == 0
    assert t.command("check").startswith("OK")


# --------------------------------------------------------------------------------------
# load: many targets under the daemon for a long time (the full run is behind --long)
# --------------------------------------------------------------------------------------


def _rss_kb(pid: int) -> int:
    pids = [pid]
    total = 0
    for p in pids:
        for line in Path(f"/proc/{p}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                total += int(line.split()[1])
    return total


def _fds(pid: int) -> tuple[int, int, int]:
    """(open fds but those of the daemon's kept sessions, of which BPF maps and
    programs, the kept sessions' fds) of a process. A session kept for a target's life
    holds 4: a pidfd, the target's /proc/PID/task/TID/mem, its window lock, and the
    schedstat of its last injecting thread (the CPU time its calls take there)."""
    n = bpf = sessions = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            link = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if link == "anon_inode:[pidfd]" or link.endswith(("/mem", ".window", "/schedstat")):
            sessions += 1
            continue
        n += 1
        bpf += link.startswith(("anon_inode:bpf", "bpf"))
    return n, bpf, sessions


@pytest.mark.slow
def test_load_many_targets_under_the_daemon(spawn, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """CI: 16 targets / 1 GiB for 60 s; --long: 64 targets / 8 GiB for 10 minutes.
    After warm-up procksm's RSS, fds and BPF objects do not grow; at the end the
    counters equal pagemap's truth and every target's self-check is clean."""
    require_privileges()
    from tests.daemon_helpers import DaemonProc, Truth

    exe = build_c_target("planted")
    n, mib, duration = (64, 128, 600.0) if LONG > 1 else (16, 64, 60.0)
    ident = mib * 256 * 3 // 4
    targets = [
        spawn([exe, "--identical", ident, "--zero", ident // 6, "--unique", ident // 6,
               "--volatile", 16, "--seed", 11])
        for _ in range(n)
    ]  # fmt: skip
    d = DaemonProc(tmp_path / "load.sock", [t.pid for t in targets])
    try:
        samples: list[tuple[float, int, int, int, int]] = []
        t0 = time.monotonic()
        while time.monotonic() - t0 < duration:
            nfd, nbpf, nsess = _fds(d.proc.pid)
            samples.append((time.monotonic() - t0, _rss_kb(d.proc.pid), nfd, nbpf, nsess))
            time.sleep(duration / 30)
        s = d.pause()
        assert s["pages_sharing"] >= (n - 1) * ident * 0.95, s["pages_sharing"]
        truth = Truth([t.pid for t in targets])
        assert s["pages_sharing"] == truth.pages_sharing
        assert s["pages_shared"] == truth.pages_shared
        warm = [x for x in samples if x[0] >= duration / 3]
        rss = [x[1] for x in warm]
        fds = {x[2] for x in warm}
        bpf = {x[3] for x in warm}
        # RSS: at most 5 % + 8 MiB above its value at the end of warm-up
        assert max(rss) <= rss[0] * 1.05 + 8192, rss
        assert max(fds) - min(fds) <= 2, fds
        assert len(bpf) == 1, bpf
        # the kept sessions: one per target at most, whenever each was started
        assert max(x[4] for x in samples) <= 4 * n, [x[4] for x in samples]
        print(f"\nload: {n} targets x {mib} MiB for {duration:.0f} s: pages_sharing "
              f"{s['pages_sharing']:,} = pagemap, {s['full_scans']} full scans, RSS "
              f"{rss[0] / 1024:.0f}->{max(rss) / 1024:.0f} MiB, fds {sorted(fds)}, "
              f"BPF fds {sorted(bpf)}")  # fmt: skip
    finally:
        assert d.stop() == 0
    for t in targets:
        assert t.command("check").startswith("OK")
