"""Plain text that needs no rich: byte sizes, and the daemon's counters as ``name
value`` lines. The daemon answers its control socket with them, and rich alone is
~2.4 MiB of the daemon's memory: report.py's rich views import from here, not the
other way round."""

from __future__ import annotations

from collections.abc import Mapping

from procksm.snapshot import Snapshot


def fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


# the daemon's counters, the kernel's names first (like /sys/kernel/mm/ksm)
STATS_KEYS = (
    "run",
    "pages_to_scan",
    "sleep_ms",
    "pages_shared",
    "pages_sharing",
    "pages_unshared",
    "pages_volatile",
    "pages_skipped",
    "pages_zero",
    "full_scans",
    "cow_breaks",
    "pages_remerged",
    "ranges_held",
    "zero_pages_dropped",
    "general_profit_bytes",
    "saved_bytes",
    "scan_rate_pages_s",
    "cpu_percent",
    "target_cpu_percent",
    "rss_bytes",
    "pause_p50_ms",
    "pause_p99_ms",
    "pause_max_ms",
)


def longest_stop_text(p: Mapping[str, float | int]) -> str:
    """One line for a stop's parts (procksm.attach.session.StopParts.as_json)."""
    return (
        f"{p['ms']} ms, pid {p['pid']} ({p['threads']} threads): stop {p['stop_ms']}, "
        f"gate {p['gate_ms']}, calls {p['calls_ms']}, resume {p['resume_ms']}, "
        f"procksm {p['other_ms']} ms"
    )


def stats_text(snap: Snapshot) -> str:
    """``name value`` lines (``procksm ctl stats``), then one line per target."""
    doc = snap.as_json()
    lines = [f"{k} {doc[k]}" for k in STATS_KEYS]
    if snap.pause_longest is not None:
        lines.append(f"pause_longest {longest_stop_text(snap.pause_longest)}")
    for t in snap.targets:
        lines.append(
            f"pid {t.pid} {t.name} pages_merged={t.pages_merged} pages_zero={t.pages_zero} "
            f"cow_breaks={t.cow_breaks} pages_refused={t.pages_refused} "
            f"max_pause_ms={t.max_pause_ms}"
        )
    return "\n".join(lines) + "\n"
