"""Merge identical pages of running processes; they stay merged after procksm exits.

Attaches to each PID, scans its eligible private anonymous memory, writes each duplicated
content once into a sealed memfd, and, with the target's threads stopped for at most about
a millisecond at a time, re-checks every page byte for byte and maps the shared page over
it copy-on-write. All-zero pages are dropped (they read back as zeros). Only processes of
one user are merged together unless --cross-uid is given (copy-on-write timing lets one
process infer another's memory).

examples:
  procksm merge 1234 1235 1236
  procksm merge --json $(pgrep -d' ' gunicorn)
  procksm unmerge 1234            # undo
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from rich.console import Console

from procksm.commands.pids import parse_pids
from procksm.commands.scan import add_selection_args, selection_from_args
from procksm.commands.stops import add_pause_budget_arg, pause_budget_from_args
from procksm.errors import UsageError
from procksm.merge import MergeOptions, merge
from procksm.text import fmt_bytes


class MergeCommand:
    __doc__ = __doc__

    def prepare_parser(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("pids", nargs="+", metavar="PID", help="process IDs to merge")
        parser.add_argument("--json", action="store_true", help="print one JSON object")
        parser.add_argument(
            "--two-scans",
            action="store_true",
            help="scan everything twice and merge only pages unchanged between the scans "
            "(KSM's classic rule; by default the second look at a page is its byte "
            "comparison right before it is merged)",
        )
        parser.add_argument(
            "--cross-uid", action="store_true", help="also merge processes of different users"
        )
        parser.add_argument(
            "--allow-async-io",
            action="store_true",
            help="merge processes that use io_uring or AIO (in-flight I/O into a replaced "
            "page would be lost)",
        )
        _add_guard_args(parser)
        parser.add_argument("--no-zero", action="store_true", help="do not drop zero pages")
        parser.add_argument(
            "--batch-pages",
            type=int,
            default=MergeOptions().batch_pages,
            help="pages handled per stop of a target at most (default %(default)d); "
            "within it, stops are sized to --pause-budget-ms",
        )
        add_pause_budget_arg(parser)
        rt = parser.add_mutually_exclusive_group()
        rt.add_argument(
            "--realtime",
            dest="realtime",
            action="store_true",
            default=None,
            help="run procksm SCHED_FIFO while it stops a target: shorter stops on a "
            "machine saturated by busy threads, slower on an idle one (default: only "
            "when there are more runnable threads than CPUs)",
        )
        rt.add_argument(
            "--no-realtime", dest="realtime", action="store_false", help="never SCHED_FIFO"
        )
        add_selection_args(parser)

    def run(self, args: argparse.Namespace) -> int:
        pids = parse_pids(args.pids)
        opts = _options_from_args(args)
        err = Console(stderr=True)
        show = (lambda m: err.print(f"[dim]{m}[/dim]")) if not args.json else None
        result = merge(pids, opts, progress=show)
        doc = result.as_json()
        if args.json:
            json.dump(doc, sys.stdout, indent=2)
            sys.stdout.write("\n")
        else:
            Console().print(_summary(doc))
            for proc in doc["processes"]:
                if proc.get("error"):
                    err.print(f"pid {proc['pid']}: {proc['error']}", highlight=False)
        # A target refused as a whole (before anything was touched in it) says why on the
        # terminal too: "merged 0 pages" and exit 0 hid it (issue 15).
        not_merged = result.refused_processes()
        if not args.json:
            for r in not_merged:
                err.print(
                    f"pid {r.pid}: not merged: {r.reason}",
                    highlight=False,
                    markup=False,
                    soft_wrap=True,
                )
        return 1 if not_merged or any(t.error for t in result.targets) else 0


def _add_guard_args(parser: argparse.ArgumentParser) -> None:
    """The madvise guard and what merging without it allows."""
    parser.add_argument(
        "--no-guard",
        action="store_true",
        help="do not install the madvise guard (a seccomp filter that makes "
        "MADV_DONTNEED/FREE/WIPEONFORK and mremap on merged pages behave as on "
        "anonymous memory; see 'procksm guard --help'); jemalloc processes are then "
        "refused",
    )
    parser.add_argument(
        "--set-no-new-privs",
        action="store_true",
        help="let the guard set no_new_privs in non-root targets (seccomp needs it); "
        "their later execve of setuid programs then gains no privileges",
    )
    parser.add_argument(
        "--allow-dontneed-reuse",
        action="store_true",
        help="with --no-guard: merge processes whose allocator (jemalloc) assumes "
        "memory reads zeros after MADV_DONTNEED; a merged page reads its old content "
        "instead (docs/design.md §3.1)",
    )


def _options_from_args(args: argparse.Namespace) -> MergeOptions:
    if not 1 <= args.batch_pages <= 1 << 20:
        raise UsageError(f"--batch-pages {args.batch_pages}: use 1 to 1048576")
    return MergeOptions(
        selection=selection_from_args(args),
        two_scans=args.two_scans,
        cross_uid=args.cross_uid,
        allow_async_io=args.allow_async_io,
        guard=not args.no_guard,
        set_no_new_privs=args.set_no_new_privs,
        allow_zero_after_dontneed=args.allow_dontneed_reuse,
        zero_pages=not args.no_zero,
        batch_pages=args.batch_pages,
        pause_budget_ms=pause_budget_from_args(args),
        realtime=args.realtime,
    )


def _summary(doc: dict[str, Any]) -> str:
    t = doc["totals"]
    p = doc["pauses"]
    return (
        f"merged [b]{t['pages_merged']:,}[/b] pages into {t['slots']:,} shared pages, "
        f"dropped {t['pages_zeroed']:,} zero pages: saved "
        f"[b green]{fmt_bytes(t['saved_bytes'])}[/b green] "
        f"({t['pages_volatile']:,} changed, {t['pages_refused']:,} refused); "
        f"pauses: {p['count']} stops, p50 {p['p50_ms']} ms, p99 {p['p99_ms']} ms, "
        f"max {p['max_ms']} ms; {doc['elapsed_s']:.2f} s, CPU {doc['cpu_s']:.2f} s "
        f"+ {doc['target_cpu_s']:.2f} s in the targets running procksm's calls"
    )
