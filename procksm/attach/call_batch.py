"""A stop window's system calls, run in the target in one go by procksm's call routine.

One ptrace round trip per injected call (two stops, a wait, registers read and written)
cost ~0.3 ms each and a window made 10-20 of them (docs/design.md §7). Here the window's
calls are written as a table in the scratch page (procksm.arch.x86_64_batch), the
injecting thread is pointed at the routine mapped in the scratch area and let run
(PTRACE_CONT): it makes every call, stores every result, sets the table's done word and
parks in a ppoll. procksm sees the done word, interrupts the parked thread and reads the
results: O(1) round trips per window, whatever the number of calls.

Kill safety (docs/kill-safety.md): the routine is only given calls that are safe to make
unsupervised, once procksm has compared the bytes under stop and gated the other threads
(:meth:`procksm.attach.session.StoppedTarget.hold_others`). Whether procksm dies before
the thread is let run (its registers already lead into the routine, or still to the gate's
wake-up) or while it runs, the thread finishes the table by itself: checks that fail skip
the calls that depend on them (EXPECT, ARG_FROM), the clean-up calls run in any case
(ALWAYS), the park times out after :data:`PARK_NS` and `ret` leads through the gate's
wake-up and the frame of its own state. No rt_sigreturn runs on the way to the park: it
would reset the thread's restart block (a nanosleep it was stopped in would then return
EINTR), and the park is a ppoll, whose interruption leaves the restart block alone too
(-ERESTARTNOHAND; a timed futex wait would set it to futex_wait_restart).
"""

from __future__ import annotations

import signal
import struct
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NoReturn, cast

from procksm import PAGE_SIZE
from procksm.arch import x86_64_batch as routine_abi
from procksm.arch.x86_64 import SYS_fstat, unsigned
from procksm.arch.x86_64_batch import (
    ALWAYS,
    ARG_FROM,
    COMPARE_STEP,
    EQUAL,
    EXPECT,
    LOAD,
    NOT_RUN,
    ZERO,
    Entry,
)
from procksm.attach.deferred_signals import signals_deferred
from procksm.attach.inject import (
    PTRACE_CONT,
    PTRACE_INTERRUPT,
    Backoff,
    Stop,
    StopKind,
    futex_wait,
    get_regs,
    get_siginfo,
    poll_stop,
    ptrace,
    set_regs,
    set_sigmask,
    set_timer_slack,
    wait_stop,
)
from procksm.attach.injected_call import SyscallInjector
from procksm.attach.kill_steps import step
from procksm.attach.return_frames import ALL_SIGNALS
from procksm.attach.scratch import SharedPages
from procksm.attach.scratch_layout import TABLE_CAPACITY, TABLE_ENTRIES, TABLE_HEADER, TABLE_STAT
from procksm.attach.tracees import Tracee
from procksm.errors import NoSuchProcess, PtraceError, PtraceTimeout

# How long a parked thread waits for procksm before it goes back to its own state by
# itself. procksm interrupts it within microseconds of the done word; the timeout only
# matters if procksm died (the target's threads then wait this long, once) or was not
# scheduled for that long (the window then ends as if procksm had died: see _escaped).
PARK_NS = 200_000_000
# How procksm waits for the end of a batch and for the stop after it: in sleeps of 20 us
# (timer slack 1 us) for the first 5 ms, then growing. Not spinning: even from another CPU
# (move_beside) the thread may be woken on procksm's (wake-affine) and starve behind a
# spinning procksm; measured with a 3 ms spin: 6 % of windows took 3-10 ms instead of ~1.
BATCH_POLL_STEADY = 5e-3
# The stop at the park follows PTRACE_INTERRUPT within microseconds (the thread sleeps
# in ppoll, on another CPU than procksm: move_beside): wait for it yielding, not
# sleeping (a sleep of 20 us ends ~60 us later here). Measured per window: 74 -> 30-35 us.
PARK_STOP_SPIN = 200e-6
BATCH_TIMER_SLACK_NS = 1000
# The longest procksm sleeps on the done word before it looks for a stop of the thread
# (a signal that cannot be blocked, a fault): a batch ends with a wake-up, so this only
# bounds how late such a stop is seen.
WAKE_WAIT_S = 2e-3


def _pacing() -> Backoff:
    return Backoff(spin=0.0, steady=BATCH_POLL_STEADY)


@dataclass(frozen=True, slots=True)
class Ref:
    """The result of an earlier call of the same batch, as an argument of a later one."""

    index: int


class CallBatch:
    """The calls of one window, in order, built before any of them runs.

    ``call(nr, *args, expect=, always=)``: a system call; an argument may be a
    :class:`Ref` to an earlier call's result (the call is then skipped if that result is
    an error or did not run). ``expect``: any other result skips every later call that
    is not ``always`` (clean-up: closes, advice that must follow a mapping).
    ``check_stat``: fstat of an fd (a Ref) compared with (st_dev, st_ino).
    """

    def __init__(self) -> None:
        self.entries: list[Entry] = []
        self.stat_buffer = 0  # the table's stat buffer; set by the runner's layout
        self._table: tuple[int, bytes] | None = None  # (entries, their encoding)

    def __len__(self) -> int:
        return len(self.entries)

    def table(self) -> bytes:
        """The table procksm writes for the routine: header and entries, encoded once
        (a table built before its window's stop is encoded there, not in the stop)."""
        if self._table is None or self._table[0] != len(self.entries):
            blob = routine_abi.header(PARK_NS).ljust(TABLE_ENTRIES - TABLE_HEADER, b"\0")
            self._table = (len(self.entries), blob + routine_abi.encode_table(self.entries))
        return self._table[1]

    def call(
        self, nr: int, *args: int | Ref, expect: int | None = None, always: bool = False
    ) -> Ref:
        flags = (EXPECT if expect is not None else 0) | (ALWAYS if always else 0)
        return self._entry(nr, args, flags, expect)

    def _entry(
        self, nr: int, args: tuple[int | Ref, ...], flags: int, expect: int | None = None
    ) -> Ref:
        source, slot, plain = -1, 0, cast("tuple[int, ...]", args)
        for i, a in enumerate(args):
            if isinstance(a, Ref):
                if source >= 0:
                    raise ValueError("a call takes at most one earlier result as argument")
                source, slot = a.index, i
        if source >= 0:
            flags |= ARG_FROM
            plain = tuple(0 if isinstance(a, Ref) else a for a in args)
        self.entries.append(Entry(nr, plain, flags, expect or 0, source, slot))
        return Ref(len(self.entries) - 1)

    def equal(self, at: int, source: int, length: int, value: int | Ref) -> Ref:
        """Whether the ``length`` bytes at ``at`` equal those at ``source``, compared by
        the routine in the target: the result is ``value`` (an earlier call's result, or
        a plain number) if so, an argument for a later call, which is skipped otherwise
        (the result is then UNEQUAL)."""
        self._check_length(length)
        return self._entry(0, (at, source, length, value), EQUAL)

    def zero(self, at: int, length: int) -> Ref:
        """Whether the ``length`` bytes at ``at`` are all zero (as :meth:`equal`)."""
        self._check_length(length)
        return self._entry(0, (at, length), ZERO)

    @staticmethod
    def _check_length(length: int) -> None:
        if length <= 0 or length % COMPARE_STEP:
            raise ValueError(f"a comparison of {length} bytes: not a multiple of {COMPARE_STEP}")

    def check_stat(
        self, fd: Ref, identity: tuple[int, int], stat_buffer: int
    ) -> list[tuple[Ref, int]]:
        """fstat(fd) into the table's stat buffer, then its st_dev and st_ino read back
        and compared: a mismatch skips every later call that is not ``always``. Returns
        each read-back with the value it must have."""
        done = self.call(SYS_fstat, fd, stat_buffer, expect=0)
        checks = []
        # x86_64's struct stat starts with st_dev, st_ino (arch/x86/include/uapi/asm/stat.h)
        for offset, want in zip((0, 8), identity, strict=True):
            self.entries.append(
                Entry(0, (stat_buffer + offset, 0), LOAD | EXPECT | ARG_FROM, want,
                      source=done.index, slot=1)
            )  # fmt: skip
            checks.append((Ref(len(self.entries) - 1), want))
        return checks


class BatchResults:
    """What each call of a batch returned: the raw rax (-errno), or NOT_RUN."""

    def __init__(self, values: Sequence[int]) -> None:
        self._values = list(values)

    def __getitem__(self, ref: Ref) -> int:
        return self._values[ref.index]

    def ran(self, ref: Ref) -> bool:
        return self._values[ref.index] != NOT_RUN

    def ok(self, ref: Ref) -> bool:
        """The call ran and did not fail."""
        value = self._values[ref.index]
        return value != NOT_RUN and not -4095 <= value < 0


_FAULT_SIGNALS = frozenset({signal.SIGSEGV, signal.SIGBUS, signal.SIGILL, signal.SIGFPE})


def _is_fault(sig: int, info: bytes) -> bool:
    """A fault of the thread's own instructions: a fault signal the kernel raised (si_code
    > 0; one sent with kill or tgkill has SI_USER 0 or a negative code)."""
    (code,) = struct.unpack_from("<i", info, 8)
    return sig in _FAULT_SIGNALS and code > 0


class BatchRunner:
    """Runs batches in the injecting thread of a gated window."""

    def __init__(
        self, calls: SyscallInjector, routine: int, table: int, shared: SharedPages | None = None
    ) -> None:
        self._calls = calls
        self._routine = routine
        self._table = table
        # procksm's own mapping of the table's page (procksm.attach.scratch.SharedPages):
        # the table written and read there, and the end waited for on its done word
        self._shared = shared

    @property
    def stat_buffer(self) -> int:
        return self._table + TABLE_STAT

    def run(self, batch: CallBatch) -> BatchResults:
        calls = self._calls
        if calls.window_ended:
            raise PtraceError("StoppedTarget used outside its stopped() window")
        if calls.abandoned is not None:
            raise PtraceTimeout(calls.abandoned)
        if not batch.entries:
            return BatchResults([])
        if len(batch) > TABLE_CAPACITY:
            raise ValueError(f"{len(batch)} calls in one batch; the table holds {TABLE_CAPACITY}")
        threads = calls.threads
        tracee = threads.injector()
        if tracee.saved is None or not tracee.chain:
            raise PtraceError("a batch runs in the injecting thread of a gated window")
        wakes = calls.precheck_routine(self._routine)
        shared = self._shared
        blob = batch.table()
        with signals_deferred():
            try:
                if shared is not None:
                    shared.write(PAGE_SIZE, blob)  # page 1 of the memfd: the table's page
                else:
                    threads.write_memory(self._table, blob)
                step("table", tracee.tid)
                calls.move_beside(tracee.tid)
                set_timer_slack(BATCH_TIMER_SLACK_NS)
                self._load(tracee, len(batch))
                ptrace(PTRACE_CONT, tracee.tid, 0, 0)
                step("batch", tracee.tid)
                self._wait_done(tracee, shared if wakes else None)
                self._interrupt_at_park(tracee)
                size = len(blob) - TABLE_ENTRIES
                if shared is not None:
                    table = shared.read(PAGE_SIZE + TABLE_ENTRIES, size)
                else:
                    table = threads.read_memory(self._table + TABLE_ENTRIES, size)
            except OSError as e:
                raise threads.lost(tracee.tid, e) from None
        return BatchResults(routine_abi.decode_results(table, len(batch)))

    def _load(self, tracee: Tracee, count: int) -> None:
        """Point the (armed) thread at the routine, then block its signals: the
        routine returns through the thread's chain (the gate's wake-up, its own frame)."""
        assert tracee.saved is not None
        regs = tracee.saved.copy()
        regs.rip = self._routine
        regs.rsp = tracee.chain
        regs.rdi = self._table + TABLE_ENTRIES
        regs.rsi = count
        regs.rdx = self._table + TABLE_HEADER
        regs.orig_rax = unsigned(-1)  # not in a syscall: no restart logic on resume
        tracee.dirty = True
        set_regs(tracee.tid, regs)
        step("routine", tracee.tid, count)
        if tracee.sigmask is None:
            tracee.sigmask = self._calls.frames.own_mask(tracee.tid)
            set_sigmask(tracee.tid, ALL_SIGNALS)
            step("block", tracee.tid)

    def _wait_done(self, tracee: Tracee, shared: SharedPages | None) -> None:
        """Until the routine has set the done word. A stop met meanwhile is a signal
        that cannot be blocked (SIGSTOP: held and re-sent at the end of the window, as
        for a single call) or a leftover event stop. With ``shared``, procksm sleeps on
        the done word until the routine's FUTEX_WAKE (or WAKE_WAIT_S, to look for such
        stops); otherwise it polls the target's memory."""
        calls, threads, tid = self._calls, self._calls.threads, tracee.tid
        deadline = time.monotonic() + calls.timeout()
        backoff = _pacing()
        done_at = PAGE_SIZE + TABLE_HEADER  # in the shared pages
        while True:
            if shared is not None:
                done = shared.word(done_at)
            else:
                (done,) = struct.unpack("<Q", threads.read_memory(self._table + TABLE_HEADER, 8))
            if done:
                return
            stop = poll_stop(tid)
            if stop is not None:
                self._resume_from(tracee, stop)
                continue
            if time.monotonic() >= deadline:
                late = f"did not complete within {calls.timeout():g} s"
                self._abandon(tracee, f"the calls of thread {tid} of pid {threads.pid} {late}")
            if shared is not None:
                futex_wait(shared.address + done_at, 0, WAKE_WAIT_S)
            else:
                backoff.pause()

    def _resume_from(self, tracee: Tracee, stop: Stop) -> None:
        if stop.kind is StopKind.EXITED:
            del self._calls.threads.tracees[tracee.tid]
            raise NoSuchProcess(self._calls.threads.pid, f"thread {tracee.tid} exited")
        if stop.kind is StopKind.SIGNAL:
            info = get_siginfo(tracee.tid)
            if _is_fault(stop.sig, info):
                self._faulted(tracee, stop, info)
            tracee.held_signals.append(info)
            self._calls.signals_held += 1
        ptrace(PTRACE_CONT, tracee.tid, 0, 0)

    def _faulted(self, tracee: Tracee, stop: Stop, info: bytes) -> NoReturn:
        """The thread faulted in the routine: procksm's own error. Held and resumed like
        another signal, it would fault again at every resume until the timeout, and once
        let go it would die of it. The signal is dropped instead (not held: the window's
        end detaches the thread from this stop with its own registers and no signal), and
        the window ends with an error; the calls made before the fault stay made (each is
        whole: a replacement of a compared range, an fd the target then keeps)."""
        (addr,) = struct.unpack_from("<Q", info, 16)
        rip = get_regs(tracee.tid).rip
        tracee.stop = stop
        raise PtraceError(
            f"pid {self._calls.threads.pid}: procksm's call routine faulted in thread "
            f"{tracee.tid} (signal {stop.sig} at {addr:#x}, rip {rip:#x}); the thread was "
            "given its own state back and the window's other calls were not made"
        )

    def _interrupt_at_park(self, tracee: Tracee) -> None:
        """Stop the thread in its park. If the park timed out first (procksm was not
        scheduled for PARK_NS), the thread went back to its own state by itself, through
        the gate's wake-up: the window ends as procksm's death would (_escaped)."""
        calls, tid = self._calls, tracee.tid
        ptrace(PTRACE_INTERRUPT, tid)
        deadline = time.monotonic() + calls.timeout()
        while True:
            stop = wait_stop(tid, deadline, pacing=Backoff(spin=PARK_STOP_SPIN))
            if stop is None:
                self._abandon(tracee, f"thread {tid} of pid {calls.threads.pid} did not stop "
                              "after its calls")  # fmt: skip
            if stop.kind in (StopKind.INTERRUPT, StopKind.GROUP_STOP):
                break
            self._resume_from(tracee, stop)
        tracee.stop = stop
        rip = get_regs(tid).rip
        if not self._routine <= rip < self._routine + len(routine_abi.ROUTINE):
            self._escaped(tracee)

    def _escaped(self, tracee: Tracee) -> None:
        calls = self._calls
        calls.abandoned = (
            f"thread {tracee.tid} of pid {calls.threads.pid} left its park before procksm "
            f"stopped it (procksm not scheduled for {PARK_NS // 1_000_000} ms); the window "
            "ended as procksm's death would end it"
        )
        # Its calls are done; the window is let go as is (procksm.attach.thread_resume).

    def _abandon(self, tracee: Tracee, message: str) -> NoReturn:
        """The routine outlived the timeout (a call in uninterruptible sleep): the thread
        is left to finish it by itself, as if procksm had died, and the window ends
        without anything more injected (as SyscallInjector._abandon)."""
        calls = self._calls
        stop = None
        try:
            ptrace(PTRACE_INTERRUPT, tracee.tid)
            stop = wait_stop(tracee.tid, time.monotonic() + calls.timeout())
        except OSError:
            pass
        if stop is not None and stop.kind is StopKind.EXITED:
            del calls.threads.tracees[tracee.tid]
            raise NoSuchProcess(calls.threads.pid, f"thread {tracee.tid} exited")
        tracee.stop = stop
        calls.abandoned = message + "; the thread was left to finish them"
        raise PtraceTimeout(calls.abandoned)
