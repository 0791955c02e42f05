"""procksm's error hierarchy.

Like memray's ``_errors.py``: every error a user can act on is a :class:`ProcksmError`
carrying an exit code; ``cli.main`` prints its message as one line on stderr (no
traceback) and exits with that code. OS errors are translated into these at the
boundary (``procfs``, ``attach``, ``reader``) so the rest of the code never sees errno.
"""

from __future__ import annotations

# Exit codes, documented in the README.
EXIT_OK = 0
EXIT_ERROR = 1  # generic failure
EXIT_USAGE = 2  # bad command line (argparse uses 2 too)
EXIT_NO_PROCESS = 3  # target does not exist / vanished
EXIT_PERMISSION = 4  # not permitted to trace / read the target
EXIT_BUSY = 5  # target already traced, or another procksm works on it
EXIT_UNSUPPORTED = 6  # kernel thread, ourselves, another namespace, missing kernel feature
EXIT_INTERRUPTED = 130


class ProcksmError(Exception):
    """An error with a one-line message meant for the user and an exit code."""

    exit_code = EXIT_ERROR

    def __init__(self, message: str, *, exit_code: int | None = None) -> None:
        super().__init__(message)
        if exit_code is not None:
            self.exit_code = exit_code

    @property
    def message(self) -> str:
        return str(self.args[0]) if self.args else self.__class__.__name__


class UsageError(ProcksmError):
    exit_code = EXIT_USAGE


class NoSuchProcess(ProcksmError):
    exit_code = EXIT_NO_PROCESS

    def __init__(self, pid: int, message: str | None = None) -> None:
        super().__init__(message or f"no such process (pid={pid})")
        self.pid = pid


class ZombieProcess(NoSuchProcess):
    def __init__(self, pid: int, name: str = "?") -> None:
        super().__init__(
            pid, f"process is a zombie (pid={pid}, name={name!r}): it has exited; nothing to scan"
        )


class AccessDenied(ProcksmError):
    exit_code = EXIT_PERMISSION

    def __init__(self, pid: int, message: str) -> None:
        super().__init__(message)
        self.pid = pid


class TargetBusy(ProcksmError):
    exit_code = EXIT_BUSY

    def __init__(self, pid: int, message: str) -> None:
        super().__init__(message)
        self.pid = pid


class Unsupported(ProcksmError):
    exit_code = EXIT_UNSUPPORTED


class PtraceError(ProcksmError):
    """ptrace failed in a way that is not a permission or existence problem."""


class PtraceTimeout(PtraceError):
    """A thread did not reach a ptrace stop within the allowed time."""
