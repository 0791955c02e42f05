"""procksm command line: one module per subcommand under ``procksm.commands``.

Each command module defines a class with a docstring (its ``--help`` text),
``prepare_parser(parser)`` and ``run(args) -> int``, like memray's commands. ``main``
turns a :class:`~procksm.errors.ProcksmError` into one line on stderr and its exit code.
"""

from __future__ import annotations

import argparse
import sys
from typing import Protocol

from procksm import __version__
from procksm.errors import EXIT_INTERRUPTED, ProcksmError


class Command(Protocol):
    def prepare_parser(self, parser: argparse.ArgumentParser) -> None: ...

    def run(self, args: argparse.Namespace) -> int: ...


def _commands() -> dict[str, Command]:
    from procksm.commands.attach import AttachCommand
    from procksm.commands.ctl import CtlCommand
    from procksm.commands.demo import DemoCommand
    from procksm.commands.guard import GuardCommand
    from procksm.commands.merge import MergeCommand
    from procksm.commands.scan import ScanCommand
    from procksm.commands.stats import StatsCommand
    from procksm.commands.top import TopCommand
    from procksm.commands.unmerge import UnmergeCommand

    return {
        "scan": ScanCommand(),
        "merge": MergeCommand(),
        "unmerge": UnmergeCommand(),
        "demo": DemoCommand(),
        "attach": AttachCommand(),
        "ctl": CtlCommand(),
        "stats": StatsCommand(),
        "top": TopCommand(),
        "guard": GuardCommand(),
    }


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        # one line, names the problem; argparse's exit code for usage errors is 2
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="procksm",
        description="Kernel Samepage Merging from user space: find and share identical "
        "memory pages of running processes.",
        epilog="Run 'procksm COMMAND --help' for a command's options. Exit codes: 0 ok, "
        "1 error, 2 usage, 3 no such process, 4 permission denied, 5 target busy, "
        "6 unsupported target, 130 interrupted.",
    )
    parser.add_argument("--version", action="version", version=f"procksm {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for name, cmd in _commands().items():
        doc = (type(cmd).__doc__ or "").strip()
        first = doc.splitlines()[0] if doc else name
        p = sub.add_parser(
            name,
            help=first,
            description=doc,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        cmd.prepare_parser(p)
        p.set_defaults(_run=cmd.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "_run", None):
        parser.print_help(sys.stderr)
        return 2
    return _run(args)


def _run(args: argparse.Namespace) -> int:
    try:
        return int(args._run(args))
    except ProcksmError as e:
        print(f"procksm: error: {e.message}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("procksm: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        return 0
