"""The daemon's knobs: those of /sys/kernel/mm/ksm (and the 2008 API's
max_pages_to_merge), changed at run time with ``procksm ctl set``, and its options."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from procksm.errors import UsageError
from procksm.merge import MergeOptions

# name -> (lowest, highest) accepted value
SETTING_LIMITS: dict[str, tuple[float, float]] = {
    "pages_to_scan": (1, 1 << 24),
    "sleep_ms": (0, 3_600_000),
    "max_pages_to_merge": (1, 1 << 24),
    "run": (0, 2),
    "cpu_limit": (0, 100),
    "stable_scans": (0, 1),
}


@dataclass(slots=True)
class Settings:
    # 16 Ki pages (64 MiB) per batch: a batch then costs ~15-40 ms of CPU, reading
    # process_vm_readv-sized chunks; the kernel's 100 pages per 20 ms needs minutes for a
    # GiB (docs/design.md §4), which is why ksmd's defaults converge so slowly.
    pages_to_scan: int = 16384
    sleep_ms: int = 20
    max_pages_to_merge: int = 16384
    run: int = 1
    # % of one CPU; 0: no cap. The default keeps procksm "modest": a quarter of a core
    # while it has work, ~0 once converged (smart scan, cheap re-reads).
    cpu_limit: float = 25.0
    # Full scans a page seen for the first time waits before it may merge. 1 is the
    # kernel's checksum rule (two looks with the same checksum). 0, the default: at once;
    # its second look is the merge itself (the slot must still hash as the page did, and
    # the page must equal the slot byte for byte under stop, as `procksm merge` does).
    # A page whose checksum changed since its previous scan waits either way, and ranges
    # that break soon after merging are held back (procksm.backoff). Measured on the
    # standard workload at full speed: one full scan to converge instead of two.
    stable_scans: int = 0

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def parse_settings(assignments: Sequence[str]) -> dict[str, float]:
    """``["pages_to_scan=100", "run=1"]`` -> validated values; UsageError on anything
    else (nothing is applied unless everything is valid)."""
    if not assignments:
        raise UsageError("set: nothing to set; use NAME=VALUE (" + ", ".join(SETTING_LIMITS) + ")")
    out: dict[str, float] = {}
    for a in assignments:
        name, sep, text = a.partition("=")
        if not sep:
            raise UsageError(f"set: {a!r} is not NAME=VALUE")
        if name not in SETTING_LIMITS:
            raise UsageError(f"set: unknown setting {name!r} (known: {', '.join(SETTING_LIMITS)})")
        lo, hi = SETTING_LIMITS[name]
        try:
            value = float(text) if name == "cpu_limit" else int(text, 10)
        except ValueError:
            raise UsageError(f"set: {name}={text!r} is not a number") from None
        if not lo <= value <= hi or value != value:  # NaN
            raise UsageError(f"set: {name}={text} is outside {lo:g}..{hi:g}")
        out[name] = value
    return out


@dataclass(slots=True)
class DaemonOptions:
    follow_children: bool = False
    unmerge_on_exit: bool = False
    merge: MergeOptions = field(default_factory=MergeOptions)
    # Pages per stop window at most: twice the one-shot merge's 256, so a window's fixed
    # cost (stop, resume, fd hand-over) is paid half as often where the pause budget
    # (merge.pause_budget_ms) allows it. Measured on the standard workload (4 x 384 MiB,
    # 2 CPUs shared with other jobs): 1024 pages p99 8.4 ms, 512 pages p99 5.4 ms and
    # 6 % more CPU.
    stop_pages: int = 512
    # Copy-on-write breaks and lifecycle events (procksm.observe): None = eBPF when it
    # works, else pagemap polling; False = pagemap polling (--no-bpf).
    use_bpf: bool | None = None
    # Volatility learned from observation (procksm.backoff): a range that a write broke
    # less than remerge_soon_s after its merge is held back for 2**level full scans.
    remerge_backoff: bool = True
    remerge_soon_s: float = 30.0
    snapshot_interval_s: float = 1.0
    history: int = 120
