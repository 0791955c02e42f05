"""Attaching to a target: stopping all threads, injecting system calls, resuming.

The generic sequence, as CRIU's compel/src/lib/infect.c, behind two public faces: a
session with a target (:class:`PtraceSession`) opens stop windows, and in a window
(:class:`StoppedTarget`) system calls are injected through kill-safe frames and the futex
gate. The parts, each in its module:

* :mod:`procksm.attach.thread_stop` seizes and stops every thread;
  :mod:`procksm.attach.thread_resume` lets them go (own state back, held signals
  redelivered, orphans detached later);
* :mod:`procksm.attach.tracees` is what is known of each stopped thread, and the target's
  memory reached through them; :mod:`procksm.attach.target_program` the program it runs (its
  memory opened, the gadgets injected calls run through, an exec noticed);
* :mod:`procksm.attach.call_batch` runs a window's calls in one go (procksm's call
  routine in the scratch area); :mod:`procksm.attach.injected_call` runs one call in a
  stopped thread;
  :mod:`procksm.attach.return_frames` writes its way back; :mod:`procksm.attach.seccomp_precheck`
  refuses a target whose seccomp filters would stop one;
* :mod:`procksm.attach.scratch` maps the scratch area (:mod:`procksm.attach.scratch_layout`) and
  removes what a killed procksm left;
* :mod:`procksm.attach.deferred_signals` holds procksm's own SIGINT & co. back during a window;
  :mod:`procksm.attach.kill_steps` is the test switch that kills procksm after any step.

Around them: why attaching would fail is :mod:`procksm.attach.diagnose` (run before anything is
touched), the raw ptrace calls are :mod:`procksm.attach.inject`, what is x86_64's (registers,
syscall numbers, the frames' layout) is :mod:`procksm.arch.x86_64`, and what a killed
procksm left is :mod:`procksm.attach.leftovers`.

docs/design.md §2.5, §2.7, §2.8, §3.10, §6. The rules these modules keep:

* Threads are taken with PTRACE_SEIZE and stopped with PTRACE_INTERRUPT, never with
  SIGSTOP or PTRACE_ATTACH: if procksm dies, the kernel detaches and the target runs on.
* A target is traced only inside a :meth:`PtraceSession.stopped` window. Between windows
  it is fully detached, because a traced thread that receives any signal sits in a
  signal-delivery-stop until its tracer restarts it: holding a target across a
  seconds-long scan would freeze every thread that gets a SIGCHLD, a timer signal or a
  runtime's preemption signal (Go's SIGURG, JVM safepoints). Re-seizing costs a few
  microseconds per thread and is included in the measured pauses.
* Every instant is safe to die at (docs/kill-safety.md): before a thread runs an
  injected call, a frame of its own state (registers, XSAVE state, signal mask) is
  written on its stack, and the call returns through it (`syscall; ret` into the
  target's sigreturn trampoline), so a thread released by the kernel when procksm dies
  runs at most that call and returns to its own state by itself. Before a replacement,
  the other threads are gated on a futex that the injecting thread's frames wake
  (:meth:`StoppedTarget.hold_others`): none runs its own code before the replacement is
  done. SIGINT, SIGTERM, SIGHUP and SIGQUIT are blocked in the calling thread for the
  whole window and take effect right after it.
* Restart of interrupted system calls is left to the kernel: windows end with
  PTRACE_DETACH (procksm.attach.thread_resume), and an epoll_wait the kernel answered with a
  plain -EINTR is made restartable at the stop (procksm.attach.thread_stop).
* Signals are never swallowed: a signal-delivery-stop met while waiting for a thread to
  stop is resumed at once with its signal; while a thread holds procksm's registers all
  its signals are blocked (PTRACE_SETSIGMASK) and stay pending until its own mask is
  back; one that still stops it (SIGSTOP) is held and re-sent when the window ends.
"""

from __future__ import annotations

import contextlib
import os
import select
import struct
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from types import TracebackType

from procksm import PAGE_SIZE, procfs
from procksm.arch.x86_64 import Registers, SYS_munmap
from procksm.attach.call_batch import BatchResults, BatchRunner, CallBatch
from procksm.attach.deferred_signals import signals_deferred
from procksm.attach.diagnose import AttachStatus, check_attachable
from procksm.attach.inject import Gadgets, get_regs
from procksm.attach.injected_call import SyscallInjector
from procksm.attach.kill_steps import step
from procksm.attach.locks import WindowLock
from procksm.attach.return_frames import ReturnFrames
from procksm.attach.scratch import (
    ScratchArea,
    is_own_area,
    remove_leftovers_in_window,
    threads_inside,
)
from procksm.attach.scratch_layout import GATE, GATE_TIMEOUT_S, SCRATCH_BYTES
from procksm.attach.seccomp_precheck import SeccompPrecheck
from procksm.attach.target_program import TargetProgram
from procksm.attach.thread_resume import ThreadGroupResume
from procksm.attach.thread_stop import ThreadGroupStop
from procksm.attach.tracees import StoppedThreads, Tracee
from procksm.errors import NoSuchProcess, ProcksmError, PtraceError
from procksm.procfs import read_stat_fields


def _open_pidfd(pid: int, start_time: int) -> int:
    """A pidfd of process `pid`, the one that started at `start_time` (not a process that
    took its pid since)."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        raise NoSuchProcess(pid, f"process {pid} has exited") from None
    try:
        now = int(read_stat_fields(pid)[19])
    except (ProcksmError, OSError, IndexError):
        now = -1
    if now != start_time:
        os.close(fd)
        raise NoSuchProcess(pid, f"process {pid} has exited (its pid now belongs to another one)")
    return fd


@dataclass(frozen=True, slots=True)
class StopParts:
    """Where the time of one stop window went (seconds): every thread stopped, gated
    (its own-state frames), the calls the target ran for procksm (injected one by one
    or in a batch), every thread let go; the rest is procksm's own work in the window
    (comparisons, planning the calls). Reported for a session's longest window."""

    pid: int
    threads: int
    total: float
    stop: float
    gate: float
    calls: float
    resume: float

    def as_json(self) -> dict[str, float | int]:
        ms = {
            "stop_ms": self.stop, "gate_ms": self.gate, "calls_ms": self.calls,
            "resume_ms": self.resume,
        }  # fmt: skip
        other = self.total - sum(ms.values())
        return {
            "pid": self.pid,
            "threads": self.threads,
            "ms": round(self.total * 1e3, 3),
            **{k: round(v * 1e3, 3) for k, v in ms.items()},
            "other_ms": round(max(other, 0.0) * 1e3, 3),
        }


class PtraceSession:
    """A target process, attached to inside :meth:`stopped` windows.

    Usage::

        with PtraceSession(pid) as session:
            with session.stopped() as target:
                target.syscall(SYS_madvise, addr, length, MADV_DONTNEED)

    A window must be used from the thread that opened it (ptrace binds a tracee to the
    tracer thread). `threads` lists the threads stopped in the last window; `pauses`
    the wall time of each window, from the first PTRACE_INTERRUPT to the last detach.
    `timeout` bounds each wait of a window (threads to stop, an injected call to end).
    """

    def __init__(self, pid: int, *, timeout: float = 2.0, pin_cpu: bool = True) -> None:
        self.pid = pid
        self.timeout = timeout
        # Injecting from the CPU the stopped thread last ran on makes each wake-up local
        # instead of a cross-CPU IPI (docs/design.md §2.8); measured in tests/test_attach.py.
        self.pin_cpu = pin_cpu
        self.threads: list[int] = []
        self.pauses: list[float] = []
        self.longest: StopParts | None = None  # the longest window's parts
        self.status: AttachStatus | None = None
        self.exec_seen = False  # the target ran execve() while we were attached
        self.signals_held = 0  # signals that arrived during an injection and were re-sent
        self._window: StoppedTarget | None = None
        self._program = TargetProgram(pid)
        self._resume = ThreadGroupResume(pid)
        self._scratch = ScratchArea()
        self._seccomp: SeccompPrecheck | None = None  # once the status is known
        self._window_lock: WindowLock | None = None
        self._pidfd: int | None = None  # the target's, from the session's start
        self._recheck_scratch = False  # renewed: is the remembered area still ours?
        # CPU time the target's threads spent running procksm's batches of calls (the
        # mmaps, populates, zero drops of a merge): procksm's cost, paid on the target's
        # CPU time (ksmd pays its own replace_page in its own)
        self.target_cpu_s = 0.0
        self._sched = procfs.ThreadSched(pid)

    # context manager

    def __enter__(self) -> PtraceSession:
        self.status = check_attachable(self.pid)
        self._pidfd = _open_pidfd(self.pid, self.status.start_time)
        try:
            self._seccomp = SeccompPrecheck(self.status)
            self._program.open(self.pid)
            self._window_lock = WindowLock(self.pid)
        except BaseException:
            self._program.close()  # __exit__ does not run when __enter__ raises
            os.close(self._pidfd)
            self._pidfd = None
            raise
        return self

    def renew(self) -> None:
        """For a session kept across rounds (procksm attach): the same process still,
        its status read again, and its seccomp filters checked again before the next
        injected call (it may have installed some since). The pauses start over."""
        self._check_same_process()
        status = check_attachable(self.pid)
        if self.status is not None and status.start_time != self.status.start_time:
            raise NoSuchProcess(self.pid, f"process {self.pid} has exited")
        self.status = status
        self._seccomp = SeccompPrecheck(status)
        # Between two rounds the target may have unmapped the area and mapped its own
        # memory at that address: the next window looks before it writes there.
        self._recheck_scratch = True
        self.pauses.clear()
        self.longest = None

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            if self._scratch.base is not None and self._window is None:
                self._unmap_scratch(raise_errors=exc_type is None)
        finally:
            try:
                self._resume.release_orphans(time.monotonic() + self.timeout)
            finally:
                self._scratch.forget()  # procksm's view of it (the area stays if in use)
                self._program.close()
                self._sched.close()
                if self._pidfd is not None:
                    os.close(self._pidfd)
                    self._pidfd = None
                if self._window_lock is not None:
                    self._window_lock.close()
                    self._window_lock = None

    @property
    def scratch_address(self) -> int | None:
        """The scratch page mapped in the target (exclude it from scans), if any."""
        return self._scratch.base

    def scratch_places(self) -> tuple[int, int, int] | None:
        """(base, staging address, stat buffer) of the scratch area mapped in an earlier
        window, for a table built before the next window's stop (procksm.merge.target);
        the window checks that its area is still at that base."""
        if self._scratch.base is None:
            return None
        return self._scratch.base, self._scratch.staging()[0], self._scratch.stat_buffer()

    @contextlib.contextmanager
    def stopped(self) -> Iterator[StoppedTarget]:
        """Stop every thread of the target; resume (detach) all of them on exit."""
        if self._window is not None:
            raise PtraceError("stopped() windows do not nest")
        tracees = self._resume.take_orphans()
        saved_affinity = os.sched_getaffinity(0)
        lock = self._window_lock
        with signals_deferred():
            if lock is not None:
                # one tracer at a time: the madvise guard may be in a window of its own
                lock.acquire(self.timeout)
            started = time.perf_counter()
            stopped_at = closing_at = started
            target: StoppedTarget | None = None
            try:
                self._check_same_process()
                target = self._open_window(tracees)
                stopped_at = time.perf_counter()
                yield target
            finally:
                self._window = None
                closing_at = time.perf_counter()
                try:
                    self._close_window(target, tracees)
                finally:
                    ended = time.perf_counter()
                    self.pauses.append(ended - started)
                    if self.longest is None or ended - started > self.longest.total:
                        self.longest = StopParts(
                            self.pid, len(tracees), ended - started, stopped_at - started,
                            target.gate_s if target is not None else 0.0,
                            target.calls_s if target is not None else 0.0,
                            ended - closing_at,
                        )  # fmt: skip
                    if lock is not None:
                        lock.release()
                    if os.sched_getaffinity(0) != saved_affinity:
                        os.sched_setaffinity(0, saved_affinity)

    def _open_window(self, tracees: dict[int, Tracee]) -> StoppedTarget:
        """Stop every thread into `tracees`; the window on them."""
        stop = ThreadGroupStop(self.pid, tracees, self.timeout)
        try:
            stop.run()
        finally:
            self.exec_seen = self.exec_seen or stop.exec_seen
        threads = StoppedThreads(self.pid, tracees)
        self._check_program(threads.memory_tid())
        base = self._scratch.base
        if self._recheck_scratch and base is not None and not is_own_area(threads, base):
            self._scratch.forget()  # not ours any more: a new one when needed
        self._recheck_scratch = False
        inside = threads_inside(threads, self._scratch.base) if self._scratch.base else []
        if inside:
            # An abandoned window's batch still runs (procksm.attach.call_batch): its
            # table and code are the scratch area's; nothing may be injected, nor the
            # area unmapped, until the thread has left. The window only resumes.
            raise PtraceError(
                f"pid {self.pid}: thread {inside[0]} still runs the calls procksm gave it "
                "in an earlier window; try again once it is done"
            )
        assert self._seccomp is not None  # set with the status, checked above
        target = StoppedTarget(
            threads, self._program.gadgets, self._seccomp, self._scratch,
            timeout=lambda: self.timeout, pin_cpu=self.pin_cpu, sched=self._sched,
        )  # fmt: skip
        self._window = target
        self.threads = sorted(tracees)
        step("stopped")
        return target

    def _close_window(self, target: StoppedTarget | None, tracees: dict[int, Tracee]) -> None:
        """Resume every thread of the window; after an abandoned call, as procksm's death
        would (procksm.attach.thread_resume)."""
        if target is not None:
            target.end()
            self.signals_held += target.signals_held
            self.target_cpu_s += target.target_cpu_s
        self._resume.resume_all(
            tracees,
            injector=target.gate_injector if target is not None else None,
            as_is=target is not None and target.abandoned is not None,
            timeout=self.timeout,
        )

    def _check_same_process(self) -> None:
        """The process the session started with still lives. Its pidfd says so in one
        poll; /proc/PID/stat, read before, sums over all threads and took 15-75 us per
        window on a 23-thread JVM."""
        if self.status is None or self._pidfd is None:
            raise PtraceError("PtraceSession used outside its `with` block")
        if select.select([self._pidfd], [], [], 0)[0]:  # readable: the process exited
            raise NoSuchProcess(self.pid, f"process {self.pid} has exited")

    def _check_program(self, tid: int) -> None:
        """Notice an exec since the last window: then start over with the new program."""
        if not self._program.unchanged():
            self.exec_seen = True
            self._scratch.forget()  # it vanished with the old address space
            self._program.open(tid)

    def _unmap_scratch(self, *, raise_errors: bool) -> None:
        scratch = self._scratch.base
        self._scratch.forget()
        try:
            with self.stopped() as target:
                # only if the area is still ours: after an exec since the last window
                # the address may be the new program's (a kept session's, the daemon's)
                if scratch is not None and target.owns_scratch_at(scratch):
                    target.syscall(SYS_munmap, scratch, SCRATCH_BYTES)
        except NoSuchProcess:
            pass
        except ProcksmError:
            if raise_errors:
                raise


class StoppedTarget:
    """All threads of the target, held in ptrace stops for the length of a window."""

    def __init__(
        self,
        threads: StoppedThreads,
        gadgets: Gadgets,
        seccomp: SeccompPrecheck,
        scratch: ScratchArea,
        *,
        timeout: Callable[[], float],
        pin_cpu: bool,
        sched: procfs.ThreadSched,
    ) -> None:
        self.pid = threads.pid
        self._threads = threads
        self._frames = ReturnFrames(threads, gadgets)
        self._calls = SyscallInjector(
            threads, self._frames, gadgets, seccomp, timeout=timeout, pin_cpu=pin_cpu,
            sched=sched,
        )  # fmt: skip
        self._scratch = scratch  # the session's
        self._gated = False
        self.gate_injector: int | None = None  # the thread whose frames wake the gate
        self.gate_s = 0.0  # time spent gating, and in the calls the target ran (StopParts)
        self.calls_s = 0.0
        self.target_cpu_s = 0.0  # the injecting thread's CPU time in this window's batches
        self._sched = sched
        self._maps: procfs.MapsQuery | None = None  # the window's (maps())
        self.leftovers_removed = 0  # fds and mappings of a killed procksm, removed
        self.leftovers_in_use = 0  # its scratch areas left: a thread still in their routine

    @property
    def threads(self) -> list[int]:
        return self._threads.tids

    def owns_scratch_at(self, base: int) -> bool:
        """The scratch area at ``base`` is still this procksm's (procksm.attach.scratch)."""
        return is_own_area(self._threads, base)

    @property
    def group_stopped(self) -> bool:
        """The process is in a job-control stop (SIGSTOP); it stays stopped after the window."""
        return self._threads.group_stopped

    @property
    def abandoned(self) -> str | None:
        """Why this window ended early with an injected call still running
        (procksm.attach.injected_call): then nothing more is injected in it."""
        return self._calls.abandoned

    @property
    def signals_held(self) -> int:
        """Signals that arrived during this window's injections (re-sent at its end)."""
        return self._calls.signals_held

    def end(self) -> None:
        """The window is over: nothing more may be injected through this object."""
        self._calls.window_ended = True
        if self._maps is not None:
            self._maps.close()
            self._maps = None

    def maps(self) -> procfs.MapsQuery:
        """The target's VMAs by address, for this window: one /proc/PID/maps fd for all
        its queries (two opens and closes a window saved, ~10-30 us of the stop)."""
        if self._maps is None:
            self._maps = procfs.MapsQuery(self._threads.memory_tid(), remember=True)
        return self._maps

    def _vmas_changed(self) -> None:
        if self._maps is not None:
            self._maps.changed()

    def saved_registers(self, tid: int | None = None) -> Registers:
        """The registers the thread had when it stopped (what it gets back at resume)."""
        saved = self._threads.tracee(tid).saved
        if saved is None:
            raise PtraceError(f"thread {tid} has no saved registers")
        return saved.copy()

    def registers(self, tid: int | None = None) -> Registers:
        """The thread's registers right now (PTRACE_GETREGS)."""
        tracee = self._threads.tracee(tid)
        try:
            return get_regs(tracee.tid)
        except OSError as e:
            raise self._threads.lost(tracee.tid, e) from None

    def syscall(self, nr: int, *args: int, tid: int | None = None) -> int:
        """Run system call `nr` in a stopped thread (default: the injecting thread).

        Returns the raw rax: the result, or -errno. Runs the target's own `syscall; ret`
        with rsp at a signal frame of the thread's own state (procksm.attach.injected_call,
        procksm.attach.return_frames): if procksm dies at any instant, the thread runs at most
        this call and returns to its own state by itself. The thread keeps those
        registers until the window ends; its own are put back then.
        """
        started = time.perf_counter()
        try:
            return self._calls.syscall(nr, *args, tid=tid)
        finally:
            self.calls_s += time.perf_counter() - started
            self._vmas_changed()

    def syscall_checked(self, nr: int, *args: int, name: str = "", tid: int | None = None) -> int:
        """Like syscall(), but raise InjectedSyscallError on a -errno result."""
        started = time.perf_counter()
        try:
            return self._calls.syscall_checked(nr, *args, name=name, tid=tid)
        finally:
            self.calls_s += time.perf_counter() - started
            self._vmas_changed()

    def syscall_address(self) -> int:
        """Where procksm's injected system calls execute (a `syscall` instruction)."""
        return self._calls.gadgets.syscall

    @property
    def injector_tid(self) -> int:
        """The thread injected calls run in (by default)."""
        return self._threads.injector().tid

    # kill safety: frames, the gate

    def undo_on_death(self, nr: int, *args: int) -> contextlib.AbstractContextManager[None]:
        """While the block runs, the injecting thread's way back first makes system call
        `nr` (e.g. close(fd) of an fd the block creates and closes again): if procksm
        dies in between, the target undoes it by itself. Used where a call creates
        something without a name a later procksm could recognise it by (a socket before
        its bind, a pidfd)."""
        return self._frames.undo_on_death(nr, *args)

    def lowest_free_fd(self) -> int:
        """The fd number the target's next new fd gets (the lowest free one: the kernel's
        rule, and no thread of the target runs meanwhile)."""
        used = procfs.open_fds(self._threads.memory_tid())
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
        started = time.perf_counter()
        try:
            self._gate()
        finally:
            self.gate_s += time.perf_counter() - started

    def _gate(self) -> None:
        base = self._scratch_base()
        threads = self._threads
        injector = threads.injector()
        with signals_deferred():
            # gate closed, its timeout; then the injecting thread's wake-up, then the others
            gate = struct.pack("<I12xqq", 0, GATE_TIMEOUT_S, 0)
            threads.write_memory(base + GATE, gate)
            step("gate")
            try:
                plan = [(injector, base + GATE, 0)]
                plan += [(t, 0, base + GATE) for t in threads.tracees.values() if t is not injector]
                self._frames.arm_all(plan, self.maps())
            except OSError as e:
                raise PtraceError(f"pid {self.pid}: gating its threads: {e}") from None
        self.gate_injector = injector.tid
        self._gated = True

    # one window's calls in one go

    def run_batch(self, batch: CallBatch) -> BatchResults:
        """Run `batch` in the injecting thread through procksm's call routine, in one
        round trip (procksm.attach.call_batch). Only after :meth:`hold_others`: the
        routine returns through the gate's wake-up, and every call in it runs even if
        procksm dies meanwhile."""
        if not self._gated:
            raise PtraceError("a batch of calls runs only in a gated window (hold_others)")
        base = self._scratch_base()
        runner = BatchRunner(
            self._calls, self._scratch.routine, base + PAGE_SIZE, self._scratch.shared
        )
        tid = self._threads.injector().tid
        cpu_before = self._sched.cpu_ns(tid)
        started = time.perf_counter()
        try:
            return runner.run(batch)
        finally:
            self.calls_s += time.perf_counter() - started
            self._vmas_changed()
            # the thread is stopped again (at its park, or let go as is: then its own
            # code ran too, and the figure is an upper bound)
            cpu_after = self._sched.cpu_ns(tid)
            if cpu_before is not None and cpu_after is not None:
                self.target_cpu_s += (cpu_after - cpu_before) / 1e9

    def stat_buffer(self) -> int:
        """The table's stat buffer, for :meth:`CallBatch.check_stat`."""
        self._scratch_base()
        return self._scratch.stat_buffer()

    # the scratch area

    def scratch(self) -> int:
        """Address of a read-write page in the target for syscall arguments.

        Page 1 of the scratch area (procksm.attach.scratch_layout), mapped once per session and
        unmapped when the session ends. The first time, what a procksm killed earlier
        left in the target is removed first (procksm.attach.scratch.remove_leftovers_in_window).
        """
        return self._scratch_base() + PAGE_SIZE

    def staging(self) -> tuple[int, int]:
        """(address, bytes) of the staging range in the scratch area, where an unmerge
        builds new anonymous pages before moving them in place (procksm.unmerge)."""
        self.scratch()
        return self._scratch.staging()

    def _scratch_base(self) -> int:
        """Page 0 of the scratch area, mapped first if need be."""
        if self._scratch.base is None:
            left = remove_leftovers_in_window(self._calls)
            self.leftovers_removed += left.removed
            self.leftovers_in_use += left.in_use
            self._scratch.map(self._calls)
            self._vmas_changed()
        assert self._scratch.base is not None
        return self._scratch.base

    def read_memory(self, addr: int, size: int) -> bytes:
        return self._threads.read_memory(addr, size)

    def write_memory(self, addr: int, data: bytes) -> None:
        self._threads.write_memory(addr, data)
