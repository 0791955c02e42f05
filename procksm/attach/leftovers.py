"""What a procksm that died left in a target, and its removal.

A killed procksm leaves the target safe (docs/kill-safety.md), but possibly with its
scratch area mapped (``/memfd:procksm-scratch``) or an fd of a memfd of its open. Any
later procksm recognises them by name and removes them before it merges or unmerges
(``procksm.attach.scratch.remove_leftovers_in_window`` does it in the first window of a
session).
"""

from __future__ import annotations

import time
from collections.abc import Callable

from procksm import procfs
from procksm.arch.x86_64 import SYS_close
from procksm.attach.call_batch import PARK_NS
from procksm.attach.scratch import LeftoversRemoved
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


# A thread that a dead procksm left in its call routine goes back to its own state by
# itself at the latest PARK_NS after the routine's calls end (procksm.attach.call_batch);
# until then its scratch area holds the code it runs, and is left alone. How long a
# removal comes back for such an area: the park, and room for a loaded machine (a CI run
# on 4ba455b found an area still in use 0.3 s after the kill).
IN_USE_WAIT_S = 4 * PARK_NS / 1e9 + 0.5
IN_USE_POLL_S = 0.05


def remove_leftovers(
    pid: int, also_close: Callable[[], list[int]] = list, *, wait_s: float = IN_USE_WAIT_S
) -> LeftoversRemoved:
    """Remove what a procksm that died left in `pid`. ``also_close``: fds to close too,
    found under stop by the caller (copies of the guard's listeners,
    procksm.guard.ListenerCopies). A scratch area with a thread still in its routine is
    looked at again, outside any stop, for up to ``wait_s``; ``in_use`` counts the areas
    still left after that."""
    removed, deadline = 0, time.monotonic() + wait_s
    while True:
        with PtraceSession(pid) as session, session.stopped() as target:
            target.scratch()  # removes the leftovers first, then maps its own
            fds = also_close()
            for fd in fds:
                target.syscall(SYS_close, fd)
            removed += target.leftovers_removed + len(fds)
            in_use = target.leftovers_in_use
        if not in_use or time.monotonic() >= deadline:
            return LeftoversRemoved(removed, in_use)
        time.sleep(IN_USE_POLL_S)
