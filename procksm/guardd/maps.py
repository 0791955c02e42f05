"""A task's VMAs, through /proc/TID/maps kept open and PROCMAP_QUERY (procksm.procfs.MapsQuery
does the same but imports numpy)."""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import struct

# procksm.slots.SEGMENT_NAME_PREFIX (not imported: procksm.slots imports numpy);
# tests/test_guard_life.py checks that the two agree.
SEGMENT_NAME_PREFIX = "/memfd:procksm-seg-"

# PROCMAP_QUERY on /proc/PID/maps (6.11+)
_PROCMAP_QUERY = 0xC0686611
_PROCMAP_QUERY_STRUCT = struct.Struct("=QQQQQQQQQIIIIQQ")
_PROCMAP_QUERY_COVERING_OR_NEXT_VMA = 0x10


class TaskMaps:
    """/proc/TID/maps kept open, queried with PROCMAP_QUERY (~10 us a lookup; falls back
    to parsing the file on kernels before 6.11)."""

    __slots__ = ("_addr", "_name", "fd")

    def __init__(self, tid: int) -> None:
        self.fd = os.open(f"/proc/{tid}/maps", os.O_RDONLY | os.O_CLOEXEC)
        self._name = ctypes.create_string_buffer(256)
        self._addr = ctypes.addressof(self._name)

    def vmas_in(self, start: int, end: int) -> list[tuple[int, int, str]]:
        """(start, end, name) of the VMAs that intersect [start, end); OSError when the
        task is gone."""
        out: list[tuple[int, int, str]] = []
        addr = start
        while addr < end:
            req = bytearray(_PROCMAP_QUERY_STRUCT.pack(
                104, _PROCMAP_QUERY_COVERING_OR_NEXT_VMA, addr,
                0, 0, 0, 0, 0, 0, 0, 0, 256, 0, self._addr, 0,
            ))  # fmt: skip
            try:
                fcntl.ioctl(self.fd, _PROCMAP_QUERY, req, True)
            except OSError as e:
                if e.errno == errno.ENOENT:
                    break  # no VMA at or above addr
                if e.errno in (errno.ENOTTY, errno.EINVAL):
                    return self._parse(start, end)
                raise
            f = _PROCMAP_QUERY_STRUCT.unpack(req)
            vstart, vend, name_size = f[3], f[4], f[11]
            if vstart >= end:
                break
            name = self._name.raw[: max(0, name_size - 1)].decode(errors="replace")
            out.append((vstart, vend, name))
            addr = vend
        return out

    def _parse(self, start: int, end: int) -> list[tuple[int, int, str]]:
        out = []
        text = os.pread(self.fd, 1 << 24, 0).decode(errors="replace")
        for line in text.splitlines():
            fields = line.split(maxsplit=5)
            a, b = (int(x, 16) for x in fields[0].split("-"))
            if a < end and b > start:
                out.append((a, b, fields[5] if len(fields) > 5 else ""))
        return out

    def close(self) -> None:
        os.close(self.fd)


class VmaCache:
    """A TaskMaps per thread that made a guarded call, the 256 most recently used."""

    def __init__(self) -> None:
        self._by_tid: dict[int, TaskMaps] = {}  # LRU order

    def vmas_in(self, tid: int, start: int, end: int) -> list[tuple[int, int, str]] | None:
        """The VMAs of [start, end) in tid's process, through a /proc/TID/maps kept open
        per thread (opening it and reading Tgid cost more than the query itself). None
        when the task is gone."""
        for attempt in range(2):
            maps = self._by_tid.pop(tid, None)
            try:
                if maps is None:
                    maps = TaskMaps(tid)
                vmas = maps.vmas_in(start, end)
            except OSError:
                if maps is not None:
                    maps.close()  # that task exited; the tid may belong to a new one now
                if attempt:
                    return None
                continue
            self._by_tid[tid] = maps  # most recently used last
            while len(self._by_tid) > 256:
                self._by_tid.pop(next(iter(self._by_tid))).close()
            return vmas
        return None

    def close(self) -> None:
        for maps in self._by_tid.values():
            maps.close()
        self._by_tid.clear()


def tgid(tid: int) -> int:
    with open(f"/proc/{tid}/status") as f:
        for line in f:
            if line.startswith("Tgid:"):
                return int(line.split()[1])
    raise ValueError(tid)
