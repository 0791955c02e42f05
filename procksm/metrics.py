"""Prometheus metrics of the daemon, read from its current Snapshot at scrape time.

Names follow the Prometheus conventions (and node_exporter's ksmd collector,
``node_ksmd_*``): the ``procksm_`` prefix, base units (bytes, seconds, ratios), ``_total``
for counters. Nothing is labelled by pid by default: pids are high-cardinality and churn
(every restarted worker is a new series); ``per_target=True`` (``--metrics-per-target``)
adds ``procksm_target_*`` series labelled ``pid`` and ``name`` for small fleets.

Served with ``prometheus_client``'s HTTP server (``--metrics-port``) or written
atomically for node_exporter's textfile collector (``--metrics-textfile``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import start_http_server, write_to_textfile
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector, CollectorRegistry

from procksm import PAGE_SIZE
from procksm.snapshot import Snapshot

SnapshotFn = Callable[[], Snapshot]
Family = GaugeMetricFamily | CounterMetricFamily

# The unlabelled metrics, in exposition order: (family, name after ``procksm_``, help,
# value read from the snapshot).
SCALAR_METRICS: tuple[tuple[type[Family], str, str, Callable[[Snapshot], float]], ...] = (
    (GaugeMetricFamily, "run", "KSM run state: 0 stopped, 1 running, 2 unmerging",
     lambda s: s.run),
    (GaugeMetricFamily, "targets", "Processes being scanned", lambda s: len(s.targets)),
    (GaugeMetricFamily, "pages_shared", "Distinct shared pages (memfd slots) in use",
     lambda s: s.pages_shared),
    (GaugeMetricFamily, "pages_sharing", "Extra mappings of shared pages (pages saved)",
     lambda s: s.pages_sharing),
    (GaugeMetricFamily, "pages_unshared", "Pages in the unstable tree (unique so far)",
     lambda s: s.pages_unshared),
    (GaugeMetricFamily, "pages_volatile", "Pages changing too fast to merge",
     lambda s: s.pages_volatile),
    (GaugeMetricFamily, "pages_zero", "Zero pages given back and still unused",
     lambda s: s.pages_zero),
    (CounterMetricFamily, "pages_skipped", "Page scans skipped by smart scan",
     lambda s: s.pages_skipped),
    (CounterMetricFamily, "full_scans", "Full scans of all registered memory",
     lambda s: s.full_scans),
    (CounterMetricFamily, "cow_breaks", "Merged pages made private again by a write",
     lambda s: s.cow_breaks),
    (CounterMetricFamily, "pages_remerged", "Copied pages of merged ranges merged again",
     lambda s: s.pages_remerged),
    (GaugeMetricFamily, "ranges_held",
     "64 KiB ranges held back for breaking soon after merging", lambda s: s.ranges_held),
    (GaugeMetricFamily, "general_profit_bytes",
     "Bytes saved minus procksm's own private memory (daemon and guards)",
     lambda s: s.general_profit_bytes),
    (GaugeMetricFamily, "saved_bytes", "Bytes saved (sharing and zero pages)",
     lambda s: s.saved_bytes),
    (GaugeMetricFamily, "scan_rate_pages_per_second", "Pages scanned per second",
     lambda s: s.scan_rate_pages_s),
    (GaugeMetricFamily, "cpu_usage_ratio", "procksm's CPU use, fraction of one CPU",
     lambda s: s.cpu_percent / 100),
    (GaugeMetricFamily, "target_cpu_usage_ratio",
     "CPU procksm's calls take in the targets' threads, fraction of one CPU",
     lambda s: s.target_cpu_percent / 100),
    (GaugeMetricFamily, "resident_memory_bytes", "procksm's own resident memory",
     lambda s: s.rss_bytes),
    (GaugeMetricFamily, "pages_to_scan", "Pages per scan batch (cpu_limit adapts it)",
     lambda s: s.pages_to_scan),
    (GaugeMetricFamily, "sleep_seconds", "Sleep between batches", lambda s: s.sleep_ms / 1000),
)  # fmt: skip


class SnapshotCollector(Collector):
    def __init__(self, source: SnapshotFn, *, per_target: bool = False) -> None:
        self.source = source
        self.per_target = per_target

    def collect(self) -> Iterator[Family]:
        s = self.source()
        for family, name, doc, value in SCALAR_METRICS:
            yield family(f"procksm_{name}", doc, value=value(s))
        yield _pause_quantiles(s)
        yield GaugeMetricFamily(
            "procksm_targets_rss_bytes", "Resident memory of all targets", value=s.targets_rss_bytes
        )
        if self.per_target:
            yield from _per_target(s)


def _pause_quantiles(s: Snapshot) -> GaugeMetricFamily:
    pause = GaugeMetricFamily(
        "procksm_target_pause_seconds",
        "How long targets were stopped per stop window (recent windows)",
        labels=["quantile"],
    )
    pause.add_metric(["0.5"], s.pause_p50_ms / 1000)
    pause.add_metric(["0.99"], s.pause_p99_ms / 1000)
    pause.add_metric(["1"], s.pause_max_ms / 1000)
    return pause


def _per_target(s: Snapshot) -> Iterator[Family]:
    """``procksm_target_*`` labelled by pid and name (``--metrics-per-target``)."""
    merged = GaugeMetricFamily(
        "procksm_target_merged_bytes", "Memory of a target mapping shared pages",
        labels=["pid", "name"],
    )  # fmt: skip
    cow = CounterMetricFamily(
        "procksm_target_cow_breaks", "Merged pages of a target written since",
        labels=["pid", "name"],
    )  # fmt: skip
    for t in s.targets:
        merged.add_metric([str(t.pid), t.name], t.pages_merged * PAGE_SIZE)
        cow.add_metric([str(t.pid), t.name], t.cow_breaks)
    yield merged
    yield cow


def registry_for(source: SnapshotFn, *, per_target: bool = False) -> CollectorRegistry:
    reg = CollectorRegistry(auto_describe=False)
    reg.register(SnapshotCollector(source, per_target=per_target))
    return reg


def serve(registry: CollectorRegistry, port: int, addr: str = "0.0.0.0") -> Callable[[], None]:
    """Start prometheus_client's HTTP server (a daemon thread) on ``addr:port``; returns
    the function that stops it."""
    server, thread = start_http_server(port, addr=addr, registry=registry)

    def stop() -> None:
        server.shutdown()
        thread.join(timeout=2)

    return stop


def write_textfile(registry: CollectorRegistry, path: str) -> None:
    """node_exporter textfile collector format, written atomically (temp file + rename)."""
    write_to_textfile(path, registry)


__all__ = ["SnapshotCollector", "registry_for", "serve", "write_textfile"]
