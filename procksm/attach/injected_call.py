"""One system call injected into a stopped thread, with its way back.

The call runs the target's own `syscall; ret` (procksm.attach.inject.find_gadgets), stepped
from its syscall-entry-stop to its syscall-exit-stop with PTRACE_SYSCALL, with rsp at
the thread's frames (procksm.attach.return_frames): if procksm dies at any instant, the thread
runs at most this call and returns to its own state by itself. While a thread holds
procksm's registers all its signals are blocked (PTRACE_SETSIGMASK) and stay pending
until its own mask is back; one that still stops it (SIGSTOP) is held and re-sent when
the window ends (procksm.attach.thread_resume).

PTRACE_SINGLESTEP over the instruction would be one round trip instead of two (measured
~15 vs ~19-25 us) but ends in a SIGTRAP signal-delivery-stop, and a thread left in a
signal-delivery-stop receives that signal if procksm dies: it killed the target in the
SIGKILL test. A syscall-exit-stop is safe to die in: its pending "signal" is
SIGTRAP|0x80 (PTRACE_O_TRACESYSGOOD), which the kernel's send_sig() rejects as invalid.
"""

from __future__ import annotations

import contextlib
import errno
import os
import time
from collections.abc import Callable

from procksm.arch import x86_64
from procksm.arch.x86_64 import ARGUMENT_REGISTERS, Registers, signed, unsigned
from procksm.attach.deferred_signals import signals_deferred
from procksm.attach.inject import (
    PTRACE_INTERRUPT,
    PTRACE_SYSCALL,
    Gadgets,
    StopKind,
    get_regs,
    get_siginfo,
    own_cpu,
    ptrace,
    set_regs,
    set_sigmask,
    wait_stop,
)
from procksm.attach.kill_steps import step
from procksm.attach.return_frames import ALL_SIGNALS, ReturnFrames
from procksm.attach.seccomp_precheck import SeccompPrecheck
from procksm.attach.tracees import StoppedThreads, Tracee
from procksm.errors import NoSuchProcess, PtraceError, PtraceTimeout
from procksm.procfs import ThreadSched


class InjectedSyscallError(PtraceError):
    """An injected system call returned an error in the target."""

    def __init__(self, pid: int, name: str, err: int) -> None:
        super().__init__(
            f"injected {name} in pid {pid} failed: "
            f"{errno.errorcode.get(err, str(err))} ({os.strerror(err)})"
        )
        self.pid = pid
        self.errno = err


class SyscallInjector:
    """The system calls of one window, each run in one of its stopped threads.

    `timeout` says how long a call may take; it is read at each call (a caller may
    change its session's timeout between calls). `pin_cpu`: inject from the CPU the
    stopped thread last ran on, which makes each wake-up local instead of a cross-CPU
    IPI (docs/design.md §2.8); the session puts the affinity back when the window ends.
    """

    def __init__(
        self,
        threads: StoppedThreads,
        frames: ReturnFrames,
        gadgets: Gadgets,
        precheck: SeccompPrecheck,
        *,
        timeout: Callable[[], float],
        pin_cpu: bool,
        sched: ThreadSched,
    ) -> None:
        self.threads = threads
        self.frames = frames
        self.gadgets = gadgets
        self._precheck = precheck
        self._timeout = timeout
        self._pin_cpu = pin_cpu
        self._pinned = False
        self._sched = sched  # the session's: the thread's CPU, from a kept fd
        self.window_ended = False  # set by the session: nothing is injected any more
        self.signals_held = 0  # signals that arrived during an injection, re-sent at resume
        # Why this window ended early with an injected call still running (_abandon):
        # then nothing more is injected, and the window ends as procksm's death would.
        self.abandoned: str | None = None

    def timeout(self) -> float:
        """How long one injected call (or one batch of them) may take."""
        return self._timeout()

    def precheck_routine(self, routine: int) -> bool:
        """Check the seccomp filters on the calls procksm's call routine makes, at its
        instruction pointers (procksm.attach.call_batch), once per session. Whether the
        routine's wake-up at its table's end runs."""
        self._precheck.ensure_routine(self.threads, routine)
        return self._precheck.routine_wakes

    def syscall(self, nr: int, *args: int, tid: int | None = None) -> int:
        """Run system call `nr` in a stopped thread (default: the injecting thread);
        the raw rax: the result, or -errno (procksm.attach.session.StoppedTarget.syscall)."""
        if self.window_ended:
            raise PtraceError("StoppedTarget used outside its stopped() window")
        if len(args) > 6:
            raise ValueError("a system call takes at most 6 arguments")
        if self.abandoned is not None:
            # e.g. a `finally:` that closes fds: the thread is still in the earlier call
            raise PtraceTimeout(self.abandoned)
        threads = self.threads
        tracee = threads.tracee(tid) if tid is not None else threads.injector()
        if tracee.saved is None:
            raise PtraceError(f"thread {tracee.tid} has no saved registers")
        insn = self.gadgets.syscall
        if self._pin_cpu and not self._pinned:
            self._pin_to(tracee.tid)
        self._precheck.ensure(threads, insn)
        with signals_deferred():
            try:
                self.frames.ensure_armed(tracee)
                self._load(tracee, insn, nr, args)
                result = self._run_syscall(tracee, insn, nr)
            except OSError as e:
                raise threads.lost(tracee.tid, e) from None
        return signed(result.rax)

    def syscall_checked(self, nr: int, *args: int, name: str = "", tid: int | None = None) -> int:
        """Like syscall(), but raise InjectedSyscallError on a -errno result."""
        result = self.syscall(nr, *args, tid=tid)
        if -4095 <= result < 0:
            raise InjectedSyscallError(self.threads.pid, name or x86_64.syscall_name(nr), -result)
        return result

    def _load(self, tracee: Tracee, insn: int, nr: int, args: tuple[int, ...]) -> None:
        """Give the (armed) thread the registers of the call, then block its signals."""
        assert tracee.saved is not None
        regs = tracee.saved.copy()
        regs.rip = insn
        regs.rsp = tracee.chain
        regs.rax = nr
        regs.orig_rax = unsigned(-1)  # not in a syscall: no restart logic on ours
        for name, value in zip(ARGUMENT_REGISTERS, args, strict=False):
            setattr(regs, name, unsigned(value))
        tracee.dirty = True
        set_regs(tracee.tid, regs)
        step("load", tracee.tid, nr)
        if tracee.sigmask is None:
            # After the registers, never before: a thread released with its own
            # registers must also have its own mask. The frame restores it.
            tracee.sigmask = self.frames.own_mask(tracee.tid)
            set_sigmask(tracee.tid, ALL_SIGNALS)
            step("block", tracee.tid)

    def move_beside(self, tid: int) -> bool:
        """Run procksm on another CPU than the one thread `tid` last ran on, for the rest
        of the window (the session puts the affinity back): while the thread runs a batch
        of calls procksm polls for its end, and polling on the thread's own CPU delays it
        (measured: every batch's end and stop seen ~0.2-0.8 ms late, procksm yielding and
        sleeping in turn). False when there is no other CPU."""
        self._pinned = True
        cpu = self._sched.last_cpu(tid)
        if cpu is None:
            return False  # an optimisation only
        try:
            if own_cpu() != cpu:
                # on another CPU already: no affinity set (setting it and putting it back
                # cost ~8 us a window, a forced migration ~40 us, measured)
                return True
            others = os.sched_getaffinity(0) - {cpu}
            if others:
                os.sched_setaffinity(0, others)
                return True
        except OSError:
            pass  # an optimisation only
        return False

    def _pin_to(self, tid: int) -> None:
        self._pinned = True
        cpu = self._sched.last_cpu(tid)
        try:
            if cpu is not None and cpu in os.sched_getaffinity(0):
                os.sched_setaffinity(0, {cpu})
        except OSError:
            pass  # pinning is an optimisation only

    def _run_syscall(self, tracee: Tracee, insn: int, nr: int) -> Registers:
        """Resume into the injected syscall; return the registers at its exit stop."""
        tid, pid = tracee.tid, self.threads.pid
        timeout = self._timeout()
        deadline = time.monotonic() + timeout
        entered = False
        ptrace(PTRACE_SYSCALL, tid, 0, 0)
        while True:
            stop = wait_stop(tid, deadline)
            if stop is None:
                message = (
                    f"injected syscall {nr} in thread {tid} of pid {pid} did not complete "
                    f"within {timeout:g} s"
                )
                self._abandon(tracee, message)
                raise PtraceTimeout(message)
            if stop.kind is StopKind.EXITED:
                del self.threads.tracees[tid]
                raise NoSuchProcess(pid, f"thread {tid} of pid {pid} exited")
            if stop.kind is StopKind.SYSCALL:
                if entered:
                    regs = get_regs(tid)
                    if regs.rip != insn + 2 or regs.orig_rax != nr:
                        raise PtraceError(
                            f"thread {tid} of pid {pid} stopped in syscall {regs.orig_rax} "
                            f"at {regs.rip:#x} instead of the injected {nr} at {insn + 2:#x}"
                        )
                    tracee.stop = stop
                    return regs
                entered = True  # the entry stop; the next syscall stop is its exit
            elif stop.kind is StopKind.SIGNAL:
                # A signal arrived while our registers are in place: delivering it now
                # would save them in the handler's frame. Hold it; re-sent at resume.
                tracee.held_signals.append(get_siginfo(tid))
                self.signals_held += 1
            # Anything else (a leftover PTRACE_EVENT_STOP, a group stop): keep going.
            ptrace(PTRACE_SYSCALL, tid, 0, 0)

    def _abandon(self, tracee: Tracee, message: str) -> None:
        """An injected call outlived the timeout (seen: a populate in uninterruptible
        sleep on a loaded machine). Interrupt it and wait as long again: if the thread
        stops, its call is over and the window goes on to its end as usual. If not, the
        call still runs (nothing interrupts an uninterruptible sleep) with procksm's
        registers: the thread is left to its frames, as if procksm had died, and the
        window ends without injecting anything more (procksm.attach.thread_resume's `as_is`)."""
        stop = None
        with contextlib.suppress(OSError):
            ptrace(PTRACE_INTERRUPT, tracee.tid)
            stop = wait_stop(tracee.tid, time.monotonic() + self._timeout())
        if stop is not None and stop.kind is StopKind.EXITED:
            del self.threads.tracees[tracee.tid]
            return
        if stop is None:
            # still in the call: an orphan, detached once it stops (procksm.attach.thread_resume)
            tracee.stop = None
            self.abandoned = message + "; the thread was left to its way back"
            return
        tracee.stop = stop
