"""Letting every thread of a window go: its own state back, held signals redelivered,
threads that had not stopped yet kept as orphans and detached once they stop.

Windows end with PTRACE_DETACH, never PTRACE_CONT: restart of interrupted system calls
is left to the kernel. Measured here (kernel 6.18): after PTRACE_INTERRUPT a thread
blocked in read/futex/nanosleep/poll/select/accept/pause shows rax = -512..-516; on
PTRACE_DETACH the kernel sets TIF_SIGPENDING (``__ptrace_unlink`` →
``ptrace_signal_wake_up``) so the thread goes through ``arch_do_signal_or_restart`` and
the restart fix-up (rax = orig_rax or restart_syscall, rip -= 2) is applied — also when
detaching from the stop that ends an injected syscall, provided the original registers
were put back. Resuming with PTRACE_CONT from that stop instead skips the fix-up (read()
then returns errno 512, docs/design.md §2.7). Applying the fix-up by hand would also be
wrong when a real signal arrives just before the resume (it would turn its EINTR into a
restart); the kernel decides with the signal in hand.
"""

from __future__ import annotations

import contextlib
import errno
import time

from procksm.attach.inject import (
    PTRACE_CONT,
    PTRACE_DETACH,
    Backoff,
    StopKind,
    get_event_msg,
    poll_stop,
    ptrace,
    set_regs,
    set_siginfo,
    set_sigmask,
    tgkill,
    wait_stop,
)
from procksm.attach.kill_steps import step
from procksm.attach.tracees import Tracee
from procksm.errors import PtraceError

# How long a window's end waits for the exits of threads killed while stopped (the rest
# is collected when the session ends: release_orphans)
REAP_S = 1.0


class ThreadGroupResume:
    """The end of every window of a session with process `pid`, and the threads a
    window could not stop in time (orphans), which the next window takes over."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.orphans: set[int] = set()  # seized threads that had not stopped by the timeout

    def take_orphans(self) -> dict[int, Tracee]:
        """The orphans, for a new window to stop with the other threads."""
        tracees = {tid: Tracee(tid) for tid in self.orphans}
        self.orphans.clear()
        return tracees

    def resume_all(
        self, tracees: dict[int, Tracee], *, injector: int | None, as_is: bool, timeout: float
    ) -> None:
        """Detach every stopped thread with its own state back (mask first, registers
        second), the injecting thread of a gated window (`injector`) last; threads that
        have not stopped become orphans.

        `as_is`: an injected call was abandoned still running
        (procksm.attach.injected_call.SyscallInjector._abandon). Every thread is then detached as
        procksm's death would leave it: its registers and mask lead through its frames (a
        gated thread waits until the running call and the wake-up after it are done), so
        no thread runs its own code before a replacement in flight has finished (issue
        13's "no lost write").
        """
        failures = []
        killed = []  # killed while stopped: their exits are procksm's to collect
        # The injecting thread last: while any other thread may still wait at the gate,
        # the injecting thread's frames still hold the gate's wake-up.
        for tracee in sorted(tracees.values(), key=lambda t: t.tid == injector):
            if tracee.stop is None:
                # Seized but not stopped yet: it can only be detached once it stops.
                self.orphans.add(tracee.tid)
                continue
            try:
                self._let_go(tracee, as_is=as_is, timeout=timeout)
            except OSError as e:
                if e.errno == errno.ESRCH:
                    killed.append(tracee.tid)
                else:
                    failures.append(f"thread {tracee.tid}: {e}")
        if killed:
            # Their exits are collected all together (release_orphans polls every pending
            # thread in turn): a traced thread-group leader's exit is reported only once
            # every other thread of the group has been collected. Waiting 0.2 s for each
            # thread in turn gave up on the leader first, and it stayed a zombie traced by
            # procksm that its parent could not reap (a CI run: a redis-server SIGKILLed
            # during a daemon window; its parent's wait hung until the daemon exited).
            self.orphans.update(killed)
            self.release_orphans(time.monotonic() + min(timeout, REAP_S))
        if failures:
            raise PtraceError(f"could not resume pid {self.pid}: {'; '.join(failures)}")

    def _let_go(self, tracee: Tracee, *, as_is: bool, timeout: float) -> None:
        if as_is:
            ptrace(PTRACE_DETACH, tracee.tid, 0, 0)
            step("detach", tracee.tid)
            return
        # Mask first, registers second: in between, the thread's registers
        # still lead through its frames, which restore the same mask.
        if tracee.sigmask is not None:
            set_sigmask(tracee.tid, tracee.sigmask)
            step("unblock", tracee.tid)
            tracee.sigmask = None
        if tracee.dirty and tracee.saved is not None:
            set_regs(tracee.tid, tracee.saved)
            step("restore", tracee.tid)
            tracee.dirty = False
        tracee.chain = 0
        if tracee.held_signals:
            self._redeliver(tracee, timeout)
        else:
            ptrace(PTRACE_DETACH, tracee.tid, 0, 0)
            step("detach", tracee.tid)

    def _redeliver(self, tracee: Tracee, timeout: float) -> None:
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
        deadline = time.monotonic() + timeout
        while True:
            stop = wait_stop(tid, deadline)
            if stop is None:
                self.orphans.add(tid)
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

    def release_orphans(self, deadline: float) -> None:
        """Detach threads left seized by a timed-out window, once they stop.

        While an orphan runs it may clone: its children are auto-attached to us too and
        must be detached as well, or they would wait in their first stop forever.
        """
        pending = set(self.orphans)
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
        self.orphans = pending
