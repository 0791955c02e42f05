"""Scan throughput vs the raw process_vm_readv + hash rate of the same memory, same run.

    .venv/bin/python benchmarks/scan_throughput.py [--targets 4] [--mib 256] [--reps 3]

Starts N planted targets (identical + zero + unique pages), then alternates, per
repetition: (a) the raw rate — read every present page of the planted regions with
PageReader (4 MiB chunks) and xxh3 them, nothing else; (b) the full analysis
(collect + analyse, as `procksm scan`; and with --exact's byte verification) on the same
ranges. Prints medians and the ratio (goal:
>= 50 %), and procksm's own memory per scanned page from tracemalloc's peak during the
analysis (numpy reports its buffers to tracemalloc; goal: <= 32 bytes/page).
Writes benchmarks/results/scan_throughput.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
import tracemalloc
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this checkout's procksm

from benchmarks.harness.common import RESULTS, Json
from benchmarks.harness.targets import Target, build_planted, fresh_targets, spawn_planted
from benchmarks.harness.truth import REGIONS
from procksm import PAGE_SIZE
from procksm.analysis import analyse
from procksm.hashing import hash_pages
from procksm.procfs import PagemapFile
from procksm.reader import PageReader
from procksm.scanner import AddressRange, ScanOptions, collect

GOAL_RATIO = 0.5
GOAL_BYTES_PER_PAGE = 32

Ranges = dict[int, list[tuple[int, int]]]  # pid -> [(start, end)] of its planted regions


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--targets", type=int, default=4)
    ap.add_argument("--mib", type=int, default=256, help="identical MiB per target")
    ap.add_argument("--reps", type=int, default=3)
    return ap.parse_args()


def start(a: argparse.Namespace) -> list[Target]:
    """--targets planted processes: --mib identical, a quarter as much zero and unique."""
    ident = a.mib * 256
    cmd = [str(build_planted()), "--identical", str(ident)]
    cmd += ["--zero", str(ident // 4), "--unique", str(ident // 4)]
    return spawn_planted([cmd] * a.targets)


def raw_read_hash(ranges: Ranges) -> float:
    """Seconds to read every present page (PageReader, 4 MiB chunks) and xxh3 it."""
    t0 = time.perf_counter()
    for pid, rs in ranges.items():
        reader = PageReader(pid)
        with PagemapFile(pid) as pm:
            for s, e in rs:
                for _addr, view in reader.iter_present(pm, s, e):
                    hash_pages(view)
    return time.perf_counter() - t0


def scan(pids: list[int], o: ScanOptions) -> tuple[float, int]:
    """Seconds of the full analysis (collect + analyse), and the pages it scanned."""
    t0 = time.perf_counter()
    rep = analyse(collect(pids, o))
    return time.perf_counter() - t0, rep.totals.pages_scanned


def scan_memory(pids: list[int], o: ScanOptions) -> int:
    """Peak bytes traced during the analysis; a separate run: tracemalloc slows
    allocations down, so it is not timed."""
    tracemalloc.start()
    analyse(collect(pids, o))
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return peak


@dataclass(frozen=True)
class Throughput:
    """What one run measured (medians over the repetitions)."""

    targets: int
    reps: int
    mib: float
    pages: int
    raw_rate: float  # MiB/s
    scan_rate: float
    exact_rate: float
    per_page: float  # peak bytes per scanned page
    per_page_exact: float

    def as_json(self) -> Json:
        return {
            "machine": f"{platform.node()} {platform.machine()} {platform.release()}, "
            f"{os.cpu_count()} CPUs",
            "targets": self.targets,
            "mib_scanned": round(self.mib, 1),
            "pages_scanned": self.pages,
            "raw_read_hash_mib_s": round(self.raw_rate, 1),
            "scan_mib_s": round(self.scan_rate, 1),
            "ratio": round(self.scan_rate / self.raw_rate, 3),
            "scan_exact_mib_s": round(self.exact_rate, 1),
            "ratio_exact": round(self.exact_rate / self.raw_rate, 3),
            "goal_ratio": GOAL_RATIO,
            "peak_bytes_per_page": round(self.per_page, 1),
            "peak_bytes_per_page_exact": round(self.per_page_exact, 1),
            "goal_bytes_per_page": GOAL_BYTES_PER_PAGE,
            "reps": self.reps,
        }


def measure(ranges: Ranges, a: argparse.Namespace) -> Throughput:
    """The raw rate and both scans, alternating per repetition; then their memory."""
    # `procksm scan` groups by hash (verify=False); `procksm scan --exact` verifies
    opts = ScanOptions(ranges=[AddressRange(s, e) for rs in ranges.values() for s, e in rs])
    opts.verify = False
    exact_opts = ScanOptions(ranges=opts.ranges, verify=True)
    pids = list(ranges)
    raws, scans, exacts = [], [], []
    pages = 0
    for _ in range(a.reps):
        raws.append(raw_read_hash(ranges))
        dt, pages = scan(pids, opts)
        scans.append(dt)
        exacts.append(scan(pids, exact_opts)[0])
    per_page = scan_memory(pids, opts) / pages
    per_page_exact = scan_memory(pids, exact_opts) / pages
    mib = sum(e - s for rs in ranges.values() for s, e in rs) / (1 << 20)
    return Throughput(
        a.targets,
        a.reps,
        mib,
        pages,
        raw_rate=mib / statistics.median(raws),
        scan_rate=mib / statistics.median(scans),
        exact_rate=mib / statistics.median(exacts),
        per_page=per_page,
        per_page_exact=per_page_exact,
    )


def print_result(t: Throughput, result: Json) -> None:
    print(f"memory scanned        {t.mib:,.0f} MiB in {t.targets} targets ({t.pages:,} pages)")
    print(f"raw read + xxh3       {t.raw_rate:,.0f} MiB/s (median of {t.reps})")
    print(f"procksm scan          {t.scan_rate:,.0f} MiB/s (the default: grouped by 64-bit hash)")
    print(f"procksm scan --exact  {t.exact_rate:,.0f} MiB/s (duplicates compared bytewise)")
    for key, label in (("ratio", "scan/raw"), ("ratio_exact", "scan --exact/raw")):
        ok = "met" if result[key] >= GOAL_RATIO else "MISSED"
        print(f"ratio {label:17s} {result[key]:.2f}  (goal >= 0.50: {ok})")
    for value, label in ((t.per_page, "scan"), (t.per_page_exact, "scan --exact")):
        ok = "met" if value <= GOAL_BYTES_PER_PAGE else "MISSED"
        print(f"peak memory, {label:12s} {value:.1f} bytes/page (goal <= 32: {ok})")


def main() -> int:
    a = parse_args()
    with fresh_targets(lambda: start(a)) as targets:
        ranges: Ranges = {
            t.pid: [
                (t.regions[r][0], t.regions[r][0] + t.regions[r][1] * PAGE_SIZE) for r in REGIONS
            ]
            for t in targets
        }
        throughput = measure(ranges, a)
    result = throughput.as_json()
    print_result(throughput, result)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "scan_throughput.json").write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
