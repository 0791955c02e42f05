"""The program a target runs, as procksm's injected calls need it: its memory, opened
once per program, and the `syscall; ret` wrapper and sigreturn trampoline of its own code
that every injected call runs through (procksm.attach.inject.find_gadgets). An exec replaces
both; :meth:`TargetProgram.unchanged` notices it at the start of a window.
"""

from __future__ import annotations

import os

from procksm import procfs
from procksm.arch.x86_64 import SYSCALL_RET
from procksm.attach.diagnose import process_name
from procksm.attach.inject import Gadgets, find_gadgets
from procksm.errors import NoSuchProcess, ProcksmError, PtraceError, Unsupported
from procksm.procfs import live_threads, thread_state


class TargetProgram:
    """The memory and the gadgets of the program process `pid` runs."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.gadgets = Gadgets(0, 0)
        # /proc/PID/task/TID/mem, opened once: the open file pins the address space it
        # was opened on, so reading from it fails once the process has exec'd another
        # program (between windows we are not attached and get no PTRACE_EVENT_EXEC).
        self._mem_fd: int | None = None

    def open(self, tid: int) -> None:
        """Open the target's memory and find a syscall instruction in it."""
        if thread_state(self.pid, tid) in (None, "Z", "X"):
            live = live_threads(self.pid)
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
                f"pid {self.pid} ({process_name(self.pid)}): no `syscall; ret` and sigreturn "
                "trampoline in its libraries (a static binary?): procksm injects only where "
                "a killed procksm leaves every thread a way back to its own state"
            )
        self.gadgets = gadgets
        self.close()
        self._mem_fd = fd

    def unchanged(self) -> bool:
        """The program opened is still the one the target runs (no exec since)."""
        assert self._mem_fd is not None
        try:
            return os.pread(self._mem_fd, 3, self.gadgets.syscall) == SYSCALL_RET
        except OSError:
            return False

    def close(self) -> None:
        if self._mem_fd is not None:
            os.close(self._mem_fd)
            self._mem_fd = None
