"""The BPF maps that say which pages the kernel side watches: a bit per target tgid
(``target_bits``), each target's armed pages as 2 MiB-region bitmaps (``merged``), the
Bloom filter of the 64 KiB chunks that hold them (``chunk_bloom``), and the targets that
exec'd (``stale``). User space writes them; the kernel only clears a page's bit when it
counts its first write."""

from __future__ import annotations

import collections
import contextlib
import ctypes
from collections.abc import Iterable
from typing import Any

from procksm.observe.bitmaps import armed_chunks, bloom_index, page_bitmaps
from procksm.observe.cow_header import PAGE_SHIFT, REGION_PAGES, REGION_SHIFT
from procksm.procfs import U64Array


class ArmedPageMaps:
    """Writes each target's armed pages where they differ from what was written last."""

    def __init__(self, bpf: Any) -> None:
        self._bpf = bpf
        self._written: dict[int, dict[int, bytes]] = {}  # pid -> region -> bitmap in the map
        self._chunks: dict[int, set[int]] = {}  # pid -> chunks whose Bloom bit it holds
        self._bloom_users: collections.Counter[int] = collections.Counter()

    def set_target(self, pid: int, on: bool) -> None:
        tab = self._bpf[b"target_bits"]
        key = tab.Key(pid >> 6)
        word = int(tab[key].value)
        bit = 1 << (pid & 63)
        word = word | bit if on else word & ~bit
        tab[key] = tab.Leaf(word)

    def clear_stale(self, pid: int) -> None:
        """``pid`` exec'd and its regions were dropped: its faults count again."""
        stale = self._bpf[b"stale"]
        with contextlib.suppress(KeyError):
            del stale[stale.Key(pid)]

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
        tab = self._bpf[b"merged"]
        dropped = written.keys() - want.keys()
        # the filter bits before the pages they let through are armed, and cleared after
        self._bloom_update(chunks - held, +1)
        for region, bits in want.items():
            if written.get(region) != bits:
                leaf = tab.Leaf()
                ctypes.memmove(ctypes.addressof(leaf), bits, len(bits))
                tab[tab.Key(pid, 0, region)] = leaf
        for region in dropped:
            with contextlib.suppress(KeyError):
                del tab[tab.Key(pid, 0, region)]
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
        tab = self._bpf[b"chunk_bloom"]
        for w, (on, off) in words.items():
            key = tab.Key(w)
            tab[key] = tab.Leaf((int(tab[key].value) | on) & ~off)
