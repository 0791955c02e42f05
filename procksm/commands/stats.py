"""Counters of a running 'procksm attach', named like /sys/kernel/mm/ksm.

pages_shared: distinct shared pages in use; pages_sharing: further mappings of them (the
pages saved); pages_unshared: unique pages in the unstable tree; pages_volatile: pages
changing too fast to merge; pages_skipped: page scans skipped by smart scan; pages_zero:
zero pages given back; full_scans; cow_breaks: merged pages made private again by a
write; general_profit: bytes saved minus procksm's own private memory (the daemon's
and the madvise guards', as "procksm private" shows it). Per process: pages
merged, zero pages, copy-on-write breaks, refusals and the longest stop.

examples:
  procksm stats
  procksm stats --json | jq .pages_sharing
"""

from __future__ import annotations

import argparse
import json
import sys

from rich.console import Console
from rich.table import Table

from procksm.control import default_control_path, stats_json
from procksm.snapshot import Snapshot
from procksm.text import fmt_bytes, longest_stop_text


class StatsCommand:
    __doc__ = __doc__

    def prepare_parser(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--json", action="store_true", help="print the daemon's snapshot")
        parser.add_argument("--control", metavar="SOCKET", default=None,
                            help=f"control socket (default {default_control_path()})")  # fmt: skip

    def run(self, args: argparse.Namespace) -> int:
        doc = stats_json(args.control or default_control_path())
        if args.json:
            json.dump(doc, sys.stdout, indent=2)
            sys.stdout.write("\n")
            return 0
        snap = Snapshot.from_json(doc)
        Console().print(render(snap))
        return 0


def render(s: Snapshot) -> Table:
    t = Table(title=f"procksm: run={s.run}, pages_to_scan={s.pages_to_scan}, "
                    f"sleep_ms={s.sleep_ms}, full_scans={s.full_scans}")  # fmt: skip
    t.add_column("counter")
    t.add_column("value", justify="right")
    rows = [
        ("pages_shared", f"{s.pages_shared:,}"),
        ("pages_sharing", f"{s.pages_sharing:,}"),
        ("pages_unshared", f"{s.pages_unshared:,}"),
        ("pages_volatile", f"{s.pages_volatile:,}"),
        ("pages_skipped", f"{s.pages_skipped:,}"),
        ("pages_zero", f"{s.pages_zero:,}"),
        ("cow_breaks", f"{s.cow_breaks:,}"),
        ("saved", fmt_bytes(s.saved_bytes)),
        ("general_profit", fmt_bytes(s.general_profit_bytes)),
        ("scan rate", f"{s.scan_rate_pages_s:,.0f} pages/s"),
        ("procksm CPU", f"{s.cpu_percent:.1f} %"),
        ("its calls in the targets", f"{s.target_cpu_percent:.1f} % CPU"),
        ("procksm RSS", fmt_bytes(s.rss_bytes)),
        ("procksm private", fmt_bytes(s.private_bytes)),
        ("pauses p50/p99/max", f"{s.pause_p50_ms}/{s.pause_p99_ms}/{s.pause_max_ms} ms"),
    ]
    if s.pause_longest is not None:
        rows.append(("longest stop", longest_stop_text(s.pause_longest)))
    for k, v in rows:
        t.add_row(k, v)
    for p in s.targets:
        t.add_row(
            f"pid {p.pid} ({p.name})",
            f"{p.pages_merged:,} merged, {p.pages_zero:,} zero, {p.cow_breaks:,} COW, "
            f"max stop {p.max_pause_ms} ms",
        )
    return t
