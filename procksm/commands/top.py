"""Watch a running procksm daemon live: memory saved, per target, at what cost.

Reads snapshots from the daemon's control socket once per interval and shows them in a
full-screen view: memory saved (bytes and % of the targets' RSS) and the KSM counters
(pages_shared, pages_sharing, zero pages), full scans, scan rate, procksm's own CPU and
RSS, run state and observer (BPF, or pagemap fallback); a table of targets (RSS, PSS,
merged, zero pages dropped, COW breaks/s, pages refused and why, stop-window pauses) with
a bar of merged vs unmerged memory; sparklines of saved bytes and COW breaks over time.
The view only asks the daemon; it never touches a process itself.

keys:
  q Esc       quit                      s r c p n  sort: saved, RSS, COW/s, pid, name
  up/down j k select a target           Enter      show/hide its mappings
  space       pause/resume scanning     u          unmerge the selected target (y/n)
  ?           help

When stdout is not a terminal (or with --count) it prints one line per interval instead;
--json prints one JSON snapshot per line. Exit codes: 0 on q or --count reached, 130 on
Ctrl-C, 143 on SIGTERM; the terminal is restored on every one of them.

examples:
  procksm top
  procksm top --interval 0.5
  procksm top --count 1 --json | jq .saved_bytes
  procksm top | tee procksm.log       # not a terminal: one line per second
"""

from __future__ import annotations

import argparse

from procksm.errors import UsageError
from procksm.snapshot import Snapshot


class TopCommand:
    __doc__ = __doc__

    def prepare_parser(self, parser: argparse.ArgumentParser) -> None:
        from procksm.control import default_control_path

        parser.add_argument(
            "--control",
            metavar="SOCKET",
            default=None,
            help=f"the daemon's control socket (default {default_control_path()}, "
            "or $PROCKSM_CONTROL)",
        )
        parser.add_argument(
            "--interval", type=float, default=1.0, metavar="S", help="refresh every S seconds (1)"
        )
        parser.add_argument(
            "--count", type=int, metavar="N", help="print N lines (or JSON documents) and exit"
        )
        parser.add_argument("--json", action="store_true", help="one JSON snapshot per line")

    def run(self, args: argparse.Namespace) -> int:
        from procksm.tui import live
        from procksm.tui.source import SocketActions, socket_source

        if not 0.05 <= args.interval <= 3600:
            raise UsageError(f"--interval {args.interval}: use 0.05 to 3600 seconds")
        if args.count is not None and args.count < 1:
            raise UsageError(f"--count {args.count}: use 1 or more")
        from procksm.control import default_control_path

        control = args.control or default_control_path()
        ask = socket_source(control)
        first = [ask()]  # no daemon: one line on stderr now, not an empty screen

        def source() -> Snapshot:
            return first.pop() if first else ask()

        return live.run(
            source,
            SocketActions(control),
            interval=args.interval,
            count=args.count,
            json_lines=args.json,
        )
