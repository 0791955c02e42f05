"""What every part of the harness uses: paths, units, the JSON type, interrupts."""

from __future__ import annotations

import signal
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from types import FrameType
from typing import Any

from procksm import PAGE_SIZE

ROOT = Path(__file__).resolve().parent.parent.parent
RESULTS = ROOT / "benchmarks" / "results"
PROCKSM = ROOT / ".venv" / "bin" / "procksm"
MIB_PAGES = (1 << 20) // PAGE_SIZE
GIB_PAGES = 1024 * MIB_PAGES
Json = dict[str, Any]


def thin(samples: list[list[float]], keep: int = 120) -> list[list[float]]:
    """At most ``keep`` evenly spread samples (and always the last) for the JSON file."""
    if len(samples) <= keep:
        return samples
    step = len(samples) / keep
    picked = [samples[int(i * step)] for i in range(keep)]
    return [*picked, samples[-1]] if picked[-1] is not samples[-1] else picked


def swap_pairs(variants: Sequence[str]) -> list[str]:
    """procksm, ksmd, procksm_busy, ksmd_defaults -> ksmd, procksm, ksmd_defaults, procksm_busy."""
    out = list(variants)
    for i in range(0, len(out) - 1, 2):
        out[i], out[i + 1] = out[i + 1], out[i]
    return out


@contextmanager
def interrupts_raise() -> Iterator[None]:
    """SIGTERM/SIGHUP raise SystemExit (SIGINT raises KeyboardInterrupt) so finally runs."""

    def handler(signum: int, frame: FrameType | None) -> None:
        raise SystemExit(128 + signum)

    old = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)
