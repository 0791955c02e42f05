"""Where things lie in the scratch area procksm maps in a target, and the names by which
a later procksm recognises what a killed one left.

The scratch area is a MAP_SHARED mapping of a memfd the target creates itself, so that
every step of its life leaves something a later procksm can recognise by name and remove
(an fd, then a mapping named /memfd:procksm-scratch), never an anonymous mapping nobody
can tell from the target's own (docs/kill-safety.md, "Nothing left behind"). Shared, so
that procksm maps the memfd's pages 0 and 1 too (procksm.attach.scratch.SharedPages):
it writes a window's table and reads its results there, and sleeps on the table's done
word until the routine's FUTEX_WAKE, instead of polling the target's memory.

  page 0   control: the futex gate, its timeout, the owner (pid, start time)
  page 1   arguments of injected calls (procksm.attach.session.StoppedTarget.scratch),
           or a window's table of calls (procksm.attach.call_batch: header, a stat
           buffer, the entries)
  pages 2..2+STAGING_PAGES  staging: an unmerge builds the new anonymous pages here,
           then moves them over the merged range in one mremap (procksm.unmerge)
  last     procksm's call routine (procksm.arch.x86_64_batch), read-only and executable:
           page 2 of the memfd; it also keeps the staging range between two pieces of
           the memfd mapping, so a leftover staging mapping is recognisable as procksm's

Mapped by :class:`procksm.attach.scratch.ScratchArea`; the gate is closed by
:meth:`procksm.attach.session.StoppedTarget.hold_others` and waited on / woken through the
frames of :mod:`procksm.attach.return_frames`.
"""

from __future__ import annotations

from procksm import PAGE_SIZE
from procksm.arch.x86_64_batch import ENTRY_SIZE

SCRATCH_NAME = b"procksm-scratch\0"
SCRATCH_PATH = "/memfd:procksm-scratch (deleted)"
STAGING_PAGES = 512
SCRATCH_PAGES = 3 + STAGING_PAGES
SCRATCH_BYTES = SCRATCH_PAGES * PAGE_SIZE
# The memfd: pages 0 and 1 (control, arguments), page 2 the call routine.
MEMFD_PAGES = 3
ROUTINE_OFFSET = 2 * PAGE_SIZE  # in the memfd
ROUTINE_PAGE = SCRATCH_PAGES - 1  # in the area

# Page 1 as a table of calls (procksm.attach.call_batch): the routine's header (done
# word, park timespec), a stat buffer for the hand-over's fd checks, then the entries.
TABLE_HEADER = 0
TABLE_STAT = 32  # struct stat is 144 bytes on x86_64
TABLE_ENTRIES = 192
TABLE_CAPACITY = (PAGE_SIZE - TABLE_ENTRIES) // ENTRY_SIZE

# What a procksm leaves in a target only while a window runs (procksm.merge): fds of the
# scratch memfd and of segments. (Unnamed fds it creates are undone on death instead.)
LEFTOVER_MEMFD_PREFIX = "/memfd:procksm-"

# Page 0: the futex gate word, its timeout (a timespec), the owner (pid, start time).
GATE, GATE_TIMEOUT, OWNER = 0, 16, 32
# How long a gated thread waits for the injecting thread's wake-up after procksm died.
# The wake-up comes within microseconds (the injecting thread is released at the same
# instant); the timeout only bounds a wait if it never came.
GATE_TIMEOUT_S = 10
FUTEX_WAIT, FUTEX_WAKE = 0, 1  # not private: between procksm and the target (the done word)
FUTEX_WAIT_PRIVATE = 0 | 128
FUTEX_WAKE_OP_PRIVATE = 5 | 128
# FUTEX_OP(FUTEX_OP_SET, 1, FUTEX_OP_CMP_EQ, 0): *gate = 1, atomically with the wake-up,
# so a thread that reaches its wait only afterwards does not wait (EAGAIN).
FUTEX_OP_SET_1 = 1 << 12
