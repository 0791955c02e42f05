"""Tune and steer a running 'procksm attach' through its control socket.

  procksm ctl set pages_to_scan=N sleep_ms=N max_pages_to_merge=N run=0|1|2 cpu_limit=PCT
  procksm ctl register PID START-END|START+LEN|NAME|all
  procksm ctl unregister PID START-END|START+LEN|NAME|all

run=0 stops scanning (merged pages stay merged), run=1 scans, run=2 unmerges everything
and stops, as /sys/kernel/mm/ksm/run. 'register' adds a range or a mapping name (glob, e.g.
'[heap]') of a process to the scanned memory, and attaches to the process if it is not
a target yet; 'unregister' removes it ('all' detaches the process). Merged pages stay
merged when their range is unregistered.

examples:
  procksm ctl set pages_to_scan=4096 sleep_ms=100
  procksm ctl set run=2
  procksm ctl register 1234 '[heap]'
  procksm ctl unregister 1234 0x7f0000000000+64M
"""

from __future__ import annotations

import argparse
import sys

from procksm.control import check_answer, default_control_path, request
from procksm.errors import UsageError


class CtlCommand:
    __doc__ = __doc__

    def prepare_parser(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("action", choices=("set", "register", "unregister"))
        parser.add_argument("args", nargs="+", metavar="ARG")
        parser.add_argument("--control", metavar="SOCKET", default=None,
                            help=f"control socket (default {default_control_path()})")  # fmt: skip

    def run(self, args: argparse.Namespace) -> int:
        if any("\n" in a for a in args.args):
            raise UsageError("arguments must not contain newlines")
        line = " ".join([args.action, *args.args])
        answer = check_answer(request(args.control or default_control_path(), line))
        sys.stdout.write(answer if answer.endswith("\n") else answer + "\n")
        return 0
