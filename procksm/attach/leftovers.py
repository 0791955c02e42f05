"""What a procksm that died left in a target, and its removal.

A killed procksm leaves the target safe (docs/kill-safety.md), but possibly with its
scratch area mapped (``/memfd:procksm-scratch``) or an fd of a memfd of its open. Any
later procksm recognises them by name and removes them before it merges or unmerges
(``procksm.attach.scratch.remove_leftovers_in_window`` does it in the first window of a
session).
"""

from __future__ import annotations

from collections.abc import Callable

from procksm import procfs
from procksm.arch.x86_64 import SYS_close
from procksm.attach.scratch_layout import LEFTOVER_MEMFD_PREFIX, SCRATCH_PATH
from procksm.attach.session import PtraceSession
from procksm.errors import ProcksmError


def has_leftovers(pid: int) -> bool:
    """Whether a procksm that died left something in `pid` (see
    procksm.attach.scratch.remove_leftovers_in_window): its scratch area, or a memfd fd of its."""
    try:
        if any(v.path == SCRATCH_PATH for v in procfs.read_maps_with_path(pid, SCRATCH_PATH)):
            return True
        return any(
            t.startswith(LEFTOVER_MEMFD_PREFIX) for t in procfs.list_fd_targets(pid).values()
        )
    except ProcksmError:
        return False


def remove_leftovers(pid: int, also_close: Callable[[], list[int]] = list) -> int:
    """Remove what a procksm that died left in `pid`; returns how many things.
    ``also_close``: fds to close too, found under stop by the caller (copies of the
    guard's listeners, procksm.guard.ListenerCopies)."""
    with PtraceSession(pid) as session, session.stopped() as target:
        target.scratch()  # removes the leftovers first, then maps its own
        fds = also_close()
        for fd in fds:
            target.syscall(SYS_close, fd)
        return target.leftovers_removed + len(fds)
