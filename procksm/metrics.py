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


class SnapshotCollector(Collector):
    def __init__(self, source: SnapshotFn, *, per_target: bool = False) -> None:
        self.source = source
        self.per_target = per_target

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        s = self.source()

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            return GaugeMetricFamily(f"procksm_{name}", doc, value=value)

        def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
            return CounterMetricFamily(f"procksm_{name}", doc, value=value)

        yield gauge("run", "KSM run state: 0 stopped, 1 running, 2 unmerging", s.run)
        yield gauge("targets", "Processes being scanned", len(s.targets))
        yield gauge("pages_shared", "Distinct shared pages (memfd slots) in use", s.pages_shared)
        yield gauge(
            "pages_sharing", "Extra mappings of shared pages (pages saved)", s.pages_sharing
        )
        yield gauge(
            "pages_unshared", "Pages in the unstable tree (unique so far)", s.pages_unshared
        )
        yield gauge("pages_volatile", "Pages changing too fast to merge", s.pages_volatile)
        yield gauge("pages_zero", "Zero pages given back and still unused", s.pages_zero)
        yield counter("pages_skipped", "Page scans skipped by smart scan", s.pages_skipped)
        yield counter("full_scans", "Full scans of all registered memory", s.full_scans)
        yield counter("cow_breaks", "Merged pages made private again by a write", s.cow_breaks)
        yield counter(
            "pages_remerged", "Copied pages of merged ranges merged again", s.pages_remerged
        )
        yield gauge(
            "ranges_held", "64 KiB ranges held back for breaking soon after merging", s.ranges_held
        )
        yield gauge(
            "general_profit_bytes",
            "Bytes saved minus procksm's own metadata",
            s.general_profit_bytes,
        )
        yield gauge("saved_bytes", "Bytes saved (sharing and zero pages)", s.saved_bytes)
        yield gauge("scan_rate_pages_per_second", "Pages scanned per second", s.scan_rate_pages_s)
        yield gauge(
            "cpu_usage_ratio", "procksm's CPU use, fraction of one CPU", s.cpu_percent / 100
        )
        yield gauge("resident_memory_bytes", "procksm's own resident memory", s.rss_bytes)
        yield gauge("pages_to_scan", "Pages per scan batch (cpu_limit adapts it)", s.pages_to_scan)
        yield gauge("sleep_seconds", "Sleep between batches", s.sleep_ms / 1000)
        pause = GaugeMetricFamily(
            "procksm_target_pause_seconds",
            "How long targets were stopped per stop window (recent windows)",
            labels=["quantile"],
        )
        pause.add_metric(["0.5"], s.pause_p50_ms / 1000)
        pause.add_metric(["0.99"], s.pause_p99_ms / 1000)
        pause.add_metric(["1"], s.pause_max_ms / 1000)
        yield pause
        yield gauge("targets_rss_bytes", "Resident memory of all targets", s.targets_rss_bytes)
        if self.per_target:
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
