"""The BPF maps' encodings of armed pages (pure): a 512-bit bitmap per 2 MiB region of a
target, and the Bloom filter bit of each 64 KiB chunk that holds armed pages."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from procksm.observe.cow_header import (
    BLOOM_BITS,
    BLOOM_MULT,
    BLOOM_SHIFT,
    PAGE_SHIFT,
    REGION_PAGES,
    REGION_SHIFT,
)
from procksm.procfs import U64Array


def page_bitmaps(pages: npt.ArrayLike) -> dict[int, bytes]:
    """Page numbers (address >> 12) -> {2 MiB region: 64-byte bitmap}, as the BPF map holds
    them: bit ``p % 512`` of the region's 8 little-endian u64 words is page ``p``."""
    p = np.asarray(pages, dtype=np.uint64)
    if p.size == 0:
        return {}
    regions = p >> np.uint64(REGION_SHIFT - PAGE_SHIFT)
    uniq, inv = np.unique(regions, return_inverse=True)
    grid = np.zeros((uniq.size, REGION_PAGES), dtype=np.bool_)
    grid[inv, (p & np.uint64(REGION_PAGES - 1)).astype(np.intp)] = True
    packed = np.packbits(grid, axis=1, bitorder="little")
    return {int(r): packed[i].tobytes() for i, r in enumerate(uniq)}


def bloom_index(chunk: int) -> int:
    """The fault filter's bit for a 64 KiB chunk (address >> 16), as cow.bpf.c has it."""
    return ((chunk * BLOOM_MULT) & 0xFFFF_FFFF_FFFF_FFFF) >> (64 - BLOOM_BITS)


def armed_chunks(pages: U64Array) -> set[int]:
    """The 64 KiB chunks holding the given page numbers."""
    return {int(c) for c in np.unique(pages >> np.uint64(BLOOM_SHIFT - PAGE_SHIFT))}


def bitmap_pages(region: int, bits: bytes) -> list[int]:
    """The inverse of :func:`page_bitmaps` for one region."""
    flags = np.unpackbits(np.frombuffer(bits, dtype=np.uint8), bitorder="little")
    first = region << (REGION_SHIFT - PAGE_SHIFT)
    return [first + int(i) for i in np.flatnonzero(flags)]
