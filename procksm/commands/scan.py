"""Read-only analysis: how much of these processes' memory is duplicated and where.

What merging would save, per process and per mapping.
Never writes to a target and never stops it. For each process and each mapping: present
pages, zero pages, pages duplicated within the process and across processes, pages already
sharing a frame (e.g. after fork), pages excluded from merging and why, and the ideal
saving = distinct frames - distinct non-zero contents.

examples:
  procksm scan 1234 1235 1236          # three workers
  procksm scan --json $(pgrep -d' ' gunicorn)
  procksm scan 1234 --mapping '[heap]' --range 0x7f0000000000+64M
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import sys
import time

from rich.console import Console

from procksm.analysis import ScanReport, analyse
from procksm.commands.pids import parse_pids
from procksm.report import scan_json, scan_view
from procksm.scanner import AddressRange, ScanOptions, collect, read_preview


def add_selection_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--range",
        dest="ranges",
        action="append",
        default=[],
        metavar="START-END|START+LEN",
        help="only scan this address range (repeatable)",
    )
    parser.add_argument(
        "--mapping",
        dest="mappings",
        action="append",
        default=[],
        metavar="NAME",
        help="only scan mappings whose name matches this glob, e.g. '[heap]', '[anon]' "
        "(repeatable)",
    )


def selection_from_args(args: argparse.Namespace) -> ScanOptions:
    return ScanOptions(
        ranges=[AddressRange.parse(r) for r in args.ranges],
        mappings=list(args.mappings),
    )


class ScanCommand:
    __doc__ = __doc__

    def prepare_parser(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("pids", nargs="+", metavar="PID", help="process IDs to scan")
        parser.add_argument("--json", action="store_true", help="print one JSON object")
        parser.add_argument("--top", type=int, default=10, help="top duplicated contents (10)")
        parser.add_argument("--no-mappings", action="store_true", help="hide the per-mapping rows")
        parser.add_argument(
            "--exact",
            action="store_true",
            help="read every duplicate candidate again and compare it byte for byte with "
            "its group's first page, and count pages that changed during the scan as "
            "volatile (about 2x slower). By default pages are grouped by their 64-bit "
            "hash: a false duplicate needs a hash collision, ~N^2/2^65 for N pages (a "
            "report only; merges always compare bytes under stop)",
        )
        add_selection_args(parser)

    def run(self, args: argparse.Namespace) -> int:
        pids = parse_pids(args.pids)
        opts = selection_from_args(args)
        opts.verify = args.exact
        report, elapsed = run_scan(pids, opts, top=args.top, progress=not args.json)
        if args.json:
            json.dump(scan_json(report, elapsed_s=elapsed), sys.stdout, indent=2)
            sys.stdout.write("\n")
        else:
            con = Console()
            con.print(scan_view(report, show_mappings=not args.no_mappings, width=con.width))
            print(f"scanned in {elapsed:.2f} s", file=sys.stderr)
        return 0


def check_readable(pid: int) -> None:
    """The attach diagnostics, except "already traced": a read-only scan needs ptrace
    access (process_vm_readv), not an attach, so another tracer does not prevent it."""
    from procksm.attach.diagnose import check_attachable
    from procksm.errors import TargetBusy

    with contextlib.suppress(TargetBusy):
        check_attachable(pid)


def run_scan(
    pids: list[int], opts: ScanOptions, *, top: int = 10, progress: bool = True
) -> tuple[ScanReport, float]:
    """Collect, verify and analyse; a progress bar on stderr when it is a terminal."""
    for pid in pids:
        check_readable(pid)
    t0 = time.perf_counter()
    err = Console(stderr=True)
    if progress and err.is_terminal:
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
        )

        with Progress(
            TextColumn("scanning"),
            BarColumn(),
            # the total is None until the first callback: "{task.total:,}" would raise
            MofNCompleteColumn(),
            TextColumn("pages"),
            TimeElapsedColumn(),
            console=err,
            transient=True,
        ) as bar:
            task = bar.add_task("scan", total=None)

            def cb(done: int, total: int) -> None:
                bar.update(task, completed=done, total=total)

            scan = collect(pids, opts, progress=cb)
    else:
        scan = collect(pids, opts)
    report = analyse(scan, top_n=top)
    # previews of the top contents (a few pages; a process may have gone: skip it)
    tops = []
    for c in report.top:
        pid, addr = scan.address_of(c.row)
        try:
            preview = read_preview(pid, addr)
        except Exception:
            preview = b""
        tops.append(dataclasses.replace(c, preview=preview))
    report = dataclasses.replace(report, top=tops)
    return report, time.perf_counter() - t0
