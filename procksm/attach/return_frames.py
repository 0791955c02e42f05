"""The way back of every injected call: frames of a thread's own state on its stack.

Before a thread runs its first injected call of a window, procksm writes below its stack
pointer, under the red zone (where the kernel puts a signal frame), an rt_sigframe of its
own state: registers with the restart fix-up applied, XSAVE state, signal mask, rseq
abort address (layouts: procksm.arch.x86_64). Injected calls run from a `syscall; ret`
with rsp at that frame, so a thread released at any instant (procksm SIGKILLed) runs at
most its call, `ret`s into the target's sigreturn trampoline and is back in its own
state. Frames chain: a frame's registers may be another call (`syscall; ret`) whose
`ret` leads to the next frame — the futex gate's wake-up and wait, a close() that undoes
an fd (:meth:`ReturnFrames.undo_on_death`). docs/kill-safety.md.
"""

from __future__ import annotations

import contextlib
import struct
from collections.abc import Iterator

from procksm import procfs
from procksm.arch import x86_64
from procksm.arch.x86_64 import Registers, SYS_futex, unsigned
from procksm.attach.inject import (
    Gadgets,
    get_rseq_area,
    get_sigmask,
    get_xstate,
    read_memories,
    read_memory,
    set_regs,
    set_sigmask,
    write_memories,
)
from procksm.attach.kill_steps import step
from procksm.attach.scratch_layout import (
    FUTEX_OP_SET_1,
    FUTEX_WAIT_PRIVATE,
    FUTEX_WAKE_OP_PRIVATE,
    GATE,
    GATE_TIMEOUT,
)
from procksm.attach.tracees import StoppedThreads, Tracee
from procksm.errors import PtraceError, Unsupported

ALL_SIGNALS = (1 << 64) - 1  # the kernel keeps SIGKILL and SIGSTOP deliverable
ARGUMENT_ROOM = 256  # bytes of dead stack below a thread's frames, for a string
# undo frames a window may stack (ReturnFrames.undo_on_death): the SCM_RIGHTS hand-over's
# socket before its bind (procksm.merge.handover). A window's batch of calls needs none:
# its clean-up calls are in the batch and always run (procksm.attach.call_batch).
MAX_UNDO = 1


def _wake_call(gate: int) -> tuple[int, ...]:
    """futex(gate, FUTEX_WAKE_OP, all, 0, gate, SET 1): open the gate, wake every waiter."""
    return (SYS_futex, gate, FUTEX_WAKE_OP_PRIVATE, 0x7FFFFFFF, 0, gate, FUTEX_OP_SET_1)


def _wait_call(gate: int) -> tuple[int, ...]:
    """futex(gate, FUTEX_WAIT, 0, its timeout): wait while the gate is closed."""
    return (SYS_futex, gate, FUTEX_WAIT_PRIVATE, 0, gate + (GATE_TIMEOUT - GATE))


class ReturnFrames:
    """The frames of one window's threads, written as each thread is armed."""

    def __init__(self, threads: StoppedThreads, gadgets: Gadgets) -> None:
        self._threads = threads
        self._gadgets = gadgets
        self._own_masks: dict[int, int] = {}
        self._undo: list[int] = []  # chain starts under the undo frames pushed

    def own_mask(self, tid: int) -> int:
        """The thread's own signal mask (PTRACE_GETSIGMASK, read once per window)."""
        if tid not in self._own_masks:
            self._own_masks[tid] = get_sigmask(tid)
        return self._own_masks[tid]

    def ensure_armed(self, tracee: Tracee) -> None:
        """Arm the thread unless it is already (its first injected call of the window)."""
        if not tracee.chain:
            with procfs.MapsQuery(self._threads.memory_tid()) as maps:
                self.arm(tracee, maps)

    def arm(self, tracee: Tracee, maps: procfs.MapsQuery, *, wake: int = 0, wait: int = 0) -> None:
        """Write the thread's own-state frame on its stack (and, for the injecting
        thread of a gated window, a wake-up frame before it); for a gated thread, point
        its registers at the gate and block its signals."""
        self.arm_all([(tracee, wake, wait)], maps)

    def arm_all(self, plan: list[tuple[Tracee, int, int]], maps: procfs.MapsQuery) -> None:
        """:meth:`arm` for each (thread, wake, wait) of `plan`: every thread's frames in
        one process_vm_writev (and their rseq sections read in one process_vm_readv),
        then, thread by thread, the registers and signal mask that lead into them.
        Frames sit below stack pointers, in dead stack: written before any register
        points there, they change nothing if procksm dies meanwhile."""
        gadgets = self._gadgets
        sections = self._rseq_sections([tracee for tracee, _, _ in plan])
        pieces, gates = [], []
        for tracee, wake, wait in plan:
            saved = tracee.saved
            assert saved is not None
            own_mask = self.own_mask(tracee.tid)
            own_at, blob = self._own_frame(tracee, maps, own_mask, sections.get(tracee.tid))
            start = own_at
            if wake:
                wake_step = saved.copy()
                x86_64.load_syscall(wake_step, *_wake_call(wake), pc=gadgets.syscall, sp=own_at)
                start = own_at - x86_64.FRAME_STRIDE
                first = x86_64.build_frame(
                    start, wake_step, ALL_SIGNALS, pretcode=gadgets.sigreturn
                )
                blob = first.data.ljust(own_at - start, b"\0") + blob
            pieces.append((start, blob))
            gate_call = _wake_call(wake) if wake else _wait_call(wait) if wait else ()
            gates.append((tracee, own_at, start, own_mask, gate_call))
        write_memories(self._threads.memory_tid(), pieces)
        step("frames", plan[0][0].tid)
        for tracee, own_at, start, own_mask, gate_call in gates:
            tracee.own_frame = own_at
            if gate_call:
                self._hold_at_gate(tracee, own_at, own_mask, gate_call)
            tracee.chain = start

    def _own_frame(
        self,
        tracee: Tracee,
        maps: procfs.MapsQuery,
        own_mask: int,
        rseq_section: tuple[int, int, int] | None,
    ) -> tuple[int, bytes]:
        """(address, bytes) of the frame of the thread's own state and its XSAVE image."""
        tid, saved = tracee.tid, tracee.saved
        assert saved is not None
        image = x86_64.signal_xstate(get_xstate(tid))
        # Below the own frame: the wake-up frame, then room for undo frames (undo_on_death)
        low, own_at, fpstate = x86_64.frame_below(saved.rsp, len(image), 1 + MAX_UNDO)
        self._check_stack_room(maps, tid, low - ARGUMENT_ROOM, saved.rsp)
        own = x86_64.build_frame(
            own_at, self._resume_state(tid, saved, rseq_section), own_mask,
            pretcode=self._gadgets.sigreturn, fpstate=fpstate,
        )  # fmt: skip
        return own_at, own.data.ljust(fpstate - own_at, b"\0") + image

    def _hold_at_gate(
        self, tracee: Tracee, own_at: int, own_mask: int, call: tuple[int, ...]
    ) -> None:
        """Give a thread of a gated window the gate's futex call as its idle registers,
        returning to its own frame, and block its signals."""
        assert tracee.saved is not None
        idle = tracee.saved.copy()
        idle.orig_rax = unsigned(-1)
        x86_64.load_syscall(idle, *call, pc=self._gadgets.syscall, sp=own_at)
        tracee.dirty = True
        set_regs(tracee.tid, idle)
        step("arm", tracee.tid)
        if tracee.sigmask is None:
            tracee.sigmask = own_mask
            set_sigmask(tracee.tid, ALL_SIGNALS)
            step("block", tracee.tid)

    def _resume_state(
        self, tid: int, saved: Registers, rseq_section: tuple[int, int, int] | None
    ) -> Registers:
        """The registers the thread's own-state frame returns to: the kernel's restart
        fix-up applied (procksm.arch.x86_64.own_state), and the abort handler of the rseq
        critical section it was stopped in, if any (:meth:`_rseq_sections`)."""
        code = b""
        if x86_64.needs_code(saved):
            before, after = x86_64.CODE_BEFORE_RIP, x86_64.CODE_AFTER_RIP
            code = read_memory(self._threads.memory_tid(), saved.rip - before, before + after)
        try:
            regs = x86_64.own_state(saved, code)
        except ValueError as e:
            raise Unsupported(
                f"pid {self._threads.pid}, thread {tid}: {e}; procksm cannot give it a way "
                "back that keeps its call going"
            ) from None
        if rseq_section is not None:
            start, length, abort = rseq_section
            if start <= regs.rip < start + length:
                regs.rip = abort
        return regs

    def _rseq_sections(self, tracees: list[Tracee]) -> dict[int, tuple[int, int, int]]:
        """(start, length, abort) of the rseq critical section each thread has armed, for
        the threads that have one: a thread stopped inside it resumes at its abort
        handler, as the kernel would move it on its way back to user space
        (kernel/rseq.c rseq_ip_fixup). After an injected call the thread returns to user
        space outside the section, which clears the section's pointer, so the
        sigreturn into it would go unnoticed. The sections' pointers (struct rseq's
        rseq_cs) of all threads come in one read."""
        areas = []
        for tracee in tracees:
            try:
                area = get_rseq_area(tracee.tid)
            except OSError:
                continue  # no rseq configuration readable: nothing the kernel fixes up
            if area:
                areas.append((tracee.tid, area))
        if not areas:
            return {}
        memory = self._threads.memory_tid()
        out = {}
        try:
            pointers = read_memories(memory, [(area + 8, 8) for _, area in areas])
            for (tid, _), raw in zip(areas, pointers, strict=True):
                cs = struct.unpack("<Q", raw)[0] if raw else 0
                if cs:  # rare: a thread stopped while a section is armed
                    _, start, length, abort = struct.unpack("<QQQQ", read_memory(memory, cs, 32))
                    out[tid] = (start, length, abort)
        except (OSError, struct.error):
            pass  # an rseq area not readable: nothing the kernel would fix up either
        return out

    def _check_stack_room(self, maps: procfs.MapsQuery, tid: int, low: int, rsp: int) -> None:
        """Frames go below the red zone of the thread's stack, where a signal frame
        would; process_vm_writev does not grow a stack, so the mapping must reach."""
        vma = maps.vma_at(rsp - 1)
        if vma is None or vma.start > low or "w" not in vma.perms:
            raise PtraceError(
                f"pid {self._threads.pid}, thread {tid}: no room for its return frame below "
                f"its stack pointer {rsp:#x}"
            )

    def dead_stack(self, tracee: Tracee) -> int:
        """An address below every frame the thread may get: room for ARGUMENT_ROOM bytes
        of arguments (a string) that no frame overwrites."""
        return tracee.own_frame - (2 + MAX_UNDO) * x86_64.FRAME_STRIDE - ARGUMENT_ROOM

    @contextlib.contextmanager
    def undo_on_death(self, nr: int, *args: int) -> Iterator[None]:
        """While the block runs, the injecting thread's way back first makes system call
        `nr` (procksm.attach.session.StoppedTarget.undo_on_death)."""
        injector = self._threads.injector()
        self.ensure_armed(injector)
        if len(self._undo) >= MAX_UNDO:
            raise PtraceError("undo_on_death blocks nest too deep")
        gadgets = self._gadgets
        assert injector.saved is not None
        at = injector.own_frame - (2 + len(self._undo)) * x86_64.FRAME_STRIDE
        regs = injector.saved.copy()
        x86_64.load_syscall(regs, nr, *args, pc=gadgets.syscall, sp=injector.chain)
        frame = x86_64.build_frame(at, regs, ALL_SIGNALS, pretcode=gadgets.sigreturn)
        self._threads.write_memory(at, frame.data)
        step("undo", injector.tid, nr)
        self._undo.append(injector.chain)
        injector.chain = at  # the next injected calls return through it
        try:
            yield
        finally:
            injector.chain = self._undo.pop()
