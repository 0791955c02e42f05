"""The slot store: merged page content held in sealed memfd segments (docs/design.md §2.3, §3.6).

A *segment* is one memfd (``procksm-seg-N``; targets see ``/memfd:procksm-seg-N (deleted)``
in their maps) built from a batch of pages and then **sealed** (F_SEAL_WRITE | SHRINK | GROW
| SEAL) before any target may map it. A *slot* is one page of a segment; a *run* is a range
of adjacent slots, so that a run of adjacent duplicate pages in a target is replaced by one
``mmap(MAP_PRIVATE|MAP_FIXED, fd, offset)`` -- one VMA (§3.3).

Life cycle::

    run = store.add_run(pages)        # pwrite into the segment being built
    for seg in store.seal_pending():  # seal: from now on nobody can change the content
        fd = seg.readonly_fd()        # a fresh O_RDONLY open file description for a target
    store.incref(run)                 # the engine mapped the run into one target
    store.decref(run)                 # ... and that target unmapped it / exited

Reclaim never punches holes: procksm only closes its own fd of a segment whose reference
count reaches zero; the kernel frees the memfd when the last target VMA mapping it goes.
Punching a hole under a live MAP_PRIVATE mapping would make the target read zeros where
its data was -- and after F_SEAL_WRITE the kernel refuses it anyway (fallocate -> EPERM).
A wrong count is therefore only an accounting error, never a correctness one: closing our
fd early (e.g. a target forked and its child still maps the run) only means procksm can no
longer read or reuse that content.

Costs measured here (kernel 6.18, 2-core VM): build + seal of a 64 MiB segment ~23 ms
(pwrite into shmem ~2.8 GB/s) + ~0.2 ms for F_SEAL_WRITE (the kernel scans the mapping
for pinned pages). The memory is Shmem charged to procksm's cgroup (docs/design.md §3.7).

Single-threaded: one engine thread owns the store.
"""

from __future__ import annotations

import errno
import fcntl
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import numpy.typing as npt

from procksm import PAGE_SIZE, procfs
from procksm.closing import Closing
from procksm.errors import ProcksmError

# 64 MiB: big enough that a segment's fixed costs (one fd, one seal) vanish, small enough
# that a mostly-dead segment does not hold much memory hostage (a segment is freed only
# when *all* its slots are unmapped everywhere).
DEFAULT_SEGMENT_PAGES = (64 << 20) // PAGE_SIZE

# MFD_NOEXEC_SEAL (Linux 6.3): the file can never become executable (execve of it). Merged
# content is data. mmap(PROT_EXEC) of it still works (measured), so JIT pages could merge.
# Without it (or MFD_EXEC) 6.3+ kernels log a warning, and vm.memfd_noexec=2 refuses it.
MFD_NOEXEC_SEAL = 0x0008
_MEMFD_FLAGS = os.MFD_ALLOW_SEALING | os.MFD_CLOEXEC

# All four: content, size and the seal set itself are fixed for the memfd's lifetime.
SEALS = fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL

# pwrite chunk: bounded so that a huge run does not need one giant syscall (and so a
# signal can interrupt between chunks).
_WRITE_CHUNK = 8 << 20

# A segment's memfd name, and how a mapping of it shows in /proc/PID/maps: how any procksm
# (also after a crash) recognises a merged range (procksm.unmerge, the guard, observe).
SEGMENT_NAME = "procksm-seg-"
SEGMENT_NAME_PREFIX = "/memfd:" + SEGMENT_NAME

_noexec_supported: bool | None = None


class FileIdentity(NamedTuple):
    """(st_dev, st_ino) of a file: how the fd a target received is recognised as ours."""

    dev: int
    ino: int

    @classmethod
    def of_fd(cls, fd: int) -> FileIdentity:
        st = os.fstat(fd)
        return cls(st.st_dev, st.st_ino)


@dataclass(frozen=True, slots=True)
class Slot:
    """One page of a segment."""

    segment_id: int
    page: int

    @property
    def offset(self) -> int:
        return self.page * PAGE_SIZE


@dataclass(frozen=True, slots=True)
class SlotRun:
    """``npages`` adjacent slots of one segment: one mmap, one VMA in a target."""

    segment_id: int
    first_page: int
    npages: int

    @property
    def offset(self) -> int:
        """Byte offset in the memfd: the ``off`` argument of the target's mmap."""
        return self.first_page * PAGE_SIZE

    @property
    def length(self) -> int:
        return self.npages * PAGE_SIZE

    def slot(self, index: int) -> Slot:
        if not 0 <= index < self.npages:
            raise IndexError(f"slot {index} outside run of {self.npages} pages")
        return Slot(self.segment_id, self.first_page + index)

    def __iter__(self) -> Iterator[Slot]:
        for page in range(self.first_page, self.first_page + self.npages):
            yield Slot(self.segment_id, page)


@dataclass(frozen=True, slots=True)
class SlotStoreStats:
    segments: int  # open segments (sealed + being built)
    pending_segments: int  # being built: not sealed, not mappable yet
    slots: int  # pages held in open segments
    bytes_held: int  # slots * PAGE_SIZE: Shmem charged to procksm's cgroup
    referenced_slots: int  # slots that at least one target maps (per the engine's counts)
    mapping_refs: int  # sum of run references (one per run mapped into one target)
    released_segments: int  # segments whose fd procksm closed (lifetime total)
    released_bytes: int  # their size; freed by the kernel once no target maps them
    # procksm keeps no mapping of any segment (read_* use pread), so its own RSS and the
    # pages' kpagecount hold no share of the store: there is no "view bytes" figure.

    @property
    def unreferenced_bytes(self) -> int:
        """Bytes of open segments that no target maps: the cost of per-segment reclaim."""
        return (self.slots - self.referenced_slots) * PAGE_SIZE


def _memfd_create(name: str) -> int:
    global _noexec_supported
    if _noexec_supported is not False:
        try:
            fd = os.memfd_create(name, _MEMFD_FLAGS | MFD_NOEXEC_SEAL)
        except OSError as exc:
            if exc.errno != errno.EINVAL:  # EINVAL: kernel before 6.3
                raise _memfd_error(name, exc) from exc
            _noexec_supported = False
        else:
            _noexec_supported = True
            return fd
    try:
        return os.memfd_create(name, _MEMFD_FLAGS)
    except OSError as exc:
        raise _memfd_error(name, exc) from exc


def _memfd_error(name: str, exc: OSError) -> ProcksmError:
    return ProcksmError(f"cannot create memfd {name!r}: {exc.strerror}")


class Segment:
    """One memfd of page content; immutable (sealed) before any target maps it."""

    def __init__(self, segment_id: int, capacity_pages: int) -> None:
        self.id = segment_id
        self.name = f"{SEGMENT_NAME}{segment_id}"
        self.capacity_pages = capacity_pages
        self._fd = _memfd_create(self.name)
        self.identity = FileIdentity.of_fd(self._fd)
        self.npages = 0
        self.sealed = False
        self.closed = False
        # Per-slot count of target mappings (uint32: a slot is mapped by at most as many
        # runs as there are target mappings of it). The segment's refcount is the sum.
        self._refs: npt.NDArray[np.uint32] = np.zeros(0, dtype=np.uint32)
        self.mapping_refs = 0

    @property
    def length(self) -> int:
        return self.npages * PAGE_SIZE

    @property
    def referenced_slots(self) -> int:
        return int(np.count_nonzero(self._refs))

    @property
    def fd(self) -> int:
        """procksm's own (read-write, but sealed) fd. Never hand this one to a target."""
        self._check_open()
        return self._fd

    def room(self) -> int:
        return self.capacity_pages - self.npages

    def _check_open(self) -> None:
        if self.closed:
            raise ProcksmError(f"segment {self.name} is closed")

    def _append(self, pages: memoryview) -> SlotRun:
        """pwrite ``pages`` after the current end; on failure the segment is unchanged."""
        self._check_open()
        if self.sealed:
            raise ProcksmError(f"segment {self.name} is sealed; it cannot grow")
        start = self.length
        done = 0
        try:
            while done < len(pages):
                chunk = pages[done : done + _WRITE_CHUNK]
                done += os.pwrite(self._fd, chunk, start + done)
        except OSError as exc:
            # ENOMEM / ENOSPC: procksm's cgroup memory limit (memfd pages are charged to
            # the writer, §3.7). Cut back to the old size so no half run stays.
            os.ftruncate(self._fd, start)
            raise ProcksmError(
                f"cannot write {len(pages)} bytes into memfd {self.name}: {exc.strerror} "
                "(memfd pages are charged to procksm's own memory cgroup)"
            ) from exc
        first = self.npages
        self.npages += len(pages) // PAGE_SIZE
        return SlotRun(self.id, first, len(pages) // PAGE_SIZE)

    def seal(self) -> None:
        """Add all seals. F_SEAL_WRITE fails with EBUSY while a writable shared mapping of
        the memfd exists; procksm never creates one (it writes with pwrite)."""
        self._check_open()
        if self.sealed:
            return
        try:
            fcntl.fcntl(self._fd, fcntl.F_ADD_SEALS, SEALS)
        except OSError as exc:
            raise ProcksmError(f"cannot seal memfd {self.name}: {exc.strerror}") from exc
        self.sealed = True
        self._refs = np.zeros(self.npages, dtype=np.uint32)

    def seals(self) -> int:
        """The kernel's F_GET_SEALS value (includes F_SEAL_EXEC with MFD_NOEXEC_SEAL)."""
        return int(fcntl.fcntl(self.fd, fcntl.F_GET_SEALS))

    def readonly_fd(self) -> int:
        """A new O_RDONLY|O_CLOEXEC fd of this memfd, for handing to a target.

        Opened through ``/proc/self/fd/N``, so it is a *new open file description* with
        read-only access: a target holding it cannot pwrite, ftruncate or fallocate it, nor
        map it MAP_SHARED|PROT_WRITE, and fcntl(F_SETFL) cannot change an access mode.
        (A target with enough privilege could reopen it O_RDWR via its own /proc; the seals
        are what stop writes then.) The caller owns the fd and closes it.
        """
        self._check_open()
        if not self.sealed:
            raise ProcksmError(f"segment {self.name} is not sealed; no target may map it")
        try:
            return procfs.reopen_own_fd(self._fd, os.O_RDONLY)
        except ProcksmError as exc:
            raise ProcksmError(f"cannot reopen memfd {self.name} read-only: {exc}") from exc

    def close(self) -> None:
        """Close procksm's fd. Targets' mappings stay valid; the kernel frees the pages when
        the last one goes."""
        if not self.closed:
            os.close(self._fd)
            self.closed = True

    @classmethod
    def adopt(cls, segment_id: int, fd: int, npages: int) -> Segment:
        """A sealed segment of an earlier procksm, opened read-only from a target's
        /proc/PID/map_files (its slots are the stable tree of later merges)."""
        seals = int(fcntl.fcntl(fd, fcntl.F_GET_SEALS))
        if seals & SEALS != SEALS:
            os.close(fd)
            raise ProcksmError("a procksm segment found in a target is not sealed; not used")
        seg = cls.__new__(cls)
        seg.id = segment_id
        seg.name = f"{SEGMENT_NAME}adopted-{segment_id}"
        seg.capacity_pages = npages
        seg._fd = fd
        seg.identity = FileIdentity.of_fd(fd)
        seg.npages = npages
        seg.sealed = True
        seg.closed = False
        seg._refs = np.zeros(npages, dtype=np.uint32)
        seg.mapping_refs = 0
        return seg

    def __repr__(self) -> str:
        state = "closed" if self.closed else "sealed" if self.sealed else "building"
        return f"<Segment {self.name} {self.npages} pages {state} refs={self.mapping_refs}>"


class SlotStore(Closing):
    """All segments of one procksm engine. Content is looked up by the caller (trees)."""

    def __init__(self, segment_pages: int = DEFAULT_SEGMENT_PAGES) -> None:
        if segment_pages <= 0:
            raise ValueError("segment_pages must be positive")
        self.segment_pages = segment_pages
        self._segments: dict[int, Segment] = {}
        self._building: Segment | None = None  # the one segment that add_run appends to
        self._next_id = 0
        self._released_segments = 0
        self._released_bytes = 0

    # --- building ------------------------------------------------------------------------

    def add_run(
        self, pages: bytes | bytearray | memoryview, *, new_segment: bool = False
    ) -> SlotRun:
        """Store ``pages`` (n * PAGE_SIZE bytes) as n adjacent slots of one segment.

        The run lands in the segment being built if it fits; otherwise a new segment is
        started (the previous one waits, unsealed, for :meth:`seal_pending`). A run larger
        than ``segment_pages`` gets a segment of its own size: a run is never split,
        because it must be one mmap in the target.
        """
        view = memoryview(pages).cast("B")
        if len(view) == 0 or len(view) % PAGE_SIZE:
            raise ValueError(f"a run is a positive multiple of {PAGE_SIZE} bytes, not {len(view)}")
        npages = len(view) // PAGE_SIZE
        seg = self._building
        if new_segment or seg is None or seg.room() < npages:
            seg = self._new_segment(max(self.segment_pages, npages))
            self._building = seg
        return seg._append(view)

    def _new_segment(self, capacity_pages: int) -> Segment:
        seg = Segment(self._next_id, capacity_pages)
        self._next_id += 1
        self._segments[seg.id] = seg
        return seg

    def adopt(self, fd: int, npages: int) -> Segment:
        """Hold an existing sealed segment (see :meth:`Segment.adopt`)."""
        seg = Segment.adopt(self._next_id, fd, npages)
        self._next_id += 1
        self._segments[seg.id] = seg
        return seg

    def seal_pending(self, tail_pages: int = 0) -> list[Segment]:
        """Seal every segment built since the last call; they become mappable. Empty ones
        are dropped. ``tail_pages``: a hole appended to each file before sealing (read as
        zeros, no memory until read)."""
        sealed: list[Segment] = []
        for seg in list(self._segments.values()):
            if seg.sealed or seg.closed:
                continue
            if seg.npages == 0:
                self._forget(seg)
                continue
            if tail_pages:
                os.ftruncate(seg.fd, seg.length + tail_pages * PAGE_SIZE)
            seg.seal()
            sealed.append(seg)
        self._building = None
        return sealed

    # --- lookup and reading ------------------------------------------------------------------

    def segment(self, segment_id: int) -> Segment:
        try:
            return self._segments[segment_id]
        except KeyError:
            raise ProcksmError(f"segment {segment_id} is not held (released?)") from None

    def segments(self) -> list[Segment]:
        return list(self._segments.values())

    def __contains__(self, item: Slot | SlotRun) -> bool:
        return item.segment_id in self._segments

    def read_slot(self, slot: Slot) -> memoryview:
        """The content of one slot, as a read-only view of a private copy.

        pread, not a mapping of the memfd: measured 0.5-0.9 µs per 4 KiB page (64 MiB in
        8 ms), same order as a Python-level compare. A MAP_SHARED view would add every
        touched page to procksm's RssShmem and raise its kpagecount by one (so counting
        sharers from kpagecount would be off by one), and a live memoryview export of an
        mmap makes ``mmap.close()`` raise BufferError, which would block reclaim.
        """
        seg = self.segment(slot.segment_id)
        if not 0 <= slot.page < seg.npages:
            raise IndexError(f"slot {slot.page} outside segment {seg.name} ({seg.npages})")
        return memoryview(os.pread(seg.fd, PAGE_SIZE, slot.offset))

    def read_run_into(self, run: SlotRun, buf: bytearray | memoryview) -> None:
        """Read a whole run into ``buf`` (>= run.length writable bytes; a numpy array's
        ``.data``) with one preadv."""
        seg = self.segment(run.segment_id)
        if run.first_page + run.npages > seg.npages:
            raise IndexError(f"run {run} outside segment {seg.name} ({seg.npages} pages)")
        target = memoryview(buf).cast("B")[: run.length]
        if len(target) < run.length:
            raise ValueError(f"buffer of {len(target)} bytes < run of {run.length}")
        done = 0
        while done < run.length:
            n = os.preadv(seg.fd, [target[done:]], run.offset + done)
            if n <= 0:
                raise ProcksmError(f"short read of segment {seg.name} at {run.offset + done}")
            done += n

    def read_run(self, run: SlotRun) -> bytes:
        buf = bytearray(run.length)
        self.read_run_into(run, buf)
        return bytes(buf)

    # --- references and reclaim ------------------------------------------------------------

    def incref(self, run: SlotRun) -> None:
        """Count one more target mapping of ``run`` (call after the injected mmap worked)."""
        seg = self.segment(run.segment_id)
        if not seg.sealed:
            raise ProcksmError(f"segment {seg.name} is not sealed; no target may map it")
        end = run.first_page + run.npages
        if run.npages <= 0 or end > seg.npages:
            raise IndexError(f"run {run} outside segment {seg.name} ({seg.npages} pages)")
        seg._refs[run.first_page : end] += 1
        seg.mapping_refs += 1

    def decref(self, run: SlotRun) -> bool:
        """One target mapping of ``run`` is gone. Returns True if that released the segment
        (no slot of it is mapped anywhere, per these counts): procksm closed its fd."""
        seg = self.segment(run.segment_id)
        end = run.first_page + run.npages
        refs = seg._refs[run.first_page : end]
        if seg.mapping_refs == 0 or len(refs) != run.npages or not refs.all():
            raise ValueError(f"decref of {run} without a matching incref")
        refs -= 1
        seg.mapping_refs -= 1
        if seg.mapping_refs == 0:
            self._release(seg)
            return True
        return False

    def collect(self) -> list[int]:
        """Release sealed segments that no target maps (e.g. every page of a merge batch
        turned out volatile). Do not call between seal_pending() and the injections that
        use the new segments. Returns the released segment ids."""
        released = []
        for seg in list(self._segments.values()):
            if seg.sealed and seg.mapping_refs == 0:
                self._release(seg)
                released.append(seg.id)
        return released

    def _release(self, seg: Segment) -> None:
        self._released_segments += 1
        self._released_bytes += seg.length
        self._forget(seg)

    def _forget(self, seg: Segment) -> None:
        seg.close()
        del self._segments[seg.id]
        if self._building is seg:
            self._building = None

    # --- whole store ---------------------------------------------------------------------

    def stats(self) -> SlotStoreStats:
        segs = list(self._segments.values())
        slots = sum(s.npages for s in segs)
        return SlotStoreStats(
            segments=len(segs),
            pending_segments=sum(1 for s in segs if not s.sealed),
            slots=slots,
            bytes_held=slots * PAGE_SIZE,
            referenced_slots=sum(s.referenced_slots for s in segs),
            mapping_refs=sum(s.mapping_refs for s in segs),
            released_segments=self._released_segments,
            released_bytes=self._released_bytes,
        )

    def close(self) -> None:
        """Close every fd (procksm exits). Targets keep their mappings and content."""
        for seg in list(self._segments.values()):
            self._forget(seg)
