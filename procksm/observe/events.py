"""The observer's events: a COW break of a merged page, a target's lifecycle or memory
call, and :func:`parse_event`, which decodes one ``struct procksm_event`` (pure)."""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any, Literal

from procksm.observe.cow_header import (
    EV_BRK,
    EV_COW_KERNEL,
    EV_COW_USER,
    EV_EXEC,
    EV_EXIT,
    EV_FORK,
    EV_MADVISE,
    EV_MMAP,
    EV_MREMAP,
    EV_MUNMAP,
    EV_PROCESS_MADVISE,
    EVENT_FORMAT,
)

LifecycleKind = Literal[
    "fork", "exec", "exit", "mmap", "munmap", "mremap", "madvise", "brk", "process_madvise"
]
_KIND_NAMES: dict[int, LifecycleKind] = {
    EV_FORK: "fork",
    EV_EXEC: "exec",
    EV_EXIT: "exit",
    EV_MMAP: "mmap",
    EV_MUNMAP: "munmap",
    EV_MREMAP: "mremap",
    EV_MADVISE: "madvise",
    EV_BRK: "brk",
    EV_PROCESS_MADVISE: "process_madvise",
}


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
    """A target forked, exec'd, exited, or changed its memory map.

    Fields by kind (``ret`` is the system call's result, negative errno on failure):
    fork ``child_pid``; exec ``tid`` = the thread that called execve; mmap ``addr``
    (requested), ``length``, ``prot``, ``flags``, ``ret`` = the address; munmap ``addr``,
    ``length``; mremap ``addr``, ``length`` (old), ``new_length``, ``flags``, ``ret`` =
    the new address; madvise ``addr``, ``length``, ``advice``; brk ``addr`` = requested
    break, ``ret`` = the new break; process_madvise ``fd`` (pidfd), ``length`` (vlen),
    ``advice``, ``ret`` = bytes advised.
    """

    kind: LifecycleKind
    pid: int
    tid: int = 0
    child_pid: int = 0
    addr: int = 0
    length: int = 0
    new_length: int = 0
    prot: int = 0
    flags: int = 0
    advice: int = 0
    fd: int = 0
    ret: int = 0
    ts_ns: int = 0

    @property
    def ok(self) -> bool:
        return self.ret >= 0


Event = CowBreak | Lifecycle


def parse_event(data: bytes) -> Event:
    """One ``struct procksm_event`` from the ring buffer as a typed record."""
    ts, kind, tgid, tid, aux, addr, length, arg, arg2, ret = struct.unpack_from(EVENT_FORMAT, data)
    if kind in (EV_COW_USER, EV_COW_KERNEL):
        kernel = kind == EV_COW_KERNEL
        return CowBreak(tgid, addr, kernel=kernel, tid=tid, error_code=aux, ts_ns=ts)
    name = _KIND_NAMES.get(kind)
    if name is None:
        raise ValueError(f"unknown procksm event kind {kind}")
    base: dict[str, Any] = {"kind": name, "pid": tgid, "tid": tid, "ts_ns": ts, "ret": ret}
    if kind == EV_FORK:
        base["child_pid"] = aux
    elif kind == EV_EXEC:
        base["tid"] = aux
    elif kind == EV_MMAP:
        base.update(addr=addr, length=length, flags=arg, prot=arg2)
    elif kind in (EV_MUNMAP, EV_MADVISE):
        base.update(addr=addr, length=length, advice=arg if kind == EV_MADVISE else 0)
    elif kind == EV_MREMAP:
        base.update(addr=addr, length=length, new_length=arg, flags=arg2)
    elif kind == EV_BRK:
        base["addr"] = addr
    elif kind == EV_PROCESS_MADVISE:
        base.update(length=length, advice=arg, fd=arg2)
    return Lifecycle(**base)
