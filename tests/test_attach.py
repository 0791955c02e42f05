"""The ptrace layer against real targets (tests/targets/blockers.c, planted.c).

blockers' threads sit in read, futex, nanosleep, clock_nanosleep, poll, epoll_wait,
accept, select and pause, and count every result they should never see (EINTR, errno
512..516, a short sleep, a lost or altered signal); `errors` returns that count.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from procksm.arch.x86_64 import (
    ERESTART_RESTARTBLOCK,
    Registers,
    SYS_getpid,
    SYS_gettid,
    SYS_mmap,
    SYS_munmap,
    SYS_restart_syscall,
    signed,
)
from procksm.attach import PtraceSession, StoppedTarget
from procksm.attach.diagnose import (
    AttachStatus,
    check_attachable,
    parse_status,
    permission_denial,
    yama_denial,
)
from procksm.attach.inject import PTRACE_SEIZE, ptrace, set_regs
from procksm.attach.scratch import dead_area_pieces
from procksm.attach.scratch_layout import (
    OWNER,
    ROUTINE_OFFSET,
    ROUTINE_PAGE,
    SCRATCH_BYTES,
    SCRATCH_PATH,
)
from procksm.errors import (
    NoSuchProcess,
    ProcksmError,
    PtraceTimeout,
    TargetBusy,
    Unsupported,
    UsageError,
    ZombieProcess,
)
from procksm.procfs import QueriedVma
from procksm.unmerge import unmerge
from tests.conftest import ROOT, Target, build_c_target

NOBODY = 65534
OTHER_UID = 43210  # a uid with no processes and no capabilities
PAGE = 4096


# --- helpers ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def blockers_exe() -> Path:
    return build_c_target("blockers")


def start_blockers(spawn: Callable[..., Target], exe: Path, *args: str, **popen: object) -> Target:
    return spawn([exe, *args], **popen)


def task_names(pid: int) -> dict[int, str]:
    names = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(OSError), open(f"/proc/{pid}/task/{tid}/comm") as f:
            names[int(tid)] = f.read().strip()
    return names


def tid_named(pid: int, name: str) -> int:
    return next(tid for tid, n in task_names(pid).items() if n == name)


def thread_field(pid: int, key: str) -> dict[int, str]:
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(OSError), open(f"/proc/{pid}/task/{tid}/status") as f:
            out[int(tid)] = parse_status(f.read())[key]
    return out


def mapping_of(pid: int, addr: int) -> str | None:
    """Permissions of the mapping holding `addr` (anonymous neighbours may be merged in)."""
    for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
        start, end = (int(x, 16) for x in line.split()[0].split("-"))
        if start <= addr < end:
            return line.split()[1]
    return None


def states(pid: int) -> dict[int, str]:
    return {tid: s[:1] for tid, s in thread_field(pid, "State").items()}


def wait_blocked(pid: int, names: set[str]) -> None:
    """Wait until the named threads sleep in their blocking syscalls (not still starting)."""
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        named = {tid for tid, name in task_names(pid).items() if name in names}
        if len(named) >= len(names) and all(states(pid).get(t) == "S" for t in named):
            return
        time.sleep(0.005)
    raise AssertionError(f"threads {names} of {pid} did not block")


def reg_diff(a: Registers, b: Registers) -> dict[str, tuple[int, int]]:
    return {k: (v, b.as_dict()[k]) for k, v in a.as_dict().items() if b.as_dict()[k] != v}


def counts(target: Target) -> dict[str, int]:
    answer = target.command("counts")
    assert answer.startswith("COUNTS"), answer
    return {k: int(v) for k, v in (tok.split("=") for tok in answer.split()[1:])}


def assert_no_errors(target: Target) -> None:
    assert target.command("errors") == "ERRORS 0"


def assert_running_untraced(pid: int) -> None:
    assert set(thread_field(pid, "TracerPid").values()) == {"0"}
    assert not {"t", "T"} & set(states(pid).values()), states(pid)


_libc = ctypes.CDLL(None, use_errno=True)


def sigqueue(pid: int, sig: int, value: int) -> None:
    # union sigval is passed in a register like a pointer on x86_64.
    if _libc.sigqueue(pid, sig, ctypes.c_void_p(value)) != 0:
        raise OSError(ctypes.get_errno(), "sigqueue")


def in_child(
    fn: Callable[[], str], *, uid: int | None = None, drop_ptrace_cap: bool = False
) -> str:
    """Run fn in a forked child (optionally as another uid / without CAP_SYS_PTRACE)."""
    r, w = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover - runs in the child
        os.close(r)
        try:
            if drop_ptrace_cap:
                _drop_cap_sys_ptrace()
            if uid is not None:
                os.setgroups([])
                os.setresgid(uid, uid, uid)
                os.setresuid(uid, uid, uid)
            result = fn()
        except BaseException as e:  # report anything, the parent asserts
            result = f"{type(e).__name__}: {e}"
        os.write(w, result.encode())
        os._exit(0)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        out = f.read().decode()
    os.waitpid(child, 0)
    return out


def _drop_cap_sys_ptrace() -> None:
    class Header(ctypes.Structure):
        _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]

    class Data(ctypes.Structure):
        _fields_ = [(n, ctypes.c_uint32) for n in ("effective", "permitted", "inheritable")]

    header = Header(0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3
    data = (Data * 2)()
    assert _libc.capget(ctypes.byref(header), data) == 0
    for d in data[:1]:  # CAP_SYS_PTRACE = 19 lives in the first 32-bit word
        d.effective &= ~(1 << 19)
        d.permitted &= ~(1 << 19)
    assert _libc.prctl(24, 19, 0, 0, 0) == 0  # PR_CAPBSET_DROP: not regained by exec
    assert _libc.capset(ctypes.byref(header), data) == 0


def try_attach(pid: int) -> str:
    try:
        status = check_attachable(pid)
    except Exception as e:
        return f"{type(e).__name__}: {e}"
    return f"ok {status.name}"


def try_seize(pid: int) -> str:
    try:
        ptrace(PTRACE_SEIZE, pid, 0, 0)
    except OSError as e:
        return f"errno {e.errno}"
    return "seized"


def try_session_getpid(pid: int) -> str:
    try:
        with PtraceSession(pid) as session, session.stopped() as target:
            return f"getpid {target.syscall(SYS_getpid)}"
    except Exception as e:
        return f"{type(e).__name__}: {e}"


# --- seize / stop / resume -------------------------------------------------------------


def test_stop_and_resume_every_thread(
    privileged: None, spawn: Callable[..., Target], blockers_exe: Path
) -> None:
    target = start_blockers(spawn, blockers_exe, "--spinners", "2")
    pid = target.pid
    me = str(threading.get_native_id())
    with PtraceSession(pid) as session:
        assert session.status is not None and session.status.threads == 12
        with session.stopped() as stopped:
            assert stopped.threads == sorted(task_names(pid))
            assert set(states(pid).values()) == {"t"}
            assert set(thread_field(pid, "TracerPid").values()) == {me}
        assert session.threads == stopped.threads
        assert_running_untraced(pid)
        before = counts(target)["spins"]
        time.sleep(0.05)
        assert counts(target)["spins"] > before
        assert len(session.pauses) == 1
    assert_no_errors(target)


def test_threads_created_while_stopping_are_stopped_too(
    privileged: None, spawn: Callable[..., Target], blockers_exe: Path
) -> None:
    # b-spawn creates a thread every ~100 us that lives ~200 us: some are created between
    # listing /proc/PID/task and PTRACE_SEIZE, some after the seize (auto-attached).
    target = start_blockers(spawn, blockers_exe, "--bare", "--spawn")
    pid = target.pid
    seen: set[int] = set()
    with PtraceSession(pid) as session:
        for _ in range(40):
            with session.stopped() as stopped:
                live = {t: s for t, s in states(pid).items() if s not in ("Z", "X")}
                assert set(live) <= set(stopped.threads)
                assert set(live.values()) == {"t"}, live
                seen.update(stopped.threads)
            time.sleep(0.002)
    assert len(seen) > 40  # short-lived threads were caught in the windows
    spawned = counts(target)["spawned"]
    time.sleep(0.05)
    assert counts(target)["spawned"] > spawned
    assert_running_untraced(pid)


# --- injection -------------------------------------------------------------------------


def test_injected_syscalls_and_registers(
    privileged: None, spawn: Callable[..., Target], blockers_exe: Path
) -> None:
    target = start_blockers(spawn, blockers_exe, "--spinners", "1")
    pid = target.pid
    restartable = {"b-read", "b-futex", "b-epoll", "b-accept", "b-select", "b-sig"}
    wait_blocked(pid, restartable)
    names = task_names(pid)
    with PtraceSession(pid) as session:
        with session.stopped() as stopped:
            assert stopped.syscall(SYS_getpid) == pid
            for tid in stopped.threads:
                before = stopped.registers(tid)
                if tid != pid:
                    assert before == stopped.saved_registers(tid)
                assert stopped.syscall(SYS_gettid, tid=tid) == tid
                # Until the window ends the thread sits after the `syscall` of `syscall;
                # ret`, its stack pointer at the frame of its own state (the way back if
                # procksm died now); its own registers come back when the window ends.
                now = stopped.registers(tid)
                assert now.rip == stopped.syscall_address() + 2, names[tid]
                assert now.rsp < stopped.saved_registers(tid).rsp - 128, names[tid]
            addr = stopped.scratch()
            assert addr % PAGE == 0
            assert stopped.scratch() == addr  # once per session
            stopped.write_memory(addr, b"procksm" * 100)
            assert stopped.read_memory(addr, 700) == b"procksm" * 100
            extra = stopped.syscall(SYS_mmap, 0, 2 * PAGE, 3, 0x22, -1, 0)
            assert extra > 0 and extra % PAGE == 0
            assert stopped.syscall(SYS_munmap, extra, 2 * PAGE) == 0
            assert stopped.syscall(SYS_munmap, 1, PAGE) == -22  # EINVAL: raw -errno
            with pytest.raises(Exception, match="EINVAL"):
                stopped.syscall_checked(SYS_munmap, 1, PAGE, name="munmap")
            first = {tid: stopped.saved_registers(tid) for tid in stopped.threads}
        assert mapping_of(pid, addr) == "rw-s"
        assert mapping_of(pid, extra) is None
        # Threads blocked in restartable calls went back into the very same call: the
        # next window finds them with identical registers.
        time.sleep(0.05)
        with session.stopped() as stopped:
            for tid, name in names.items():
                if name in restartable:
                    again = stopped.saved_registers(tid)
                    assert again == first[tid], (name, reg_diff(again, first[tid]))
            epoll = stopped.saved_registers(tid_named(pid, "b-epoll"))
            assert signed(epoll.rax) == -514  # EINTR rewritten to ERESTARTNOHAND
    assert mapping_of(pid, addr) is None  # unmapped when the session ended
    assert_running_untraced(pid)
    assert_no_errors(target)
    assert target.command("poke") == "OK reads=1"


def test_blockers_see_nothing_after_many_cycles(
    privileged: None, spawn: Callable[..., Target], blockers_exe: Path
) -> None:
    target = start_blockers(spawn, blockers_exe)
    pid = target.pid
    tids = sorted(task_names(pid))
    started = time.monotonic()
    cycles = 0
    with PtraceSession(pid) as session:
        # Long enough for b-sleep's 1 s nanosleep and b-clock's ticks to complete twice
        # while being interrupted and injected into over and over.
        while time.monotonic() - started < 2.3:
            with session.stopped() as stopped:
                tid = tids[cycles % len(tids)]
                assert stopped.syscall(SYS_gettid, tid=tid) == tid
                stopped.scratch()
            cycles += 1
            time.sleep(0.002)
    assert cycles > 200
    assert_no_errors(target)
    got = counts(target)
    assert got["sleeps"] >= 2 and got["ticks"] >= 2  # never short, never failed
    assert target.command("poke") == "OK reads=1"
    assert_no_errors(target)


def test_signals_are_delivered_not_swallowed(
    privileged: None, spawn: Callable[..., Target], blockers_exe: Path
) -> None:
    target = start_blockers(spawn, blockers_exe)
    pid, rtmin = target.pid, target.int("sig")
    b_sig = tid_named(pid, "b-sig")
    sent: list[int] = []
    stop_flood = threading.Event()

    def flood() -> None:  # signals arriving while threads are being stopped and resumed
        value = 1000
        while not stop_flood.is_set():
            with contextlib.suppress(OSError):  # EAGAIN: the queue is full for a moment
                sigqueue(pid, rtmin, value)
                sent.append(value)
            value += 1
            time.sleep(0.0002)

    flooder = threading.Thread(target=flood)
    flooder.start()
    try:
        with PtraceSession(pid) as session:
            for i in range(100):
                with session.stopped() as stopped:
                    # Queued while b-sig is stopped: the thread's signals are blocked
                    # while it runs injected calls (PTRACE_SETSIGMASK), so the signal
                    # stays pending in the kernel and arrives, intact, after the window.
                    sigqueue(pid, rtmin, i + 1)
                    sent.append(i + 1)
                    assert stopped.syscall(SYS_gettid, tid=b_sig) == b_sig
                    assert stopped.syscall(SYS_getpid, tid=b_sig) == pid
    finally:
        stop_flood.set()
        flooder.join()
    assert session.signals_held == 0  # none had to be taken out and re-sent
    deadline = time.monotonic() + 5
    while counts(target)["sigs"] < len(sent) and time.monotonic() < deadline:
        time.sleep(0.01)
    got = counts(target)
    assert (got["sigs"], got["sigsum"]) == (len(sent), sum(sent))
    assert_no_errors(target)


def test_group_stopped_target_stays_stopped(
    privileged: None, spawn: Callable[..., Target], blockers_exe: Path
) -> None:
    target = start_blockers(spawn, blockers_exe)
    pid = target.pid
    os.kill(pid, signal.SIGSTOP)
    deadline = time.monotonic() + 2
    while set(states(pid).values()) != {"T"} and time.monotonic() < deadline:
        time.sleep(0.005)
    status = check_attachable(pid)
    assert status.stopped_by_signal and "stopped by job control" in " ".join(status.notes)
    with PtraceSession(pid) as session:
        for _ in range(3):
            with session.stopped() as stopped:
                assert stopped.group_stopped
                assert stopped.syscall(SYS_getpid) == pid
            time.sleep(0.05)
            assert set(states(pid).values()) == {"T"}  # not resumed by us
    assert set(thread_field(pid, "TracerPid").values()) == {"0"}
    os.kill(pid, signal.SIGCONT)
    assert target.command("poke") == "OK reads=1"
    assert_no_errors(target)


def test_leader_thread_exited(
    privileged: None, spawn: Callable[..., Target], blockers_exe: Path
) -> None:
    # The main thread called pthread_exit: the leader is a zombie, the process lives on.
    target = start_blockers(spawn, blockers_exe, "--exit-main")
    pid = target.pid
    deadline = time.monotonic() + 2
    while states(pid).get(pid) != "Z" and time.monotonic() < deadline:
        time.sleep(0.005)
    assert states(pid)[pid] == "Z"
    with PtraceSession(pid) as session, session.stopped() as stopped:
        assert pid not in stopped.threads and len(stopped.threads) == 10
        assert stopped.syscall(SYS_getpid) == pid
        assert stopped.scratch() > 0
    assert_no_errors(target)


def test_process_exit_between_windows(
    privileged: None, spawn: Callable[..., Target], blockers_exe: Path
) -> None:
    target = start_blockers(spawn, blockers_exe)
    with PtraceSession(target.pid) as session:
        with session.stopped() as stopped:
            stopped.scratch()
        target.kill()
        with pytest.raises(NoSuchProcess, match="has exited"), session.stopped():
            pass


def test_exec_between_windows_is_noticed(
    privileged: None, spawn: Callable[..., Target], blockers_exe: Path
) -> None:
    target = start_blockers(spawn, blockers_exe)
    pid = target.pid
    with PtraceSession(pid) as session:
        with session.stopped() as stopped:
            stopped.scratch()
        assert target.command("exec").startswith(f"READY pid={pid} ")
        with session.stopped() as stopped:
            assert session.exec_seen
            assert stopped.syscall(SYS_getpid) == pid  # a syscall insn of the new program
            new_scratch = stopped.scratch()
            assert mapping_of(pid, new_scratch) == "rw-s"
    assert mapping_of(pid, new_scratch) is None
    assert_running_untraced(pid)
    assert target.command("errors") == "ERRORS 0"


def test_thread_that_cannot_stop_times_out_and_the_rest_resume(
    privileged: None, spawn: Callable[..., Target], blockers_exe: Path
) -> None:
    target = start_blockers(spawn, blockers_exe)
    pid = target.pid
    stuck = int(target.command("vfork 1200").split("=")[1])  # in D until its child exits
    with PtraceSession(pid, timeout=0.3) as session:
        timed_out = pytest.raises(PtraceTimeout, match=rf"tid {stuck} \(b-vfork, state D")
        with timed_out, session.stopped():
            pass
        tracers = thread_field(pid, "TracerPid")
        assert {t for t, v in tracers.items() if v != "0"} == {stuck}
        assert not {"t", "T"} & {s for t, s in states(pid).items() if t != stuck}
        # The next window picks the stuck thread up as soon as it can stop.
        session.timeout = 3.0
        with session.stopped() as stopped:
            assert stuck in stopped.threads or stuck not in task_names(pid)
    assert_running_untraced(pid)
    assert_no_errors(target)


# --- the tool dying --------------------------------------------------------------------

_CHILD_SESSION = """
import sys, time
from procksm.attach import PtraceSession
from procksm.arch.x86_64 import SYS_getpid
with PtraceSession(int(sys.argv[1])) as session:
    with session.stopped() as target:
        target.syscall(SYS_getpid)
        target.scratch()
        print("STOPPED", flush=True)
        time.sleep(float(sys.argv[2]))
        print("BODY-DONE", flush=True)
"""


def _session_child(pid: int, body_seconds: float) -> subprocess.Popen[str]:
    # SIGINT back to its default first: a shell starts background jobs (`make test &`)
    # with SIGINT ignored, and Python keeps an ignored SIGINT ignored.
    child = subprocess.Popen(
        [sys.executable, "-c", _CHILD_SESSION, str(pid), str(body_seconds)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )  # fmt: skip
    assert child.stdout is not None
    assert child.stdout.readline().strip() == "STOPPED"
    return child


def test_sigkill_of_the_tool_leaves_target_running(
    privileged: None, spawn: Callable[..., Target], blockers_exe: Path
) -> None:
    target = start_blockers(spawn, blockers_exe, "--spinners", "1")
    pid = target.pid
    child = _session_child(pid, 3600)
    assert set(states(pid).values()) == {"t"}
    child.kill()
    child.wait()
    time.sleep(0.05)
    assert_running_untraced(pid)
    spins = counts(target)["spins"]
    time.sleep(0.05)
    assert counts(target)["spins"] > spins
    assert target.command("poke") == "OK reads=1"
    assert_no_errors(target)


def _as_caught_after_the_fixup(st: StoppedTarget, tid: int) -> None:
    """Put thread `tid`, stopped in a call restarted through its restart block (rax =
    -ERESTART_RESTARTBLOCK), in the state the kernel leaves it in when the stop comes
    after its restart fix-up: rax = restart_syscall, rip back at the `syscall`, orig_rax
    as it was. procksm then reads these as the thread's own registers."""
    tracee = st._threads.tracees[tid]
    assert tracee.saved is not None
    assert -signed(tracee.saved.rax) == ERESTART_RESTARTBLOCK, tracee.saved
    regs = tracee.saved.copy()
    regs.rax, regs.rip = SYS_restart_syscall, regs.rip - 2
    assert st.read_memory(regs.rip, 2) == b"\x0f\x05"
    set_regs(tid, regs)
    tracee.saved = regs


def test_killed_with_sleepers_caught_on_their_way_into_restart_syscall(
    privileged: None, spawn: Callable[..., Target], blockers_exe: Path
) -> None:
    """A thread let go by one window can meet the next window's PTRACE_INTERRUPT on its
    way back to user space after the kernel's restart fix-up: rip at its `syscall`, rax
    = restart_syscall (measured: 28 % of a lone thread's back-to-back stops in poll;
    the kill sweep met it in CI between the guard's window and the first merge window:
    `blocker poll returned -1 errno=4`). The race is narrow in a whole window, so the
    test gives the sleepers that state itself, then procksm dies once every thread is
    gated. Each thread returns through its own frame, whose rt_sigreturn clears the
    restart block: the frame must re-issue poll and nanosleep, not restart_syscall
    (which returns EINTR; b-poll and b-nap count it)."""
    target = start_blockers(spawn, blockers_exe, "--sleepers", "1")
    pid = target.pid
    wait_blocked(pid, {"b-poll", "b-nap", "b-sleep"})
    sleepers = [tid_named(pid, name) for name in ("b-poll", "b-nap")]
    child = os.fork()
    if child == 0:  # pragma: no cover - the procksm that dies
        try:
            with PtraceSession(pid) as session:
                with session.stopped() as st:
                    st.scratch()  # the gate's page; the sleepers now sleep in restart_syscall
                time.sleep(0.05)
                with session.stopped() as st:
                    for tid in sleepers:
                        assert st.saved_registers(tid).orig_rax == SYS_restart_syscall
                        _as_caught_after_the_fixup(st, tid)
                    st.hold_others()
                    os.kill(os.getpid(), signal.SIGKILL)
        finally:
            os._exit(1)
    _, status = os.waitpid(child, 0)
    assert os.WIFSIGNALED(status), "the child failed before it was gated"
    time.sleep(0.3)  # the gate opens at once: the injecting thread held no call
    assert_running_untraced(pid)
    assert_no_errors(target)
    assert target.command("poke") == "OK reads=1"
    unmerge(pid)  # the dead session's scratch area
    assert_no_errors(target)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_sigterm_sigint_wait_for_the_window_to_end(
    privileged: None, spawn: Callable[..., Target], blockers_exe: Path, sig: int
) -> None:
    target = start_blockers(spawn, blockers_exe)
    child = _session_child(target.pid, 0.3)
    child.send_signal(sig)
    out, err = child.communicate(timeout=10)
    assert out.strip() == "BODY-DONE"  # the signal took effect only after the window
    if sig == signal.SIGINT:
        # Raised where the window unblocked signals again, after every thread was resumed.
        assert err.rstrip().endswith("KeyboardInterrupt") and "pthread_sigmask" in err
    # SIGTERM kills by default; SIGINT raised KeyboardInterrupt, and Python exits from an
    # unhandled one by re-raising SIGINT.
    assert child.returncode == -sig
    assert_running_untraced(target.pid)
    assert_no_errors(target)


# --- diagnostics -----------------------------------------------------------------------


def test_no_such_process() -> None:
    with pytest.raises(NoSuchProcess, match=r"^no such process \(pid=4194305\)$"):
        check_attachable(4194305)  # above the largest possible pid_max (2^22)


def test_zombie() -> None:
    child = os.fork()
    if child == 0:  # pragma: no cover
        os._exit(0)
    try:
        deadline = time.monotonic() + 2
        while states(child).get(child) != "Z" and time.monotonic() < deadline:
            time.sleep(0.001)
        with pytest.raises(ZombieProcess, match=rf"zombie \(pid={child}, name="):
            check_attachable(child)
    finally:
        os.waitpid(child, 0)


def test_kernel_thread() -> None:
    with pytest.raises(
        Unsupported, match=r"^pid 2 \(kthreadd\) is a kernel thread: it has no user"
    ):
        check_attachable(2)


def test_ourselves() -> None:
    with pytest.raises(Unsupported, match="procksm itself"):
        check_attachable(os.getpid())
    done = threading.Event()
    helper = threading.Thread(target=done.wait)
    helper.start()
    try:
        assert helper.native_id is not None
        with pytest.raises(Unsupported, match="thread of procksm itself"):
            check_attachable(helper.native_id)
    finally:
        done.set()
        helper.join()


def test_thread_id_instead_of_pid(
    privileged: None, spawn: Callable[..., Target], blockers_exe: Path
) -> None:
    target = start_blockers(spawn, blockers_exe)
    tid = tid_named(target.pid, "b-read")
    with pytest.raises(UsageError, match=rf"pid {tid} is a thread of process {target.pid}"):
        check_attachable(tid)


_TRACER = """
import ctypes, sys
libc = ctypes.CDLL(None, use_errno=True)
assert libc.ptrace(0x4206, int(sys.argv[1]), None, None) == 0, ctypes.get_errno()
print("SEIZED", flush=True)
sys.stdin.read()
"""


def test_already_traced(privileged: None, spawn: Callable[..., Target], blockers_exe: Path) -> None:
    target = start_blockers(spawn, blockers_exe)
    pid = target.pid
    tracer = subprocess.Popen(
        [sys.executable, "-c", _TRACER, str(pid)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert tracer.stdout is not None and tracer.stdout.readline().strip() == "SEIZED"
        before = (states(pid), thread_field(pid, "TracerPid"))
        expected = rf"^pid {pid} \(blockers\) is already traced by pid {tracer.pid} \(python"
        with pytest.raises(TargetBusy, match=expected):
            check_attachable(pid)
        with pytest.raises(TargetBusy, match=expected), PtraceSession(pid):
            pass
        assert (states(pid), thread_field(pid, "TracerPid")) == before  # nothing changed
    finally:
        tracer.kill()
        tracer.wait()
    # Another session of this process, inside its window, holds the target too.
    busy = pytest.raises(TargetBusy, match="already being traced by this procksm")
    with PtraceSession(pid) as first, first.stopped(), busy:
        check_attachable(pid)
    assert_no_errors(target)


def test_other_user_without_capability(
    privileged: None, spawn: Callable[..., Target], blockers_exe: Path
) -> None:
    target = start_blockers(spawn, blockers_exe, user=NOBODY, group=NOBODY)
    pid = target.pid
    out = in_child(lambda: try_attach(pid), uid=OTHER_UID)
    assert out == (
        f"AccessDenied: not permitted to trace pid {pid} (blockers), owned by uid {NOBODY} "
        f"(nobody), from uid {OTHER_UID} ({OTHER_UID}): run procksm as root, or as the same user"
    )
    assert in_child(lambda: try_seize(pid), uid=OTHER_UID) == "errno 1"  # the kernel agrees
    assert in_child(lambda: try_session_getpid(pid), uid=OTHER_UID).startswith("AccessDenied")
    # The same user may: no false refusal.
    assert in_child(lambda: try_session_getpid(pid), uid=NOBODY) == f"getpid {pid}"
    # A user may not trace root's processes.
    root_target = start_blockers(spawn, blockers_exe, "--bare")
    out = in_child(lambda: try_attach(root_target.pid), uid=NOBODY)
    assert out.startswith(f"AccessDenied: not permitted to trace pid {root_target.pid}")
    assert_running_untraced(pid)  # the refused attempts changed nothing
    assert_no_errors(target)


def test_root_without_cap_sys_ptrace_gets_the_container_hint(
    privileged: None, spawn: Callable[..., Target], blockers_exe: Path
) -> None:
    # Like `docker run` without --cap-add SYS_PTRACE: root, but no CAP_SYS_PTRACE.
    target = start_blockers(spawn, blockers_exe, "--bare", user=NOBODY, group=NOBODY)
    out = in_child(lambda: try_attach(target.pid), drop_ptrace_cap=True)
    assert out.startswith("AccessDenied: not permitted to trace pid")
    assert "without CAP_SYS_PTRACE" in out and "--cap-add SYS_PTRACE" in out
    assert in_child(lambda: try_seize(target.pid), drop_ptrace_cap=True) == "errno 1"
    # A root process holding CAP_SYS_PTRACE itself is out of reach too (the kernel's
    # cap_ptrace_access_check: the target's capabilities must be a subset of ours) ...
    full = start_blockers(spawn, blockers_exe, "--bare")
    out = in_child(lambda: try_attach(full.pid), drop_ptrace_cap=True)
    assert "holds capabilities procksm lacks (CAP_SYS_PTRACE)" in out
    assert in_child(lambda: try_seize(full.pid), drop_ptrace_cap=True) == "errno 1"
    # ... while root processes of the same "container" (same capability bounds) are fine.
    capped = start_blockers(spawn, blockers_exe, "--bare", preexec_fn=_drop_cap_sys_ptrace)
    assert in_child(lambda: try_session_getpid(capped.pid), drop_ptrace_cap=True) == (
        f"getpid {capped.pid}"
    )


def test_other_pid_and_mount_namespace(privileged: None, blockers_exe: Path) -> None:
    outer = subprocess.Popen(
        ["unshare", "--pid", "--fork", "--mount-proc", str(blockers_exe), "--bare"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert outer.stdout is not None
        assert outer.stdout.readline().startswith("READY pid=1 ")
        inner = int(Path(f"/proc/{outer.pid}/task/{outer.pid}/children").read_text().split()[0])
        status = check_attachable(inner)
        assert {"pid", "mnt"} <= set(status.other_namespaces)
        assert status.nspid == (inner, 1)
        assert "another PID namespace (pid 1 there)" in " ".join(status.notes)
        with PtraceSession(inner) as session, session.stopped() as stopped:
            assert stopped.syscall(SYS_getpid) == 1  # the target's own view of its pid
    finally:
        outer.kill()
        outer.wait()


def test_yama_scope_messages() -> None:
    assert yama_denial(None, False, False) is None
    assert yama_denial(0, False, False) is None
    assert yama_denial(1, False, True) is None
    assert yama_denial(1, True, False) is None
    assert "only descendants" in (yama_denial(1, False, False) or "")
    assert "ptrace_scope=0" in (yama_denial(1, False, False) or "")
    assert yama_denial(2, True, False) is None
    assert "only with CAP_SYS_PTRACE" in (yama_denial(2, False, True) or "")
    assert "reboot" in (yama_denial(3, True, True) or "")


def test_permission_messages() -> None:
    args = dict(pid=5, name="svc", target_uids=(1000,) * 4, target_gids=(1000,) * 4,
                dumpable=True, my_uid=1000, my_gid=1000, has_cap=False)  # fmt: skip
    assert permission_denial(**args) is None  # type: ignore[arg-type]
    assert permission_denial(**{**args, "has_cap": True, "my_uid": 7}) is None  # type: ignore[arg-type]
    setuid = permission_denial(**{**args, "target_uids": (1000, 0, 0, 0)})  # type: ignore[arg-type]
    assert setuid is not None and "owned by uid 1000" in setuid
    undumpable = permission_denial(**{**args, "dumpable": False})  # type: ignore[arg-type]
    assert undumpable is not None and "not dumpable" in undumpable
    container = permission_denial(**{**args, "my_uid": 0, "my_gid": 0})  # type: ignore[arg-type]
    assert container is not None and "--cap-add SYS_PTRACE" in container


def test_epoll_rewrite_only_for_infinite_timeouts() -> None:
    from procksm.attach.thread_stop import _interrupted_infinite_epoll

    def regs(nr: int, rax: int, r10: int) -> Registers:
        r = Registers()
        r.orig_rax, r.rax, r.r10 = nr, rax & (2**64 - 1), r10 & (2**64 - 1)
        return r

    assert _interrupted_infinite_epoll(regs(232, -4, -1))  # epoll_wait(..., -1)
    assert _interrupted_infinite_epoll(regs(281, -4, 0xFFFFFFFF))  # int -1 in a 64-bit reg
    assert _interrupted_infinite_epoll(regs(441, -4, 0))  # epoll_pwait2(..., NULL)
    assert not _interrupted_infinite_epoll(regs(232, -4, 1000))  # finite: EINTR stays
    assert not _interrupted_infinite_epoll(regs(441, -4, 0x7FFF0000))
    assert not _interrupted_infinite_epoll(regs(232, -514, -1))  # already restartable
    assert not _interrupted_infinite_epoll(regs(0, -4, -1))  # read: not epoll


def test_parse_status_fixture() -> None:
    text = "Name:\tsvc worker\nState:\tS (sleeping)\nTracerPid:\t0\nUid:\t1 2 3 4\n"
    assert parse_status(text) == {"Name": "svc worker", "State": "S (sleeping)",
                                  "TracerPid": "0", "Uid": "1 2 3 4"}  # fmt: skip


def test_status_of_an_ordinary_target(
    privileged: None, spawn: Callable[..., Target], blockers_exe: Path
) -> None:
    target = start_blockers(spawn, blockers_exe, "--bare")
    status = check_attachable(target.pid)
    assert isinstance(status, AttachStatus)
    assert (status.name, status.uid, status.threads, status.other_namespaces, status.notes) == (
        "blockers",
        0,
        1,
        (),
        (),
    )


# --- stop windows and injected calls on every kind of target (costs: benchmarks/attach_costs.py)


def test_stop_windows_and_injected_calls_leave_every_kind_of_target_intact(
    privileged: None, spawn: Callable[..., Target], blockers_exe: Path
) -> None:
    """Empty stop windows and injected getpid() calls (pinned to the target's CPU and not)
    on a 1-thread, an 8-sleeper and an 8-spinner target: every window is measured, every
    call answers the target's pid, and the target stays clean. What they cost (the
    medians that were asserted here) is a benchmark: benchmarks/attach_costs.py."""
    # One target at a time: 8 spinners on 2 CPUs would slow every other target.
    for args in [(), ("--sleepers", "8"), ("--spinners", "8")]:
        target = start_blockers(spawn, blockers_exe, "--bare", *args)
        with PtraceSession(target.pid) as session:
            for _ in range(20):
                with session.stopped():
                    pass
        assert len(session.pauses) == 20 and all(p > 0 for p in session.pauses)
        if args == ("--sleepers", "8"):
            for pin in (True, False):
                with (
                    PtraceSession(target.pid, pin_cpu=pin) as session,
                    session.stopped() as stopped,
                ):
                    assert {stopped.syscall(SYS_getpid) for _ in range(50)} == {target.pid}
        assert_running_untraced(target.pid)
        assert_no_errors(target)
        target.kill()


EXEC_THEN_MAP = r"""
import ctypes, mmap, os, sys
libc = ctypes.CDLL(None, use_errno=True)
libc.mmap.restype = ctypes.c_void_p
c = ctypes
libc.mmap.argtypes = [c.c_void_p, c.c_size_t, c.c_int, c.c_int, c.c_int, c.c_long]
MAP_FIXED_NOREPLACE = 0x100000
print(f"READY pid={os.getpid()}", flush=True)
for line in sys.stdin:
    cmd, *arg = line.split()
    if cmd == "exec":
        os.execv(sys.executable, [sys.executable, "-c", sys.argv[1], sys.argv[1]])
    elif cmd == "map":
        addr = int(arg[0], 0)
        got = libc.mmap(addr, 3 * mmap.PAGESIZE, 3, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS
                        | MAP_FIXED_NOREPLACE, -1, 0)
        if got == addr:
            ctypes.memset(addr, 0x5A, 3 * mmap.PAGESIZE)
        print("OK" if got == addr else f"FAILED {got} errno {ctypes.get_errno()}", flush=True)
    elif cmd == "check":
        addr = int(arg[0], 0)
        with open("/proc/self/maps") as f:
            spans = [[int(x, 16) for x in l.split()[0].split("-")] for l in f]
        mapped = any(a <= addr < b for a, b in spans)
        ok = mapped and ctypes.string_at(addr, 3 * mmap.PAGESIZE) == b"\x5a" * (3 * mmap.PAGESIZE)
        print("OK" if ok else "GONE", flush=True)
    elif cmd == "replace":  # unmap what is at addr, then map our own memory there
        addr, length = int(arg[0], 0), int(arg[1], 0)
        libc.munmap.argtypes = [c.c_void_p, c.c_size_t]
        if libc.munmap(addr, length) != 0:
            print(f"FAILED munmap errno {ctypes.get_errno()}", flush=True)
            continue
        got = libc.mmap(addr, 3 * mmap.PAGESIZE, 3, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS
                        | MAP_FIXED_NOREPLACE, -1, 0)
        if got == addr:
            ctypes.memset(addr, 0x5A, 3 * mmap.PAGESIZE)
        print("OK" if got == addr else f"FAILED {got} errno {ctypes.get_errno()}", flush=True)
"""


def test_a_renewed_session_never_writes_where_the_target_remapped_its_scratch_area(spawn) -> None:  # type: ignore[no-untyped-def]
    """The daemon keeps a target's session from round to round. If the target unmaps the
    scratch area meanwhile and maps its own memory at that address, the renewed
    session's next window must see the area is gone: a gate written there, or the area
    unmapped at the session's end, would destroy the target's memory."""
    t = spawn([sys.executable, "-c", EXEC_THEN_MAP, EXEC_THEN_MAP])
    with PtraceSession(t.pid) as sess:
        with sess.stopped() as st:
            base = st.scratch() - PAGE  # the area's first page
        assert t.command(f"replace {base:#x} {SCRATCH_BYTES:#x}") == "OK"
        sess.renew()  # the next round
        with sess.stopped() as st:
            st.hold_others()  # writes the gate in the scratch area's first page
            assert st.scratch() - PAGE != base  # a new area, elsewhere
    assert t.command(f"check {base:#x}") == "OK"


def test_a_session_never_unmaps_what_an_exec_put_at_its_scratch_address(spawn) -> None:  # type: ignore[no-untyped-def]
    """A session remembers its scratch area's address between windows (the daemon keeps
    a target's session for the target's life). If the target execs meanwhile, the area
    went with the old address space and the address may now hold the new program's
    memory: ending the session must leave it alone (it unmapped it before)."""
    t = spawn([sys.executable, "-c", EXEC_THEN_MAP, EXEC_THEN_MAP])
    with PtraceSession(t.pid) as sess:
        with sess.stopped() as st:
            base = st.scratch() - PAGE  # the area's first page
        t.proc.stdin.write("exec\n")
        t.proc.stdin.flush()
        assert t.proc.stdout.readline().startswith("READY")  # the new program
        assert t.command(f"map {base:#x}") == "OK"  # its memory where the area was
    assert t.command(f"check {base:#x}") == "OK"


def test_a_dead_procksms_area_is_removed_without_what_the_target_mapped_in_its_span(spawn) -> None:  # type: ignore[no-untyped-def]
    """A procksm killed in a window leaves its scratch area; the next one removes it
    (procksm.attach.scratch.remove_leftovers_in_window). If the target meanwhile unmapped
    the area's end and mapped its own memory there, only the area's own pieces may go:
    one munmap of the whole span would destroy the target's memory."""
    t = spawn([sys.executable, "-c", EXEC_THEN_MAP, EXEC_THEN_MAP])
    with PtraceSession(t.pid) as sess:
        with sess.stopped() as st:
            base = st.scratch() - PAGE
            # as if its owner had died: a pid that is no process's
            st.write_memory(base + OWNER, struct.pack("<QQ", 2**22 + 1, 1))
        tail = base + SCRATCH_BYTES - 3 * PAGE
        assert t.command(f"replace {tail:#x} {3 * PAGE:#x}") == "OK"
    # the ended session saw the area was not its own any more, and left it
    assert f"{base:x}-" in Path(f"/proc/{t.pid}/maps").read_text()
    with PtraceSession(t.pid) as sess, sess.stopped() as st:
        st.scratch()  # the first window removes leftovers, then maps its own area
        assert st.leftovers_removed >= 1
    maps = Path(f"/proc/{t.pid}/maps").read_text()
    assert not any(
        line.startswith(f"{base:x}-") and SCRATCH_PATH in line for line in maps.splitlines()
    )
    assert t.command(f"check {tail:#x}") == "OK"


def _vma(start: int, end: int, name: str = "", inode: int = 0, offset: int = 0) -> QueriedVma:
    return QueriedVma(start, end, "rw-p", inode, name, offset)


def test_dead_area_pieces_are_the_areas_memfd_at_its_place_and_staging_between() -> None:
    base, end, routine = 0x10000, 0x10000 + SCRATCH_BYTES, 0x10000 + ROUTINE_PAGE * PAGE
    head = _vma(base, base + 2 * PAGE, SCRATCH_PATH, 7)
    staging = _vma(base + 2 * PAGE, base + 10 * PAGE)
    rest = _vma(base + 10 * PAGE, routine, SCRATCH_PATH, 7, 10 * PAGE)
    code = _vma(routine, end, SCRATCH_PATH, 7, ROUTINE_OFFSET)
    # whole: one run
    assert dead_area_pieces(base, [head, staging, rest, code]) == [(base, end)]
    # died before the routine's page was mapped: the one mapping
    assert dead_area_pieces(base, [_vma(base, end, SCRATCH_PATH, 7)]) == [(base, end)]
    # the target's memory where the routine was: left alone
    theirs = _vma(routine - PAGE, end)
    rest_cut = _vma(base + 10 * PAGE, routine - PAGE, SCRATCH_PATH, 7, 10 * PAGE)
    got = dead_area_pieces(base, [head, staging, rest_cut, theirs])
    assert got == [(base, routine - PAGE)]
    # anonymous memory after the last piece, or across a gap, is not staging
    assert dead_area_pieces(base, [head, _vma(base + 3 * PAGE, end)]) == [(base, base + 2 * PAGE)]
    assert dead_area_pieces(base, [head, staging]) == [(base, base + 2 * PAGE)]
    # another memfd of that name (other inode) or a piece off its place is not the area's
    other = _vma(base + 10 * PAGE, routine, SCRATCH_PATH, 8, 10 * PAGE)
    moved = _vma(routine, end, SCRATCH_PATH, 7, 0)
    assert dead_area_pieces(base, [head, staging, other, moved]) == [(base, base + 2 * PAGE)]
    # not a head at base: nothing
    assert dead_area_pieces(base, [_vma(base, end, SCRATCH_PATH, 7, PAGE)]) == []


def test_a_target_killed_in_a_window_is_left_for_its_parent_to_reap(
    privileged: None, spawn: Callable[..., Target], blockers_exe: Path
) -> None:
    """SIGKILL of a multi-threaded target while procksm holds its threads stopped (a
    supervisor stopping a service during one of the daemon's windows): procksm collects
    every thread's exit, the leader's last (the kernel reports a traced leader's exit
    only once the other threads are collected), so the target's parent can reap it while
    procksm lives on. Before, procksm gave up on the leader after 0.2 s, before its other
    threads were collected, and the leader stayed a zombie traced by procksm: the
    parent's wait hung until procksm exited (a CI run: a redis-server's)."""
    target = spawn([blockers_exe])
    pid = target.pid
    wait_blocked(pid, {"b-read", "b-futex", "b-sleep", "b-poll"})
    ready_r, ready_w = os.pipe()
    tracer = os.fork()
    if tracer == 0:  # pragma: no cover - the procksm that lives on
        try:
            session = PtraceSession(pid)
            with session, contextlib.suppress(ProcksmError), session.stopped():
                os.kill(pid, signal.SIGKILL)
                time.sleep(0.1)  # every thread killed while stopped
            os.write(ready_w, b"x")
            time.sleep(30)
        finally:
            os._exit(0)
    try:
        assert os.read(ready_r, 1) == b"x"  # the session has ended; its process lives on
        status = Path(f"/proc/{pid}/status")
        tracer_line = (
            next((ln for ln in status.read_text().splitlines() if ln.startswith("TracerPid:")), "")
            if status.exists()
            else ""
        )
        assert tracer_line.split()[-1:] != [str(tracer)], "the zombie is still procksm's"
        assert target.proc.wait(timeout=5) == -signal.SIGKILL  # reaped by its parent
    finally:
        os.kill(tracer, signal.SIGKILL)
        os.waitpid(tracer, 0)
        os.close(ready_r)
        os.close(ready_w)
