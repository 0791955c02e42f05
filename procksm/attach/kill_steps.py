"""The hidden test switch of tests/test_kill_steps.py: SIGKILL procksm right after the
N-th step that changes a target (docs/kill-safety.md, "Proof").

Steps are the points where a target's state changes: register, mask and memory writes,
resumes, detaches. Each module that makes one calls :func:`step` right after it.

* ``PROCKSM_TEST_KILL_AT_STEP=N``: SIGKILL this process after step N;
  ``KIND:DETAIL#I+K``: K steps after the I-th step of that kind and detail (e.g.
  ``load:9#2+0``: right after the second mmap's registers are loaded), for a point that
  does not move when a run has more or fewer windows or extents than another; a suffix
  ``~MS`` waits MS milliseconds after that step before the kill (an instant while the
  target runs calls procksm let go: procksm.attach.call_batch);
* ``PROCKSM_TEST_STEP_LOG=FILE``: append each step's number, kind and thread to FILE;
* ``PROCKSM_TEST_KILL_FILE=FILE``: the same as the first, N read from FILE at each step,
  counted from the file's creation, and the file removed at the kill: for processes
  started by others (the guard's unmerge helper) whose successor must not die too.
"""

from __future__ import annotations

import os
import signal
import time

_KILL_AT_STEP = 0
# (kind, detail, occurrence, steps after it), from KIND:DETAIL#I+K
_KILL_AT_ANCHOR: tuple[str, int, int, int] | None = None
_anchor_seen = 0
_KILL_DELAY = 0.0


def arm(spec: str) -> None:
    """Kill at ``spec``: ``N`` or ``KIND:DETAIL#I+K`` (see above); "" or "0": never.
    Steps are counted from here."""
    global _KILL_AT_STEP, _KILL_AT_ANCHOR, _anchor_seen, _steps, _KILL_DELAY
    _KILL_AT_STEP, _KILL_AT_ANCHOR, _anchor_seen, _steps = 0, None, 0, 0
    spec, _, delay = spec.partition("~")
    _KILL_DELAY = int(delay) / 1000 if delay else 0.0
    if "#" in spec:
        what, where = spec.split("#")
        kind, detail = what.split(":")
        nth, after = where.split("+")
        _KILL_AT_ANCHOR = (kind, int(detail), int(nth), int(after))
    elif spec:
        _KILL_AT_STEP = int(spec)


_STEP_LOG = os.environ.get("PROCKSM_TEST_STEP_LOG")
_KILL_FILE = os.environ.get("PROCKSM_TEST_KILL_FILE")
_steps = 0
_file_steps: dict[float, int] = {}  # steps since the kill file (by its mtime) appeared


def step(kind: str, tid: int = 0, detail: int = 0) -> None:
    """A step of kind `kind` (e.g. "load", "detach") just changed thread `tid`;
    `detail`: the system call number of a "load"."""
    global _steps, _KILL_AT_STEP, _anchor_seen
    if not (_KILL_AT_STEP or _KILL_AT_ANCHOR or _STEP_LOG or _KILL_FILE):
        return
    _steps += 1
    if _STEP_LOG:
        with open(_STEP_LOG, "a") as log:
            log.write(f"{_steps} {kind} {tid} {detail}\n")
    if _KILL_AT_ANCHOR and (kind, detail) == _KILL_AT_ANCHOR[:2]:
        _anchor_seen += 1
        if _anchor_seen == _KILL_AT_ANCHOR[2]:
            _KILL_AT_STEP = _steps + _KILL_AT_ANCHOR[3]
    if _steps == _KILL_AT_STEP:
        if _KILL_DELAY:
            time.sleep(_KILL_DELAY)
        os.kill(os.getpid(), signal.SIGKILL)
    if _KILL_FILE:
        try:
            stamp = os.stat(_KILL_FILE).st_mtime
            with open(_KILL_FILE) as f:
                at = int(f.read() or 0)
        except (OSError, ValueError):
            return
        _file_steps[stamp] = _file_steps.get(stamp, 0) + 1
        if _file_steps[stamp] == at:
            os.unlink(_KILL_FILE)
            os.kill(os.getpid(), signal.SIGKILL)


arm(os.environ.get("PROCKSM_TEST_KILL_AT_STEP") or "")
