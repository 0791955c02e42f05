"""What the BPF program reports, read from its ring buffer (or perf buffer before 5.8)
and decoded into :mod:`~procksm.observe.events` records, in the kernel's order."""

from __future__ import annotations

import ctypes
from collections.abc import Iterator
from typing import Any

from procksm.observe.events import Event, parse_event


class EventBuffer:
    """The program's ``events`` output. bcc calls back with each record while it polls;
    the records are kept raw until :meth:`wait` or :meth:`drain` hands them out."""

    def __init__(self, bpf: Any, perf_buffer: bool) -> None:
        self._bpf = bpf
        self._perf_buffer = perf_buffer
        self._raw: list[bytes] = []
        if perf_buffer:
            bpf[b"events"].open_perf_buffer(self._on_perf_event, page_cnt=64)
        else:
            bpf[b"events"].open_ring_buffer(self._on_ring_event)

    def wait(self, timeout_ms: int) -> Iterator[Event]:
        """What arrives within ``timeout_ms`` (at once if something is there already)."""
        if self._perf_buffer:
            self._bpf.perf_buffer_poll(timeout_ms)
        else:
            self._bpf.ring_buffer_poll(timeout_ms)
            # memory-syscall events do not always wake us (cow.bpf.c, emit): read them
            self._bpf.ring_buffer_consume()
        return self._take()

    def drain(self) -> Iterator[Event]:
        """What the kernel already sent, without waiting."""
        if self._perf_buffer:
            self._bpf.perf_buffer_poll(0)
        else:
            self._bpf.ring_buffer_consume()
        return self._take()

    def _take(self) -> Iterator[Event]:
        raw, self._raw = self._raw, []
        return map(parse_event, raw)  # decoded one by one as the caller applies them

    def _on_ring_event(self, _ctx: Any, data: Any, size: int) -> int:
        self._raw.append(ctypes.string_at(data, size))
        return 0

    def _on_perf_event(self, _cpu: int, data: Any, size: int) -> None:
        self._raw.append(ctypes.string_at(data, size))
