"""Run the real live loop on a scripted snapshot source (for tests/test_tui_live.py).

    python tests/tui_scripted.py LOG [--interval S] [--raise-after N]

Each call of the source is one step of procksm.tui.sample.demo_like_snapshot, so the
savings grow from 0 over 30 calls. The actions object records what the view asked for,
one line each in LOG ("pause", "resume", "unmerge PID"), and pausing really stops the
scripted scanning (run=0, savings stop growing). LOG's first line is "pid PID".
``--raise-after N``: the source raises an exception on its Nth call (the exception
exit path). The exit code is the loop's (0 q, 130 Ctrl-C, 143 SIGTERM).
"""

from __future__ import annotations

import argparse
import os
import sys

from procksm.snapshot import Snapshot
from procksm.tui import live
from procksm.tui.sample import demo_like_snapshot


class Scripted:
    def __init__(self, log: str, raise_after: int | None) -> None:
        self.log = log
        self.raise_after = raise_after
        self.calls = 0
        self.step = 0
        self.run = 1
        self.record(f"pid {os.getpid()}")

    def record(self, line: str) -> None:
        with open(self.log, "a") as f:
            f.write(line + "\n")

    def source(self) -> Snapshot:
        self.calls += 1
        if self.raise_after is not None and self.calls >= self.raise_after:
            raise RuntimeError("scripted source failure")
        if self.run == 1:
            self.step += 1
        return demo_like_snapshot(self.step, run=self.run)

    def pause(self) -> str:
        self.record("pause")
        self.run = 0
        return "scanning paused"

    def resume(self) -> str:
        self.record("resume")
        self.run = 1
        return "scanning resumed"

    def unmerge(self, pid: int) -> str:
        self.record(f"unmerge {pid}")
        return f"unmerged pid {pid}"


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("log")
    ap.add_argument("--interval", type=float, default=0.3)
    ap.add_argument("--raise-after", type=int)
    args = ap.parse_args()
    s = Scripted(args.log, args.raise_after)
    return live.run(s.source, s, interval=args.interval)


if __name__ == "__main__":
    sys.exit(main())
