"""Undoing a merge: procksm's mappings in a target made private anonymous memory again,
with exactly the bytes the process sees (DESIGN.md §2.6; docs/kill-safety.md).

``unmerge`` finds procksm's mappings by their memfd name in /proc/PID/maps (so any
procksm, also after a crash, can undo them) and, stopped, replaces each with anonymous
memory holding exactly the bytes the process saw. The same pieces serve the daemon
(ranges a target's writes keep breaking) and the madvise guard's unmerge helper.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from procksm import PAGE_SIZE, coredump, guard, procfs
from procksm.arch.x86_64 import (
    MAP_ANONYMOUS,
    MAP_FIXED,
    MAP_PRIVATE,
    MREMAP_DONTUNMAP,
    MREMAP_FIXED,
    MREMAP_MAYMOVE,
    PROT_EXEC,
    PROT_READ,
    PROT_WRITE,
    SYS_madvise,
    SYS_mmap,
    SYS_mprotect,
    SYS_mremap,
)
from procksm.attach import PtraceSession, StoppedTarget
from procksm.attach.diagnose import check_attachable
from procksm.attach.leftovers import has_leftovers, remove_leftovers
from procksm.attach.locks import target_locks
from procksm.errors import ProcksmError
from procksm.slots import SEGMENT_NAME_PREFIX
from procksm.window_sizer import DEFAULT_PAUSE_BUDGET_MS, WindowSizer


@dataclass(slots=True)
class UnmergeResult:
    pid: int
    name: str
    pages_unmerged: int = 0
    ranges: int = 0
    leftovers_removed: int = 0  # fds and mappings a killed procksm had left
    leftovers_in_use: int = 0  # its scratch areas left: a thread stays in their routine
    pauses: list[float] = field(default_factory=list)


def merged_ranges(pid: int) -> list[procfs.Vma]:
    """procksm's mappings in a target, recognised by the memfd's name (only their lines
    of /proc/PID/maps are parsed)."""
    return procfs.read_maps_with_path(pid, SEGMENT_NAME_PREFIX)


def merged_vmas(pid: int) -> list[procfs.Vma]:
    """:func:`merged_ranges` with their VmFlags (smaps: slower, it walks page tables)."""
    return [v for v in procfs.read_vmas(pid) if v.path.startswith(SEGMENT_NAME_PREFIX)]


def unmerge(
    pid: int, *, batch_pages: int = 512, pause_budget_ms: float = DEFAULT_PAUSE_BUDGET_MS
) -> UnmergeResult:
    """Make every procksm-merged range of ``pid`` private anonymous memory again, with
    exactly the bytes the process sees now (its own copied-on-write pages included).

    Stopped, per piece of at most ``batch_pages``, sized to ``pause_budget_ms`` from the
    windows before (procksm.window_sizer): read the range, map fresh anonymous
    memory over it (same protection), write the non-zero pages back through
    /proc/PID/mem (works whatever the protection). Zero pages stay untouched: they read
    as zeros, like the never-written anonymous memory they now are.
    """
    st0 = check_attachable(pid)
    res = UnmergeResult(pid, st0.name)
    with target_locks([pid]):
        # under the lock: a merge in progress elsewhere finishes (or is refused) first
        left = guard.listener_copies_left_in(pid)
        if has_leftovers(pid) or left.found:
            removal = remove_leftovers(pid, left.still_left)
            res.leftovers_removed, res.leftovers_in_use = removal.removed, removal.in_use
        ranges = merged_ranges(pid)
        if ranges:
            res.ranges += len(ranges)
            res.pages_unmerged += unmerge_pieces(
                pid,
                [(v.start, v.end) for v in ranges],
                batch_pages=batch_pages,
                pause_budget_ms=pause_budget_ms,
                pauses=res.pauses,
            )
        if not merged_ranges(pid):
            # procksm's last range is gone: give back the coredump_filter it changed
            coredump.restore_after_unmerge(pid)
        return res


def unmerge_pieces(
    pid: int,
    pieces: Sequence[tuple[int, int]],
    *,
    batch_pages: int = 512,
    pause_budget_ms: float = DEFAULT_PAUSE_BUDGET_MS,
    pauses: list[float] | None = None,
) -> int:
    """Unmerge procksm's pages in each [start, end) of ``pid`` (exact bytes, private
    anonymous memory again); returns the pages unmerged. Each window re-checks, under
    stop, which mappings are still procksm's: whatever changed since is left alone."""
    done = 0
    # The merged ranges' advice (hg, nh, ...: given to them by the merge), read from smaps
    # once, outside the stops: the anonymous memory that replaces them gets it again.
    advised = [(v.start, v.end, v.advice) for v in merged_vmas(pid) if v.advice]
    # A window's pages cost more here than in a merge (~6-8 us each: the read, then the
    # write into fresh pages, measured) and 512 of them took 4-12 ms: sized per window.
    sizer = WindowSizer(pause_budget_ms / 1000.0, batch_pages)
    with PtraceSession(pid) as sess:
        for start, end in pieces:
            with procfs.MapsQuery(pid) as maps:
                ours = [
                    (max(v.start, start), min(v.end, end))
                    for v in maps.vmas_in(start, end)
                    if v.name.startswith(SEGMENT_NAME_PREFIX)
                ]
            for a, b in ours:
                addr = a
                while addr < b:
                    n = min(sizer.next_pages() * PAGE_SIZE, b - addr)
                    with sess.stopped() as st:
                        now = st.maps().vma_at(addr)
                        if now is None or not now.name.startswith(SEGMENT_NAME_PREFIX):
                            break  # unmapped or remapped meanwhile: not ours to replace
                        n = min(n, now.end - addr)
                        advice = next((a for s, e, a in advised if s <= addr < e), ())
                        _unmerge_piece(st, addr, n, now.perms, advice)
                    sizer.observe(n // PAGE_SIZE, sess.pauses[-1])
                    done += n // PAGE_SIZE
                    addr += n
        if pauses is not None:
            pauses.extend(sess.pauses)
    return done


def _unmerge_piece(
    st: StoppedTarget, addr: int, length: int, perms: str, advice: tuple[int, ...] = ()
) -> None:
    """Replace [addr, addr+length) by private anonymous memory with the same bytes, in
    one step: the new pages are built in the scratch area's staging range, then moved
    over the range by one mremap(MREMAP_FIXED | MREMAP_DONTUNMAP). At every instant the
    range holds either its merged mapping or its complete new content, with its advice
    (``advice``: madvise values, given to the staging range before the move; mremap
    keeps a VMA's flags); the staging range stays mapped (DONTUNMAP), so nothing of the
    target's can come to lie inside procksm's scratch area. Zero pages are not written:
    they read as zeros."""
    st.hold_others()
    stage, room = st.staging()
    if length > room:
        raise ProcksmError(f"unmerge piece of {length} bytes > staging room {room}")
    data = st.read_memory(addr, length)
    if len(data) != length:
        raise ProcksmError(f"pid {st.pid}: cannot read merged range {addr:#x}")
    prot = (PROT_READ if perms[0] == "r" else 0) | (PROT_WRITE if perms[1] == "w" else 0)
    prot |= PROT_EXEC if perms[2] == "x" else 0
    got = st.syscall_checked(
        SYS_mmap, stage, length, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_FIXED | MAP_ANONYMOUS,
        -1, 0, name="mmap",
    )  # fmt: skip
    if got != stage:
        raise ProcksmError(f"mmap returned {got:#x}, not {stage:#x}")
    pages = np.frombuffer(data, np.uint64).reshape(-1, PAGE_SIZE // 8)
    nonzero = np.flatnonzero(pages.any(axis=1))
    if nonzero.size:
        for run in np.split(nonzero, np.flatnonzero(np.diff(nonzero) != 1) + 1):
            a, b = int(run[0]) * PAGE_SIZE, (int(run[-1]) + 1) * PAGE_SIZE
            st.write_memory(stage + a, data[a:b])
    if prot != PROT_READ | PROT_WRITE:
        st.syscall_checked(SYS_mprotect, stage, length, prot, name="mprotect")
    for adv in advice:
        st.syscall_checked(SYS_madvise, stage, length, adv, name="madvise")
    flags = MREMAP_MAYMOVE | MREMAP_FIXED | MREMAP_DONTUNMAP
    got = st.syscall_checked(SYS_mremap, stage, length, length, flags, addr, name="mremap")
    if got != addr:
        raise ProcksmError(f"mremap returned {got:#x}, not {addr:#x}")


__all__ = ["UnmergeResult", "merged_ranges", "unmerge", "unmerge_pieces"]
