"""What the BPF side and Python share: ``procksm/bpf/cow.h`` mirrored (map geometry, event
kinds, kernel counters, settings, the event layout). tests/test_observe.py reads cow.h
and checks that these agree, so change both together."""

from __future__ import annotations

import struct

from procksm import PAGE_SIZE

PAGE_SHIFT = PAGE_SIZE.bit_length() - 1

REGION_SHIFT = 21
REGION_PAGES = 1 << (REGION_SHIFT - PAGE_SHIFT)  # 512: one bit each
REGION_WORDS = 8
BLOOM_SHIFT = 16  # 64 KiB chunks
BLOOM_BITS = 21
BLOOM_MULT = 0x9E3779B97F4A7C15
EV_COW_USER = 1
EV_COW_KERNEL = 2
EV_FORK = 3
EV_EXEC = 4
EV_EXIT = 5
C_COW_USER = 0
C_COW_KERNEL = 1
C_LIFECYCLE = 2
C_LOST = 3
C_STALE = 4
C_NR = 5
CFG_FOLLOW_CHILDREN = 0
CFG_NR = 1
KERNEL_COUNTER_NAMES = ("cow_user", "cow_kernel", "lifecycle", "lost", "stale")
EVENT_FORMAT = "<QIIIIQ"  # struct procksm_event
EVENT_SIZE = struct.calcsize(EVENT_FORMAT)
