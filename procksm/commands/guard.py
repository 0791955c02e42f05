"""The madvise guard: the resident process that keeps merged memory behaving like
anonymous memory under madvise and mremap. procksm starts it on demand; you rarely
run it yourself.

With its first merge into a process, procksm installs a seccomp filter in it that
sends madvise(MADV_DONTNEED, MADV_FREE, MADV_REMOVE, MADV_WIPEONFORK,
MADV_DONTNEED_LOCKED) and mremap to this guard. A call that touches merged pages gets
them unmerged first (exact bytes), then runs as on anonymous memory: DONTNEED reads
zeros afterwards, FREE and WIPEONFORK succeed. Other calls continue at once (~40 us).

If the guard is killed, guarded processes' calls of that kind fail with ENOSYS until
procksm merges them again (memory is never read stale). The guard exits by itself
when no guarded process is left.

examples:
  procksm guard --list            # processes the running guard answers for
"""

from __future__ import annotations

import argparse
import json
import sys

from procksm import guard
from procksm.errors import UsageError


class GuardCommand:
    __doc__ = __doc__

    def prepare_parser(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument(
            "--list", action="store_true", help="list the processes the running guard guards"
        )
        parser.add_argument("--json", action="store_true", help="with --list: JSON")
        parser.add_argument(
            "--socket", default=None, help=f"control socket (default {guard.socket_path()})"
        )
        parser.add_argument(
            "--idle-exit",
            type=float,
            default=10.0,
            help="seconds without guarded processes before the guard exits (default 10)",
        )

    def run(self, args: argparse.Namespace) -> int:
        if args.idle_exit < 0:
            raise UsageError(f"--idle-exit {args.idle_exit}: use a number of seconds >= 0")
        if args.list:
            client = guard.GuardClient(args.socket)
            stats: dict[str, object] = (
                client.stats() if client.running() else {"pid": None, "guarded": []}
            )
            if args.json:
                json.dump(stats, sys.stdout)
                sys.stdout.write("\n")
            elif not stats["guarded"]:
                print("no guarded processes")
            else:
                print(
                    f"guard pid {stats['pid']}: {stats['notifications']} calls answered, "
                    f"{stats['pages_unmerged']} pages unmerged before a guarded call"
                )
                for key in stats["guarded"]:  # type: ignore[attr-defined]
                    print(f"  pid {key.split('-')[0]} (started at tick {key.split('-')[1]})")
            return 0
        return guard.serve(args.socket, idle_exit=args.idle_exit)
