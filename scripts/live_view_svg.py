"""Write docs/live-view.svg: the live view rendered with rich's Console.save_svg.

    .venv/bin/python scripts/live_view_svg.py --demo 30          # the demo workload (root)
    .venv/bin/python scripts/live_view_svg.py --control SOCKET   # a running daemon's
    .venv/bin/python scripts/live_view_svg.py                    # a hand-built demo-like one

--demo S starts the workers of 'procksm demo' (4 x 64 MiB shared, 16 MiB zeros, 16 MiB
unique, 4 MiB hot), lets the daemon of 'procksm attach' work on them for S seconds and
renders its last snapshot; the workers are stopped afterwards.

The view is rendered by the same pure function ``procksm top`` draws with
(procksm.tui.render.view).
"""

from __future__ import annotations

import argparse
import dataclasses
import io
from pathlib import Path

from rich.console import Console

from procksm.snapshot import Snapshot
from procksm.tui import render
from procksm.tui.render import ViewState

ROOT = Path(__file__).resolve().parent.parent


def demo_snapshot(seconds: float) -> Snapshot:
    import threading
    import time

    from procksm.commands.demo import demo_workers
    from procksm.daemon import Daemon

    with demo_workers(4, 64, 16, 16, 4) as procs, Daemon([p.pid for p in procs]) as daemon:
        loop = threading.Thread(target=daemon.run_forever)
        loop.start()
        try:
            time.sleep(seconds)
        finally:
            daemon.stopping.set()
            daemon.wake.set()
            loop.join()
        daemon.maybe_publish(force=True)
        return daemon.snapshot()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--control", metavar="SOCKET", help="take the snapshot from this daemon")
    ap.add_argument("--demo", type=float, metavar="S", help="run the demo workload S seconds")
    ap.add_argument("--width", type=int, default=120)
    ap.add_argument("--height", type=int, default=30)
    ap.add_argument("--expand", type=int, metavar="PID", help="expand this target (0: the first)")
    ap.add_argument("-o", "--output", type=Path, default=ROOT / "docs" / "live-view.svg")
    args = ap.parse_args()

    snap: Snapshot
    if args.control:
        from procksm.tui.source import socket_source

        snap = socket_source(args.control)()
    elif args.demo:
        snap = demo_snapshot(args.demo)
    else:
        from procksm.tui.sample import demo_like_snapshot

        snap = demo_like_snapshot(24)
    state = ViewState()
    first = render.selected_target(snap, state)
    pid = args.expand or (first.pid if first and args.expand == 0 else None)
    if pid is not None:
        state = dataclasses.replace(state, selected=pid, expanded=frozenset({pid}))
    console = Console(
        record=True,
        width=args.width,
        height=args.height,
        force_terminal=True,
        color_system="truecolor",
        file=io.StringIO(),
    )
    console.print(render.view(snap, state, args.width, args.height))
    args.output.parent.mkdir(parents=True, exist_ok=True)
    print(console.export_text(clear=False))
    console.save_svg(str(args.output), title="procksm top")
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
