"""The madvise guard: the resident processes that keep merged memory behaving like
anonymous memory under madvise and mremap. procksm starts them on demand; you rarely
run them yourself.

With its first merge into a process, procksm installs a seccomp filter in it that
sends madvise(MADV_DONTNEED, MADV_FREE, MADV_REMOVE, MADV_WIPEONFORK,
MADV_DONTNEED_LOCKED) and mremap to the guard. A call that touches merged pages gets
them unmerged first (exact bytes), then runs as on anonymous memory: DONTNEED reads
zeros afterwards, FREE and WIPEONFORK succeed. Other calls continue at once.

Two guards run: an active one and a standby holding the same listeners; each
respawns the other, so killing one loses nothing. They live in a cgroup of their own
(<cgroup2 mount>/procksm-guard; PROCKSM_GUARD_CGROUP names another, "none" keeps them
where they start), so stopping or restarting the procksm service leaves them running.
A SIGTERM makes a guard exit once no guarded process is left. They exit by themselves
when nothing is left to guard.

examples:
  procksm guard --list            # processes the running guards answer for
  procksm guard --upgrade         # re-execute both guards with the installed code
  procksm guard --stop            # unmerge every guarded process, stop the guards
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from procksm import guard
from procksm.errors import UsageError
from procksm.guardd.launch import guard_argv, guard_env


class GuardCommand:
    __doc__ = __doc__

    def prepare_parser(self, parser: argparse.ArgumentParser) -> None:
        what = parser.add_mutually_exclusive_group()
        what.add_argument(
            "--list", action="store_true", help="list the processes the running guards guard"
        )
        what.add_argument(
            "--upgrade",
            action="store_true",
            help="re-execute both guards, one after the other, with this procksm's code",
        )
        what.add_argument(
            "--stop",
            action="store_true",
            help="unmerge every guarded process, then stop both guards (their guarded "
            "calls then fail with ENOSYS: seccomp filters cannot be removed)",
        )
        parser.add_argument("--json", action="store_true", help="with --list: JSON")
        parser.add_argument(
            "--socket", default=None, help=f"control socket (default {guard.socket_path()})"
        )
        parser.add_argument(
            "--idle-exit",
            type=float,
            default=10.0,
            help="seconds without guarded processes before the guards exit (default 10)",
        )

    def run(self, args: argparse.Namespace) -> int:
        if args.idle_exit < 0:
            raise UsageError(f"--idle-exit {args.idle_exit}: use a number of seconds >= 0")
        client = guard.GuardClient(args.socket)
        if args.upgrade:
            st = client.upgrade()
            print(f"guards {st['pid']} and {st['peer']} run generation {st['gen']}")
            return 0
        if args.stop:
            pages = client.stop()
            print(f"unmerged {pages} pages; guards stopped")
            return 0
        if args.list:
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
                    f"guard pid {stats['pid']} (standby {stats.get('peer')}): "
                    f"{stats['notifications']} calls answered, "
                    f"{stats['pages_unmerged']} pages unmerged before a guarded call, "
                    f"{stats.get('calls_restarted', 0)} calls restarted after a guard died"
                )
                for key in stats["guarded"]:  # type: ignore[attr-defined]
                    print(f"  pid {key.split('-')[0]} (started at tick {key.split('-')[1]})")
            return 0
        # In the foreground: become the lean guard (no numpy, no CLI) in place.
        argv = [*guard_argv(), "--socket", client.path, "--idle-exit", str(args.idle_exit)]
        sys.stdout.flush()
        os.execve(argv[0], argv, guard_env())
