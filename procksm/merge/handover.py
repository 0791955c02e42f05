"""Handing a stopped target read-only fds of sealed segments (docs/design.md §2.6, §3.6):
pidfd_getfd for targets that may ptrace procksm, SCM_RIGHTS (procksm.fdpass) for the
others, every fd checked to be the segment's inode before anything maps it.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field

from procksm.arch.x86_64 import SYS_close, SYS_pidfd_getfd, SYS_pidfd_open
from procksm.attach import StoppedTarget
from procksm.attach.call_batch import BatchResults, CallBatch, Ref
from procksm.closing import Closing
from procksm.errors import ProcksmError
from procksm.fdpass import (
    FdSender,
    build_recv_layout,
    parse_recv_result,
    proc_open_possible,
    verify_received_fd,
)
from procksm.slots import Segment


class FdHandOver(Closing):
    """procksm's read-only fd of each segment, and its hand-over to stopped targets.

    One per engine: the fds are procksm's for a merge round (closed by :meth:`close`,
    the targets keep their mappings); what each target may do (pidfd_getfd or not) is
    learnt once and kept.
    """

    def __init__(self) -> None:
        self._ro_fds: dict[int, int] = {}
        self._pidfd_ok: dict[int, bool] = {}  # per target: may it pidfd_getfd from us

    def close(self) -> None:
        for fd in self._ro_fds.values():
            with contextlib.suppress(OSError):
                os.close(fd)
        self._ro_fds.clear()

    def readonly_fd(self, seg: Segment) -> int:
        """procksm's one read-only fd (open file description) per segment.

        Every hand-over passes *this* file description (SCM_RIGHTS and pidfd_getfd
        duplicate it, they do not reopen): the kernel merges adjacent mappings only when
        they share the struct file, so the stop windows of one long extent end as one
        VMA instead of one per window (measured: a reopen per window left 4 VMAs for
        1024 pages).
        """
        fd = self._ro_fds.get(seg.id)
        if fd is None:
            fd = self._ro_fds[seg.id] = seg.readonly_fd()
        return fd

    def hand_over(self, st: StoppedTarget, batch: CallBatch, segs: list[Segment]) -> HandedFds:
        """Give the target a read-only fd of each segment, for the calls of `batch`.

        Targets that may ptrace procksm (root, our pid namespace) take the fds
        themselves, inside the batch: pidfd_open + pidfd_getfd, each fd checked by fstat
        to be the segment's inode before anything maps it (§3.6; a check that fails
        skips every mapping). Others receive them now, over an abstract AF_UNIX socket
        created in their network namespace (SCM_RIGHTS; docs/design.md §2.6), checked
        by procksm through /proc. Either way the target holds procksm's read-only open
        file description; :meth:`HandedFds.close_in` adds the closes.
        """
        # Decided once per target, not in every stop window: a target that may not
        # ptrace procksm would otherwise pay failed system calls per window.
        if st.pid not in self._pidfd_ok:
            self._pidfd_ok[st.pid] = proc_open_possible(st.pid)
        if self._pidfd_ok[st.pid]:
            return self.take_in_batch(batch, segs, st.stat_buffer())
        sent = self._send(st, segs, {s.id: self.readonly_fd(s) for s in segs})
        return HandedFds({s.id: fd for s, fd in zip(segs, sent, strict=True)})

    def takes_itself(self, pid: int) -> bool:
        """Whether target ``pid`` is known to take fds itself (pidfd_getfd in its batch,
        no injected call before it): its tables can be built before its windows' stops."""
        return bool(self._pidfd_ok.get(pid))

    def take_in_batch(self, batch: CallBatch, segs: list[Segment], stat_buffer: int) -> HandedFds:
        """The hand-over's calls in `batch` for a target that :meth:`takes_itself`, for a
        table built before its window's stop (procksm.merge.target)."""
        if not segs:
            return HandedFds({})  # no pidfd without a segment
        ro_fds = {s.id: self.readonly_fd(s) for s in segs}
        return self._take_with_pidfd(batch, segs, ro_fds, stat_buffer)

    def pidfd_refused(self, pid: int) -> None:
        """The target may not take fds from procksm: SCM_RIGHTS from now on."""
        self._pidfd_ok[pid] = False

    def _send(self, st: StoppedTarget, segs: list[Segment], ro_fds: dict[int, int]) -> list[int]:
        """The SCM_RIGHTS hand-over, one injected call at a time; the received fds."""
        if not segs:
            return []
        scratch = st.scratch()
        with FdSender(st.pid) as sender:
            layout = build_recv_layout(scratch, sender.target_address, max_fds=len(segs))
            st.write_memory(scratch, layout.blob)
            # The socket has no name before its bind: if procksm dies while it exists, the
            # target closes it itself (its fd number is known in advance: the lowest free).
            expected = st.lowest_free_fd()
            close = layout.close_call(expected)
            with st.undo_on_death(close.nr, *close.args):
                c = layout.socket_call()
                sock = st.syscall_checked(c.nr, *c.args, name="socket")
                try:
                    if sock != expected:
                        raise ProcksmError(f"pid {st.pid}: socket() got fd {sock}, not {expected}")
                    c = layout.bind_call(sock)
                    st.syscall_checked(c.nr, *c.args, name="bind")
                    sender.send_fds([ro_fds[s.id] for s in segs])
                    c = layout.recvmsg_call(sock)
                    ret = st.syscall(c.nr, *c.args)
                finally:
                    c = layout.close_call(sock)
                    st.syscall(c.nr, *c.args)
            msg = parse_recv_result(layout, st.read_memory(scratch, layout.size), ret)
            ok = msg.is_from(sender) and len(msg.fds) == len(segs)
            ok = ok and all(
                verify_received_fd(st.pid, fd, s) for fd, s in zip(msg.fds, segs, strict=False)
            )
            if not ok:
                for fd in msg.fds:
                    st.syscall(SYS_close, fd)
                raise ProcksmError(f"pid {st.pid}: fd hand-over failed verification")
            return list(msg.fds)

    def _take_with_pidfd(
        self, batch: CallBatch, segs: list[Segment], ro_fds: dict[int, int], stat_buffer: int
    ) -> HandedFds:
        """pidfd_open(procksm), then pidfd_getfd + its fstat check per segment, then the
        pidfd's close: the first calls of `batch`. procksm is alive while they run (a
        killed one never reaches the pid's reuse: it stays a zombie until its parent
        reaps it, and pidfd_getfd from a zombie fails), and the fstat check holds
        whatever happens."""
        pidfd = batch.call(SYS_pidfd_open, os.getpid(), 0)
        fds: dict[int, int | Ref] = {}
        checks: list[tuple[Ref, int]] = []
        for s in segs:
            fd = batch.call(SYS_pidfd_getfd, pidfd, ro_fds[s.id], 0)
            checks.extend(batch.check_stat(fd, s.identity, stat_buffer))
            fds[s.id] = fd
        batch.call(SYS_close, pidfd, always=True)
        return HandedFds(fds, pidfd=pidfd, checks=checks)


@dataclass
class HandedFds:
    """The segments' fds in the target for one batch: numbers (SCM_RIGHTS, received
    already) or the results of the batch's own pidfd_getfd calls."""

    fds: dict[int, int | Ref]
    pidfd: Ref | None = None
    checks: list[tuple[Ref, int]] = field(default_factory=list)  # (loaded value, expected)

    def close_in(self, batch: CallBatch) -> None:
        """The closes, last in the batch, made whatever failed before them."""
        for fd in self.fds.values():
            batch.call(SYS_close, fd, always=True)

    def refused(self, results: BatchResults) -> bool:
        """The target may not take fds from procksm (pidfd_open or pidfd_getfd failed)."""
        if self.pidfd is None:
            return False
        return not results.ok(self.pidfd) or not all(
            results.ok(fd) for fd in self.fds.values() if isinstance(fd, Ref)
        )

    def verified(self, results: BatchResults) -> bool:
        """Every fd the batch took is the segment's inode."""
        return all(results[ref] == want for ref, want in self.checks)
