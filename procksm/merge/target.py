"""One target's merge under stop (the engine's step 5, docs/design.md §2.3-2.7, §3).

In stop windows sized to the pause budget (procksm.window_sizer, at most
``batch_pages`` pages): with every thread stopped, check that each extent is still in
private anonymous memory; read the short ones again and compare them byte for byte with
their slots (pages that changed are skipped, counted volatile); hold the other threads;
then in one batch run by the target (procksm.attach.call_batch) take read-only fds of
the segments, ``mmap(MAP_PRIVATE|MAP_FIXED)`` the compared extents with the VMA's
protection; for the long ones (procksm.plan.IN_TARGET_PAGES) map the slots in the
staging range, let the target compare, and map them over the extent only if equal;
give the advice again, ``MADV_POPULATE_READ``, ``MADV_DONTNEED`` the zero runs (the
long ones checked by the target first), give the staging range back, close the fds;
resume. Two short windows come first: the scratch area (with the call routine),
then the madvise guard (procksm.guard).
"""

from __future__ import annotations

import contextlib
import gc
import itertools
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np

from procksm import PAGE_SIZE, coredump, guard, procfs
from procksm.arch.x86_64 import (
    MADV_DONTFORK,
    MADV_DONTNEED,
    MADV_POPULATE_READ,
    MAP_ANONYMOUS,
    MAP_FIXED,
    MAP_PRIVATE,
    PROT_EXEC,
    PROT_READ,
    PROT_WRITE,
    SYS_close,
    SYS_madvise,
    SYS_mmap,
)
from procksm.arch.x86_64_batch import UNEQUAL
from procksm.attach import PtraceSession, StoppedTarget
from procksm.attach.call_batch import NOT_RUN, BatchResults, CallBatch, Ref
from procksm.attach.injected_call import InjectedSyscallError
from procksm.attach.scratch_layout import STAGING_PAGES, TABLE_CAPACITY
from procksm.errors import ProcksmError
from procksm.merge.handover import FdHandOver, HandedFds
from procksm.merge.records import MergeOptions, Refusal, TargetResult
from procksm.merge.round_slots import RoundSlots
from procksm.plan import (
    FD_CALLS,
    STAGING_CALLS,
    Extent,
    TargetPlan,
    ZeroExtent,
    compared_in_target,
    extent_calls,
    split_batches,
    window_units,
    zero_run_calls,
)
from procksm.reader import PageReader
from procksm.runs import mask_runs
from procksm.slots import SEGMENT_NAME_PREFIX, Segment
from procksm.window_sizer import WindowSizer


class TargetMerger:
    """The merge of one target's planned extents and zero runs, window by window; what
    it did goes into ``res`` and ``refused`` (shared by the round's targets).
    ``merged_before``: the target mapped procksm's segments when the round read its maps;
    ``sizer``: the target's window sizes, learnt from its windows (kept across rounds)."""

    def __init__(
        self,
        tp: TargetPlan,
        opts: MergeOptions,
        slots: RoundSlots,
        handover: FdHandOver,
        guard_client: Callable[[], guard.GuardClient],
        res: TargetResult,
        refused: list[Refusal],
        merged_before: bool,
        sizer: WindowSizer,
        session: Callable[[], contextlib.AbstractContextManager[PtraceSession]],
    ) -> None:
        self.pid = tp.pid
        self.advice_at = tp.advice_at
        self.extents = tp.extents
        self.zero_extents = tp.zero_extents
        self.opts = opts
        self.slots = slots
        self.handover = handover
        self.guard_client = guard_client  # the engine's, started on first use
        self.res = res
        self.refused = refused
        self.merged_before = merged_before
        self.sizer = sizer
        self.session = session  # a new session, or the target's kept one (the daemon's)

    def merge_safely(self) -> None:
        """:meth:`merge`, at real-time priority when asked for (or when the CPUs are
        saturated); an error ends this target's merge and is kept in its result."""
        try:
            rt = self.opts.realtime
            if rt is None:
                rt = _cpus_saturated()
            with _realtime_priority() if rt else contextlib.nullcontext():
                self.merge()
        except ProcksmError as e:
            self.res.error = e.message

    def merge(self) -> None:
        """Guard the target if needed, then merge its batches, one stop window each."""
        pid, extents, opts = self.pid, self.extents, self.opts
        batches = split_batches(
            extents,
            self.zero_extents,
            self.sizer.next_pages,
            opts.batch_pages,
            max_calls=opts.max_calls,
            piece_of=lambda slot: self.slots.piece(slot)[0].id,
            advice_calls=lambda addr: len(self.advice_at(addr)),
        )
        # A target merged before whose guard is gone (killed, or another guard's) gets
        # a new one even when nothing new is merged (procksm.guard: the newest filter's
        # listener takes the notifications).
        reguard = opts.guard and not extents and self.merged_before
        if not extents and not self.zero_extents and not reguard:
            return
        reader = PageReader(pid, chunk_bytes=opts.batch_pages * PAGE_SIZE)
        client: guard.GuardClient | None = None
        if opts.guard and (extents or reguard):
            client = self.guard_client()
            try:
                # outside any stop window: starting the guard process takes ~0.2 s
                if client.guarded(pid):
                    client = None
            except guard.GuardError as err:
                return self._refuse(err.message)
        with self.session() as sess, _gc_paused():
            first_pause, cpu_before = len(sess.pauses), sess.target_cpu_s
            why = self._first_window(sess, client)
            if why is not None:
                return self._refuse(why)
            if extents:
                # Before the first mmap (and after the first window, where a target that
                # procksm cannot serve is refused untouched): merged ranges are file-backed
                # private mappings, which the default coredump_filter leaves out of kernel
                # cores (procksm.coredump).
                coredump.keep_merged_in_cores(pid)
            for ext_batch, zero_batch in batches:
                self._window(sess, reader, ext_batch, zero_batch)  # one stop, always
                self.sizer.observe(window_units(ext_batch, zero_batch), sess.pauses[-1])
                # no thread of the target is stopped between windows: collect the cyclic
                # garbage a window leaves (~100 objects; measured: 412,853 in 4,220
                # windows on four redis-servers). Paused for the whole of a target, a
                # scattered merge of thousands of windows held them all: the daemon grew
                # from 37 to 46 MiB within one target's merge
                gc.collect(0)
            self.res.pauses.extend(sess.pauses[first_pause:])
            self.res.longest = sess.longest
            self.res.target_cpu_s += sess.target_cpu_s - cpu_before

    def _refuse(self, reason: str) -> None:
        self.refused.append(Refusal(self.pid, 0, 0, reason))
        self.res.pages_refused += sum(x.npages for x in self.extents)

    def _first_window(self, sess: PtraceSession, client: guard.GuardClient | None) -> str | None:
        """The scratch area (the call routine, arguments of the hand-over) gets a short
        window of its own, so the first merge window is no longer than the others; the
        madvise guard's filter is installed in a second one (each ~2 ms on a quiet
        machine: together they were the p99 of a merge's stops), and its listener
        handed to the guard before anything is merged (procksm.guard). Returns why the
        target is refused."""
        listener = None
        left = guard.listener_copies_left_in(self.pid) if self.opts.guard else None
        if sess.scratch_address is None:  # a kept session has its area from a round before
            with sess.stopped() as st:
                st.scratch()
        copies = left is not None and left.found
        if copies or client is not None:
            with sess.stopped() as st:
                # under stop: the fd numbers cannot change meanwhile
                for fd in left.still_left() if left is not None and copies else ():
                    st.syscall(SYS_close, fd)  # a dead procksm's copy of the guard's listener
                if client is not None:
                    try:
                        listener = guard.install(st, set_no_new_privs=self.opts.set_no_new_privs)
                    except guard.GuardError as err:
                        return err.message
        # None: guarded already, through a filter inherited from a guarded parent
        if client is not None and listener is not None:
            try:
                client.hand_over(self.pid, *listener)
            except guard.GuardError as err:
                # the filter is in but has no listener: its calls fail with ENOSYS
                # (never stale memory); merge nothing more into this process
                return f"madvise guard hand-over: {err.message}"
            finally:
                os.close(listener[0])
            self.res.guard_installed = True
        return None

    def _window(
        self,
        sess: PtraceSession,
        reader: PageReader,
        ext_batch: list[Extent],
        zero_batch: list[ZeroExtent],
    ) -> None:
        """One stop window: check the ranges, compare the short ones here, hold the
        other threads, then one batch maps and drops (the long runs compared by the
        target itself in the same batch, procksm.plan.IN_TARGET_PAGES). A long run
        the target found changed since the scan is compared here page by page, and
        its equal pages are replaced in a second batch of the same window."""
        pieces = [(e, self._ok_pieces(e)) for e in ext_batch]
        here = [p for _, ps in pieces for p in ps if not compared_in_target(p.npages)]
        # Slots are sealed, immutable: read the bytes procksm compares before stopping.
        want = self.slots.content_of(here)
        rows = dict(zip((p.addr for p in here), _first_rows(here), strict=True))
        prepared = self._prepare(sess, pieces, zero_batch)
        with sess.stopped() as st:
            maps = st.maps()
            stacks = _thread_stack_ranges(st, maps)
            usable = self._usable_extents(st, maps, pieces, stacks)
            ext_here = [(e, prot) for e, prot in usable if not compared_in_target(e.npages)]
            ext_there = [(e, prot) for e, prot in usable if compared_in_target(e.npages)]
            ext_ok = self._compare_here(reader, [(e, p, rows[e.addr]) for e, p in ext_here], want)
            zero_usable = _usable_zero(maps, zero_batch, stacks, self.res)
            zero_ok = _zero_here(
                reader, [z for z in zero_usable if not compared_in_target(z.npages)], self.res
            )
            zero_there = [z for z in zero_usable if compared_in_target(z.npages)]
            if ext_ok or zero_ok or ext_there or zero_there:
                # Compared under stop, or compared by the target in the batch, once
                # gated: from here no thread of the target may run its own code before
                # the replacements are done, even if procksm dies (the futex gate,
                # procksm.attach.session).
                st.hold_others()
                work = (ext_ok, zero_ok, ext_there, zero_there)
                changed, zero_changed = self._replace(st, *work, prepared=prepared)
                if changed or zero_changed:
                    again = self.slots.content_of([e for e, _ in changed])
                    again_rows = _first_rows([e for e, _ in changed])
                    rerun = [(e, p, r) for (e, p), r in zip(changed, again_rows, strict=True)]
                    ext_ok = self._compare_here(reader, rerun, again)
                    zero_ok = _zero_here(reader, zero_changed, self.res)
                    self._replace(st, ext_ok, zero_ok, [], [])

    def _ok_pieces(self, e: Extent) -> list[Extent]:
        """The runs of ``e`` whose slots may be mapped (RoundSlots.ok: the reference page
        still held what the scan hashed when its slot was written)."""
        ok = self.slots.ok[e.slot : e.slot + e.npages]
        if ok.all():
            return [e]
        return [_piece(e, i0, n) for i0, n in mask_runs(ok)]

    def _replace(
        self,
        st: StoppedTarget,
        ext_ok: list[tuple[Extent, int]],
        zero_ok: list[ZeroExtent],
        ext_there: list[tuple[Extent, int]],
        zero_there: list[ZeroExtent],
        *,
        prepared: _Prepared | None = None,
    ) -> tuple[list[tuple[Extent, int]], list[ZeroExtent]]:
        """Under stop, gated: the replacements, in batches of calls run by the target
        (procksm.attach.call_batch), usually one per window; the window's plan fits one
        table and the staging range, but pieces of an extent (slots not ok) each have
        their own calls: then more batches, in the same window (the gate stays closed
        between them). ``ext_there``, ``zero_there``: compared by the target. Returns
        the runs the target found changed. ``prepared``: the table built before the
        stop, used if the window's checks found exactly the work it was built for."""
        failed: InjectedSyscallError | None = None
        changed: list[tuple[Extent, int]] = []
        zero_changed: list[ZeroExtent] = []
        work = (ext_ok, zero_ok, ext_there, zero_there)
        parts: list[tuple[_BatchPart, _BuiltBatch | None]]
        if prepared is not None and prepared.holds(st, work):
            parts = [(prepared.part, prepared.built)]
        else:
            parts = [(part, None) for part in self._table_sized(*work)]
        for part, built in parts:
            try:
                more, more_zero = self._replace_in_one_batch(st, part, built)
            except InjectedSyscallError as e:
                failed = failed or e
                continue
            changed += more
            zero_changed += more_zero
        if failed is not None:
            raise failed
        return changed, zero_changed

    def _table_sized(
        self,
        ext_ok: list[tuple[Extent, int]],
        zero_ok: list[ZeroExtent],
        ext_there: list[tuple[Extent, int]],
        zero_there: list[ZeroExtent],
    ) -> list[_BatchPart]:
        """The window's work cut into parts whose calls fit one table (each extent its
        :func:`procksm.plan.extent_calls`, each zero run its zero_run_calls, each
        segment a part uses its hand-over (FD_CALLS), each part its pidfd's open and
        close, and the staging range's STAGING_CALLS once) and whose runs compared by
        the target fit the staging range (longer ones are cut)."""
        parts: list[_BatchPart] = [_BatchPart()]
        segs: set[int] = set()
        calls = staged = 0
        there = [
            (_piece(e, i, min(STAGING_PAGES, e.npages - i)), prot)
            for e, prot in ext_there
            for i in range(0, e.npages, STAGING_PAGES)
        ]

        def new_part() -> None:
            nonlocal calls, staged
            parts.append(_BatchPart())
            segs.clear()
            calls, staged = 2, 0

        calls = 2
        work = [*((e, p, False) for e, p in ext_ok), *((e, p, True) for e, p in there)]
        for e, prot, on_target in work:
            seg = self.slots.piece(e.slot)[0].id
            advice = len(self.advice_at(e.addr))
            cost = self._calls_of(e, on_target, advice, staged, segs)
            if (
                calls + cost > TABLE_CAPACITY or (on_target and staged + e.npages > STAGING_PAGES)
            ) and parts[-1].work:
                new_part()
                cost = self._calls_of(e, on_target, advice, staged, segs)
            calls += cost
            segs.add(seg)
            if on_target:
                parts[-1].ext_there.append((e, prot))
                staged += e.npages
            else:
                parts[-1].ext_ok.append((e, prot))
        for z, on_target in [*((z, False) for z in zero_ok), *((z, True) for z in zero_there)]:
            need = zero_run_calls(on_target)
            if calls + need > TABLE_CAPACITY and parts[-1].work:
                new_part()
            calls += need
            (parts[-1].zero_there if on_target else parts[-1].zero_ok).append(z)
        return parts

    def _calls_of(
        self, e: Extent, on_target: bool, advice: int, staged: int, segs: set[int]
    ) -> int:
        """An extent's calls in a batch part: its mapping's, the staging range's once,
        its segment's hand-over once."""
        seg = self.slots.piece(e.slot)[0].id
        return (
            extent_calls(on_target, advice)
            + (STAGING_CALLS if on_target and not staged else 0)
            + (FD_CALLS if seg not in segs else 0)
        )

    def _replace_in_one_batch(
        self, st: StoppedTarget, part: _BatchPart, built: _BuiltBatch | None = None
    ) -> tuple[list[tuple[Extent, int]], list[ZeroExtent]]:
        """Take the segments' fds, map each extent over the pages equal to it (for the
        runs the target compares: map the slots in the staging range, compare, map them
        over the run only if equal), give it its advice again, populate it, drop the
        zero runs (checked by the target first, for long ones), give the staging range
        back, close the fds: one batch (``built`` before the stop, or built here). A
        target that may not take fds itself gets them over SCM_RIGHTS and the batch is
        made again, in the same window (nothing was replaced). Returns the runs the
        target found changed."""
        while True:
            if built is None:
                stage = st.staging()[0] if part.ext_there else 0
                built = self._build_batch(
                    part, lambda batch, segs: self.handover.hand_over(st, batch, segs), stage
                )
            results = st.run_batch(built.batch)
            if built.fds.refused(results):
                self.handover.pidfd_refused(st.pid)
                built = None
                continue
            break
        fds, maps, compared, zeros, given_back = (
            built.fds, built.maps, built.compared, built.zeros, built.given_back
        )  # fmt: skip
        if not fds.verified(results):
            raise ProcksmError(f"pid {st.pid}: fd hand-over failed verification")
        failed: InjectedSyscallError | None = None
        for e, mapped in maps:
            err = self._count_mapping(st, e, results[mapped], "mmap")
            failed = failed or err
        changed: list[tuple[Extent, int]] = []
        for e, prot, same, mapped in compared:
            if results[same] == UNEQUAL:
                changed.append((e, prot))
            else:
                err = self._count_mapping(st, e, results[mapped], "mmap")
                failed = failed or err
        zero_changed = []
        for z, zero_check, dropped in zeros:
            if zero_check is not None and results[zero_check] == UNEQUAL:
                zero_changed.append(z)
            elif results[dropped] == 0:
                self.res.pages_zeroed += z.npages
        _check_given_back(st, results, given_back)
        if failed is not None:
            raise failed
        return changed, zero_changed

    def _build_batch(
        self,
        part: _BatchPart,
        take_fds: Callable[[CallBatch, list[Segment]], HandedFds],
        stage: int,
    ) -> _BuiltBatch:
        """The calls of :meth:`_replace_in_one_batch`'s batch, and where each result
        will be. ``take_fds``: the hand-over's calls; ``stage``: the staging range."""
        every = [*part.ext_ok, *part.ext_there]
        pieces = (self.slots.piece(e.slot)[0] for e, _ in every)
        segs = list({seg.id: seg for seg in pieces}.values())
        batch = CallBatch()
        fds = take_fds(batch, segs)
        maps = [(e, self._map_extent(batch, e, prot, fds)) for e, prot in part.ext_ok]
        compared, staged = [], 0
        for e, prot in part.ext_there:
            same, mapped = self._map_compared_extent(batch, e, prot, fds, stage + staged)
            compared.append((e, prot, same, mapped))
            staged += e.npages * PAGE_SIZE
        zeros: list[tuple[ZeroExtent, Ref | None, Ref]] = [
            (z, None, batch.call(SYS_madvise, z.addr, z.npages * PAGE_SIZE, MADV_DONTNEED))
            for z in part.zero_ok
        ]
        for z in part.zero_there:
            checked = batch.zero(z.addr, z.npages * PAGE_SIZE)
            zeros.append((z, checked, batch.call(SYS_madvise, z.addr, checked, MADV_DONTNEED)))
        given_back = _give_staging_back(batch, stage, staged) if staged else []
        fds.close_in(batch)
        return _BuiltBatch(batch, fds, maps, compared, zeros, given_back)

    def _prepare(
        self,
        sess: PtraceSession,
        pieces: list[tuple[Extent, list[Extent]]],
        zero_batch: list[ZeroExtent],
    ) -> _Prepared | None:
        """The window's table built before its stop, for the work it has if nothing
        changed since the scan (every range still private anonymous read-write memory,
        every page still equal to its slot or still zero): ~0.1 ms of Python taken out
        of each stop (docs/design.md §7). None where the window's calls need the target
        first (the scratch area not mapped yet, fds sent over SCM_RIGHTS) or more than
        one table (scattered pages: built under stop, one at a time; held all at once
        here, they raised the daemon's peak memory on four scattered redis-servers past
        its budget, issue 15)."""
        places = sess.scratch_places()
        if places is None or not self.handover.takes_itself(self.pid):
            return None
        base, stage, stat_buffer = places
        rw = PROT_READ | PROT_WRITE
        ext = [p for _, ps in pieces for p in ps]
        work = (
            [(p, rw) for p in ext if not compared_in_target(p.npages)],
            [z for z in zero_batch if not compared_in_target(z.npages)],
            [(p, rw) for p in ext if compared_in_target(p.npages)],
            [z for z in zero_batch if compared_in_target(z.npages)],
        )
        sized = self._table_sized(*work)
        if len(sized) > 1:
            return None
        (part,) = sized
        built = self._build_batch(
            part,
            lambda batch, segs: self.handover.take_in_batch(batch, segs, stat_buffer),
            stage if part.ext_there else 0,
        )
        built.batch.table()  # encoded now, not in the stop
        return _Prepared(base, work, part, built)

    def _count_mapping(
        self, st: StoppedTarget, e: Extent, got: int, call: str
    ) -> InjectedSyscallError | None:
        """Count what the mmap of ``e`` did; its error, if it failed."""
        if got == e.addr:
            self.res.pages_merged += e.npages
            self.res.extents += 1
            self.slots.mark_mapped(e)
        elif got == NOT_RUN:
            self.res.pages_volatile += e.npages  # after a failed call: left for later
        elif -4095 <= got < 0:
            return InjectedSyscallError(st.pid, call, -got)
        else:
            # MAP_FIXED never moves a mapping elsewhere: a bug
            raise ProcksmError(f"{call} returned {got:#x}, not {e.addr:#x}")
        return None

    def _map_extent(self, batch: CallBatch, e: Extent, prot: int, fds: HandedFds) -> Ref:
        """mmap the slots over the extent, give the new mapping the VMA's advice again
        (hg, nh, sr, rr, dd: procfs.REAPPLIED_VMFLAGS), populate it. Returns the mmap.

        The advice is made even when the batch was cut short before (ALWAYS): made
        after this mmap, it is the new mapping's; without it (procksm's checks failed
        first, or the mmap did) it lands on the original VMA, which carries it already:
        a no-op that splits nothing."""
        seg, off = self.slots.piece(e.slot)
        length = e.npages * PAGE_SIZE
        mapped = batch.call(
            SYS_mmap, e.addr, length, prot, MAP_PRIVATE | MAP_FIXED, fds.fds[seg.id], off,
            expect=e.addr,
        )  # fmt: skip
        for adv in self.advice_at(e.addr):
            batch.call(SYS_madvise, e.addr, length, adv, always=True)
        # Read-populate only: all PTEs point at the memfd pages now.
        batch.call(SYS_madvise, e.addr, length, MADV_POPULATE_READ)
        return mapped

    def _map_compared_extent(
        self, batch: CallBatch, e: Extent, prot: int, fds: HandedFds, stage: int
    ) -> tuple[Ref, Ref]:
        """The slots mapped at ``stage`` (in the scratch area's staging range), read-only;
        the target compares the extent with them (EQUAL, which gives the segment's fd
        only if they are equal); the mmap of the slots over the extent takes that fd, so
        a difference skips it; then as :meth:`_map_extent`: the advice again (ALWAYS),
        the populate. Returns (the comparison, the mmap over the extent).

        Not mremap from the staging range: the madvise guard's filter sends every
        mremap to the guard (procksm.guard), a round trip per extent, and none when
        the guard is gone (the call fails ENOSYS); mmap and MADV_POPULATE_READ pass."""
        seg, off = self.slots.piece(e.slot)
        length = e.npages * PAGE_SIZE
        fd, private = fds.fds[seg.id], MAP_PRIVATE | MAP_FIXED
        batch.call(SYS_mmap, stage, length, PROT_READ, private, fd, off, expect=stage)
        same = batch.equal(e.addr, stage, length, fd)
        mapped = batch.call(SYS_mmap, e.addr, length, prot, private, same, off, expect=e.addr)
        for adv in self.advice_at(e.addr):
            batch.call(SYS_madvise, e.addr, length, adv, always=True)
        batch.call(SYS_madvise, e.addr, length, MADV_POPULATE_READ)
        return same, mapped

    def _usable_extents(
        self,
        st: StoppedTarget,
        maps: procfs.MapsQuery,
        pieces: list[tuple[Extent, list[Extent]]],
        stacks: list[tuple[int, int]],
    ) -> list[tuple[Extent, int]]:
        """Under stop: the pieces (runs of an extent whose slots are ok) of extents in a
        mapping that is still private anonymous memory (or procksm's), not a thread's
        stack; with its protection now."""
        out: list[tuple[Extent, int]] = []
        for e, ok_pieces in pieces:
            if _overlaps(stacks, e.addr, e.end):
                self.refused.append(Refusal(st.pid, e.addr, e.end, "thread stack"))
                self.res.pages_refused += e.npages
                continue
            vma = _vma_covering(maps, e.addr, e.end)
            if vma is None or not _still_mergeable(vma):
                # unmapped, remapped or changed since the scan: never map over it
                self.res.pages_volatile += e.npages
                continue
            prot = _prot(vma.perms)
            self.res.pages_volatile += e.npages - sum(p.npages for p in ok_pieces)
            out.extend((p, prot) for p in ok_pieces)
        return out

    def _compare_here(
        self,
        reader: PageReader,
        checked: list[tuple[Extent, int, int]],
        want: bytes | bytearray,
    ) -> list[tuple[Extent, int]]:
        """Under stop: of ``checked`` (extent, protection, its first row in ``want``), the
        runs of pages that still equal their slot, byte for byte. ``want``: slots' bytes.

        The extents are read in one process_vm_readv and compared in one vectorised
        step: one read and one comparison each cost ~60-80 us an extent in Python
        (measured on a first window of 7 extents: 0.4-0.6 ms against 0.09 for one)."""
        if not checked:
            return []
        equal = _equal_pages(reader, [(e.addr, e.npages, first) for e, _, first in checked], want)
        out: list[tuple[Extent, int]] = []
        for e, prot, first in checked:
            same = equal[first : first + e.npages]
            if same.all():
                out.append((e, prot))
                continue
            self.res.pages_volatile += int(e.npages - same.sum())
            for i0, n in mask_runs(same):
                out.append((Extent(e.addr + i0 * PAGE_SIZE, n, e.slot + i0), prot))
        return out


@dataclass
class _BatchPart:
    """The work of one batch of a window: extents and zero runs compared by procksm
    (``ext_ok``, ``zero_ok``), and compared by the target (``ext_there``, ``zero_there``)."""

    ext_ok: list[tuple[Extent, int]] = field(default_factory=list)
    zero_ok: list[ZeroExtent] = field(default_factory=list)
    ext_there: list[tuple[Extent, int]] = field(default_factory=list)
    zero_there: list[ZeroExtent] = field(default_factory=list)

    @property
    def work(self) -> bool:
        return bool(self.ext_ok or self.zero_ok or self.ext_there or self.zero_there)


@dataclass
class _BuiltBatch:
    """A batch's calls, and the results to read: each extent's mmap, each compared
    extent's comparison and mmap, each zero run's check and drop, the staging range's
    give-back."""

    batch: CallBatch
    fds: HandedFds
    maps: list[tuple[Extent, Ref]]
    compared: list[tuple[Extent, int, Ref, Ref]]
    zeros: list[tuple[ZeroExtent, Ref | None, Ref]]
    given_back: list[Ref]


_Work = tuple[
    list[tuple[Extent, int]], list[ZeroExtent], list[tuple[Extent, int]], list[ZeroExtent]
]


@dataclass
class _Prepared:
    """A window's table built before its stop (TargetMerger._prepare), for ``work``
    (ext_ok, zero_ok, ext_there, zero_there) and the scratch area at ``base``."""

    base: int
    work: _Work
    part: _BatchPart
    built: _BuiltBatch

    def holds(self, st: StoppedTarget, work: _Work) -> bool:
        """Under stop: the window found the work this table was built for, and its
        scratch area is still the one it points into."""
        return work == self.work and st.scratch() == self.base + PAGE_SIZE


def _first_rows(extents: list[Extent]) -> list[int]:
    """Each extent's first row in a buffer holding their pages back to back."""
    return list(itertools.accumulate((e.npages for e in extents), initial=0))[: len(extents)]


def _piece(e: Extent, first: int, npages: int) -> Extent:
    """Pages [first, first + npages) of ``e``."""
    return Extent(e.addr + first * PAGE_SIZE, npages, e.slot + first, e.prot_write)


def _give_staging_back(batch: CallBatch, stage: int, length: int) -> list[Ref]:
    """The staging range as it was, whatever the batch did there (ALWAYS: after an abort
    too, and procksm need not be alive): anonymous memory again, over the slots still
    mapped there for the comparisons,
    not inherited by a fork like the rest of the scratch area. Nothing of a segment's
    stays in the area (procksm.unmerge.merged_ranges would take it for merged memory)."""
    return [
        batch.call(
            SYS_mmap,
            stage,
            length,
            PROT_READ | PROT_WRITE,
            MAP_PRIVATE | MAP_FIXED | MAP_ANONYMOUS,
            -1,
            0,
            always=True,
        ),
        batch.call(SYS_madvise, stage, length, MADV_DONTFORK, always=True),
    ]


def _check_given_back(st: StoppedTarget, results: BatchResults, given_back: list[Ref]) -> None:
    for ref, name in zip(given_back, ("mmap", "madvise"), strict=False):
        if not results.ok(ref):
            raise InjectedSyscallError(st.pid, name, -results[ref])


def _equal_pages(
    reader: PageReader, runs: list[tuple[int, int, int]], want: bytes | bytearray
) -> np.ndarray:
    """Per row of ``want`` (pages back to back): whether the target's page equals it now.
    ``runs``: (address, pages, first row) of the ranges to compare, read in this order;
    rows of no run, and pages from the first one that cannot be read on, are False."""
    want_pages = np.frombuffer(want, np.uint64).reshape(-1, PAGE_SIZE // 8)
    equal = np.zeros(len(want_pages), bool)
    data = reader.read_gather([(a, n) for a, n, _ in runs])
    n = len(data) // PAGE_SIZE
    got = np.frombuffer(data, np.uint64, count=n * (PAGE_SIZE // 8)).reshape(n, -1)
    at, every_row = 0, True
    for _, pages, first in runs:
        every_row = every_row and first == at
        at += pages
    if every_row and at == len(want_pages):
        # the usual case: every page compared, in row order; one flat comparison first
        if n == len(want_pages) and np.array_equal(got.ravel(), want_pages.ravel()):
            equal[:] = True
        else:
            equal[:n] = (got == want_pages[:n]).all(axis=1)
        return equal
    rows = np.concatenate([np.arange(first, first + pages) for _, pages, first in runs])[:n]
    equal[rows] = (got == want_pages[rows]).all(axis=1)
    return equal


def _cpus_saturated() -> bool:
    """More runnable threads than CPUs right now."""
    try:
        return procfs.procs_running() > (os.cpu_count() or 1)
    except OSError:
        return False


@contextlib.contextmanager
def _gc_paused() -> Iterator[None]:
    """No automatic cyclic garbage collection while a target is merged: a collection
    inside a stop window would lengthen the target's pause (measured: a few ms); the
    merge collects the young generation between windows itself."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


@contextlib.contextmanager
def _realtime_priority() -> Iterator[None]:
    """SCHED_FIFO for the calling thread while it merges one target.

    Every ptrace round trip needs procksm to be scheduled; on a machine saturated by
    busy threads (the targets' own, often) a SCHED_OTHER procksm waits a time slice per
    round trip and stop windows stretch to 100+ ms (measured: 32 spinning threads on 2
    CPUs). The thread sleeps whenever it waits, so it cannot monopolise a CPU.
    Silently skipped without CAP_SYS_NICE.
    """
    before = os.sched_getscheduler(0), os.sched_getparam(0)
    try:
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(1))
        changed = True
    except OSError:
        changed = False
    try:
        yield
    finally:
        if changed:
            with contextlib.suppress(OSError):
                os.sched_setscheduler(0, before[0], before[1])


def _prot(perms: str) -> int:
    return (
        (PROT_READ if perms[0] == "r" else 0)
        | (PROT_WRITE if perms[1] == "w" else 0)
        | (PROT_EXEC if perms[2] == "x" else 0)
    )


def _vma_covering(maps: procfs.MapsQuery, start: int, end: int) -> procfs.QueriedVma | None:
    v = maps.vma_at(start)
    return v if v is not None and end <= v.end else None


def _still_anonymous(v: procfs.QueriedVma) -> bool:
    """Re-checked under stop (VmFlags were checked at scan time): still a private,
    read-write, anonymous mapping that is neither a stack nor named (procfs.ineligibility
    refuses both)."""
    return (
        v.perms[:2] == "rw"
        and v.perms[3] == "p"
        and v.is_anonymous
        and not v.name.startswith(("[stack", "[anon:"))
    )


def _still_mergeable(v: procfs.QueriedVma) -> bool:
    """Where a slot may be mapped over pages equal to it: private anonymous memory as
    above, or one of procksm's own segment mappings, read-write and private (pages a
    write copied there are merged again by the daemon). Never for zero pages: there
    MADV_DONTNEED would bring back the segment's bytes, not zeros (_verify_zero)."""
    if _still_anonymous(v):
        return True
    return v.perms[:2] == "rw" and v.perms[3] == "p" and v.name.startswith(SEGMENT_NAME_PREFIX)


def _thread_stack_ranges(st: StoppedTarget, maps: procfs.MapsQuery) -> list[tuple[int, int]]:
    """VMAs that hold a thread's stack pointer: never merged (pthread stacks carry no
    VmFlag that says so). Conservative: the whole VMA, which may also hold memory the
    kernel merged into the stack's VMA; that memory is refused ("thread stack")."""
    out = []
    for tid in st.threads:
        try:
            v = maps.vma_at(st.saved_registers(tid).rsp)
        except ProcksmError:
            continue
        if v is not None:
            out.append((v.start, v.end))
    return out


def _overlaps(ranges: list[tuple[int, int]], start: int, end: int) -> bool:
    return any(s < end and start < e for s, e in ranges)


def _usable_zero(
    maps: procfs.MapsQuery,
    zero: list[ZeroExtent],
    stacks: list[tuple[int, int]],
    res: TargetResult,
) -> list[ZeroExtent]:
    """Under stop: the zero runs still in private anonymous memory, not a thread's stack
    (MADV_DONTNEED elsewhere would not give zeros back)."""
    out: list[ZeroExtent] = []
    for z in zero:
        end = z.addr + z.npages * PAGE_SIZE
        vma = _vma_covering(maps, z.addr, end)
        if _overlaps(stacks, z.addr, end) or vma is None or not _still_anonymous(vma):
            res.pages_volatile += z.npages
            continue
        out.append(z)
    return out


def _zero_here(reader: PageReader, zero: list[ZeroExtent], res: TargetResult) -> list[ZeroExtent]:
    """Under stop: the runs of pages of ``zero`` that are still all zero, read by procksm."""
    out: list[ZeroExtent] = []
    for z in zero:
        data = reader.read(z.addr, z.npages * PAGE_SIZE)
        n = len(data) // PAGE_SIZE
        zero_mask = np.zeros(z.npages, bool)
        if n:
            zero_mask[:n] = ~np.frombuffer(data, np.uint64, count=n * 512).reshape(n, -1).any(
                axis=1
            )
        res.pages_volatile += int(z.npages - zero_mask.sum())
        for i0, k in mask_runs(zero_mask):
            out.append(ZeroExtent(z.addr + i0 * PAGE_SIZE, k))
    return out
