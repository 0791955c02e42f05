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
import platform
import statistics
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from procksm import PAGE_SIZE  # noqa: E402
from procksm.analysis import analyse  # noqa: E402
from procksm.hashing import hash_pages  # noqa: E402
from procksm.procfs import PagemapFile  # noqa: E402
from procksm.reader import PageReader  # noqa: E402
from procksm.scanner import AddressRange, ScanOptions, collect  # noqa: E402


def build_planted() -> Path:
    out = ROOT / "build" / "targets" / "planted"
    out.parent.mkdir(parents=True, exist_ok=True)
    src = ROOT / "tests" / "targets" / "planted.c"
    if not out.exists() or out.stat().st_mtime < src.stat().st_mtime:
        subprocess.run(["gcc", "-O2", "-pthread", "-o", str(out), str(src)], check=True)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--targets", type=int, default=4)
    ap.add_argument("--mib", type=int, default=256, help="identical MiB per target")
    ap.add_argument("--reps", type=int, default=3)
    a = ap.parse_args()
    exe = build_planted()
    ident = a.mib * 256
    zero, unique = ident // 4, ident // 4
    procs = []
    try:
        for _ in range(a.targets):
            procs.append(
                subprocess.Popen(
                    [
                        str(exe),
                        "--identical",
                        str(ident),
                        "--zero",
                        str(zero),
                        "--unique",
                        str(unique),
                    ],
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    text=True,
                )
            )
        infos = []
        for p in procs:
            assert p.stdout is not None
            line = p.stdout.readline()
            infos.append(dict(kv.split("=") for kv in line.split()[1:]))
        ranges: dict[int, list[tuple[int, int]]] = {}
        for p, info in zip(procs, infos, strict=True):
            ranges[p.pid] = [
                (int(info[r], 16), int(info[r], 16) + int(info[r + "_pages"]) * PAGE_SIZE)
                for r in ("identical", "zero", "unique")
            ]
        total_bytes = sum(e - s for rs in ranges.values() for s, e in rs)

        def raw() -> float:
            t0 = time.perf_counter()
            for pid, rs in ranges.items():
                reader = PageReader(pid)
                with PagemapFile(pid) as pm:
                    for s, e in rs:
                        for _addr, view in reader.iter_present(pm, s, e):
                            hash_pages(view)
            return time.perf_counter() - t0

        # `procksm scan` groups by hash (verify=False); `procksm scan --exact` verifies
        opts = ScanOptions(ranges=[AddressRange(s, e) for rs in ranges.values() for s, e in rs])
        opts.verify = False
        exact_opts = ScanOptions(ranges=opts.ranges, verify=True)
        pids = list(ranges)

        def scan(o: ScanOptions = opts) -> tuple[float, int]:
            t0 = time.perf_counter()
            rep = analyse(collect(pids, o))
            return time.perf_counter() - t0, rep.totals.pages_scanned

        def scan_memory(o: ScanOptions) -> int:
            # a separate run: tracemalloc slows allocations down, so it is not timed
            tracemalloc.start()
            analyse(collect(pids, o))
            _, peak = tracemalloc.get_traced_memory()
            tracemalloc.stop()
            return peak

        raws, scans, exacts = [], [], []
        pages = 0
        for _ in range(a.reps):
            raws.append(raw())
            dt, pages = scan()
            scans.append(dt)
            exacts.append(scan(exact_opts)[0])
        per_page = scan_memory(opts) / pages
        per_page_exact = scan_memory(exact_opts) / pages
        mib = total_bytes / (1 << 20)
        raw_rate = mib / statistics.median(raws)
        scan_rate = mib / statistics.median(scans)
        exact_rate = mib / statistics.median(exacts)
        result = {
            "machine": f"{platform.node()} {platform.machine()} {platform.release()}, "
            f"{__import__('os').cpu_count()} CPUs",
            "targets": a.targets,
            "mib_scanned": round(mib, 1),
            "pages_scanned": pages,
            "raw_read_hash_mib_s": round(raw_rate, 1),
            "scan_mib_s": round(scan_rate, 1),
            "ratio": round(scan_rate / raw_rate, 3),
            "scan_exact_mib_s": round(exact_rate, 1),
            "ratio_exact": round(exact_rate / raw_rate, 3),
            "goal_ratio": 0.5,
            "peak_bytes_per_page": round(per_page, 1),
            "peak_bytes_per_page_exact": round(per_page_exact, 1),
            "goal_bytes_per_page": 32,
            "reps": a.reps,
        }
        print(f"memory scanned        {mib:,.0f} MiB in {a.targets} targets ({pages:,} pages)")
        print(f"raw read + xxh3       {raw_rate:,.0f} MiB/s (median of {a.reps})")
        print(f"procksm scan          {scan_rate:,.0f} MiB/s (the default: grouped by 64-bit hash)")
        print(f"procksm scan --exact  {exact_rate:,.0f} MiB/s (duplicates compared bytewise)")
        for key, label in (("ratio", "scan/raw"), ("ratio_exact", "scan --exact/raw")):
            ok = "met" if result[key] >= 0.5 else "MISSED"
            print(f"ratio {label:17s} {result[key]:.2f}  (goal >= 0.50: {ok})")
        for value, label in ((per_page, "scan"), (per_page_exact, "scan --exact")):
            ok = "met" if value <= 32 else "MISSED"
            print(f"peak memory, {label:12s} {value:.1f} bytes/page (goal <= 32: {ok})")
        out = ROOT / "benchmarks" / "results"
        out.mkdir(parents=True, exist_ok=True)
        (out / "scan_throughput.json").write_text(json.dumps(result, indent=2) + "\n")
        return 0
    finally:
        for p in procs:
            p.kill()
            p.wait()


if __name__ == "__main__":
    raise SystemExit(main())
