"""Keep processes merged: a background scanner with the kernel KSM's knobs and counters.

Scans the eligible private anonymous memory of each PID (or only the ranges registered
with 'procksm ctl register') pages_to_scan pages at a time, sleeping sleep_ms between
batches, with KSM's rules: a page is merged only if its checksum did not change since
the previous full scan, the unstable tree is rebuilt every full scan, pages that keep
failing to merge are scanned less often (smart scan). Every page is compared byte for
byte with the shared page, with the target's threads stopped for about a millisecond,
before it is merged. Tune it while it runs with 'procksm ctl set ...'; watch it with
'procksm stats' (or --metrics-port for Prometheus).

SIGINT/SIGTERM: the current batch finishes, every target is detached; merged pages stay
merged (they are valid after procksm exits) unless --unmerge-on-exit.

examples:
  procksm attach $(pgrep -d' ' gunicorn)
  procksm attach --follow-children --cpu-limit 10 1234
  procksm attach --metrics-port 9477 1234 1235
  procksm attach --live $(pgrep -d' ' gunicorn)
  procksm ctl set pages_to_scan=4096 sleep_ms=50
  procksm stats --json
"""

from __future__ import annotations

import argparse
import contextlib
import signal
import sys
import time
from types import FrameType

from procksm.commands.pids import parse_pids
from procksm.commands.stops import add_pause_budget_arg, pause_budget_from_args
from procksm.control import ControlServer, default_control_path
from procksm.daemon import Daemon, DaemonOptions, Settings, parse_settings
from procksm.errors import UsageError
from procksm.merge import MergeOptions
from procksm.text import fmt_bytes


class AttachCommand:
    __doc__ = __doc__

    def prepare_parser(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("pids", nargs="*", metavar="PID", help="processes to keep merged")
        _add_daemon_args(parser)
        _add_knob_args(parser)
        _add_metrics_args(parser)
        _add_merge_args(parser)
        parser.add_argument("-q", "--quiet", action="store_true", help="no progress lines")
        parser.add_argument(
            "--live",
            action="store_true",
            help="show the live view (as procksm top) while scanning; q quits and detaches",
        )

    def run(self, args: argparse.Namespace) -> int:
        if args.ebpf:
            return _print_bpf_source()
        pids = parse_pids(args.pids) if args.pids else []
        settings, opts = _settings_from_args(args), _options_from_args(args)
        quiet = args.quiet

        def log(msg: str) -> None:
            if not quiet:
                print(f"procksm attach: {time.strftime('%H:%M:%S')} {msg}", file=sys.stderr)

        path = args.control or default_control_path()
        daemon = Daemon(pids, settings, opts, log=log)

        def on_signal(signum: int, _frame: FrameType | None) -> None:
            # the batch in progress finishes (its stop windows defer signals anyway)
            daemon.stopping.set()
            daemon.wake.set()

        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, on_signal)
        with daemon, ControlServer(path, daemon.handle), contextlib.ExitStack() as stack:
            _publish_metrics(args, daemon, stack)
            log(
                f"scanning {len(daemon.targets)} process(es); control socket {path}; "
                "stop with Ctrl-C or SIGTERM (merged pages stay merged"
                + (", --unmerge-on-exit" if args.unmerge_on_exit else "")
                + ")"
            )
            if args.live:
                from procksm.tui.inprocess import run_with_daemon

                run_with_daemon(daemon)  # q, Ctrl-C, SIGTERM: stop as without --live
            else:
                daemon.run_forever()
            if args.unmerge_on_exit:
                n = daemon.unmerge_all()
                log(f"unmerged {n} pages")
            snap = daemon.snapshot()
            log(
                f"detached: {snap.full_scans} full scans, saved {fmt_bytes(snap.saved_bytes)} "
                f"({snap.pages_shared} shared, {snap.pages_sharing} sharing, "
                f"{snap.pages_zero} zero pages)"
            )
        return 0


def _settings_from_args(args: argparse.Namespace) -> Settings:
    """The knobs, checked as `procksm ctl set` checks them."""
    values = parse_settings(
        [
            f"pages_to_scan={args.pages_to_scan}",
            f"sleep_ms={args.sleep_ms}",
            f"max_pages_to_merge={args.max_pages_to_merge}",
            f"run={args.run}",
            f"cpu_limit={args.cpu_limit}",
            f"stable_scans={args.stable_scans}",
        ]
    )
    return Settings(**values)  # type: ignore[arg-type]


def _options_from_args(args: argparse.Namespace) -> DaemonOptions:
    if not 0 <= args.remerge_soon_s <= 86400:
        raise UsageError(f"--remerge-soon-s {args.remerge_soon_s:g}: use 0..86400 seconds")
    if args.metrics_port is not None and not 0 < args.metrics_port < 65536:
        raise UsageError(f"--metrics-port {args.metrics_port}: use 1..65535")
    return DaemonOptions(
        follow_children=args.follow_children,
        unmerge_on_exit=args.unmerge_on_exit,
        merge=MergeOptions(
            cross_uid=args.cross_uid,
            allow_async_io=args.allow_async_io,
            zero_pages=not args.no_zero,
            pause_budget_ms=pause_budget_from_args(args),
        ),
        use_bpf=False if args.no_bpf else None,
        remerge_backoff=args.remerge_soon_s > 0,
        remerge_soon_s=args.remerge_soon_s,
    )


def _publish_metrics(args: argparse.Namespace, daemon: Daemon, stack: contextlib.ExitStack) -> None:
    """Serve /metrics and/or write the textfile (every 10 s and on exit), if asked."""
    if args.metrics_port is None and not args.metrics_textfile:
        return
    from procksm import metrics

    reg = metrics.registry_for(daemon.snapshot, per_target=args.metrics_per_target)
    if args.metrics_port is not None:
        stack.callback(metrics.serve(reg, args.metrics_port, args.metrics_addr))
    if args.metrics_textfile:
        textfile = args.metrics_textfile
        last = [0.0]

        def publish(_snap: object) -> None:
            if time.monotonic() - last[0] >= 10:
                last[0] = time.monotonic()
                metrics.write_textfile(reg, textfile)

        daemon.on_publish = publish
        stack.callback(lambda: metrics.write_textfile(reg, textfile))


def _add_daemon_args(parser: argparse.ArgumentParser) -> None:
    """Which processes, the control socket, how the daemon ends and what it watches with."""
    parser.add_argument(
        "--follow-children",
        action="store_true",
        help="also scan the children the targets fork (checked every full scan)",
    )
    parser.add_argument(
        "--control",
        metavar="SOCKET",
        default=None,
        help=f"control socket (default {default_control_path()})",
    )
    parser.add_argument(
        "--unmerge-on-exit",
        action="store_true",
        help="on SIGINT/SIGTERM, make every merged page private again before exiting",
    )
    parser.add_argument(
        "--no-bpf",
        action="store_true",
        help="watch copy-on-write breaks by pagemap polling only, not eBPF",
    )
    parser.add_argument("--ebpf", action="store_true", help=argparse.SUPPRESS)


def _add_knob_args(parser: argparse.ArgumentParser) -> None:
    """KSM's knobs (the same names as /sys/kernel/mm/ksm) and the daemon's pacing."""
    d = Settings()
    parser.add_argument(
        "--cpu-limit",
        type=float,
        metavar="PCT",
        default=d.cpu_limit,
        help=f"CPU cap, %% of one core; adapts pages_to_scan (default {d.cpu_limit:g}; 0: no cap)",
    )
    parser.add_argument("--pages-to-scan", type=int, default=d.pages_to_scan)
    parser.add_argument("--sleep-ms", type=int, default=d.sleep_ms)
    parser.add_argument("--max-pages-to-merge", type=int, default=d.max_pages_to_merge)
    parser.add_argument(
        "--run", type=int, default=1, choices=(0, 1), help="1: scan (default), 0: wait"
    )
    parser.add_argument(
        "--stable-scans",
        type=int,
        default=d.stable_scans,
        choices=(0, 1),
        help="full scans a newly seen page waits before it may merge: 1 is the "
        "kernel's checksum rule, 0 (default) merges at once, the byte comparison "
        "under stop being its second look",
    )
    add_pause_budget_arg(parser)
    parser.add_argument(
        "--remerge-soon-s",
        type=float,
        metavar="S",
        default=DaemonOptions().remerge_soon_s,
        help="a range written less than S seconds after its merge is not merged again "
        "for 2, 4, ... 64 full scans (default %(default)g; 0: merge again at once)",
    )


def _add_metrics_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--metrics-port", type=int, metavar="PORT", help="serve Prometheus /metrics"
    )
    parser.add_argument("--metrics-addr", default="0.0.0.0", help="address for /metrics")
    parser.add_argument(
        "--metrics-textfile",
        metavar="PATH",
        help="write metrics for node_exporter's textfile collector (every 10 s)",
    )
    parser.add_argument(
        "--metrics-per-target",
        action="store_true",
        help="add per-process series labelled pid (high cardinality)",
    )


def _add_merge_args(parser: argparse.ArgumentParser) -> None:
    """What may be merged (as for procksm merge)."""
    parser.add_argument(
        "--cross-uid", action="store_true", help="also merge processes of different users"
    )
    parser.add_argument(
        "--allow-async-io", action="store_true", help="merge processes using io_uring/AIO"
    )
    parser.add_argument("--no-zero", action="store_true", help="do not drop zero pages")


def _print_bpf_source() -> int:
    try:
        from procksm.observe import bpf_source
    except ImportError:
        raise UsageError("the eBPF observer (procksm.observe) is not available") from None
    sys.stdout.write(bpf_source())
    return 0
