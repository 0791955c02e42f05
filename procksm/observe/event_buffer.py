"""What the BPF program reports, read from its ring buffer and decoded into
:mod:`~procksm.observe.events` records, in the kernel's order."""

from __future__ import annotations

from collections.abc import Iterator

from procksm.observe.events import Event, parse_event
from procksm.observe.ring_buffer import RingBuffer


class EventBuffer:
    """The program's ``events`` ring; records are decoded one by one as the caller
    applies them."""

    def __init__(self, ring: RingBuffer) -> None:
        self._ring = ring

    def wait(self, timeout_ms: int) -> Iterator[Event]:
        """What arrives within ``timeout_ms`` (at once if something is there already,
        also records whose producer asked for no wakeup: cow.bpf.c, emit)."""
        return map(parse_event, self._ring.wait(timeout_ms))

    def drain(self) -> Iterator[Event]:
        """What the kernel already sent, without waiting."""
        return map(parse_event, self._ring.drain())
