"""``python -S -m procksm.guardd --socket PATH [--idle-exit S]``: one guard process
(the package's docstring tells the whole story)."""

from __future__ import annotations

import os
import signal
import sys

from procksm.guardd import TEST_OFF, log
from procksm.guardd.guard import Guard
from procksm.guardd.launch import STATE_ENV
from procksm.guardd.loop import Loop
from procksm.guardd.syscalls import malloc_trim


def _install_signals(guard: Guard) -> None:
    # procksm may have started us from a stop window, where it blocks signals
    # (procksm.attach.deferred_signals.signals_deferred); a blocked mask is inherited across execve.
    signal.pthread_sigmask(signal.SIG_SETMASK, [])
    # nor keep the CPU pinning and SCHED_FIFO of the window that started it
    try:
        os.sched_setaffinity(0, range(os.cpu_count() or 1))
        os.sched_setscheduler(0, os.SCHED_OTHER, os.sched_param(0))
    except OSError:
        pass
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)
    # Children (the peer, the unmerge helper) are reaped by the kernel; their deaths
    # are seen on a pidfd and on a pipe's EOF.
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)

    def on_term(_sig: int, _frame: object) -> None:
        # A guard is in no service's cgroup: a SIGTERM is someone's explicit kill or
        # the system's shutdown. Exiting now would fail every guarded process's
        # guarded calls (ENOSYS): keep answering while one lives, exit once none
        # does (at shutdown: right after the targets). `procksm guard --stop`
        # unmerges them and stops at once.
        if not guard.draining:
            log(f"SIGTERM: exiting once none of {len(guard.targets)} guarded processes "
                "is left (procksm guard --stop unmerges them and stops now)")  # fmt: skip
        guard.draining = True

    if TEST_OFF != "sigterm":
        signal.signal(signal.SIGTERM, on_term)


def _trim() -> None:
    """Hand the memory freed after start-up back to the kernel (the interpreter's
    free lists and glibc's heap keep it otherwise)."""
    import gc

    gc.collect()
    malloc_trim()


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    path, idle_exit = "", 10.0
    while args:
        opt = args.pop(0)
        if opt == "--socket" and args:
            path = args.pop(0)
        elif opt == "--idle-exit" and args:
            idle_exit = float(args.pop(0))
        else:
            print(f"procksm.guardd: unknown argument {opt!r}", file=sys.stderr)
            return 2
    if not path:
        # (procksm.attach.locks.lock_dir would import numpy through procksm.procfs)
        print("procksm.guardd: --socket PATH is required", file=sys.stderr)
        return 2
    if TEST_OFF == "lean":
        import numpy  # noqa: F401
    guard = Guard(path, idle_exit)
    _install_signals(guard)
    loop = Loop(guard)
    if not loop.start(os.environ.pop(STATE_ENV, None)):
        return 0  # a guard pair serves this socket already
    _trim()
    return loop.run()


if __name__ == "__main__":
    raise SystemExit(main())
