"""A BPF ring buffer (``BPF_MAP_TYPE_RINGBUF``) read from Python, as libbpf's ringbuf.c
reads it (Documentation/bpf/ringbuf.rst, kernel/bpf/ringbuf.c):

* the map's fd is mmap'ed twice: the consumer page (offset 0) read-write, and the
  producer page followed by the data area, read-only; the kernel maps the data area
  twice in a row, so a record that wraps around the end is contiguous;
* ``consumer_pos`` and ``producer_pos`` are byte counters that only grow; a record
  starts at ``pos & (size - 1)`` with an 8-byte header whose first u32 is its length
  with two flags: BUSY (reserved, not committed yet: stop there) and DISCARD (skip it);
  records take ``round_up(length + 8, 8)`` bytes;
* the reader stores the new ``consumer_pos`` once it has copied the records, which frees
  their room for the producer.

Ordering: the kernel stores the header (``xchg``) before ``producer_pos``
(``smp_store_release``); the reader must load them in the other order. x86-64 keeps loads
in order and stores in order (procksm runs on x86-64 only, procksm/arch/), so plain
loads and stores are enough here; each counter is read with one 8-byte load (a ctypes
``c_uint64``), never byte by byte, so a value is never torn.

Waiting: ``poll(2)`` on the map's fd asks the ring itself whether data is there
(ringbuf_map_poll), so it returns at once for records whose producer asked for no
wakeup; epoll would report only the wakeups.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import select
from collections.abc import Callable
from typing import Protocol

from procksm.closing import Closing

BUSY_BIT = 1 << 31
DISCARD_BIT = 1 << 30
HEADER_SIZE = 8

_libc = ctypes.CDLL(None, use_errno=True)
_mmap = _libc.mmap
_mmap.restype = ctypes.c_void_p
_mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                  ctypes.c_long]  # fmt: skip
_munmap = _libc.munmap
_munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_MAP_FAILED = ctypes.c_void_p(-1).value


class Words(Protocol):
    """u32 words by index: the ring's ctypes array, or a test's memoryview."""

    def __getitem__(self, index: int, /) -> int: ...


def take_records(
    header_words: Words,
    copy: Callable[[int, int], bytes],
    consumer_pos: int,
    producer_pos: int,
    mask: int,
) -> tuple[list[bytes], int]:
    """The committed records between ``consumer_pos`` and ``producer_pos`` (pure).

    ``header_words[i]`` is the u32 at byte ``4 * i`` of the (doubly mapped) data area,
    ``copy(offset, n)`` its bytes ``[offset, offset + n)``. Returns the records, without
    the discarded ones, and the position after the last one taken: a record still being
    written (BUSY) ends the batch, it and those after it are read next time."""
    records: list[bytes] = []
    pos = consumer_pos
    while pos < producer_pos:
        offset = pos & mask
        word = header_words[offset >> 2]
        if word & BUSY_BIT:
            break
        length = word & ~(BUSY_BIT | DISCARD_BIT)
        if not word & DISCARD_BIT:
            records.append(copy(offset + HEADER_SIZE, length))
        pos += (length + HEADER_SIZE + 7) & ~7
    return records, pos


def _map(fd: int, length: int, prot: int, offset: int) -> int:
    addr = _mmap(None, length, prot, mmap.MAP_SHARED, fd, offset)
    if addr is None or addr == _MAP_FAILED:
        err = ctypes.get_errno()
        raise OSError(err, f"mmap of the BPF ring buffer: {os.strerror(err)}")
    return int(addr)


class RingBuffer(Closing):
    """The consumer of one ring buffer map of ``size`` bytes (its ``max_entries``, a
    power of two number of pages)."""

    def __init__(self, fd: int, size: int) -> None:
        page = mmap.PAGESIZE
        self._mask = size - 1
        self._mappings: list[tuple[int, int]] = []  # (address, length)
        consumer = _map(fd, page, mmap.PROT_READ | mmap.PROT_WRITE, 0)
        self._mappings.append((consumer, page))
        try:
            producer = _map(fd, page + 2 * size, mmap.PROT_READ, page)
        except OSError:
            self.close()
            raise
        self._mappings.append((producer, page + 2 * size))
        self._consumer = ctypes.c_uint64.from_address(consumer)
        self._producer = ctypes.c_uint64.from_address(producer)
        self._data = producer + page
        self._words = (ctypes.c_uint32 * (2 * size // 4)).from_address(self._data)
        self._poll = select.poll()
        self._poll.register(fd, select.POLLIN)

    def available(self) -> bool:
        return bool(self._mappings) and self._consumer.value < self._producer.value

    def drain(self) -> list[bytes]:
        """The records committed so far, oldest first, without waiting. One pass up to
        the producer position read at the start: a producer that never stops cannot keep
        the caller here."""
        if not self._mappings:
            return []
        start = self._consumer.value
        records, pos = take_records(
            self._words, self._copy, start, self._producer.value, self._mask
        )
        if pos != start:
            self._consumer.value = pos
        return records

    def wait(self, timeout_ms: int) -> list[bytes]:
        """The records there are, waiting up to ``timeout_ms`` for one if there is none."""
        if timeout_ms > 0 and not self.available():
            self._poll.poll(timeout_ms)
        return self.drain()

    def _copy(self, offset: int, n: int) -> bytes:
        return ctypes.string_at(self._data + offset, n)

    def close(self) -> None:
        """Unmap the ring (the mappings hold a reference to the map: unmapped, the map
        goes with its fds). Reading it afterwards would fault: :meth:`drain` and
        :meth:`wait` return nothing once closed."""
        mappings, self._mappings = self._mappings, []
        for addr, length in mappings:
            _munmap(addr, length)
