"""Page hashes: xxh3_64 of each 4 KiB page, into a numpy array.

A hash is only an index into the trees: two pages are identical only after an exact byte
comparison (docs/design.md §2.2).

Measured on this machine (2-core VM, 256 MiB of random pages, xxhash 3.x / numpy 2.x):

====================================================  =================
``np.fromiter(map(xxh3, pages_2d))`` (used here)      5.3-6.3 M pages/s
generator of memoryview slices into ``np.fromiter``       4.6 M pages/s
list comprehension of memoryview slices                   3.8 M pages/s
indexed loop writing into a preallocated array            3.4 M pages/s
two threads (xxhash keeps the GIL for 4 KiB inputs)       2.6 M pages/s
``bytes`` copy, then slices                               0.5 M pages/s
one xxh3 call over all 256 MiB (C-speed upper bound)      8.2 M pages/s
====================================================  =================

Iterating the rows of a 2-D uint8 array hands xxhash ready-made buffer objects from C,
so the per-page Python work is one C-level iteration step and one call.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import numpy.typing as npt
import xxhash

from procksm import PAGE_SIZE

_xxh3: Callable[[Any], int] = xxhash.xxh3_64_intdigest

# The hash of a page of zeros: a row with it is compared with zeros before it is called one.
ZERO_HASH = _xxh3(bytes(PAGE_SIZE))


def hash_page(page: bytes | bytearray | memoryview) -> int:
    """xxh3_64 of one page (the same value :func:`hash_pages` gives it)."""
    return _xxh3(page)


def hash_pages(view: bytes | bytearray | memoryview) -> npt.NDArray[np.uint64]:
    """xxh3_64 of each 4 KiB page of ``view`` (whose length is a multiple of the page size)."""
    nbytes = len(view) if not isinstance(view, memoryview) else view.nbytes
    if nbytes % PAGE_SIZE:
        raise ValueError(f"length {nbytes} is not a multiple of the page size")
    pages = np.frombuffer(view, dtype=np.uint8).reshape(-1, PAGE_SIZE)
    return np.fromiter(map(_xxh3, pages), dtype=np.uint64, count=len(pages))
