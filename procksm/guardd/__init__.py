"""The madvise guard's resident processes (procksm.guard explains the filter).

Two lean processes, ``python -S -m procksm.guardd``, hold every listener fd:

* the **active** guard answers the notifications and the control socket;
* the **standby** holds duplicates of the same listener fds (a listener fd is a file:
  ``SCM_RIGHTS`` and ``fork`` share it, and the filter keeps a listener while any
  process holds one), the same listening socket and the same lock, and answers nothing.

Each watches the other with a pidfd. When one dies the other takes over at once (the
standby becomes active), kicks the calls the dead one had received but not answered,
and spawns a new standby that inherits every fd. A single SIGKILL therefore never
closes the last listener: the kernel's ENOSYS answer (a notify filter without listener)
is never reached. An active guard that is stopped or hangs is not dead (its pidfd
stays quiet): the standby pings it, and answers too while it does not answer.

Kernel facts behind the rules:

* A notification the dead guard had received (``SECCOMP_IOCTL_NOTIF_RECV``) stays in its
  SENT state as long as the listener file lives (seccomp_notify_release runs only when
  the last holder closes it): the calling thread would wait for ever. The survivor stops
  such threads for an instant (PTRACE_SEIZE + PTRACE_INTERRUPT): the waiting call
  returns -ERESTARTSYS and is restarted when the thread resumes, and its new
  notification reaches the survivor.
* A notification is received by one ``SECCOMP_IOCTL_NOTIF_RECV``; only the active guard
  receives, so a call is never woken twice.
* ``execve`` keeps fds that are not close-on-exec, and a pidfd names the same process
  after its ``execve``: an upgrade re-executes each guard in place, the standby first,
  then the former active after handing the active role over; never both at once.
* A process started by a service is in the service's cgroup, and a service stop, a
  restart or a pod replacement signals every process of that cgroup: the first guard
  moves itself into a cgroup of its own (``<cgroup2 mount>/procksm-guard``) before it
  accepts any listener; its peers are born there.

The guard imports no numpy (``PROCKSM_GUARD_LEAN=1`` keeps procksm/__init__ from
importing it, ``-S`` skips site's imports): unmerging a range runs in a helper
process (``procksm.guard_unmerge``, started on demand, exits when idle) that calls
``procksm.unmerge.unmerge_pieces``.

The modules, from the process down (each imports only those below it, and this
package's ``log`` and ``TEST_OFF``):

* ``__main__``: ``python -S -m procksm.guardd``: arguments, signals, start, the loop;
* ``loop``: the one thread's poll over every fd, handing each event to its part;
* ``control``: the control socket's requests (list, stats, guard, upgrade, stop);
* ``intake``: how a target's listener reaches the guard (expect, take, rescue);
* ``pairing``: the peer guard: link messages, its death, its silence, a new standby,
  the upgrade hand-over;
* ``guard``: one guard's state (role, the fds it holds, its counters) and what
  changes it (start, add or drop a guarded process, re-execute);
* ``answering``: a notified call: unmerge what it would touch, then let it run;
* ``peer``, ``endpoint``, ``launch``: the link to the peer; the control socket and
  lock; the command line, environment and inherited state of a guard image;
* ``calls``, ``listener``, ``maps``, ``kick``, ``unmerger``, ``isolation``,
  ``syscalls``, ``wire``: what a notified call acts on; the listener fd's ioctls; a
  task's VMAs; restarting waiting calls; the unmerge helper; cgroup, mount namespace
  and OOM score; libc system calls; messages with fds, and JSON replies.
"""

from __future__ import annotations

import os
import time

# Tests only (tests/test_guard_life.py shows each of its tests failing with one of these):
# "standby" (no peer), "kick" (no restart of calls a dead guard received), "inherit"
# (listeners not kept across an upgrade's execve), "lean" (the guard imports numpy),
# "rescue" (no taking of the listener a dead procksm left in a target's fd table),
# "sigterm" (SIGTERM ends a guard), "stop" (--stop unmerges nothing), "stall" (no
# stand-in for a stopped active guard).
TEST_OFF = os.environ.get("PROCKSM_GUARD_TEST_OFF", "")


def log(msg: str) -> None:
    print(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} procksm-guard[{os.getpid()}]: {msg}", flush=True)
