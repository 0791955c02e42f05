"""The observer's events: a COW break of a merged page, a target's fork, exec or exit,
and :func:`parse_event`, which decodes one ``struct procksm_event`` (pure)."""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Literal

from procksm.observe.cow_header import (
    EV_COW_KERNEL,
    EV_COW_USER,
    EV_EXEC,
    EV_EXIT,
    EV_FORK,
    EVENT_FORMAT,
)

LifecycleKind = Literal["fork", "exec", "exit"]
_KIND_NAMES: dict[int, LifecycleKind] = {EV_FORK: "fork", EV_EXEC: "exec", EV_EXIT: "exit"}


@dataclass(frozen=True, slots=True)
class CowBreak:
    """The first write to merged page ``addr`` of ``pid`` since it was merged (or re-armed).

    ``kernel``: the kernel wrote it (read() into the page); ``reconciled``: no fault
    showed it, pagemap did (a write through get_user_pages, or a dropped event).
    ``error_code``: the x86 page-fault error code (0x7 user write to a present page, 0x6
    to a not-present one, 0x3 / 0x2 the same from the kernel); 0 when reconciled.
    """

    pid: int
    addr: int
    kernel: bool = False
    reconciled: bool = False
    tid: int = 0
    error_code: int = 0
    ts_ns: int = 0


@dataclass(frozen=True, slots=True)
class Lifecycle:
    """A target forked (``child_pid``), exec'd (``tid`` = the thread that called execve)
    or exited. Its memory calls (munmap, mremap, madvise, brk) are no events: watching
    them costs every process on the machine (docs/design.md §11)."""

    kind: LifecycleKind
    pid: int
    tid: int = 0
    child_pid: int = 0
    ts_ns: int = 0


Event = CowBreak | Lifecycle


def parse_event(data: bytes) -> Event:
    """One ``struct procksm_event`` from the ring buffer as a typed record."""
    ts, kind, tgid, tid, aux, addr = struct.unpack_from(EVENT_FORMAT, data)
    if kind in (EV_COW_USER, EV_COW_KERNEL):
        kernel = kind == EV_COW_KERNEL
        return CowBreak(tgid, addr, kernel=kernel, tid=tid, error_code=aux, ts_ns=ts)
    name = _KIND_NAMES.get(kind)
    if name is None:
        raise ValueError(f"unknown procksm event kind {kind}")
    if kind == EV_FORK:
        return Lifecycle(name, tgid, tid=tid, child_pid=aux, ts_ns=ts)
    return Lifecycle(name, tgid, tid=aux if kind == EV_EXEC else tid, ts_ns=ts)
