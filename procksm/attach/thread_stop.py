"""Seizing and stopping every thread of a target (the start of each stop window).

Threads are taken with PTRACE_SEIZE and stopped with PTRACE_INTERRUPT, never with
SIGSTOP or PTRACE_ATTACH: if procksm dies, the kernel detaches them and the target runs
on (never PTRACE_O_EXITKILL either). A signal-delivery-stop met on the way is resumed at
once with its signal; an event stop (clone, exec) is not a place to hold a thread, so it
is interrupted again and let go on to the next stop.

epoll_wait is the one blocking call the kernel answers with plain -EINTR (not a restart
code) when a tracer interrupts it, so the application would see EINTR with no signal
sent. For an infinite timeout procksm rewrites that rax to -ERESTARTNOHAND at the stop:
the kernel then restarts the call, or still returns EINTR if a real signal's handler
runs — exactly the semantics of a restartable call. A finite timeout is left alone (the
restart would not shorten the timeout; EINTR is documented and event loops recompute
their timeout on it).
"""

from __future__ import annotations

import ctypes
import errno
import threading
import time

from procksm import procfs
from procksm.arch import x86_64
from procksm.arch.x86_64 import (
    ERESTARTNOHAND,
    Registers,
    SYS_epoll_pwait,
    SYS_epoll_pwait2,
    SYS_epoll_wait,
    signed,
    unsigned,
)
from procksm.attach.diagnose import check_attachable, process_name
from procksm.attach.inject import (
    PTRACE_CONT,
    PTRACE_INTERRUPT,
    PTRACE_O_TRACECLONE,
    PTRACE_O_TRACEEXEC,
    PTRACE_O_TRACESYSGOOD,
    PTRACE_SEIZE,
    Backoff,
    Stop,
    StopKind,
    get_event_msg,
    get_regs,
    poll_stop,
    ptrace,
    set_regs,
)
from procksm.attach.tracees import Tracee
from procksm.errors import AccessDenied, NoSuchProcess, ProcksmError, PtraceError, PtraceTimeout
from procksm.procfs import read_status_fields, thread_state

SEIZE_OPTIONS = PTRACE_O_TRACESYSGOOD | PTRACE_O_TRACECLONE | PTRACE_O_TRACEEXEC
# Never PTRACE_O_EXITKILL: procksm dying must not kill its targets.


class ThreadGroupStop:
    """Stop every thread of process `pid` within `timeout` seconds, into `tracees`
    (which may already hold orphans of an earlier window, seized but not stopped)."""

    def __init__(self, pid: int, tracees: dict[int, Tracee], timeout: float) -> None:
        self.pid = pid
        self.tracees = tracees
        self.timeout = timeout
        self.exec_seen = False  # the target ran execve() while we were attaching
        self._tracer = threading.get_native_id()
        self._ignored: set[int] = set()  # zombie threads: cannot be seized, need nothing

    def run(self) -> None:
        deadline = time.monotonic() + self.timeout
        tracees = self.tracees
        self._attach_new()
        backoff = Backoff()
        while True:
            running = [t for t in tracees.values() if t.stop is None]
            if not running:
                if not self._attach_new():
                    break
                continue
            progressed = False
            for tracee in running:
                stop = poll_stop(tracee.tid)
                if stop is not None:
                    progressed = True
                    self._on_stop(tracee, stop)
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

    def _attach_new(self) -> bool:
        """Seize the threads of one listing not seized yet; whether there were any.

        Threads cloned by a thread before we seized it show up only in a later listing;
        :meth:`run` lists again once every seized thread is stopped, and ends only when
        that listing finds nothing new: then no thread is left that could have cloned
        one unseen (a stopped thread clones nothing; clones made after the seize are
        auto-attached, PTRACE_O_TRACECLONE, and reported by their parent's CLONE event).
        A listing right after each seize as well cost a third /proc/PID/task read per
        window (open, two getdents64, close) and found nothing the last one would not."""
        tracees, ignored = self.tracees, self._ignored
        new = [t for t in self._list_tasks() if t not in tracees and t not in ignored]
        for tid in new:
            self._seize(tid)
        return bool(new)

    def _list_tasks(self) -> list[int]:
        try:
            return procfs.list_threads(self.pid)
        except NoSuchProcess:
            return []

    def _seize(self, tid: int) -> None:
        try:
            ptrace(PTRACE_SEIZE, tid, 0, SEIZE_OPTIONS)
        except OSError as e:
            if e.errno == errno.ESRCH:
                self._ignored.add(tid)  # exited since the listing
                return
            if e.errno != errno.EPERM:
                raise PtraceError(f"PTRACE_SEIZE of thread {tid} of pid {self.pid}: {e}") from None
            self._seize_refused(tid)
            return
        self.tracees[tid] = Tracee(tid)
        try:
            ptrace(PTRACE_INTERRUPT, tid)
        except OSError as e:
            if e.errno != errno.ESRCH:
                raise PtraceError(f"PTRACE_INTERRUPT of thread {tid}: {e}") from None

    def _seize_refused(self, tid: int) -> None:
        """PTRACE_SEIZE of `tid` failed with EPERM: a thread of ours already, a thread
        gone, or a refusal to explain."""
        try:
            tracer_of_tid = int(read_status_fields(self.pid, tid).get("TracerPid", "0"))
        except (ProcksmError, OSError):
            self._ignored.add(tid)  # the thread is gone
            return
        if tracer_of_tid == self._tracer:
            # Auto-attached clone (or a thread left over from a timed-out window): it
            # reports a PTRACE_EVENT_STOP by itself.
            self.tracees[tid] = Tracee(tid)
            return
        if thread_state(self.pid, tid) in (None, "Z", "X"):
            self._ignored.add(tid)  # an exited thread (e.g. a leader that called pthread_exit)
            return
        # Re-run the diagnosis for a precise message; if it finds nothing, say what we know.
        check_attachable(self.pid)
        raise AccessDenied(
            self.pid,
            f"PTRACE_SEIZE of pid {self.pid} was refused (EPERM) although uids and "
            "capabilities allow it: a security module (SELinux, AppArmor, Yama) forbids it",
        ) from None

    def _on_stop(self, tracee: Tracee, stop: Stop) -> None:
        tid = tracee.tid
        kind = stop.kind
        if kind is StopKind.EXITED:
            del self.tracees[tid]
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
            self.tracees.setdefault(child, Tracee(child))
        elif kind is StopKind.EXEC:
            # The process runs a new program; other threads are gone (their exits are
            # reported) and the execing thread now has the leader's tid. The session
            # then reopens the new program's memory (procksm.attach.target_program).
            self.exec_seen = True
            former = get_event_msg(tid)
            if former != tid:
                self.tracees.pop(former, None)
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

    def _save_registers(self, tracee: Tracee) -> None:
        try:
            regs = get_regs(tracee.tid)
        except OSError as e:
            if e.errno == errno.ESRCH:
                return  # SIGKILLed while stopped; the resume reaps it
            raise PtraceError(f"PTRACE_GETREGS of thread {tracee.tid}: {e}") from None
        if _interrupted_infinite_epoll(regs):
            regs.rax = unsigned(-ERESTARTNOHAND)
            set_regs(tracee.tid, regs)
        tracee.saved = regs

    def _timeout_error(self, tids: list[int]) -> PtraceTimeout:
        parts = []
        states = set()
        for tid in tids[:4]:
            state = thread_state(self.pid, tid)
            states.add(state)
            try:
                wchan = procfs.read_wchan(self.pid, tid)
            except (ProcksmError, OSError):
                wchan = "?"
            nr = procfs.read_thread_syscall(self.pid, tid)
            within = f", in {x86_64.syscall_name(nr)}" if nr is not None else ""
            parts.append(f"tid {tid} ({process_name(tid)}, state {state}, wchan {wchan}{within})")
        # D: a sleep nothing interrupts; R: runnable threads that got no CPU in time
        if states == {"R"}:
            why = "runnable, not scheduled in time: an overloaded machine?"
        else:
            why = "uninterruptible sleep?"
        return PtraceTimeout(
            f"{len(tids)} thread(s) of pid {self.pid} did not stop within {self.timeout:g} s "
            f"({why}): {', '.join(parts)}; the others were resumed"
        )


def _interrupted_infinite_epoll(regs: Registers) -> bool:
    """A thread stopped in epoll_wait(timeout -1) that the kernel answered with -EINTR."""
    if signed(regs.rax) != -errno.EINTR:
        return False
    if regs.orig_rax in (SYS_epoll_wait, SYS_epoll_pwait):
        return ctypes.c_int32(regs.r10 & 0xFFFFFFFF).value < 0  # timeout (int) < 0: forever
    if regs.orig_rax == SYS_epoll_pwait2:
        return regs.r10 == 0  # NULL timespec: forever
    return False
