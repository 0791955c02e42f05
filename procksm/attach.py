"""Attaching to a target: stopping all threads, injecting system calls, resuming.

The generic sequence, as CRIU's compel/src/lib/infect.c: seize and stop every thread
(:class:`PtraceSession`), inject system calls through kill-safe frames and the futex gate
(:class:`StoppedTarget`), resume. Around it: why attaching would fail is
:mod:`procksm.diagnose` (run before anything is touched), the raw ptrace calls are
:mod:`procksm.inject`, what is x86_64's (registers, syscall numbers, the frames' layout)
is :mod:`procksm.arch.x86_64`, and what a killed procksm left is :mod:`procksm.leftovers`.

docs/design.md §2.5, §2.7, §2.8, §3.10. The rules this module keeps:

* Threads are taken with PTRACE_SEIZE and stopped with PTRACE_INTERRUPT, never with
  SIGSTOP or PTRACE_ATTACH: if procksm dies, the kernel detaches and the target runs on.
* A target is traced only inside a :meth:`PtraceSession.stopped` window. Between windows
  it is fully detached, because a traced thread that receives any signal sits in a
  signal-delivery-stop until its tracer restarts it: holding a target across a
  seconds-long scan would freeze every thread that gets a SIGCHLD, a timer signal or a
  runtime's preemption signal (Go's SIGURG, JVM safepoints). Re-seizing costs a few
  microseconds per thread and is included in the measured pauses.
* Every instant is safe to die at (procksm.arch.x86_64, docs/kill-safety.md): before a
  thread runs an injected call, a frame of its own state (registers, XSAVE state, signal
  mask) is written on its stack, and the call returns through it (`syscall; ret` into
  the target's sigreturn trampoline), so a thread released by the kernel when procksm
  dies runs at most that call and returns to its own state by itself. Before a
  replacement, the other threads are gated on a futex that the injecting thread's frames
  wake (:meth:`StoppedTarget.hold_others`): none runs its own code before the
  replacement is done. SIGINT, SIGTERM, SIGHUP and SIGQUIT are blocked in the calling
  thread for the whole window and take effect right after it.
* Restart of interrupted system calls is left to the kernel. Measured here (kernel 6.18):
  after PTRACE_INTERRUPT a thread blocked in read/futex/nanosleep/poll/select/accept/
  pause shows rax = -512..-516; on PTRACE_DETACH the kernel sets TIF_SIGPENDING
  (``__ptrace_unlink`` → ``ptrace_signal_wake_up``) so the thread goes through
  ``arch_do_signal_or_restart`` and the restart fix-up (rax = orig_rax or
  restart_syscall, rip -= 2) is applied — also when detaching from the stop that ends an
  injected syscall, provided the original registers were put back. Resuming with
  PTRACE_CONT from that stop instead skips the fix-up (read() then returns errno 512,
  docs/design.md §2.7): that is why windows end with PTRACE_DETACH. Applying the fix-up by
  hand would also be wrong when a real signal arrives just before the resume (it would
  turn its EINTR into a restart); the kernel decides with the signal in hand.
* epoll_wait is the exception: the kernel returns plain -EINTR (not a restart code) when
  a tracer interrupts it, so the application would see EINTR with no signal sent. For an
  infinite timeout procksm rewrites that rax to -ERESTARTNOHAND at the stop: the kernel
  then restarts the call, or still returns EINTR if a real signal's handler runs —
  exactly the semantics of a restartable call. A finite timeout is left alone (the
  restart would not shorten the timeout; EINTR is documented and event loops recompute
  their timeout on it).
* Signals are never swallowed: a signal-delivery-stop met while waiting for a thread to
  stop is resumed at once with its signal; while a thread holds procksm's registers all
  its signals are blocked (PTRACE_SETSIGMASK) and stay pending until its own mask is
  back; one that still stops it (SIGSTOP) is held and re-sent when the window ends.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import signal
import struct
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from types import TracebackType

from procksm import PAGE_SIZE, procfs, seccomp_bpf
from procksm.arch import x86_64
from procksm.arch.x86_64 import (
    ARGUMENT_REGISTERS as _ARGUMENT_REGISTERS,
)
from procksm.arch.x86_64 import (
    ERESTARTNOHAND,
    MADV_DONTNEED,
    MADV_POPULATE_READ,
    MAP_ANONYMOUS,
    MAP_FIXED,
    MAP_PRIVATE,
    MFD_CLOEXEC,
    PROT_READ,
    PROT_WRITE,
    SYSCALL_RET,
    Registers,
    SYS_bind,
    SYS_close,
    SYS_epoll_pwait,
    SYS_epoll_pwait2,
    SYS_epoll_wait,
    SYS_ftruncate,
    SYS_futex,
    SYS_madvise,
    SYS_memfd_create,
    SYS_mmap,
    SYS_mprotect,
    SYS_mremap,
    SYS_munmap,
    SYS_pidfd_getfd,
    SYS_pidfd_open,
    SYS_prctl,
    SYS_recvmsg,
    SYS_restart_syscall,
    SYS_rt_sigreturn,
    SYS_seccomp,
    SYS_socket,
    signed,
    unsigned,
)
from procksm.diagnose import AttachStatus, check_attachable
from procksm.diagnose import process_name as _comm
from procksm.errors import (
    AccessDenied,
    NoSuchProcess,
    ProcksmError,
    PtraceError,
    PtraceTimeout,
    Unsupported,
)
from procksm.inject import (
    PTRACE_CONT,
    PTRACE_DETACH,
    PTRACE_INTERRUPT,
    PTRACE_O_TRACECLONE,
    PTRACE_O_TRACEEXEC,
    PTRACE_O_TRACESYSGOOD,
    PTRACE_SEIZE,
    PTRACE_SYSCALL,
    Backoff,
    Gadgets,
    Stop,
    StopKind,
    find_gadgets,
    get_event_msg,
    get_regs,
    get_rseq_area,
    get_siginfo,
    get_sigmask,
    get_xstate,
    poll_stop,
    ptrace,
    read_memory,
    set_regs,
    set_siginfo,
    set_sigmask,
    tgkill,
    wait_stop,
    write_memory,
)
from procksm.locks import WindowLock
from procksm.procfs import live_threads as _live_threads
from procksm.procfs import read_stat_fields, read_status_fields
from procksm.procfs import thread_state as _thread_state

# The scratch area procksm maps in a target: a MAP_PRIVATE mapping of a memfd the target
# creates itself, so that every step of its life leaves something a later procksm can
# recognise by name and remove (an fd, then a mapping named /memfd:procksm-scratch),
# never an anonymous mapping nobody can tell from the target's own.
#   page 0   control: the futex gate, its timeout, the owner (pid, start time)
#   page 1   arguments of injected calls (StoppedTarget.scratch())
#   pages 2..2+STAGING_PAGES  staging: an unmerge builds the new anonymous pages here,
#            then moves them over the merged range in one mremap (procksm.merge)
#   last     a tail page that keeps the staging range between two pieces of the memfd
#            mapping, so a leftover staging mapping is recognisable as procksm's
SCRATCH_NAME = b"procksm-scratch\0"
SCRATCH_PATH = "/memfd:procksm-scratch (deleted)"
STAGING_PAGES = 512
SCRATCH_PAGES = 3 + STAGING_PAGES
SCRATCH_BYTES = SCRATCH_PAGES * PAGE_SIZE
_GATE, _GATE_TIMEOUT, _OWNER = 0, 16, 32  # offsets in page 0 (owner: pid, start time)
# How long a gated thread waits for the injecting thread's wake-up after procksm died.
# The wake-up comes within microseconds (the injecting thread is released at the same
# instant); the timeout only bounds a wait if it never came.
GATE_TIMEOUT_S = 10
FUTEX_WAIT_PRIVATE = 0 | 128
FUTEX_WAKE_OP_PRIVATE = 5 | 128
# FUTEX_OP(FUTEX_OP_SET, 1, FUTEX_OP_CMP_EQ, 0): *gate = 1, atomically with the wake-up,
# so a thread that reaches its wait only afterwards does not wait (EAGAIN).
FUTEX_OP_SET_1 = 1 << 12
ALL_SIGNALS = (1 << 64) - 1  # the kernel keeps SIGKILL and SIGSTOP deliverable
_ARGUMENT_ROOM = 256  # bytes of dead stack below a thread's frames, for a string
# undo frames a window may stack (StoppedTarget.undo_on_death): an extent's advice, up to
# three (procfs.REAPPLIED_VMFLAGS: THP, readahead, dump), or a hand-over's two
MAX_UNDO = 3
# What a procksm leaves in a target only while a window runs (procksm.merge): fds of the
# scratch memfd and of segments. (Unnamed fds it creates are undone on death instead.)
LEFTOVER_MEMFD_PREFIX = "/memfd:procksm-"

SEIZE_OPTIONS = PTRACE_O_TRACESYSGOOD | PTRACE_O_TRACECLONE | PTRACE_O_TRACEEXEC
# Never PTRACE_O_EXITKILL: procksm dying must not kill its targets.

# Signals that would end or interrupt procksm in the middle of a window; held back while
# threads are stopped and delivered when they run again (the window is milliseconds).
# The stop signals too: a Ctrl-Z (or a background write to the terminal) in a window would
# stop procksm with every target thread held, for as long as procksm stays stopped.
_DEFERRED_SIGNALS = {
    signal.SIGINT,
    signal.SIGTERM,
    signal.SIGHUP,
    signal.SIGQUIT,
    signal.SIGTSTP,
    signal.SIGTTIN,
    signal.SIGTTOU,
}


# /proc/PID/status parsing lives in procksm.procfs (one place for /proc, like psutil).
_read_status = read_status_fields


def _own_start_time() -> int:
    return int(read_stat_fields(os.getpid())[19])


def _alive(pid: int, start_time: int) -> bool:
    """Process `pid` runs and is the one that started at `start_time` (a zombie does not
    run: a killed procksm stays one until its parent reaps it)."""
    try:
        fields = read_stat_fields(pid)
        return fields[0] not in ("Z", "X") and int(fields[19]) == start_time
    except (ProcksmError, OSError, IndexError, ValueError):
        return False


PTRACE_SECCOMP_GET_FILTER = 0x420C


def _seccomp_filters(tid: int) -> list[bytes]:
    """The thread's seccomp filters as classic BPF, newest first (root only)."""
    filters: list[bytes] = []
    for index in range(512):
        try:
            count = ptrace(PTRACE_SECCOMP_GET_FILTER, tid, index, 0)
            buf = ctypes.create_string_buffer(8 * count)
            ptrace(PTRACE_SECCOMP_GET_FILTER, tid, index, ctypes.addressof(buf))
        except OSError as e:
            if e.errno == errno.ENOENT:
                return filters  # past the oldest filter
            raise PtraceError(
                f"cannot read the seccomp filters of thread {tid} ({e.strerror}): procksm "
                "checks them before it injects anything (needs CAP_SYS_ADMIN)"
            ) from None
        filters.append(buf.raw)
    return filters


# (name, number, arguments like procksm's, essential): what a seccomp filter is asked.
# Not essential: calls procksm does without when they fail (the pidfd hand-over falls
# back to SCM_RIGHTS, the guard's refusal is reported); killing or trapping still counts.
_RW, _PRIV, _FIX, _ANON = PROT_READ | PROT_WRITE, MAP_PRIVATE, MAP_FIXED, MAP_ANONYMOUS
_INJECTED_CALLS: tuple[tuple[str, int, tuple[int, ...], bool], ...] = (
    ("memfd_create", SYS_memfd_create, (0, MFD_CLOEXEC), True),
    ("ftruncate", SYS_ftruncate, (3, 2 * PAGE_SIZE), True),
    ("mmap", SYS_mmap, (0, SCRATCH_BYTES, _RW, _PRIV, 3, 0), True),
    ("mmap", SYS_mmap, (1 << 30, PAGE_SIZE, _RW, _PRIV | _FIX, 3, 0), True),
    ("mmap", SYS_mmap, (1 << 30, PAGE_SIZE, _RW, _PRIV | _FIX | _ANON, (1 << 64) - 1, 0), True),
    ("mprotect", SYS_mprotect, (1 << 30, PAGE_SIZE, PROT_READ), True),
    ("mremap", SYS_mremap, (1 << 30, PAGE_SIZE, PAGE_SIZE, 7, 1 << 31), True),
    ("munmap", SYS_munmap, (1 << 30, PAGE_SIZE), True),
    ("madvise", SYS_madvise, (1 << 30, PAGE_SIZE, MADV_DONTNEED), True),
    ("madvise", SYS_madvise, (1 << 30, PAGE_SIZE, MADV_POPULATE_READ), True),
    ("close", SYS_close, (3,), True),
    (
        "futex",
        SYS_futex,
        (1 << 30, FUTEX_WAKE_OP_PRIVATE, 0x7FFFFFFF, 0, 1 << 30, FUTEX_OP_SET_1),
        True,
    ),
    ("rt_sigreturn", SYS_rt_sigreturn, (), True),
    ("pidfd_open", SYS_pidfd_open, (1, 0), False),
    ("pidfd_getfd", SYS_pidfd_getfd, (3, 3, 0), False),
    ("socket", SYS_socket, (1, 2 | 0o2000000, 0), False),  # AF_UNIX, SOCK_DGRAM|SOCK_CLOEXEC
    ("bind", SYS_bind, (3, 1 << 30, 40), False),
    ("recvmsg", SYS_recvmsg, (3, 1 << 30, 0), False),
    ("seccomp", SYS_seccomp, (1, 0, 1 << 30), False),
    ("prctl", SYS_prctl, (38, 1, 0, 0, 0), False),  # PR_SET_NO_NEW_PRIVS
)
_GATED_CALLS: tuple[tuple[str, int, tuple[int, ...], bool], ...] = (
    ("futex", SYS_futex, (1 << 30, FUTEX_WAIT_PRIVATE, 0, 1 << 30), True),
    ("rt_sigreturn", SYS_rt_sigreturn, (), True),
)


# --- the session -----------------------------------------------------------------------


class InjectedSyscallError(PtraceError):
    """An injected system call returned an error in the target."""

    def __init__(self, pid: int, name: str, err: int) -> None:
        super().__init__(
            f"injected {name} in pid {pid} failed: "
            f"{errno.errorcode.get(err, str(err))} ({os.strerror(err)})"
        )
        self.pid = pid
        self.errno = err


@dataclass
class _Tracee:
    tid: int
    stop: Stop | None = None  # the ptrace stop it is held in; None while it still runs
    saved: Registers | None = None  # its own registers, read when it stopped
    dirty: bool = False  # registers changed (only true inside an injection)
    held_signals: list[bytes] = field(default_factory=list)  # siginfo, re-sent at resume
    # Kill safety (procksm.arch.x86_64): once armed, the thread's own state is in a frame
    # on its stack, and whatever registers it holds lead back to that frame.
    sigmask: int | None = None  # its own signal mask, while procksm has blocked all
    chain: int = 0  # rsp for an injected call: the frame its `ret` returns through
    own_frame: int = 0  # where the frame of its own state is


# A hidden test switch (tests/test_kill_steps.py): SIGKILL this process right after the
# N-th step that changes a target, and log each step's kind to a file. Steps are the
# points where a target's state changes: register, mask and memory writes, resumes.
# PROCKSM_TEST_KILL_FILE: the same, N read from that file at each step, counted from the
# file's creation, and the file removed at the kill: for processes started by others
# (the guard's unmerge helper) whose successor must not die too.
_KILL_AT_STEP = int(os.environ.get("PROCKSM_TEST_KILL_AT_STEP") or 0)
_STEP_LOG = os.environ.get("PROCKSM_TEST_STEP_LOG")
_KILL_FILE = os.environ.get("PROCKSM_TEST_KILL_FILE")
_steps = 0
_file_steps: dict[float, int] = {}  # steps since the kill file (by its mtime) appeared


def _step(kind: str, tid: int = 0) -> None:
    global _steps
    if not (_KILL_AT_STEP or _STEP_LOG or _KILL_FILE):
        return
    _steps += 1
    if _STEP_LOG:
        with open(_STEP_LOG, "a") as log:
            log.write(f"{_steps} {kind} {tid}\n")
    if _steps == _KILL_AT_STEP:
        os.kill(os.getpid(), signal.SIGKILL)
    if _KILL_FILE:
        try:
            stamp = os.stat(_KILL_FILE).st_mtime
            with open(_KILL_FILE) as f:
                at = int(f.read() or 0)
        except (OSError, ValueError):
            return
        _file_steps[stamp] = _file_steps.get(stamp, 0) + 1
        if _file_steps[stamp] == at:
            os.unlink(_KILL_FILE)
            os.kill(os.getpid(), signal.SIGKILL)


@contextlib.contextmanager
def _signals_deferred() -> Iterator[None]:
    """Block SIGINT/SIGTERM/... in this thread; pending ones arrive when unblocked."""
    old = signal.pthread_sigmask(signal.SIG_BLOCK, _DEFERRED_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


class PtraceSession:
    """A target process, attached to inside :meth:`stopped` windows.

    Usage::

        with PtraceSession(pid) as session:
            with session.stopped() as target:
                target.syscall(SYS_madvise, addr, length, MADV_DONTNEED)

    A window must be used from the thread that opened it (ptrace binds a tracee to the
    tracer thread). `threads` lists the threads stopped in the last window; `pauses`
    the wall time of each window, from the first PTRACE_INTERRUPT to the last detach.
    """

    def __init__(self, pid: int, *, timeout: float = 2.0, pin_cpu: bool = True) -> None:
        self.pid = pid
        self.timeout = timeout
        # Injecting from the CPU the stopped thread last ran on makes each wake-up local
        # instead of a cross-CPU IPI (docs/design.md §2.8); measured in tests/test_attach.py.
        self.pin_cpu = pin_cpu
        self.threads: list[int] = []
        self.pauses: list[float] = []
        self.status: AttachStatus | None = None
        self.exec_seen = False  # the target ran execve() while we were attached
        self.signals_held = 0  # signals that arrived during an injection and were re-sent
        self._window: StoppedTarget | None = None
        self._orphans: set[int] = set()  # seized threads that had not stopped by the timeout
        # /proc/PID/task/TID/mem, opened once: the open file pins the address space it was
        # opened on, so reading from it fails once the process has exec'd another program
        # (between windows we are not attached and get no PTRACE_EVENT_EXEC).
        self._mem_fd: int | None = None
        self._syscall_insn = 0
        self._gadgets = Gadgets(0, 0)
        self._scratch: int | None = None  # page 0 of the scratch area (SCRATCH_PAGES)
        self._window_lock: WindowLock | None = None
        self._injector: int | None = None  # the thread whose frames wake the gate
        self._filters_checked = False  # the target's seccomp filters allow our calls

    # context manager

    def __enter__(self) -> PtraceSession:
        self.status = check_attachable(self.pid)
        self._open_address_space(self.pid)
        self._window_lock = WindowLock(self.pid)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            if self._scratch is not None and self._window is None:
                self._unmap_scratch(raise_errors=exc_type is None)
        finally:
            try:
                self._release_orphans(time.monotonic() + self.timeout)
            finally:
                if self._mem_fd is not None:
                    os.close(self._mem_fd)
                    self._mem_fd = None
                if self._window_lock is not None:
                    self._window_lock.close()
                    self._window_lock = None

    @property
    def scratch_address(self) -> int | None:
        """The scratch page mapped in the target (exclude it from scans), if any."""
        return self._scratch

    @contextlib.contextmanager
    def stopped(self) -> Iterator[StoppedTarget]:
        """Stop every thread of the target; resume (detach) all of them on exit."""
        if self._window is not None:
            raise PtraceError("stopped() windows do not nest")
        tracees: dict[int, _Tracee] = {tid: _Tracee(tid) for tid in self._orphans}
        self._orphans.clear()
        saved_affinity = os.sched_getaffinity(0)
        lock = self._window_lock
        with _signals_deferred():
            if lock is not None:
                # one tracer at a time: the madvise guard may be in a window of its own
                lock.acquire(self.timeout)
            started = time.perf_counter()
            target: StoppedTarget | None = None
            try:
                self._check_same_process()
                self._stop_all(tracees)
                target = StoppedTarget(self, tracees)
                self._check_address_space(target._memory_tid())
                self._window = target
                self.threads = sorted(tracees)
                _step("stopped")
                yield target
            finally:
                self._window = None
                try:
                    abandoned = target is not None and target.abandoned is not None
                    self._resume_all(tracees, as_is=abandoned)
                finally:
                    self.pauses.append(time.perf_counter() - started)
                    if lock is not None:
                        lock.release()
                    if os.sched_getaffinity(0) != saved_affinity:
                        os.sched_setaffinity(0, saved_affinity)

    # stopping

    def _check_same_process(self) -> None:
        if self.status is None:
            raise PtraceError("PtraceSession used outside its `with` block")
        try:
            start_time = int(read_stat_fields(self.pid)[19])
        except (ProcksmError, OSError, IndexError):
            raise NoSuchProcess(self.pid, f"process {self.pid} has exited") from None
        if start_time != self.status.start_time:
            raise NoSuchProcess(
                self.pid, f"process {self.pid} has exited (its pid now belongs to another one)"
            )

    def _open_address_space(self, tid: int) -> None:
        """Open the target's memory and find a syscall instruction in it."""
        if _thread_state(self.pid, tid) in (None, "Z", "X"):
            live = _live_threads(self.pid)
            if not live:
                raise NoSuchProcess(self.pid, f"process {self.pid} has exited")
            tid = live[0]
        try:
            fd = procfs.open_mem(self.pid, tid)
        except NoSuchProcess:
            raise NoSuchProcess(self.pid, f"process {self.pid} has exited") from None
        try:
            gadgets = find_gadgets(self.pid, tid, fd)
        except NoSuchProcess:
            os.close(fd)
            raise NoSuchProcess(self.pid, f"process {self.pid} has exited") from None
        except ProcksmError:
            os.close(fd)
            raise
        except OSError as e:
            os.close(fd)
            raise PtraceError(f"pid {self.pid}: {e}") from None
        if gadgets is None:
            os.close(fd)
            raise Unsupported(
                f"pid {self.pid} ({_comm(self.pid)}): no `syscall; ret` and sigreturn "
                "trampoline in its libraries (a static binary?): procksm injects only where "
                "a killed procksm leaves every thread a way back to its own state"
            )
        self._gadgets = gadgets
        self._syscall_insn = gadgets.syscall
        if self._mem_fd is not None:
            os.close(self._mem_fd)
        self._mem_fd = fd

    def _check_address_space(self, tid: int) -> None:
        """Notice an exec since the last window: then start over with the new program."""
        assert self._mem_fd is not None
        try:
            same = os.pread(self._mem_fd, 3, self._syscall_insn) == SYSCALL_RET
        except OSError:
            same = False
        if not same:
            self.exec_seen = True
            self._scratch = None  # it vanished with the old address space
            self._open_address_space(tid)

    def _list_tasks(self) -> list[int]:
        try:
            return procfs.list_threads(self.pid)
        except NoSuchProcess:
            return []

    def _stop_all(self, tracees: dict[int, _Tracee]) -> None:
        deadline = time.monotonic() + self.timeout
        tracer = threading.get_native_id()
        ignored: set[int] = set()  # zombie threads: cannot be seized, need nothing

        def attach_new() -> bool:
            # Re-list until stable: threads cloned by a thread before we seized it show up
            # only in the next listing. Clones made after the seize are auto-attached
            # (PTRACE_O_TRACECLONE) and reported by their parent's CLONE event.
            found = False
            while True:
                new = [t for t in self._list_tasks() if t not in tracees and t not in ignored]
                if not new:
                    return found
                found = True
                for tid in new:
                    self._seize(tid, tracer, tracees, ignored)

        attach_new()
        backoff = Backoff()
        while True:
            running = [t for t in tracees.values() if t.stop is None]
            if not running:
                if not attach_new():
                    break
                continue
            progressed = False
            for tracee in running:
                stop = poll_stop(tracee.tid)
                if stop is not None:
                    progressed = True
                    self._on_stop(tracee, stop, tracees)
            if not tracees:
                break
            if time.monotonic() >= deadline:
                raise self._timeout_error([t.tid for t in tracees.values() if t.stop is None])
            if progressed:
                backoff = Backoff()
            else:
                backoff.pause()
        if not tracees:
            raise NoSuchProcess(self.pid, f"process {self.pid} exited while being stopped")

    def _seize(self, tid: int, tracer: int, tracees: dict[int, _Tracee], ignored: set[int]) -> None:
        try:
            ptrace(PTRACE_SEIZE, tid, 0, SEIZE_OPTIONS)
        except OSError as e:
            if e.errno == errno.ESRCH:
                ignored.add(tid)  # exited since the listing
                return
            if e.errno != errno.EPERM:
                raise PtraceError(f"PTRACE_SEIZE of thread {tid} of pid {self.pid}: {e}") from None
            try:
                tracer_of_tid = int(_read_status(self.pid, tid).get("TracerPid", "0"))
            except (ProcksmError, OSError):
                ignored.add(tid)  # the thread is gone
                return
            if tracer_of_tid == tracer:
                # Auto-attached clone (or a thread left over from a timed-out window): it
                # reports a PTRACE_EVENT_STOP by itself.
                tracees[tid] = _Tracee(tid)
                return
            if _thread_state(self.pid, tid) in (None, "Z", "X"):
                ignored.add(tid)  # an exited thread (e.g. a leader that called pthread_exit)
                return
            # Re-run the diagnosis for a precise message; if it finds nothing, say what we know.
            check_attachable(self.pid)
            raise AccessDenied(
                self.pid,
                f"PTRACE_SEIZE of pid {self.pid} was refused (EPERM) although uids and "
                "capabilities allow it: a security module (SELinux, AppArmor, Yama) forbids it",
            ) from None
        tracees[tid] = _Tracee(tid)
        try:
            ptrace(PTRACE_INTERRUPT, tid)
        except OSError as e:
            if e.errno != errno.ESRCH:
                raise PtraceError(f"PTRACE_INTERRUPT of thread {tid}: {e}") from None

    def _on_stop(self, tracee: _Tracee, stop: Stop, tracees: dict[int, _Tracee]) -> None:
        tid = tracee.tid
        kind = stop.kind
        if kind is StopKind.EXITED:
            del tracees[tid]
            return
        if kind in (StopKind.INTERRUPT, StopKind.GROUP_STOP):
            tracee.stop = stop
            # Now, not after all threads stopped: the epoll fix-up must also be in place
            # if this window times out and resumes the thread without injecting.
            self._save_registers(tracee)
            return
        # Any other stop (an event, a signal) is not a place to hold a thread: a CLONE or
        # EXEC stop is in the middle of its syscall, whose return value would overwrite
        # injected registers. And every ptrace stop clears a pending PTRACE_INTERRUPT
        # (ptrace_stop: "any trap clears pending STOP trap"; measured: a thread cloning
        # in a loop never stopped). So interrupt again, then let it go on: it stops in
        # a PTRACE_EVENT_STOP on its way back to user space.
        sig = 0
        if kind is StopKind.CLONE:
            child = get_event_msg(tid)
            tracees.setdefault(child, _Tracee(child))
        elif kind is StopKind.EXEC:
            # The process runs a new program; other threads are gone (their exits are
            # reported) and the execing thread now has the leader's tid.
            # _check_address_space then reopens the new program's memory.
            self.exec_seen = True
            former = get_event_msg(tid)
            if former != tid:
                tracees.pop(former, None)
        elif kind is StopKind.SIGNAL:
            # Deliver it now: the kernel sets up the handler frame, then the new
            # interrupt stops the thread before the handler runs.
            sig = stop.sig
        self._restart(tid, PTRACE_INTERRUPT, 0)
        self._restart(tid, PTRACE_CONT, sig)

    def _restart(self, tid: int, request: int, sig: int) -> None:
        try:
            ptrace(request, tid, 0, sig)
        except OSError as e:
            if e.errno != errno.ESRCH:  # ESRCH: killed meanwhile; its exit is reported next
                raise PtraceError(f"restarting thread {tid} of pid {self.pid}: {e}") from None

    def _save_registers(self, tracee: _Tracee) -> None:
        try:
            regs = get_regs(tracee.tid)
        except OSError as e:
            if e.errno == errno.ESRCH:
                return  # SIGKILLed while stopped; _resume_all reaps it
            raise PtraceError(f"PTRACE_GETREGS of thread {tracee.tid}: {e}") from None
        if _interrupted_infinite_epoll(regs):
            regs.rax = unsigned(-ERESTARTNOHAND)
            set_regs(tracee.tid, regs)
        tracee.saved = regs

    def _timeout_error(self, tids: list[int]) -> PtraceTimeout:
        parts = []
        states = set()
        for tid in tids[:4]:
            state = _thread_state(self.pid, tid)
            states.add(state)
            try:
                wchan = procfs.read_wchan(self.pid, tid)
            except (ProcksmError, OSError):
                wchan = "?"
            nr = procfs.read_thread_syscall(self.pid, tid)
            within = f", in {x86_64.syscall_name(nr)}" if nr is not None else ""
            parts.append(f"tid {tid} ({_comm(tid)}, state {state}, wchan {wchan}{within})")
        # D: a sleep nothing interrupts; R: runnable threads that got no CPU in time
        if states == {"R"}:
            why = "runnable, not scheduled in time: an overloaded machine?"
        else:
            why = "uninterruptible sleep?"
        return PtraceTimeout(
            f"{len(tids)} thread(s) of pid {self.pid} did not stop within {self.timeout:g} s "
            f"({why}): {', '.join(parts)}; the others were resumed"
        )

    # resuming

    def _resume_all(self, tracees: dict[int, _Tracee], *, as_is: bool = False) -> None:
        """Detach every stopped thread with its own state back (mask first, registers
        second), the injecting thread last; threads that have not stopped become orphans.

        `as_is`: an injected call was abandoned still running (StoppedTarget._abandon).
        Every thread is then detached as procksm's death would leave it: its registers
        and mask lead through its frames (a gated thread waits until the running call
        and the wake-up after it are done), so no thread runs its own code before a
        replacement in flight has finished (issue 13's "no lost write").
        """
        failures = []
        # The injecting thread last: while any other thread may still wait at the gate,
        # the injecting thread's frames still hold the gate's wake-up.
        injector = self._injector
        self._injector = None
        for tracee in sorted(tracees.values(), key=lambda t: t.tid == injector):
            if tracee.stop is None:
                # Seized but not stopped yet: it can only be detached once it stops.
                self._orphans.add(tracee.tid)
                continue
            try:
                if as_is:
                    ptrace(PTRACE_DETACH, tracee.tid, 0, 0)
                    _step("detach", tracee.tid)
                    continue
                # Mask first, registers second: in between, the thread's registers
                # still lead through its frames, which restore the same mask.
                if tracee.sigmask is not None:
                    set_sigmask(tracee.tid, tracee.sigmask)
                    _step("unblock", tracee.tid)
                    tracee.sigmask = None
                if tracee.dirty and tracee.saved is not None:
                    set_regs(tracee.tid, tracee.saved)
                    _step("restore", tracee.tid)
                    tracee.dirty = False
                tracee.chain = 0
                if tracee.held_signals:
                    self._redeliver(tracee)
                else:
                    ptrace(PTRACE_DETACH, tracee.tid, 0, 0)
                    _step("detach", tracee.tid)
            except OSError as e:
                if e.errno == errno.ESRCH:
                    self._reap(tracee.tid)  # killed while stopped: collect its exit
                else:
                    failures.append(f"thread {tracee.tid}: {e}")
        if failures:
            raise PtraceError(f"could not resume pid {self.pid}: {'; '.join(failures)}")

    def _redeliver(self, tracee: _Tracee) -> None:
        """Re-send signals held during injections, each with its original siginfo.

        tgkill queues the signal again; at its signal-delivery-stop PTRACE_SETSIGINFO
        puts back the original siginfo and the restart delivers it, with the thread's own
        registers in place, so the kernel's restart/EINTR decision is the normal one.
        """
        tid = tracee.tid
        held = list(tracee.held_signals)
        tracee.held_signals.clear()
        for info in held:
            tgkill(self.pid, tid, int.from_bytes(info[0:4], "little"))
        ptrace(PTRACE_CONT, tid, 0, 0)
        deadline = time.monotonic() + self.timeout
        while True:
            stop = wait_stop(tid, deadline)
            if stop is None:
                self._orphans.add(tid)
                return
            if stop.kind is StopKind.EXITED:
                return
            sig = 0
            if stop.kind is StopKind.SIGNAL:
                sig = stop.sig
                match = next((i for i in held if int.from_bytes(i[0:4], "little") == sig), None)
                if match is not None:
                    set_siginfo(tid, match)
                    held.remove(match)
            if not held:
                ptrace(PTRACE_DETACH, tid, 0, sig)
                return
            ptrace(PTRACE_CONT, tid, 0, sig)

    def _reap(self, tid: int) -> None:
        wait_stop(tid, time.monotonic() + 0.2)

    def _release_orphans(self, deadline: float) -> None:
        """Detach threads left seized by a timed-out window, once they stop.

        While an orphan runs it may clone: its children are auto-attached to us too and
        must be detached as well, or they would wait in their first stop forever.
        """
        pending = set(self._orphans)
        backoff = Backoff()
        while pending and time.monotonic() < deadline:
            progressed = False
            for tid in sorted(pending):
                stop = poll_stop(tid)
                if stop is None:
                    continue
                progressed = True
                pending.discard(tid)
                if stop.kind is StopKind.EXITED:
                    continue
                with contextlib.suppress(OSError):
                    if stop.kind is StopKind.CLONE:
                        pending.add(get_event_msg(tid))
                    ptrace(PTRACE_DETACH, tid, 0, stop.sig if stop.kind is StopKind.SIGNAL else 0)
            if progressed:
                backoff = Backoff()
            else:
                backoff.pause()
        # Still running: the kernel detaches them when procksm exits.
        self._orphans = pending

    # helpers for StoppedTarget

    def _unmap_scratch(self, *, raise_errors: bool) -> None:
        scratch, self._scratch = self._scratch, None
        try:
            with self.stopped() as target:
                target.syscall(SYS_munmap, scratch or 0, SCRATCH_BYTES)
        except NoSuchProcess:
            pass
        except ProcksmError:
            if raise_errors:
                raise


def _interrupted_infinite_epoll(regs: Registers) -> bool:
    """A thread stopped in epoll_wait(timeout -1) that the kernel answered with -EINTR."""
    if signed(regs.rax) != -errno.EINTR:
        return False
    if regs.orig_rax in (SYS_epoll_wait, SYS_epoll_pwait):
        return ctypes.c_int32(regs.r10 & 0xFFFFFFFF).value < 0  # timeout (int) < 0: forever
    if regs.orig_rax == SYS_epoll_pwait2:
        return regs.r10 == 0  # NULL timespec: forever
    return False


class StoppedTarget:
    """All threads of the target, held in ptrace stops for the length of a window."""

    def __init__(self, session: PtraceSession, tracees: dict[int, _Tracee]) -> None:
        self._session = session
        self._tracees = tracees
        self.pid = session.pid
        self._pinned = False
        self._gated = False
        self._injector_tid: int | None = None
        self._own_masks: dict[int, int] = {}
        self._undo: list[int] = []  # chain starts under the undo frames pushed
        self.leftovers_removed = 0  # fds and mappings of a killed procksm, removed
        # Why this window ended early with an injected call still running (_abandon):
        # then nothing more is injected, and the window ends as procksm's death would.
        self.abandoned: str | None = None

    @property
    def threads(self) -> list[int]:
        return sorted(self._tracees)

    @property
    def group_stopped(self) -> bool:
        """The process is in a job-control stop (SIGSTOP); it stays stopped after the window."""
        return any(
            t.stop is not None and t.stop.kind is StopKind.GROUP_STOP
            for t in self._tracees.values()
        )

    def saved_registers(self, tid: int | None = None) -> Registers:
        """The registers the thread had when it stopped (what it gets back at resume)."""
        saved = self._tracee(tid).saved
        if saved is None:
            raise PtraceError(f"thread {tid} has no saved registers")
        return saved.copy()

    def registers(self, tid: int | None = None) -> Registers:
        """The thread's registers right now (PTRACE_GETREGS)."""
        tracee = self._tracee(tid)
        try:
            return get_regs(tracee.tid)
        except OSError as e:
            raise self._lost(tracee.tid, e) from None

    def syscall(self, nr: int, *args: int, tid: int | None = None) -> int:
        """Run system call `nr` in a stopped thread (default: the injecting thread).

        Returns the raw rax: the result, or -errno. Runs the target's own `syscall; ret`
        (procksm.inject.find_gadgets), stepping from its syscall-entry-stop to its
        syscall-exit-stop with PTRACE_SYSCALL, with rsp at a signal frame of the thread's
        own state (procksm.arch.x86_64): if procksm dies at any instant, the thread runs at
        most this call and returns to its own state by itself. The thread keeps those
        registers until the window ends; its own are put back then.

        PTRACE_SINGLESTEP over the instruction would be one round trip instead of two
        (measured ~15 vs ~19-25 us) but ends in a SIGTRAP signal-delivery-stop, and a
        thread left in a signal-delivery-stop receives that signal if procksm dies: it
        killed the target in the SIGKILL test. A syscall-exit-stop is safe to die in: its
        pending "signal" is SIGTRAP|0x80 (PTRACE_O_TRACESYSGOOD), which the kernel's
        send_sig() rejects as invalid.
        """
        if self._session._window is not self:
            raise PtraceError("StoppedTarget used outside its stopped() window")
        if len(args) > 6:
            raise ValueError("a system call takes at most 6 arguments")
        if self.abandoned is not None:
            # e.g. a `finally:` that closes fds: the thread is still in the earlier call
            raise PtraceTimeout(self.abandoned)
        tracee = self._tracee(tid) if tid is not None else self._injector()
        if tracee.saved is None:
            raise PtraceError(f"thread {tracee.tid} has no saved registers")
        insn = self._session._syscall_insn
        if self._session.pin_cpu and not self._pinned:
            self._pin_to(tracee.tid)
        if not self._session._filters_checked:
            self._check_filters()
        with _signals_deferred():
            try:
                if not tracee.chain:
                    with procfs.MapsQuery(self._memory_tid()) as maps:
                        self._arm(tracee, maps)
                regs = tracee.saved.copy()
                regs.rip = insn
                regs.rsp = tracee.chain
                regs.rax = nr
                regs.orig_rax = unsigned(-1)  # not in a syscall: no restart logic on ours
                for name, value in zip(_ARGUMENT_REGISTERS, args, strict=False):
                    setattr(regs, name, unsigned(value))
                tracee.dirty = True
                set_regs(tracee.tid, regs)
                _step("load", tracee.tid)
                if tracee.sigmask is None:
                    # After the registers, never before: a thread released with its own
                    # registers must also have its own mask. The frame restores it.
                    tracee.sigmask = self._own_masks[tracee.tid]
                    set_sigmask(tracee.tid, ALL_SIGNALS)
                    _step("block", tracee.tid)
                result = self._run_syscall(tracee, insn, nr)
            except OSError as e:
                raise self._lost(tracee.tid, e) from None
        return signed(result.rax)

    # kill safety: frames, the gate

    @contextlib.contextmanager
    def undo_on_death(self, nr: int, *args: int) -> Iterator[None]:
        """While the block runs, the injecting thread's way back first makes system call
        `nr` (e.g. close(fd) of an fd the block creates and closes again): if procksm
        dies in between, the target undoes it by itself. Used where a call creates
        something without a name a later procksm could recognise it by (a socket before
        its bind, a pidfd)."""
        injector = self._injector()
        if not injector.chain:
            with procfs.MapsQuery(self._memory_tid()) as maps:
                self._arm(injector, maps)
        if len(self._undo) >= MAX_UNDO:
            raise PtraceError("undo_on_death blocks nest too deep")
        gadgets = self._session._gadgets
        assert injector.saved is not None
        at = injector.own_frame - (2 + len(self._undo)) * x86_64.FRAME_STRIDE
        regs = injector.saved.copy()
        x86_64.load_syscall(regs, nr, *args, pc=gadgets.syscall, sp=injector.chain)
        frame = x86_64.build_frame(at, regs, ALL_SIGNALS, pretcode=gadgets.sigreturn)
        self.write_memory(at, frame.data)
        _step("undo", injector.tid)
        self._undo.append(injector.chain)
        injector.chain = at  # the next injected calls return through it
        try:
            yield
        finally:
            injector.chain = self._undo.pop()

    def lowest_free_fd(self) -> int:
        """The fd number the target's next new fd gets (the lowest free one: the kernel's
        rule, and no thread of the target runs meanwhile)."""
        used = procfs.open_fds(self._memory_tid())
        return next(n for n in range(len(used) + 1) if n not in used)

    def hold_others(self) -> None:
        """Gate every other thread before a replacement (an mmap over a range, a
        DONTNEED of zero pages) that follows a byte comparison.

        If procksm dies, a gated thread waits on a futex in the scratch page until the
        injecting thread, whose frames run any injected call it was given and then wake
        the gate, has finished: no thread of the target runs its own code between the
        comparison and the replacement, so none of its stores can be lost. While procksm
        lives, every thread just stays stopped. Needs the scratch area.
        """
        if self._gated:
            return
        session = self._session
        base = self._scratch_base()
        injector = self._injector()
        with _signals_deferred():
            # gate closed, its timeout; then the injecting thread's wake-up, then the others
            gate = struct.pack("<I12xqq", 0, GATE_TIMEOUT_S, 0)
            self.write_memory(base + _GATE, gate)
            _step("gate")
            try:
                with procfs.MapsQuery(self._memory_tid()) as maps:
                    self._arm(injector, maps, wake=base + _GATE)
                    for tracee in self._tracees.values():
                        if tracee is not injector:
                            self._arm(tracee, maps, wait=base + _GATE)
            except OSError as e:
                raise PtraceError(f"pid {self.pid}: gating its threads: {e}") from None
        session._injector = injector.tid
        self._gated = True

    def _check_filters(self) -> None:
        """Refuse a target whose seccomp filters would kill, trap or fail a call procksm
        injects (a container profile, a sandbox), before anything is injected."""
        session = self._session
        status = session.status
        if status is not None and status.seccomp == 1:
            raise Unsupported(
                f"pid {self.pid} ({status.name}) runs in strict seccomp mode: it may make "
                "no system call procksm needs"
            )
        if status is None or status.seccomp != 2:
            session._filters_checked = True
            return
        ip = session._syscall_insn + 2
        injector = self._injector().tid
        for tracee in self._tracees.values():
            filters = _seccomp_filters(tracee.tid)
            calls = _INJECTED_CALLS if tracee.tid == injector else _GATED_CALLS
            for name, nr, args, essential in calls:
                action = seccomp_bpf.verdict(filters, nr, ip, args)
                if action in seccomp_bpf.RUNS:
                    continue
                if action == seccomp_bpf.SECCOMP_RET_ERRNO and not essential:
                    continue  # procksm falls back (e.g. SCM_RIGHTS when pidfd_open fails)
                what = seccomp_bpf.ACTION_NAMES.get(action, f"answers {action:#x} to")
                raise Unsupported(
                    f"pid {self.pid} ({status.name}): its seccomp filter {what} {name}(), "
                    "which procksm injects; not touched"
                )
        session._filters_checked = True

    def _injector(self) -> _Tracee:
        """The thread injected calls run in: the main thread, unless it sleeps in a call
        restarted through its restart block and another thread does not (if procksm
        died, that call would be re-issued with its whole timeout, procksm.arch.x86_64)."""
        if self._injector_tid is None:
            candidates = sorted(self._tracees.values(), key=lambda t: t.tid != self.pid)
            if not candidates:
                raise NoSuchProcess(self.pid, f"process {self.pid} has no threads left")
            best = next(
                (t for t in candidates if t.saved and not x86_64.restarts_through_block(t.saved)),
                candidates[0],
            )
            self._injector_tid = best.tid
        return self._tracee(self._injector_tid)

    def _arm(
        self, tracee: _Tracee, maps: procfs.MapsQuery, *, wake: int = 0, wait: int = 0
    ) -> None:
        """Write the thread's own-state frame on its stack (and, for the injecting
        thread of a gated window, a wake-up frame before it); for a gated thread, point
        its registers at the gate and block its signals."""
        tid = tracee.tid
        saved = tracee.saved
        assert saved is not None
        gadgets = self._session._gadgets
        if tid not in self._own_masks:
            self._own_masks[tid] = get_sigmask(tid)
        own_mask = self._own_masks[tid]
        image = x86_64.signal_xstate(get_xstate(tid))
        # Below the own frame: the wake-up frame, then room for undo frames (undo_on_death)
        low, own_at, fpstate = x86_64.frame_below(saved.rsp, len(image), 1 + MAX_UNDO)
        self._check_stack_room(maps, tid, low - _ARGUMENT_ROOM, saved.rsp)
        own = x86_64.build_frame(
            own_at, self._resume_state(tid, saved), own_mask,
            pretcode=gadgets.sigreturn, fpstate=fpstate,
        )  # fmt: skip
        blob = own.data.ljust(fpstate - own_at, b"\0") + image
        tracee.own_frame = own_at
        chain = start = own_at
        if wake:
            step = saved.copy()
            x86_64.load_syscall(
                step, SYS_futex, wake, FUTEX_WAKE_OP_PRIVATE, 0x7FFFFFFF, 0, wake, FUTEX_OP_SET_1,
                pc=gadgets.syscall, sp=own_at,
            )  # fmt: skip
            chain = start = own_at - x86_64.FRAME_STRIDE
            first = x86_64.build_frame(start, step, ALL_SIGNALS, pretcode=gadgets.sigreturn)
            blob = first.data.ljust(own_at - start, b"\0") + blob
        write_memory(self._memory_tid(), start, blob)
        _step("frames", tid)
        if wake or wait:
            idle = saved.copy()
            idle.orig_rax = unsigned(-1)
            if wake:
                x86_64.load_syscall(
                    idle, SYS_futex, wake, FUTEX_WAKE_OP_PRIVATE, 0x7FFFFFFF, 0, wake,
                    FUTEX_OP_SET_1, pc=gadgets.syscall, sp=own_at,
                )  # fmt: skip
            else:
                x86_64.load_syscall(
                    idle, SYS_futex, wait, FUTEX_WAIT_PRIVATE, 0, wait + (_GATE_TIMEOUT - _GATE),
                    pc=gadgets.syscall, sp=own_at,
                )  # fmt: skip
            tracee.dirty = True
            set_regs(tid, idle)
            _step("arm", tid)
            if tracee.sigmask is None:
                tracee.sigmask = own_mask
                set_sigmask(tid, ALL_SIGNALS)
                _step("block", tid)
        tracee.chain = chain

    def _resume_state(self, tid: int, saved: Registers) -> Registers:
        """The registers the thread's own-state frame returns to: the kernel's restart
        fix-up applied (procksm.arch.x86_64.own_state), and the abort handler of an rseq
        critical section it was stopped in, as the kernel would on its way back to user
        space (kernel/rseq.c rseq_ip_fixup): after an injected call the thread returns
        to user space outside the section, which clears the section's pointer, so the
        sigreturn into it would go unnoticed."""
        restarted = None
        if saved.orig_rax == SYS_restart_syscall:
            code = read_memory(self._memory_tid(), saved.rip - 9, 7)
            restarted = x86_64.restarted_call(code)
        try:
            regs = x86_64.own_state(saved, restarted)
        except ValueError as e:
            raise Unsupported(
                f"pid {self.pid}, thread {tid}: {e}; procksm cannot give it a way back "
                "that keeps its call going"
            ) from None
        try:
            area = get_rseq_area(tid)
            if area:
                (cs,) = struct.unpack("<Q", read_memory(self._memory_tid(), area + 8, 8))
                if cs:
                    _, start, length, abort = struct.unpack(
                        "<QQQQ", read_memory(self._memory_tid(), cs, 32)
                    )
                    if start <= regs.rip < start + length:
                        regs.rip = abort
        except OSError:
            pass  # no rseq area readable: nothing the kernel would fix up either
        return regs

    def _check_stack_room(self, maps: procfs.MapsQuery, tid: int, low: int, rsp: int) -> None:
        """Frames go below the red zone of the thread's stack, where a signal frame
        would; process_vm_writev does not grow a stack, so the mapping must reach."""
        vma = maps.vma_at(rsp - 1)
        if vma is None or vma.start > low or "w" not in vma.perms:
            raise PtraceError(
                f"pid {self.pid}, thread {tid}: no room for its return frame below its "
                f"stack pointer {rsp:#x}"
            )

    def _scratch_base(self) -> int:
        self.scratch()
        assert self._session._scratch is not None
        return self._session._scratch

    def syscall_checked(self, nr: int, *args: int, name: str = "", tid: int | None = None) -> int:
        """Like syscall(), but raise InjectedSyscallError on a -errno result."""
        result = self.syscall(nr, *args, tid=tid)
        if -4095 <= result < 0:
            raise InjectedSyscallError(self.pid, name or x86_64.syscall_name(nr), -result)
        return result

    def syscall_address(self) -> int:
        """Where procksm's injected system calls execute (a `syscall` instruction)."""
        return self._session._syscall_insn

    def scratch(self) -> int:
        """Address of a read-write page in the target for syscall arguments.

        Page 1 of the scratch area (SCRATCH_PAGES), mapped once per session and unmapped
        when the session ends. The first time, what a procksm killed earlier left in the
        target is removed first (:meth:`_remove_leftovers`).
        """
        session = self._session
        if session._scratch is None:
            self._remove_leftovers()
            injector = self._injector()
            if not injector.chain:
                with procfs.MapsQuery(self._memory_tid()) as maps:
                    self._arm(injector, maps)
            # below every frame the thread may get: dead stack
            name_at = injector.own_frame - (2 + MAX_UNDO) * x86_64.FRAME_STRIDE - _ARGUMENT_ROOM
            self.write_memory(name_at, SCRATCH_NAME)
            _step("name")
            fd = self.syscall_checked(SYS_memfd_create, name_at, MFD_CLOEXEC, name="memfd_create")
            try:
                self.syscall_checked(SYS_ftruncate, fd, 2 * PAGE_SIZE, name="ftruncate")
                base = self.syscall_checked(
                    SYS_mmap, 0, SCRATCH_BYTES, PROT_READ | PROT_WRITE, MAP_PRIVATE, fd, 0,
                    name="mmap",
                )  # fmt: skip
            finally:
                self.syscall(SYS_close, fd)
            owner = struct.pack("<QQ", os.getpid(), _own_start_time())
            self.write_memory(base + _OWNER, owner)
            _step("owner")
            session._scratch = base
        return session._scratch + PAGE_SIZE

    def staging(self) -> tuple[int, int]:
        """(address, bytes) of the staging range in the scratch area, where an unmerge
        builds new anonymous pages before moving them in place (procksm.merge)."""
        self.scratch()
        assert self._session._scratch is not None
        return self._session._scratch + 2 * PAGE_SIZE, STAGING_PAGES * PAGE_SIZE

    def _remove_leftovers(self) -> None:
        """Remove what a procksm that died in a window left in the target: fds of its
        memfds (scratch, segments), and scratch areas whose owner is gone. Each is
        recognised by a name the target's own code does not use."""
        tid = self._memory_tid()  # /proc/TID works for any live thread; a leader may be gone
        try:
            fds = procfs.list_fd_targets(tid)
            spans = [v for v in procfs.read_maps(tid) if v.path == SCRATCH_PATH and v.offset == 0]
        except ProcksmError:
            return  # cannot look (the process is exiting): nothing to remove either
        for head in spans:
            owner_pid, owner_start = struct.unpack("<QQ", self.read_memory(head.start + _OWNER, 16))
            if owner_pid and _alive(int(owner_pid), int(owner_start)):
                continue  # a live procksm's (the daemon between two windows)
            self.syscall(SYS_munmap, head.start, SCRATCH_BYTES)
            self.leftovers_removed += 1
        for fd, target in sorted(fds.items()):
            if target.startswith(LEFTOVER_MEMFD_PREFIX):
                self.syscall(SYS_close, fd)
                self.leftovers_removed += 1

    def read_memory(self, addr: int, size: int) -> bytes:
        tid = self._memory_tid()
        try:
            return read_memory(tid, addr, size)
        except OSError as e:
            raise self._lost(tid, e) from None

    def write_memory(self, addr: int, data: bytes) -> None:
        tid = self._memory_tid()
        try:
            write_memory(tid, addr, data)
        except OSError as e:
            raise self._lost(tid, e) from None

    # internals

    def _memory_tid(self) -> int:
        """A live thread to reach the address space through (the leader may have exited)."""
        return self._tracee(None).tid

    def _tracee(self, tid: int | None) -> _Tracee:
        if tid is None:
            if not self._tracees:
                raise NoSuchProcess(self.pid, f"process {self.pid} has no threads left")
            tid = self.pid if self.pid in self._tracees else min(self._tracees)
        tracee = self._tracees.get(tid)
        if tracee is None:
            raise PtraceError(f"thread {tid} is not a stopped thread of pid {self.pid}")
        return tracee

    def _lost(self, tid: int, e: OSError) -> ProcksmError:
        if e.errno == errno.ESRCH and not procfs.thread_exists(self.pid, tid):
            return NoSuchProcess(self.pid, f"thread {tid} of pid {self.pid} has exited")
        if e.errno == errno.ESRCH:
            # The thread lives but is not in a ptrace stop of ours: say where it is, and
            # who traces it, so that the cause can be told from the message alone.
            try:
                tracer = _read_status(self.pid, tid).get("TracerPid", "?")
            except OSError:
                tracer = "?"
            return PtraceError(
                f"pid {self.pid}, thread {tid}: {e} (state {_thread_state(self.pid, tid)}, "
                f"traced by {tracer}, this tracer thread {threading.get_native_id()}, "
                f"last stop {self._tracees[tid].stop if tid in self._tracees else None})"
            )
        return PtraceError(f"pid {self.pid}, thread {tid}: {e}")

    def _pin_to(self, tid: int) -> None:
        self._pinned = True
        try:
            cpu = int(read_stat_fields(self.pid, tid)[36])
            if cpu in os.sched_getaffinity(0):
                os.sched_setaffinity(0, {cpu})
        except (ProcksmError, OSError, IndexError, ValueError):
            pass  # pinning is an optimisation only

    def _run_syscall(self, tracee: _Tracee, insn: int, nr: int) -> Registers:
        """Resume into the injected syscall; return the registers at its exit stop."""
        tid = tracee.tid
        deadline = time.monotonic() + self._session.timeout
        entered = False
        ptrace(PTRACE_SYSCALL, tid, 0, 0)
        while True:
            stop = wait_stop(tid, deadline)
            if stop is None:
                message = (
                    f"injected syscall {nr} in thread {tid} of pid {self.pid} did not complete "
                    f"within {self._session.timeout:g} s"
                )
                self._abandon(tracee, message)
                raise PtraceTimeout(message)
            if stop.kind is StopKind.EXITED:
                del self._tracees[tid]
                raise NoSuchProcess(self.pid, f"thread {tid} of pid {self.pid} exited")
            if stop.kind is StopKind.SYSCALL:
                if entered:
                    regs = get_regs(tid)
                    if regs.rip != insn + 2 or regs.orig_rax != nr:
                        raise PtraceError(
                            f"thread {tid} of pid {self.pid} stopped in syscall {regs.orig_rax} "
                            f"at {regs.rip:#x} instead of the injected {nr} at {insn + 2:#x}"
                        )
                    tracee.stop = stop
                    return regs
                entered = True  # the entry stop; the next syscall stop is its exit
            elif stop.kind is StopKind.SIGNAL:
                # A signal arrived while our registers are in place: delivering it now
                # would save them in the handler's frame. Hold it; re-sent at resume.
                tracee.held_signals.append(get_siginfo(tid))
                self._session.signals_held += 1
            # Anything else (a leftover PTRACE_EVENT_STOP, a group stop): keep going.
            ptrace(PTRACE_SYSCALL, tid, 0, 0)

    def _abandon(self, tracee: _Tracee, message: str) -> None:
        """An injected call outlived the timeout (seen: a populate in uninterruptible
        sleep on a loaded machine). Interrupt it and wait as long again: if the thread
        stops, its call is over and the window goes on to its end as usual. If not, the
        call still runs (nothing interrupts an uninterruptible sleep) with procksm's
        registers: the thread is left to its frames, as if procksm had died, and the
        window ends without injecting anything more (see _resume_all's `as_is`)."""
        stop = None
        with contextlib.suppress(OSError):
            ptrace(PTRACE_INTERRUPT, tracee.tid)
            stop = wait_stop(tracee.tid, time.monotonic() + self._session.timeout)
        if stop is not None and stop.kind is StopKind.EXITED:
            del self._tracees[tracee.tid]
            return
        if stop is None:
            # still in the call: an orphan, detached once it stops (PtraceSession)
            tracee.stop = None
            self.abandoned = message + "; the thread was left to its way back"
            return
        tracee.stop = stop
