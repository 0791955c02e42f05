"""Keep merged pages in core dumps (docs/design.md §3.8): /proc/PID/coredump_filter.

A merged range is a MAP_PRIVATE mapping of a memfd, a *file-backed private* mapping to
the kernel. fs/coredump.c ``vma_dump_size`` dumps such a VMA under the default filter
(0x33) only if it has an ``anon_vma``, i.e. only after the target wrote to one of its
pages; a merged range the target only reads is left out of the core unless bit 2
(MMF_DUMP_MAPPED_PRIVATE, "file-backed private memory") is set. Measured on kernel 6.18,
planted target, 64 merged pages: filter 0x33 -> the kernel core lacks them (with a COWed
page in the range: present); 0x37 -> present. gdb 13's gcore dumps them under 0x33 too
(it classifies "/memfd:... (deleted)" mappings as anonymous), so gcore needs no change.

procksm therefore sets bit 2 before its first mmap into a target and clears it again
when an unmerge leaves no procksm range in the target. The side effect: the target's
cores also hold its other private file mappings (library text, MAP_PRIVATE data files),
measured +2.3 MiB for a C program linked with libc, +48 MiB for Python with numpy.

The original value is remembered in a state file ``coredump-<pid>-<start time>`` next to
the lock files (/run/procksm for root): the restore may be done by another procksm,
after this one exited or crashed; the start time makes a reused pid another target.
Only bit 2 is undone on restore, so a change the user made to other bits meanwhile
survives. A target whose filter already had bit 2 gets no state file and is never
changed.
"""

from __future__ import annotations

import contextlib
import os

from procksm.attach.locks import lock_dir, remove_stale_files
from procksm.procfs import parse_coredump_filter as parse_filter
from procksm.procfs import read_coredump_filter as read_filter
from procksm.procfs import start_time
from procksm.procfs import write_coredump_filter as write_filter

# Bits of /proc/PID/coredump_filter (Documentation/filesystems/proc.rst, "coredump_filter")
DUMP_ANON_PRIVATE = 1 << 0
DUMP_ANON_SHARED = 1 << 1
DUMP_MAPPED_PRIVATE = 1 << 2
DUMP_MAPPED_SHARED = 1 << 3
DUMP_ELF_HEADERS = 1 << 4
DUMP_HUGETLB_PRIVATE = 1 << 5
DUMP_HUGETLB_SHARED = 1 << 6
DUMP_DAX_PRIVATE = 1 << 7
DUMP_DAX_SHARED = 1 << 8
DEFAULT_FILTER = 0x33  # the kernel's default (CONFIG_CORE_DUMP_DEFAULT_ELF_HEADERS=y)

STATE_PREFIX = "coredump-"


def format_filter(value: int) -> str:
    return f"{value:08x}"


def state_path(pid: int) -> str:
    return os.path.join(lock_dir(), f"{STATE_PREFIX}{pid}-{start_time(pid)}")


def keep_merged_in_cores(pid: int) -> bool:
    """Before procksm first maps a segment into ``pid``: set bit 2 of its coredump
    filter, remembering the original value. Returns True if the filter was changed now.
    Call it under the target's lock (``locks.target_locks``)."""
    current = read_filter(pid)
    if current & DUMP_MAPPED_PRIVATE:
        return False  # already dumped: set by the user, or by an earlier procksm
    path = state_path(pid)
    os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
    remove_stale_state(os.path.dirname(path))
    # The state file first: if procksm dies between the two writes, an unmerge finds
    # the file and clears a bit that is not set, which is harmless. The other order
    # could leave bit 2 set with nobody knowing it was procksm's.
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(format_filter(current) + "\n")
    os.replace(tmp, path)
    write_filter(pid, current | DUMP_MAPPED_PRIVATE)
    return True


def remove_stale_state(directory: str) -> int:
    """Remove the state files of processes that have exited (a merged target that dies
    is never unmerged); returns how many. /run is a tmpfs, so a reboot clears them too."""
    return remove_stale_files(directory, STATE_PREFIX, "")


def original_filter(pid: int) -> int | None:
    """The filter procksm found before it set bit 2, if procksm set it."""
    try:
        with open(state_path(pid)) as f:
            return parse_filter(f.read())
    except FileNotFoundError:
        return None


def restore_after_unmerge(pid: int) -> bool:
    """When no procksm range is left in ``pid``: clear bit 2 again if procksm set it.
    Returns True if the filter was changed. Call it under the target's lock."""
    original = original_filter(pid)
    if original is None:
        return False
    changed = False
    current = read_filter(pid)
    if current & DUMP_MAPPED_PRIVATE and not original & DUMP_MAPPED_PRIVATE:
        write_filter(pid, current & ~DUMP_MAPPED_PRIVATE)
        changed = True
    with contextlib.suppress(FileNotFoundError):
        os.unlink(state_path(pid))
    return changed


__all__ = [
    "DEFAULT_FILTER",
    "DUMP_ANON_PRIVATE",
    "DUMP_ELF_HEADERS",
    "DUMP_MAPPED_PRIVATE",
    "format_filter",
    "keep_merged_in_cores",
    "original_filter",
    "parse_filter",
    "read_filter",
    "remove_stale_state",
    "restore_after_unmerge",
    "state_path",
    "write_filter",
]
