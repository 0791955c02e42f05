"""Answering a notified call (the active guard, or a standby standing in): unmerge
procksm's pages in the range it would act on, then let it run (CONTINUE); when that
cannot be done now, answer it later."""

from __future__ import annotations

import select
from collections.abc import Container

from procksm.guardd import log
from procksm.guardd.calls import (
    Notification,
    guarded_range,
    injected_by_procksm,
    mremap_may_keep_merged,
)
from procksm.guardd.listener import hung_up, id_valid, receive, respond_continue
from procksm.guardd.maps import SEGMENT_NAME_PREFIX, VmaCache, tgid
from procksm.guardd.unmerger import Unmerger


class Answerer:
    def __init__(self, unmerger: Unmerger) -> None:
        self.unmerger = unmerger
        self.vmas = VmaCache()
        self.handled = 0  # notifications
        self.unmerged_pages = 0
        self._retry: list[tuple[int, Notification]] = []
        self._last_refusal = ""

    @property
    def pending(self) -> bool:
        """Calls wait for an unmerge that could not be done yet."""
        return bool(self._retry)

    def on_listener(self, fd: int, ev: int) -> bool:
        """Answer the call listener ``fd`` reports; True when no task uses its filter any
        more (drop it)."""
        n = receive(fd)
        if n is None:  # withdrawn before we read it
            return bool(ev & select.POLLHUP) or hung_up(fd)
        self._handle(fd, n)
        return False

    def _handle(self, fd: int, n: Notification) -> None:
        self.handled += 1
        rng = guarded_range(n.nr, n.arch, n.args)
        if rng is not None:
            keep = mremap_may_keep_merged(n.nr, n.arch, n.args)
            if not self._unmerge_range(n, *rng, keep_if_one_vma=keep):
                # never let the call run on merged pages: answer later
                self._retry.append((fd, n))
                return
        respond_continue(fd, n.id)

    def retry_pending(self, listeners: Container[int]) -> None:
        """Try again the calls that wait; ``listeners``: the fds still guarded."""
        pending, self._retry = self._retry, []
        for fd, n in pending:
            if fd not in listeners or not id_valid(fd, n.id):
                continue  # the call was restarted (and notifies again) or its task died
            self._handle(fd, n)

    def _unmerge_range(
        self, n: Notification, start: int, end: int, *, keep_if_one_vma: bool = False
    ) -> bool:
        """Unmerge procksm's pages of [start, end) in the caller's process (not when
        ``keep_if_one_vma`` and one VMA holds the range); False when it could not be
        done now (the target is traced by someone else, say)."""
        tid = n.tid
        vmas = self.vmas.vmas_in(tid, start, end)
        if vmas is None:
            return True  # the task is gone: nothing will run the call
        if keep_if_one_vma and len(vmas) == 1 and vmas[0][0] <= start and vmas[0][1] >= end:
            return True
        pieces = [
            (max(a, start), min(b, end)) for a, b, name in vmas
            if name.startswith(SEGMENT_NAME_PREFIX)
        ]  # fmt: skip
        if not pieces:
            return True
        if injected_by_procksm(n):
            return True  # procksm's own call, in a stop window of its: never wait for it
        try:
            pid = tgid(tid)
        except (OSError, ValueError):
            return True
        request = f"unmerge {pid} " + " ".join(f"{a} {b}" for a, b in pieces)
        try:
            answer = self.unmerger.request(request)
        except OSError as e:
            log(f"tid {tid}: unmerge helper: {e.strerror}")
            return False
        if not answer.startswith("ok"):
            msg = f"tid {tid}: cannot unmerge {start:#x}-{end:#x} yet: {answer[6:]}"
            if msg != self._last_refusal:  # retried every 50 ms: say it once
                log(msg)
                self._last_refusal = msg
            return False
        self._last_refusal = ""
        self.unmerged_pages += int(answer.split()[1])
        return True
