"""Run the commands that stop targets in a forked worker, with an outer process that
waits for it and relays its exit code.

Killing procksm is safe by construction (procksm.attach, procksm.arch.x86_64: every
injected call returns through a frame of the thread's own state), whichever procksm
process dies. The worker remains for an orderly end on the signals people send:

* SIGKILL of the outer process (the PID the user started): the worker gets SIGTERM
  (PR_SET_PDEATHSIG), which its stop windows defer, so it ends between two windows and
  removes its scratch areas from the targets.
* SIGINT/SIGTERM/SIGHUP to the outer process are forwarded to the worker (same effect).
* Ctrl-Z: the outer process stops only once the worker has (the live view restores the
  terminal first).
* The OOM killer: the worker runs with oom_score_adj -1000 while it merges (root).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import sys
from collections.abc import Callable

PR_SET_PDEATHSIG = 1
_FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT)


def run_in_worker(body: Callable[[], int]) -> int:
    """Run ``body`` in a forked child; return its exit code (or 128+signal)."""
    parent = os.getpid()
    sys.stdout.flush()
    sys.stderr.flush()
    child = os.fork()
    if child == 0:  # the worker
        code = 1
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
            if os.getppid() != parent:  # the outer process died before prctl
                os.kill(os.getpid(), signal.SIGTERM)
            code = body()
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
        except BaseException:
            import traceback

            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)

    # the outer process: forward signals, wait
    def forward(signum: int, _frame: object) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(child, signum)

    old = {s: signal.signal(s, forward) for s in _FORWARDED}
    # Ctrl-Z stops the whole job; the outer process stops only once the worker has
    # (the live view first restores the terminal), so the shell's prompt never comes
    # back over a screen the worker still owns. `fg` continues both (SIGCONT to the job).
    old[signal.SIGTSTP] = signal.signal(signal.SIGTSTP, signal.SIG_IGN)
    try:
        while True:
            try:
                _, status = os.waitpid(child, os.WUNTRACED)
            except ChildProcessError:
                return 1
            except InterruptedError:
                continue
            if os.WIFSTOPPED(status):
                os.kill(os.getpid(), signal.SIGSTOP)
                continue
            break
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    if os.WIFSIGNALED(status):
        return 128 + os.WTERMSIG(status)
    return os.WEXITSTATUS(status)
