"""Handing a stopped target read-only fds of sealed segments (docs/design.md §2.6, §3.6):
pidfd_getfd for targets that may ptrace procksm, SCM_RIGHTS (procksm.fdpass) for the
others, every fd checked to be the segment's inode before anything maps it.
"""

from __future__ import annotations

import contextlib
import os

from procksm.arch.x86_64 import SYS_close, SYS_pidfd_getfd, SYS_pidfd_open
from procksm.attach import StoppedTarget
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

    def hand_over(self, st: StoppedTarget, segs: list[Segment]) -> dict[int, int]:
        """Give the target a read-only fd of each segment; returns segment id -> its fd.

        Targets that may ptrace procksm (root, our pid namespace) take the fds
        themselves with pidfd_open + pidfd_getfd; others receive them over an abstract
        AF_UNIX socket created in their network namespace (SCM_RIGHTS; docs/design.md §2.6).
        Either way the target holds procksm's read-only open file description, and every
        fd is checked to be the segment's inode before anything maps it (§3.6).
        """
        ro_fds = {s.id: self.readonly_fd(s) for s in segs}
        # Decided once per target, not in every stop window: a target that may not
        # ptrace procksm would otherwise pay three failed system calls per window.
        if st.pid not in self._pidfd_ok:
            self._pidfd_ok[st.pid] = proc_open_possible(st.pid)
        if self._pidfd_ok[st.pid]:
            got = self._take_with_pidfd(st, segs, ro_fds)
            if got is not None:
                return got
            self._pidfd_ok[st.pid] = False
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
            return {s.id: fd for s, fd in zip(segs, msg.fds, strict=True)}

    def _take_with_pidfd(
        self, st: StoppedTarget, segs: list[Segment], ro_fds: dict[int, int]
    ) -> dict[int, int] | None:
        """pidfd_open(procksm) + pidfd_getfd per segment + close, in the target. None when
        the kernel refuses (the target may not ptrace procksm): use SCM_RIGHTS then."""
        # A pidfd has no name a later procksm could recognise it by: if procksm dies while
        # it exists, the target closes it itself (its number is the lowest free fd).
        expected = st.lowest_free_fd()
        with st.undo_on_death(SYS_close, expected):
            return self._take_with_pidfd_from(st, segs, ro_fds, expected)

    def _take_with_pidfd_from(
        self, st: StoppedTarget, segs: list[Segment], ro_fds: dict[int, int], expected: int
    ) -> dict[int, int] | None:
        pidfd = st.syscall(SYS_pidfd_open, os.getpid(), 0)
        if pidfd < 0:
            return None
        got: dict[int, int] = {}
        try:
            if pidfd != expected:
                raise ProcksmError(f"pid {st.pid}: pidfd_open got fd {pidfd}, not {expected}")
            for s in segs:
                fd = st.syscall(SYS_pidfd_getfd, pidfd, ro_fds[s.id], 0)
                if fd < 0:
                    for f in got.values():
                        st.syscall(SYS_close, f)
                    return None
                if not verify_received_fd(st.pid, fd, s):
                    st.syscall(SYS_close, fd)
                    for f in got.values():
                        st.syscall(SYS_close, f)
                    raise ProcksmError(f"pid {st.pid}: received fd is not procksm's memfd")
                got[s.id] = fd
            return got
        finally:
            st.syscall(SYS_close, pidfd)
