"""The BPF maps that say which pages the kernel side watches: a bit per target tgid
(``target_bits``), each target's armed pages as 2 MiB-region bitmaps (``merged``), the
Bloom filter of the 64 KiB chunks that hold them (``chunk_bloom``), and the targets that
exec'd (``stale``). User space writes them; the kernel only clears a page's bit when it
counts its first write."""

from __future__ import annotations

import collections
import struct
from collections.abc import Iterable, Mapping

from procksm.observe.bitmaps import armed_chunks, bloom_index, page_bitmaps
from procksm.observe.bpf_maps import BpfMap, IntArray
from procksm.observe.cow_header import PAGE_SHIFT, REGION_PAGES, REGION_SHIFT
from procksm.procfs import U64Array

_TGID = struct.Struct("=I")  # the key of `stale`
_REGION_KEY = struct.Struct("=IIQ")  # struct procksm_region_key: tgid, pad, region


class ArmedPageMaps:
    """Writes each target's armed pages where they differ from what was written last."""

    def __init__(self, maps: Mapping[str, BpfMap]) -> None:
        self._target_bits = IntArray(maps["target_bits"])
        self._bloom = IntArray(maps["chunk_bloom"])
        self._merged = maps["merged"]
        self._stale = maps["stale"]
        self._written: dict[int, dict[int, bytes]] = {}  # pid -> region -> bitmap in the map
        self._chunks: dict[int, set[int]] = {}  # pid -> chunks whose Bloom bit it holds
        self._bloom_users: collections.Counter[int] = collections.Counter()

    def set_target(self, pid: int, on: bool) -> None:
        word = self._target_bits[pid >> 6]
        bit = 1 << (pid & 63)
        self._target_bits[pid >> 6] = word | bit if on else word & ~bit

    def clear_stale(self, pid: int) -> None:
        """``pid`` exec'd and its regions were dropped: its faults count again."""
        self._stale.delete(_TGID.pack(pid))

    def page_cleared(self, pid: int, addr: int) -> None:
        """The kernel cleared the bit of ``addr`` itself (its first write): mirror it in
        what the map is known to hold, so that re-arming the page later is a change."""
        written = self._written.get(pid, {})
        region = addr >> REGION_SHIFT
        if region in written:
            bits = bytearray(written[region])
            page = (addr >> PAGE_SHIFT) & (REGION_PAGES - 1)
            bits[page >> 3] &= ~(1 << (page & 7)) & 0xFF
            written[region] = bytes(bits)

    def write(self, pid: int, armed: U64Array) -> None:
        """Arm exactly the pages ``armed`` (page numbers) of ``pid``."""
        written = self._written.pop(pid, {})
        held = self._chunks.pop(pid, set())
        want = page_bitmaps(armed)
        chunks = armed_chunks(armed)
        dropped = written.keys() - want.keys()
        # the filter bits before the pages they let through are armed, and cleared after
        self._bloom_update(chunks - held, +1)
        for region, bits in want.items():
            if written.get(region) != bits:
                self._merged.update(_REGION_KEY.pack(pid, 0, region), bits)
        for region in dropped:
            self._merged.delete(_REGION_KEY.pack(pid, 0, region))
        self._bloom_update(held - chunks, -1)
        if want or chunks:  # nothing armed: the pid is forgotten
            self._written[pid], self._chunks[pid] = want, chunks

    def _bloom_update(self, chunks: Iterable[int], delta: int) -> None:
        """Count the (target, chunk) pairs behind each filter bit; set a bit when its
        first pair comes, clear it when its last one went."""
        words: dict[int, tuple[int, int]] = {}  # word -> (bits to set, bits to clear)
        for chunk in chunks:
            h = bloom_index(chunk)
            self._bloom_users[h] += delta
            n = self._bloom_users[h]
            if (delta > 0 and n == 1) or (delta < 0 and n == 0):
                on, off = words.get(h >> 6, (0, 0))
                bit = 1 << (h & 63)
                words[h >> 6] = (on | bit, off) if delta > 0 else (on, off | bit)
            if n == 0:
                del self._bloom_users[h]
        if not words:
            return
        for w, (on, off) in words.items():
            self._bloom[w] = (self._bloom[w] | on) & ~off
