"""SIGKILL of procksm right after every step of every kind of stop window (issue 13).

A hidden switch (``PROCKSM_TEST_KILL_AT_STEP=N``, procksm.attach.kill_steps) makes the process that
injects SIGKILL itself right after the N-th step that changes a target: a register,
signal-mask or memory write, a resume, a detach. A first run with
``PROCKSM_TEST_STEP_LOG`` lists the steps; the test then kills at every step of one
window of each kind:

* the first window of a target (scratch area, madvise guard's filter, its listener),
* a merge window whose memfd hand-over is pidfd_getfd, and one that uses SCM_RIGHTS
  (a target in another mount namespace),
* a window that only drops zero pages,
* an unmerge window,
* a batch window of the daemon.

After each kill: every target alive, no thread stopped or traced, its memory checks
clean, no blocked call saw EINTR or a restart code, the register/FPU/signal-mask/
altstack canaries unchanged, no store of the writer threads (which store counters into
the merged pages) lost; then a new ``procksm unmerge`` removes what the killed one left
(fds, mappings) and unmerges everything, and the target's fds and mappings are as
before the merge.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from procksm import PAGE_SIZE
from procksm.arch.x86_64 import SYS_madvise
from procksm.attach.call_batch import PARK_NS
from procksm.procfs import parse_smaps
from procksm.unmerge import merged_ranges, unmerge
from tests.conftest import (
    Target,
    assert_target_intact,
    build_c_target,
    require_privileges,
    run_procksm,
)

PROCKSM = [sys.executable, "-m", "procksm"]
# After a kill, before a new procksm cleans up: released threads finish their frames'
# calls, and a thread parked in the call routine waits out its park (procksm.attach.
# call_batch); until then a new procksm leaves the dead one's scratch area in place
# (an unmerge comes back for it: procksm.attach.leftovers).
AFTER_KILL_S = PARK_NS / 1e9 + 0.1
IDENTICAL, ZERO = 48, 16


def _spawn_canaries(
    spawn: Any,
    n: int,
    *extra: object,
    prefix: list[str] | None = None,
    identical: int = IDENTICAL,
) -> list[Target]:
    exe = build_c_target("planted")
    argv = [exe, "--identical", identical, "--zero", ZERO, "--seed", 7, "--canaries", *extra]
    targets = [spawn([*(prefix or []), *argv]) for _ in range(n)]
    time.sleep(0.3)  # the blocker threads make their pipes after READY: fds settle
    return targets


def _fds(pid: int) -> dict[int, str]:
    out = {}
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            out[int(fd)] = os.readlink(f"/proc/{pid}/fd/{fd}")
        except FileNotFoundError:
            continue
    return out


def _procksm_things(pid: int) -> list[str]:
    """Mappings and fds of procksm's in the target (none once unmerged and cleaned)."""
    maps = [
        line for line in Path(f"/proc/{pid}/maps").read_text().splitlines() if "procksm" in line
    ]
    fds = [t for t in _fds(pid).values() if "procksm" in t]
    return maps + fds


def start_procksm(
    args: list[object], *, kill_at: int | str = 0, step_log: str | None = None
) -> int:
    """`procksm ARGS` in a child forked from this process (which has imported procksm
    already: no interpreter start-up per round), in a process group of its own as under
    a supervisor; `kill_at`/`step_log` set the hidden switch. Returns its pid."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 1
        try:
            os.setsid()
            devnull = os.open(os.devnull, os.O_RDWR)
            for fd in (0, 1, 2):
                os.dup2(devnull, fd)
            debug = os.environ.get("PROCKSM_KILL_DEBUG")
            if debug:
                os.dup2(os.open(debug, os.O_WRONLY | os.O_CREAT | os.O_APPEND), 2)
            from procksm import cli
            from procksm.attach import kill_steps

            kill_steps.arm(str(kill_at))
            kill_steps._STEP_LOG = step_log
            code = cli.main([str(a) for a in args])
        finally:
            os._exit(code)
    return pid


def _run(
    args: list[object], timeout: float, *, kill_at: int | str = 0, log: str | None = None
) -> bool:
    """Run procksm until it exits (or is killed by the switch), SIGKILLing its whole group
    after `timeout`; then wait until every process of the group is gone. Whether it was
    SIGKILLed (by the switch or the timeout)."""
    pid = start_procksm(args, kill_at=kill_at, step_log=log)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got, status = os.waitpid(pid, os.WNOHANG)
        if got:
            break
        time.sleep(0.005)
    else:
        os.killpg(pid, signal.SIGKILL)
        _, status = os.waitpid(pid, 0)
    wait_group_gone(pid)  # a procksm killed by the switch may still be exiting
    return os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL


def unmerge_when_free(pid: int, timeout: float = 30) -> None:
    """unmerge(pid) once the killed procksm's lock is gone (its last process may still be
    exiting after the group was seen dead)."""
    from procksm.errors import TargetBusy

    deadline = time.monotonic() + timeout
    while True:
        try:
            unmerge(pid)
            return
        except TargetBusy:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def exited(pid: int) -> bool:
    """The forked procksm has exited (and is reaped)."""
    try:
        return os.waitpid(pid, os.WNOHANG)[0] != 0
    except ChildProcessError:
        return True


def kill_procksm(pid: int) -> None:
    """SIGKILL the forked procksm's whole process group; wait until all of it is gone."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGKILL)
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, 0)
    wait_group_gone(pid)


def kill_group(proc: subprocess.Popen[bytes]) -> None:
    """SIGKILL every process of `proc`'s group, and wait until all are gone (their locks
    with them)."""
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    wait_group_gone(proc.pid)


def _group_members(pgid: int) -> list[str]:
    """Processes of group `pgid` that have not exited: zombies are left out (they hold
    no lock; an orphaned worker's zombie waits for PID 1 to reap it, which took more
    than 10 s on a loaded CI machine)."""
    out = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        if int(fields[2]) == pgid and fields[0] not in ("Z", "X"):
            out.append(f"{pid} {fields[0]}")
    return out


def wait_group_gone(pgid: int) -> None:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return
        if not _group_members(pgid):
            return
        time.sleep(0.01)
    raise AssertionError(
        f"process group {pgid} still alive 10 s after SIGKILL: {_group_members(pgid)}"
    )


def _step_log(args: list[object], tmp: Path, timeout: float = 60) -> list[str]:
    """The kinds of the run's steps, in order ("load:9": a load of syscall 9; an
    "undo:3" frame makes a close on the way back)."""
    log = tmp / "steps.log"
    log.unlink(missing_ok=True)
    _run(args, timeout, log=str(log))
    assert log.exists(), f"procksm {args[0]} changed no target in {timeout:g} s"
    out = []
    for line in log.read_text().splitlines():
        _n, kind, _tid, detail = line.split()
        out.append(f"{kind}:{detail}" if kind in ("load", "undo") else kind)
    return out


def _through_first_batch(kinds: list[str], window: range) -> range:
    """The steps of `window` up to its batch of calls let run (procksm.attach.call_batch):
    its hand-over and replacements. The steps after (the threads' restore) are those of
    the pidfd merge window, swept whole above."""
    run = next(i for i in window if kinds[i - 1] == "batch")
    return range(window.start, run + 1)


def _windows(kinds: list[str]) -> list[range]:
    """Step numbers (1-based) of each stop window, from its "stopped" to its last step."""
    starts = [i + 1 for i, k in enumerate(kinds) if k == "stopped"]
    ends = [*(s - 1 for s in starts[1:]), len(kinds)]
    return [range(s, e + 1) for s, e in zip(starts, ends, strict=True)]


def _unmerge_clean(targets: list[Target], baseline: dict[int, dict[int, str]]) -> None:
    """A new procksm (in this process: the killed one's pid and start time differ)
    removes the leftovers and unmerges; then nothing of procksm's is left."""
    for t in targets:
        unmerge_when_free(t.pid)
    for t in targets:
        assert merged_ranges(t.pid) == []
        assert _procksm_things(t.pid) == []
        assert _fds(t.pid) == baseline[t.pid]
        assert_target_intact(t)


Setup = Callable[[], tuple[list[Target], list[object]]]


def _logged_windows(setup: Setup, tmp: Path, timeout: float = 60) -> tuple[list[str], list[range]]:
    """Step kinds and stop windows of one run of procksm on fresh targets (``setup``)."""
    targets, args = setup()
    kinds = _step_log(args, tmp, timeout)
    _unmerge_clean(targets, {t.pid: _fds(t.pid) for t in targets})
    for t in targets:
        t.kill()
    return kinds, _windows(kinds)


def _sweep(setup: Setup, steps: range, *, timeout: float = 30) -> Iterator[int]:
    """Kill procksm after each step in `steps`, each time on fresh targets from `setup`:
    the run then replays the logged one (targets it merged before are guarded already,
    and their windows differ: the step numbers would land elsewhere); check the
    targets, unmerge them, check again."""
    for n in steps:
        targets, args = setup()
        baseline = {t.pid: _fds(t.pid) for t in targets}
        _run(args, timeout, kill_at=n)
        time.sleep(AFTER_KILL_S)
        for t in targets:
            try:
                assert_target_intact(t)
                _assert_advice_kept(t)
            except AssertionError as e:
                raise AssertionError(f"killed after step {n}: {e}") from None
        try:
            _unmerge_clean(targets, baseline)
        except AssertionError as e:
            raise AssertionError(f"killed after step {n}, then unmerged: {e}") from None
        for t in targets:
            _assert_advice_kept(t)  # and after the unmerge
            t.kill()
        yield n


PLANTED_REGIONS = ("identical", "zero", "unique", "counters")


def _assert_advice_kept(t: Target) -> None:
    """planted gives its regions MADV_NOHUGEPAGE: whatever maps them now (the original
    anonymous VMA, a segment mapping, a piece of each) has `nh` in smaps (the merge
    gives it again under an undo frame, docs/kill-safety.md)."""
    vmas = parse_smaps(Path(f"/proc/{t.pid}/smaps").read_text())
    for region in PLANTED_REGIONS:
        start = int(t.info.get(region, "0"), 16)
        if not start:
            continue
        end = start + t.int(f"{region}_pages") * PAGE_SIZE
        inside = [v for v in vmas if v.start < end and start < v.end]
        assert inside, f"pid {t.pid}: nothing mapped at the {region} region"
        lost = [f"{v.start:#x}-{v.end:#x} {v.path}" for v in inside if "nh" not in v.vmflags]
        assert not lost, f"pid {t.pid}: MADV_NOHUGEPAGE lost on {region}: {lost}"


def _kinds_in(kinds: list[str], window: range) -> set[str]:
    return {kinds[i - 1].split(":")[0] for i in window}


@pytest.fixture
def privileged() -> None:
    require_privileges()


def _merge_of(spawn: Any, n: int = 2, **kw: Any) -> Setup:
    """Fresh canary targets, and `procksm merge` of them."""

    def setup() -> tuple[list[Target], list[object]]:
        targets = _spawn_canaries(spawn, n, **kw)
        return targets, ["merge", *(t.pid for t in targets)]

    return setup


def test_kill_after_every_step_of_first_and_merge_windows(
    privileged: None, spawn: Any, tmp_path: Path
) -> None:
    setup = _merge_of(spawn)
    kinds, windows = _logged_windows(setup, tmp_path)
    # the first target's windows: the scratch area, the guard, the first merge window
    first = windows[0]
    merge = next(w for w in windows if "batch" in _kinds_in(kinds, w))
    assert {"name", "owner"} <= _kinds_in(kinds, first)  # the scratch area is made there
    assert {"gate", "arm", "frames", "table", "routine", "batch"} <= _kinds_in(kinds, merge)
    done = list(_sweep(setup, range(first.start, merge.stop)))
    assert len(done) == merge.stop - first.start
    print(f"\nkilled after each of {len(done)} steps (windows {first}, {merge})")


@pytest.mark.parametrize("delay_ms", [0, 50])
def test_kill_while_the_routine_runs_the_windows_calls(
    privileged: None, spawn: Any, delay_ms: int
) -> None:
    """Killed right after the first window's batch of calls is let run (0 ms: the target
    makes the calls after procksm died; its pidfd_getfd from a dead procksm fails, so
    every mapping is skipped), or once they are done and the thread parked (50 ms: it
    waits for the park's timeout, then goes back by itself). Either way the target is
    intact, the advice kept, and nothing is left open in it even before a new procksm
    cleans up: the closes always run."""
    targets, args = _merge_of(spawn)()
    baseline = {t.pid: _fds(t.pid) for t in targets}
    assert _run(args, 30, kill_at=f"batch:0#1+0~{delay_ms}"), "no batch ran"
    time.sleep(0.3)  # the park's timeout (0.2 s), then the way back
    if delay_ms:
        assert merged_ranges(targets[0].pid), "the batch's mmaps were not made"
    for t in targets:
        assert_target_intact(t)
        _assert_advice_kept(t)
        assert _fds(t.pid) == baseline[t.pid]  # before any clean-up
    _unmerge_clean(targets, baseline)
    for t in targets:
        _assert_advice_kept(t)


def test_an_unmerge_right_after_the_kill_waits_for_a_parked_thread(
    privileged: None, spawn: Any
) -> None:
    """Killed once the first window's calls are done and its thread parked in the call
    routine (it goes back by itself at the park's timeout, 0.2 s): an unmerge started at
    once finds the dead procksm's scratch area in use, comes back for it once the thread
    has left, and leaves nothing of procksm's (it left the area for good before)."""
    targets, args = _merge_of(spawn)()
    baseline = {t.pid: _fds(t.pid) for t in targets}
    assert _run(args, 30, kill_at="batch:0#1+0~20"), "no batch ran"
    assert merged_ranges(targets[0].pid), "the batch's mmaps were not made"
    _unmerge_clean(targets, baseline)  # no wait for the park: the unmerge's own
    for t in targets:
        _assert_advice_kept(t)


def test_kill_after_every_step_of_a_scm_rights_merge_window(
    privileged: None, spawn: Any, tmp_path: Path
) -> None:
    # Another mount namespace: /proc/<procksm>/fd is not reachable, the memfds are handed
    # over with SCM_RIGHTS on a socket the target creates (procksm.fdpass).
    merge_of = _merge_of(spawn, prefix=["unshare", "--mount"])

    def setup() -> tuple[list[Target], list[object]]:
        targets, args = merge_of()
        assert all(t.int("pid") == t.pid for t in targets)  # our pid namespace
        return targets, args

    kinds, windows = _logged_windows(setup, tmp_path)
    handover = _through_first_batch(
        kinds, next(w for w in windows if "batch" in _kinds_in(kinds, w))
    )
    done = list(_sweep(setup, handover))
    assert len(done) == len(handover)


def test_kill_after_every_step_of_a_zero_page_window(
    privileged: None, spawn: Any, tmp_path: Path
) -> None:
    exe = build_c_target("planted")

    def setup() -> tuple[list[Target], list[object]]:
        target = spawn([exe, "--zero", 32, "--seed", 7, "--canaries", "--counters", 0])
        time.sleep(0.3)
        return [target], ["merge", target.pid]

    kinds, windows = _logged_windows(setup, tmp_path)
    zero = next(w for w in windows if "gate" in _kinds_in(kinds, w))
    done = list(_sweep(setup, zero))
    assert len(done) == len(zero)


def test_kill_after_every_step_of_an_unmerge_window(
    privileged: None, spawn: Any, tmp_path: Path
) -> None:
    targets = _spawn_canaries(spawn, 2)
    pids = [t.pid for t in targets]
    baseline = {t.pid: _fds(t.pid) for t in targets}
    assert run_procksm("merge", *pids).returncode == 0
    kinds = _step_log(["unmerge", *pids], tmp_path)
    _unmerge_clean(targets, baseline)
    windows = _windows(kinds)
    piece = next(w for w in windows if "gate" in _kinds_in(kinds, w))
    done = 0
    for n in piece:
        _run(["merge", *pids], 60)
        assert all(merged_ranges(p) for p in pids)
        _run(["unmerge", *pids], 30, kill_at=n)
        time.sleep(AFTER_KILL_S)
        for t in targets:
            assert_target_intact(t)
        _unmerge_clean(targets, baseline)
        done += 1
    assert done == len(piece)


def test_kill_after_every_step_of_a_daemon_batch(
    privileged: None, spawn: Any, tmp_path: Path
) -> None:
    def setup() -> tuple[list[Target], list[object]]:
        targets = _spawn_canaries(spawn, 2)
        ctl = tmp_path / "ctl.sock"
        return targets, ["attach", "--no-bpf", "--control", ctl, *(t.pid for t in targets)]

    kinds, windows = _logged_windows(setup, tmp_path, timeout=15)
    # the first window that maps an extent (a batch's first may only drop zero pages)
    batch = next(w for w in windows if "batch" in _kinds_in(kinds, w))
    # the daemon's window is the merge engine's: swept whole above; here its start (the
    # daemon's own process holds the engine) through a first extent
    steps = _through_first_batch(kinds, batch)
    done = list(_sweep(setup, steps, timeout=6))
    assert len(done) == len(steps)


def test_kill_after_every_step_of_the_guards_unmerge(
    privileged: None, spawn: Any, guard_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The madvise guard's unmerge helper (procksm.guard_unmerge) killed after each step
    of the unmerge it makes for a target's MADV_DONTNEED on a merged page: the guard
    gives the call to a new helper, the call succeeds, the page reads zeros, the target
    noticed nothing else. PROCKSM_TEST_KILL_FILE kills one helper only (its successor
    finds the file gone)."""
    from procksm.merge import MergeEngine, MergeOptions
    from procksm.scanner import AddressRange, ScanOptions

    kill_file = guard_dir / "kill-at-step"
    monkeypatch.setenv("PROCKSM_TEST_KILL_FILE", str(kill_file))  # the guards inherit it
    pages = 512  # a page DONTNEEDed each round stays zero: more rounds than steps
    targets = _spawn_canaries(spawn, 2, identical=pages)
    baseline = {t.pid: _fds(t.pid) for t in targets}
    ranges = [AddressRange(t.int("identical"), t.int("identical") + pages * 4096) for t in targets]
    opts = MergeOptions(selection=ScanOptions(ranges=ranges))

    def merge_identical() -> None:
        with MergeEngine([t.pid for t in targets], opts) as eng:
            eng.run()

    merge_identical()
    a = targets[0]
    n = 0
    while True:
        n += 1
        page = n % pages
        assert merged_ranges(a.pid), f"round {n}: nothing merged to unmerge"
        kill_file.write_text(str(n))
        assert a.command(f"dontneed identical {page} 1", timeout=60) == "OK", n
        survived = kill_file.exists()  # past the last step: nobody died this round
        kill_file.unlink(missing_ok=True)
        time.sleep(AFTER_KILL_S)
        for t in targets:
            try:
                assert_target_intact(t)
            except AssertionError as e:
                raise AssertionError(f"helper killed after step {n}: {e}") from None
        if survived:
            break
        merge_identical()
    assert n > 10, n  # the helper's windows have more steps than this
    _unmerge_clean(targets, baseline)
    print(f"\nthe guard's unmerge helper killed after each of {n - 1} steps")


def test_an_injected_call_that_outlives_the_timeout_is_left_its_way_back(
    privileged: None, spawn: Any
) -> None:
    """An injected call still running after the timeout, and after the interrupt and as
    long again (a populate sleeps uninterruptibly: seen on a loaded machine): the window
    ends at once, as procksm's death would end it. Nothing more is injected (a `finally`
    that closes fds is refused), every thread is left to its frames, the gated threads
    wait until the call and its wake-up are done, and the next window takes the thread
    over once its call ends. The target notices nothing."""
    from procksm.arch.x86_64 import (
        MAP_ANONYMOUS,
        MAP_PRIVATE,
        PROT_READ,
        PROT_WRITE,
        SYS_close,
        SYS_mmap,
        SYS_munmap,
    )
    from procksm.attach import PtraceSession
    from procksm.errors import PtraceTimeout

    madv_populate_write, size = 23, 1 << 30  # ~0.3 s of zeroing: far over 2 x 20 ms
    (t,) = _spawn_canaries(spawn, 1)
    baseline = _fds(t.pid)
    with PtraceSession(t.pid) as session:
        with pytest.raises(PtraceTimeout, match="did not complete"), session.stopped() as st:
            prot, flags = PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS
            addr = st.syscall_checked(SYS_mmap, 0, size, prot, flags, -1, 0, name="mmap")
            st.hold_others()
            session.timeout = 0.02
            try:
                st.syscall(SYS_madvise, addr, size, madv_populate_write)
            finally:
                with pytest.raises(PtraceTimeout, match="left to its way back"):
                    st.syscall(SYS_close, 1000)
        assert st.abandoned is not None
        session.timeout = 10
        with session.stopped() as st:  # the orphan, once its call is over
            assert st.syscall(SYS_munmap, addr, size) == 0
    time.sleep(AFTER_KILL_S)
    assert_target_intact(t)
    _unmerge_clean([t], {t.pid: baseline})


def test_ctrl_z_in_a_window_stops_procksm_after_it(privileged: None, spawn: Any) -> None:
    """SIGTSTP (Ctrl-Z) in the middle of a stop window waits for the window's end:
    procksm stops with every target thread running, not held for as long as procksm
    stays stopped.

    The kernel discards SIGTSTP sent to a process of an orphaned process group (CI runs
    the suite in one), so procksm runs here in a group of its own under a parent of the
    same session, as under a shell's job control."""
    from procksm.attach import PtraceSession

    (t,) = _spawn_canaries(spawn, 1)
    read_end, write_end = os.pipe()
    session_leader = os.fork()
    if session_leader == 0:  # pragma: no cover - the children
        code = 1
        try:
            os.close(read_end)
            os.setsid()
            job = os.fork()
            if job == 0:
                os.setpgid(0, 0)  # a job: its parent is in the session, in another group
                os.write(write_end, f"{os.getpid()}\n".encode())
                with PtraceSession(t.pid) as session, session.stopped() as st:
                    os.kill(os.getpid(), signal.SIGTSTP)
                    time.sleep(0.2)  # not stopped: the signal waits for the window's end
                    os.write(write_end, f"{len(st.threads)}\n".encode())
                code = 0
            else:
                _, status = os.waitpid(job, 0)
                code = os.waitstatus_to_exitcode(status)
        finally:
            os._exit(code)
    os.close(write_end)
    job = 0
    try:
        with os.fdopen(read_end) as pipe:
            job = int(pipe.readline())
            ready, _, _ = select.select([pipe], [], [], 10)
            assert ready, "procksm stopped inside its window"
            assert int(pipe.readline()) > 1  # the window held every thread, and went on
        deadline = time.monotonic() + 10
        while Path(f"/proc/{job}/stat").read_text().rsplit(")", 1)[1].split()[0] != "T":
            assert time.monotonic() < deadline, "procksm did not stop after its window"
            time.sleep(0.01)
        assert_target_intact(t)  # running, untraced, while procksm is stopped
    finally:
        if job:
            with contextlib.suppress(ProcessLookupError):
                os.kill(job, signal.SIGCONT)
        _, status = os.waitpid(session_leader, 0)
    assert os.waitstatus_to_exitcode(status) == 0
