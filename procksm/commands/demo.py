"""Start sample worker processes, find their duplicated memory, merge it, and clean up.

The workers (python -m procksm.demo_worker) each hold the same "model" data, a
pre-touched zero buffer, their own unique data and a hot, constantly rewritten table -
the mix of a fleet of Python/model-serving workers. The demo scans them, prints the
analysis, merges them, and shows their memory before and after (from the kernel's
smaps_rollup, not procksm's counters) and the workers' own integrity checks. On a
terminal it then keeps them merged with the daemon of 'procksm attach' and shows the live
view until q (--no-live skips it). The workers are stopped on every exit path (and die
with the demo if it is killed).

examples:
  procksm demo
  procksm demo --workers 8 --shared-mib 256 --json
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType
from typing import Any

from rich.console import Console
from rich.table import Table

from procksm import procfs
from procksm.errors import ProcksmError, UsageError
from procksm.merge import MergeOptions, merge
from procksm.report import scan_json, scan_view
from procksm.scanner import ScanOptions
from procksm.text import fmt_bytes


@contextmanager
def demo_workers(
    n: int, shared_mib: int, zero_mib: int, unique_mib: int, volatile_mib: int
) -> Iterator[list[subprocess.Popen[str]]]:
    """Start ``n`` workers; on exit (any path, SIGTERM included) stop them all."""
    procs: list[subprocess.Popen[str]] = []

    def on_term(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    old = signal.signal(signal.SIGTERM, on_term)
    try:
        for _ in range(n):
            procs.append(
                subprocess.Popen(
                    [
                        sys.executable,
                        "-m",
                        "procksm.demo_worker",
                        "--shared-mib",
                        str(shared_mib),
                        "--zero-mib",
                        str(zero_mib),
                        "--unique-mib",
                        str(unique_mib),
                        "--volatile-mib",
                        str(volatile_mib),
                    ],
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    text=True,
                )
            )
        for p in procs:
            assert p.stdout is not None
            line = p.stdout.readline()
            if not line.startswith("READY"):
                raise ProcksmError(f"demo worker {p.pid} failed to start: {line.strip()!r}")
        yield procs
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        for p in procs:
            p.wait()
        signal.signal(signal.SIGTERM, old)


def worker_check(p: subprocess.Popen[str]) -> str:
    assert p.stdin is not None and p.stdout is not None
    p.stdin.write("check\n")
    p.stdin.flush()
    return p.stdout.readline().strip()


def workers_memory(pids: list[int]) -> dict[str, int]:
    """Sum of the workers' smaps_rollup (kB): the kernel's view, not procksm's."""
    keys = ("Rss", "Pss", "Anonymous", "Pss_Shmem")
    total = dict.fromkeys(keys, 0)
    for pid in pids:
        roll = procfs.read_smaps_rollup(pid)
        for k in keys:
            total[k] += roll.get(k, 0)
    return total


def memory_table(before: dict[str, int], after: dict[str, int]) -> Table:
    t = Table(title="Workers' memory (smaps_rollup, all workers)", title_justify="left")
    t.add_column("")
    t.add_column("before", justify="right")
    t.add_column("after", justify="right")
    t.add_column("change", justify="right")
    for k, label in (
        ("Rss", "RSS"),
        ("Pss", "PSS (what they really cost)"),
        ("Anonymous", "private anonymous"),
        ("Pss_Shmem", "shared (procksm memfd)"),
    ):
        b, a = before[k] * 1024, after[k] * 1024
        t.add_row(label, fmt_bytes(b), fmt_bytes(a), fmt_bytes(a - b))
    return t


class DemoCommand:
    __doc__ = __doc__

    def prepare_parser(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--workers", type=int, default=4, help="worker processes (4)")
        parser.add_argument("--shared-mib", type=int, default=64, help="identical data per worker")
        parser.add_argument("--zero-mib", type=int, default=16, help="zero-filled pages per worker")
        parser.add_argument("--unique-mib", type=int, default=16, help="unique data per worker")
        parser.add_argument("--volatile-mib", type=int, default=4, help="hot data per worker")
        parser.add_argument("--json", action="store_true", help="print one JSON object")
        parser.add_argument(
            "--no-merge", action="store_true", help="only scan (read-only), do not merge"
        )
        parser.add_argument(
            "--no-live", action="store_true", help="do not end in the live view on a terminal"
        )

    def run(self, args: argparse.Namespace) -> int:
        from procksm.commands.scan import run_scan

        _check_sizes(args)
        out = Console(stderr=args.json)
        out.print(
            f"[b]procksm demo[/b]: starting {args.workers} workers "
            f"({args.shared_mib} MiB shared, {args.zero_mib} MiB zero, "
            f"{args.unique_mib} MiB unique, {args.volatile_mib} MiB hot each)"
        )
        t0 = time.perf_counter()
        with demo_workers(
            args.workers, args.shared_mib, args.zero_mib, args.unique_mib, args.volatile_mib
        ) as procs:
            pids = [p.pid for p in procs]
            out.print(f"workers ready in {time.perf_counter() - t0:.1f} s: pids {pids}")

            report, elapsed = run_scan(pids, ScanOptions(), progress=not args.json)
            doc = scan_json(report, elapsed_s=elapsed)
            if not args.json:
                out.print(scan_view(report, show_mappings=False, width=out.width))
                out.print(
                    f"scanned {report.totals.pages_scanned:,} pages in {elapsed:.2f} s; "
                    f"merging would save [b green]{fmt_bytes(report.totals.ideal_savings_bytes)}"
                    "[/b green]"
                )
            if not args.no_merge:
                doc.update(_merge_workers(pids, out, quiet=args.json))
            if not (args.json or args.no_merge or args.no_live) and sys.stdout.isatty():
                from procksm.daemon import Daemon, DaemonOptions
                from procksm.tui.inprocess import run_with_daemon

                out.print("[b]live view[/b]: the daemon keeps the workers merged; q quits")
                with Daemon(pids, opts=DaemonOptions(merge=MergeOptions())) as daemon:
                    run_with_daemon(daemon)
            checks = [worker_check(p) for p in procs]
            doc["workers_self_check"] = checks
            if args.json:
                json.dump(doc, sys.stdout, indent=2)
                sys.stdout.write("\n")
            else:
                out.print(f"workers' self-checks: {', '.join(checks)}")
            if any(c != "OK" for c in checks):
                raise ProcksmError("a demo worker reported corrupted memory")
        if os.environ.get("PROCKSM_DEMO_DEBUG"):
            out.print("workers stopped")
        return 0


def _check_sizes(args: argparse.Namespace) -> None:
    if not 1 <= args.workers <= 64:
        raise UsageError(f"--workers {args.workers}: use 1 to 64")
    for k in ("shared_mib", "zero_mib", "unique_mib", "volatile_mib"):
        if not 0 <= getattr(args, k) <= 4096:
            raise UsageError(f"--{k.replace('_', '-')} {getattr(args, k)}: use 0 to 4096")


def _merge_workers(pids: list[int], out: Console, *, quiet: bool) -> dict[str, Any]:
    """Merge the workers; their memory before and after, as /proc shows it."""
    before = workers_memory(pids)
    result = merge(
        pids, MergeOptions(), progress=None if quiet else lambda m: out.print(f"[dim]{m}[/dim]")
    )
    after = workers_memory(pids)
    doc = {"merge": result.as_json(), "memory_kb": {"before": before, "after": after}}
    if not quiet:
        out.print(memory_table(before, after))
        p = doc["merge"]["pauses"]
        out.print(
            f"merged {result.pages_merged:,} pages into {result.slots_mapped:,} "
            f"shared pages, dropped {result.pages_zeroed:,} zero pages in "
            f"{result.elapsed_s:.2f} s; workers paused {p['count']} times, "
            f"p50 {p['p50_ms']} ms, max {p['max_ms']} ms"
        )
    return doc
