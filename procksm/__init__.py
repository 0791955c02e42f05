"""procksm: Kernel Samepage Merging from user space."""

from __future__ import annotations

__version__ = "0.1.0"
PAGE_SIZE = 4096
