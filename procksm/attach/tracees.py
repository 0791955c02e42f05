"""The threads of a target that procksm holds in ptrace stops.

:class:`Tracee` is what procksm knows of one thread while it is seized; a window's
threads, all stopped, are :class:`StoppedThreads`, through which the target's memory is
reached and which names the thread injected calls run in.
"""

from __future__ import annotations

import errno
import threading
from dataclasses import dataclass, field

from procksm import procfs
from procksm.arch import x86_64
from procksm.arch.x86_64 import Registers
from procksm.attach.inject import Stop, StopKind, read_memory, write_memory
from procksm.errors import NoSuchProcess, ProcksmError, PtraceError
from procksm.procfs import read_status_fields
from procksm.procfs import thread_state as _thread_state


@dataclass
class Tracee:
    tid: int
    stop: Stop | None = None  # the ptrace stop it is held in; None while it still runs
    saved: Registers | None = None  # its own registers, read when it stopped
    dirty: bool = False  # registers changed (only true inside an injection)
    held_signals: list[bytes] = field(default_factory=list)  # siginfo, re-sent at resume
    # Kill safety (procksm.attach.return_frames): once armed, the thread's own state is in a
    # frame on its stack, and whatever registers it holds lead back to that frame.
    sigmask: int | None = None  # its own signal mask, while procksm has blocked all
    chain: int = 0  # rsp for an injected call: the frame its `ret` returns through
    own_frame: int = 0  # where the frame of its own state is


class StoppedThreads:
    """Every thread of the target, held in ptrace stops for the length of a window."""

    def __init__(self, pid: int, tracees: dict[int, Tracee]) -> None:
        self.pid = pid
        self.tracees = tracees  # shared with the window's resume: exits are removed
        self._injector_tid: int | None = None

    @property
    def tids(self) -> list[int]:
        return sorted(self.tracees)

    @property
    def group_stopped(self) -> bool:
        """The process is in a job-control stop (SIGSTOP); it stays stopped after the window."""
        return any(
            t.stop is not None and t.stop.kind is StopKind.GROUP_STOP for t in self.tracees.values()
        )

    def tracee(self, tid: int | None) -> Tracee:
        """Thread `tid`, or with None the leader (or, once it exited, the lowest tid)."""
        if tid is None:
            if not self.tracees:
                raise NoSuchProcess(self.pid, f"process {self.pid} has no threads left")
            tid = self.pid if self.pid in self.tracees else min(self.tracees)
        tracee = self.tracees.get(tid)
        if tracee is None:
            raise PtraceError(f"thread {tid} is not a stopped thread of pid {self.pid}")
        return tracee

    def injector(self) -> Tracee:
        """The thread injected calls run in: the main thread, unless it sleeps in a call
        restarted through its restart block and another thread does not (if procksm
        died, that call would be re-issued with its whole timeout, procksm.arch.x86_64)."""
        if self._injector_tid is None:
            candidates = sorted(self.tracees.values(), key=lambda t: t.tid != self.pid)
            if not candidates:
                raise NoSuchProcess(self.pid, f"process {self.pid} has no threads left")
            best = next(
                (t for t in candidates if t.saved and not x86_64.restarts_through_block(t.saved)),
                candidates[0],
            )
            self._injector_tid = best.tid
        return self.tracee(self._injector_tid)

    # memory

    def memory_tid(self) -> int:
        """A live thread to reach the address space through (the leader may have exited)."""
        return self.tracee(None).tid

    def read_memory(self, addr: int, size: int) -> bytes:
        tid = self.memory_tid()
        try:
            return read_memory(tid, addr, size)
        except OSError as e:
            raise self.lost(tid, e) from None

    def write_memory(self, addr: int, data: bytes) -> None:
        tid = self.memory_tid()
        try:
            write_memory(tid, addr, data)
        except OSError as e:
            raise self.lost(tid, e) from None

    def lost(self, tid: int, e: OSError) -> ProcksmError:
        """The procksm error for `e`, met reaching thread `tid`."""
        if e.errno == errno.ESRCH and not procfs.thread_exists(self.pid, tid):
            return NoSuchProcess(self.pid, f"thread {tid} of pid {self.pid} has exited")
        if e.errno == errno.ESRCH:
            # The thread lives but is not in a ptrace stop of ours: say where it is, and
            # who traces it, so that the cause can be told from the message alone.
            try:
                tracer = read_status_fields(self.pid, tid).get("TracerPid", "?")
            except OSError:
                tracer = "?"
            return PtraceError(
                f"pid {self.pid}, thread {tid}: {e} (state {_thread_state(self.pid, tid)}, "
                f"traced by {tracer}, this tracer thread {threading.get_native_id()}, "
                f"last stop {self.tracees[tid].stop if tid in self.tracees else None})"
            )
        return PtraceError(f"pid {self.pid}, thread {tid}: {e}")
