"""Undo procksm's merging: merged pages become private anonymous memory again.

Every range procksm mapped (it shows as /memfd:procksm-seg-N in /proc/PID/maps) is
replaced, with the target stopped, by anonymous memory holding exactly the bytes the
process sees now, including pages it already copied on write. Works from any procksm,
also after the one that merged was killed. --all does it for every process that has
procksm mappings (the kernel KSM's run=2); processes another procksm holds (a running
`procksm attach`) are skipped and listed, and the exit code is then 5.

examples:
  procksm unmerge 1234 1235
  procksm unmerge --all --json
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from rich.console import Console

from procksm import procfs
from procksm.attach.diagnose import check_attachable
from procksm.commands.pids import parse_pids
from procksm.commands.stops import add_pause_budget_arg, pause_budget_from_args
from procksm.errors import EXIT_BUSY, NoSuchProcess, TargetBusy, UsageError
from procksm.merge import pause_stats
from procksm.slots import SEGMENT_NAME_PREFIX
from procksm.unmerge import unmerge


def processes_with_merged_ranges() -> list[int]:
    """Every process whose maps show a procksm segment (unreadable ones are skipped)."""
    return procfs.pids_mapping(SEGMENT_NAME_PREFIX)


class UnmergeCommand:
    __doc__ = __doc__

    def prepare_parser(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("pids", nargs="*", metavar="PID", help="process IDs to unmerge")
        parser.add_argument(
            "--all", action="store_true", help="every process with procksm-merged memory"
        )
        parser.add_argument("--json", action="store_true", help="print one JSON object")
        add_pause_budget_arg(parser)

    def run(self, args: argparse.Namespace) -> int:
        budget = pause_budget_from_args(args)
        if args.all and args.pids:
            raise UsageError("give PIDs or --all, not both")
        if args.all:
            pids = processes_with_merged_ranges()
        elif args.pids:
            pids = parse_pids(args.pids)
        else:
            raise UsageError("no PID given: pass process IDs, or --all")
        # Every target is diagnosed before any is touched: bad input changes nothing.
        # With --all, processes that went away or that another procksm (a daemon, say)
        # holds are skipped and reported instead: the rest is still undone.
        skipped: list[dict[str, Any]] = []
        results = []
        if not args.all:
            for pid in pids:
                check_attachable(pid)
        for pid in pids:
            try:
                results.append(unmerge(pid, pause_budget_ms=budget))
            except (NoSuchProcess, TargetBusy) as e:
                if not args.all:
                    raise
                skipped.append({"pid": pid, "reason": e.message})
                print(f"procksm: skipped pid {pid}: {e.message}", file=sys.stderr)
        pauses = [p for r in results for p in r.pauses]
        doc: dict[str, Any] = {
            "totals": {
                "pages_unmerged": sum(r.pages_unmerged for r in results),
                "ranges": sum(r.ranges for r in results),
                "leftovers_removed": sum(r.leftovers_removed for r in results),
                "leftovers_in_use": sum(r.leftovers_in_use for r in results),
            },
            "processes": [
                {
                    "pid": r.pid,
                    "name": r.name,
                    "pages_unmerged": r.pages_unmerged,
                    "ranges": r.ranges,
                    "leftovers_removed": r.leftovers_removed,
                    "leftovers_in_use": r.leftovers_in_use,
                }
                for r in results
            ],
            "pauses": pause_stats(pauses),
            "skipped": skipped,
        }
        if args.json:
            json.dump(doc, sys.stdout, indent=2)
            sys.stdout.write("\n")
        else:
            Console().print(
                f"unmerged {doc['totals']['pages_unmerged']:,} pages in "
                f"{doc['totals']['ranges']} ranges of {len(results)} processes"
            )
            if doc["totals"]["leftovers_removed"]:
                Console().print(
                    f"removed {doc['totals']['leftovers_removed']} fds/mappings that a "
                    "killed procksm had left in its targets"
                )
            for r in results:
                if r.leftovers_in_use:
                    Console().print(
                        f"pid {r.pid}: a thread stays in a killed procksm's call routine "
                        "(stopped, or traced by another tool?): its scratch area is left "
                        "in place; run `procksm unmerge` again once the thread runs"
                    )
        return EXIT_BUSY if skipped else 0
