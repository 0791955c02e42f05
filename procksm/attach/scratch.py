"""The scratch area procksm maps in a target (layout: procksm.attach.scratch_layout), and the
removal of what a procksm that died in a window left there.

Mapped by the first window of a session that needs it, unmapped when the session ends
(procksm.attach.session.PtraceSession), forgotten when the target execs (the mapping went with
the old address space). Every step of its mapping leaves something with a name: an fd
``/memfd:procksm-scratch``, then the mapping; its first page holds the owner's pid and
start time, so that a later procksm can tell a live owner's area from a dead one's.
"""

from __future__ import annotations

import ctypes
import itertools
import mmap
import os
import struct
from collections.abc import Sequence
from dataclasses import dataclass

from procksm import PAGE_SIZE, procfs
from procksm.arch.x86_64 import (
    MADV_DONTFORK,
    MAP_FIXED,
    MAP_PRIVATE,
    MAP_SHARED,
    MFD_CLOEXEC,
    PROT_EXEC,
    PROT_READ,
    PROT_WRITE,
    SYS_close,
    SYS_ftruncate,
    SYS_madvise,
    SYS_memfd_create,
    SYS_mmap,
    SYS_munmap,
)
from procksm.arch.x86_64_batch import ROUTINE
from procksm.attach.injected_call import SyscallInjector
from procksm.attach.kill_steps import step
from procksm.attach.scratch_layout import (
    LEFTOVER_MEMFD_PREFIX,
    MEMFD_PAGES,
    OWNER,
    ROUTINE_OFFSET,
    ROUTINE_PAGE,
    SCRATCH_BYTES,
    SCRATCH_NAME,
    SCRATCH_PATH,
    STAGING_PAGES,
    TABLE_STAT,
)
from procksm.attach.tracees import StoppedThreads
from procksm.errors import ProcksmError
from procksm.procfs import read_stat_fields


def _own_start_time() -> int:
    return int(read_stat_fields(os.getpid())[19])


def _alive(pid: int, start_time: int) -> bool:
    """Process `pid` runs and is the one that started at `start_time` (a zombie does not
    run: a killed procksm stays one until its parent reaps it)."""
    try:
        fields = read_stat_fields(pid)
        return fields[0] not in ("Z", "X") and int(fields[19]) == start_time
    except (ProcksmError, OSError, IndexError, ValueError):
        return False


@dataclass(frozen=True)
class LeftoversRemoved:
    """What remove_leftovers_in_window did: things removed, and dead procksms' scratch
    areas left because a thread still runs (or parks in) their call routine."""

    removed: int = 0
    in_use: int = 0


def remove_leftovers_in_window(calls: SyscallInjector) -> LeftoversRemoved:
    """Remove what a procksm that died in a window left in the target: fds of its
    memfds (scratch, segments), and scratch areas whose owner is gone. Each is
    recognised by a name the target's own code does not use."""
    threads = calls.threads
    tid = threads.memory_tid()  # /proc/TID works for any live thread; a leader may be gone
    try:
        fds = procfs.list_fd_targets(tid)
        spans = [
            v
            for v in procfs.read_maps_with_path(tid, SCRATCH_PATH)
            if v.path == SCRATCH_PATH and v.offset == 0
        ]
    except ProcksmError:
        return LeftoversRemoved()  # cannot look (the process is exiting): nothing to remove either
    removed = in_use = 0
    for head in spans:
        owner = threads.read_memory(head.start + OWNER, 16)
        owner_pid, owner_start = struct.unpack("<QQ", owner)
        if owner_pid and _alive(int(owner_pid), int(owner_start)):
            continue  # a live procksm's (the daemon between two windows)
        if threads_inside(calls.threads, head.start):
            # A thread still runs the dead procksm's call routine (or parks in it): its
            # code and table must stay until it has left (procksm.attach.call_batch).
            in_use += 1
            continue
        try:
            with procfs.MapsQuery(tid) as maps:
                vmas = list(maps.vmas_in(head.start, head.start + SCRATCH_BYTES))
        except ProcksmError:
            return LeftoversRemoved(removed, in_use)
        for start, end in dead_area_pieces(head.start, vmas):
            calls.syscall(SYS_munmap, start, end - start)
        removed += 1
    for fd, target in sorted(fds.items()):
        if target.startswith(LEFTOVER_MEMFD_PREFIX):
            calls.syscall(SYS_close, fd)
            removed += 1
    return LeftoversRemoved(removed, in_use)


def dead_area_pieces(base: int, vmas: Sequence[procfs.QueriedVma]) -> list[tuple[int, int]]:
    """The address ranges of a dead procksm's scratch area at ``base`` that are still its
    own, to unmap: of the VMAs in [base, base + SCRATCH_BYTES) (address order), the
    pieces of the area's memfd at their place (same inode as the head, offset = address
    - base; the routine's page at ROUTINE_OFFSET), and the anonymous VMAs lying between
    two such pieces (an unmerge's staging, which stays mapped: procksm.unmerge). The
    target may have unmapped part of the area since and mapped its own memory there;
    that is never in the result (a munmap of the whole span would destroy it)."""
    if not vmas or (vmas[0].start, vmas[0].name, vmas[0].offset) != (base, SCRATCH_PATH, 0):
        return []
    inode, routine = vmas[0].inode, base + ROUTINE_PAGE * PAGE_SIZE

    def own(v: procfs.QueriedVma) -> bool:
        place = ROUTINE_OFFSET if v.start == routine else v.start - base
        return v.name == SCRATCH_PATH and v.inode == inode and v.offset == place

    # Contiguous chains of the area's pieces and anonymous VMAs, each trimmed to run from
    # a piece to a piece: an anonymous VMA counts only when no gap separates it from a
    # piece on either side.
    chains: list[list[procfs.QueriedVma]] = []
    for v in vmas:
        if not (own(v) or v.is_anonymous) or v.end > base + SCRATCH_BYTES:
            chains.append([])
        elif chains and chains[-1] and chains[-1][-1].end == v.start:
            chains[-1].append(v)
        else:
            chains.append([v])
    runs = []
    for chain in chains:
        pieces = [i for i, v in enumerate(chain) if own(v)]
        if pieces:
            runs.append((chain[pieces[0]].start, chain[pieces[-1]].end))
    return runs


def is_own_area(threads: StoppedThreads, base: int) -> bool:
    """Is the area at ``base`` still this procksm's whole scratch area? A session remembers
    its address across windows (the daemon's, for a target's life), and between two
    windows the target may exec (a new address space, where the address may hold the new
    program's memory) or unmap the area and map something else there: the area must then
    be forgotten, never written to nor unmapped. Checked: the span is covered without a
    gap, its first VMA is the scratch memfd from offset 0 with our owner in page 0 and
    covers the table's page too (procksm writes tables into the memfd: SharedPages), its
    last is the routine's page (the memfd at ROUTINE_OFFSET, executable)."""
    end = base + SCRATCH_BYTES
    try:
        # PROCMAP_QUERY, not /proc/PID/maps: reading a merged-then-unmerged target's
        # maps costs ~17 ms (3,700 VMAs), and this runs under stop
        with procfs.MapsQuery(threads.memory_tid()) as maps:
            vmas = list(maps.vmas_in(base, end))
        if not vmas or vmas[0].start != base or vmas[-1].end != end:
            return False
        if any(a.end != b.start for a, b in itertools.pairwise(vmas)):
            return False
        head, tail = vmas[0], vmas[-1]
        if (head.name, head.offset) != (SCRATCH_PATH, 0):
            return False
        if head.end < base + SharedPages.PAGES * PAGE_SIZE:
            return False  # its table's page is not the memfd's any more: not procksm's view
        routine = (SCRATCH_PATH, end - PAGE_SIZE, ROUTINE_OFFSET, "r-xp")
        if (tail.name, tail.start, tail.offset, tail.perms) != routine:
            return False
        owner = threads.read_memory(base + OWNER, 16)
    except (ProcksmError, OSError):
        return False
    return len(owner) == 16 and struct.unpack("<QQ", owner) == (os.getpid(), _own_start_time())


def threads_inside(threads: StoppedThreads, base: int) -> list[int]:
    """The stopped threads whose registers are in the scratch area at `base`: still
    running procksm's call routine, from a window that was abandoned or whose procksm
    died. Such an area must not be unmapped, nor its table rewritten."""
    return [
        t.tid
        for t in threads.tracees.values()
        if t.saved is not None and base <= t.saved.rip < base + SCRATCH_BYTES
    ]


class SharedPages:
    """procksm's own MAP_SHARED mapping of the scratch memfd's first pages (control, and
    the table of calls): the same memory as the target's area. procksm writes a window's
    table and reads its results here, and waits for the table's end on its done word
    with a futex, which the routine wakes (procksm.attach.call_batch): a poll of the
    target's memory cost a process_vm_readv, a waitpid and a sleep (~25 us of CPU on
    this VM, timer and idle exits) every ~50 us, ~170 us of procksm's CPU a window."""

    PAGES = 2

    def __init__(self, fd: int) -> None:
        self._map = mmap.mmap(
            fd, self.PAGES * PAGE_SIZE, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE
        )
        self._anchor = (ctypes.c_char * len(self._map)).from_buffer(self._map)
        self.address = ctypes.addressof(self._anchor)

    def write(self, offset: int, data: bytes) -> None:
        self._map[offset : offset + len(data)] = data

    def read(self, offset: int, size: int) -> bytes:
        return self._map[offset : offset + size]

    def word(self, offset: int) -> int:
        return int(struct.unpack_from("<Q", self._map, offset)[0])

    def close(self) -> None:
        del self._anchor  # the buffer export, which would keep the mapping open
        self._map.close()


class ScratchArea:
    """A session's scratch area in its target, mapped through a window's injected calls."""

    def __init__(self) -> None:
        self.base: int | None = None  # page 0, once mapped
        self.shared: SharedPages | None = None  # procksm's view of its first pages

    def forget(self) -> None:
        """The area is gone, or no longer this session's: procksm's view of it goes too."""
        self.base = None
        if self.shared is not None:
            self.shared.close()
            self.shared = None

    @property
    def routine(self) -> int:
        """Address of procksm's call routine in the mapped area."""
        assert self.base is not None
        return self.base + ROUTINE_PAGE * PAGE_SIZE

    def staging(self) -> tuple[int, int]:
        """(address, bytes) of the staging range of the mapped area."""
        assert self.base is not None
        return self.base + 2 * PAGE_SIZE, STAGING_PAGES * PAGE_SIZE

    def stat_buffer(self) -> int:
        """The table's stat buffer in the mapped area (CallBatch.check_stat)."""
        assert self.base is not None
        return self.base + PAGE_SIZE + TABLE_STAT

    def map(self, calls: SyscallInjector) -> None:
        """Map it: the target creates the memfd (its name written on dead stack below
        the injecting thread's frames) and sizes it; procksm writes the call routine
        into it (through /proc/PID/fd/N); the target maps it, maps the routine's page
        read-only and executable over the last page (MAP_FIXED over a piece of the same
        memfd: either way the area is one named memfd), marks it MADV_DONTFORK, and closes
        the fd; then the owner is written in page 0."""
        injector = calls.threads.injector()
        calls.frames.ensure_armed(injector)
        name_at = calls.frames.dead_stack(injector)
        calls.threads.write_memory(name_at, SCRATCH_NAME)
        step("name")
        fd = calls.syscall_checked(SYS_memfd_create, name_at, MFD_CLOEXEC, name="memfd_create")
        shared = None
        try:
            size = MEMFD_PAGES * PAGE_SIZE
            calls.syscall_checked(SYS_ftruncate, fd, size, name="ftruncate")
            own = procfs.open_fd_of(calls.threads.memory_tid(), fd, os.O_RDWR)
            try:
                procfs.write_through(own, ROUTINE, ROUTINE_OFFSET)
                shared = SharedPages(own)
            finally:
                os.close(own)
            base = calls.syscall_checked(
                SYS_mmap, 0, SCRATCH_BYTES, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0,
                name="mmap",
            )  # fmt: skip
            routine = base + ROUTINE_PAGE * PAGE_SIZE
            calls.syscall_checked(
                SYS_mmap, routine, PAGE_SIZE, PROT_READ | PROT_EXEC, MAP_PRIVATE | MAP_FIXED,
                fd, ROUTINE_OFFSET, name="mmap",
            )  # fmt: skip
            # Not inherited by a child the target forks: the daemon keeps the area for
            # the target's life, and in a child its owner would stay alive, so no
            # procksm would ever remove it (remove_leftovers_in_window).
            calls.syscall_checked(SYS_madvise, base, SCRATCH_BYTES, MADV_DONTFORK, name="madvise")
        except BaseException:
            if shared is not None:
                shared.close()
            raise
        finally:
            calls.syscall(SYS_close, fd)
        owner = struct.pack("<QQ", os.getpid(), _own_start_time())
        calls.threads.write_memory(base + OWNER, owner)
        step("owner")
        self.base, self.shared = base, shared
