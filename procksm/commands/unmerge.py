"""Undo procksm's merging: merged pages become private anonymous memory again.

Every range procksm mapped (it shows as /memfd:procksm-seg-N in /proc/PID/maps) is
replaced, with the target stopped, by anonymous memory holding exactly the bytes the
process sees now, including pages it already copied on write. Works from any procksm,
also after the one that merged was killed.

examples:
  procksm unmerge 1234 1235
  procksm unmerge --json 1234
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from rich.console import Console

from procksm.attach import check_attachable
from procksm.commands.scan import parse_pids
from procksm.merge import pause_stats, unmerge


class UnmergeCommand:
    __doc__ = __doc__

    def prepare_parser(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("pids", nargs="+", metavar="PID", help="process IDs to unmerge")
        parser.add_argument("--json", action="store_true", help="print one JSON object")

    def run(self, args: argparse.Namespace) -> int:
        pids = parse_pids(args.pids)
        # Every target is diagnosed before any is touched: bad input changes nothing.
        for pid in pids:
            check_attachable(pid)
        results = [unmerge(pid) for pid in pids]
        pauses = [p for r in results for p in r.pauses]
        doc: dict[str, Any] = {
            "totals": {
                "pages_unmerged": sum(r.pages_unmerged for r in results),
                "ranges": sum(r.ranges for r in results),
            },
            "processes": [
                {
                    "pid": r.pid,
                    "name": r.name,
                    "pages_unmerged": r.pages_unmerged,
                    "ranges": r.ranges,
                }
                for r in results
            ],
            "pauses": pause_stats(pauses),
        }
        if args.json:
            json.dump(doc, sys.stdout, indent=2)
            sys.stdout.write("\n")
        else:
            Console().print(
                f"unmerged {doc['totals']['pages_unmerged']:,} pages in "
                f"{doc['totals']['ranges']} ranges of {len(pids)} processes"
            )
        return 0
