"""procksm command line: one module per subcommand under ``procksm.commands``.

Each command module defines a class with a docstring (its ``--help`` text),
``prepare_parser(parser)`` and ``run(args) -> int``, like memray's commands. ``main``
turns a :class:`~procksm.errors.ProcksmError` into one line on stderr and its exit code.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Protocol

from procksm import __version__
from procksm.errors import EXIT_INTERRUPTED, ProcksmError


class Command(Protocol):
    def prepare_parser(self, parser: argparse.ArgumentParser) -> None: ...

    def run(self, args: argparse.Namespace) -> int: ...


# name -> (module under procksm.commands, class, the first line of its docstring): only
# the command that runs is imported (the others cost memory for the life of the process:
# rich alone is ~2.4 MiB of the daemon's). tests/test_imports.py checks the summaries.
COMMANDS: dict[str, tuple[str, str, str]] = {
    "scan": (
        "scan",
        "ScanCommand",
        "Read-only analysis: how much of these processes' memory is duplicated and where.",
    ),
    "merge": (
        "merge",
        "MergeCommand",
        "Merge identical pages of running processes; they stay merged after procksm exits.",
    ),
    "unmerge": (
        "unmerge",
        "UnmergeCommand",
        "Undo procksm's merging: merged pages become private anonymous memory again.",
    ),
    "demo": (
        "demo",
        "DemoCommand",
        "Start sample worker processes, find their duplicated memory, merge it, and clean up.",
    ),
    "attach": (
        "attach",
        "AttachCommand",
        "Keep processes merged: a background scanner with the kernel KSM's knobs and counters.",
    ),
    "ctl": (
        "ctl",
        "CtlCommand",
        "Tune and steer a running 'procksm attach' through its control socket.",
    ),
    "stats": (
        "stats",
        "StatsCommand",
        "Counters of a running 'procksm attach', named like /sys/kernel/mm/ksm.",
    ),
    "top": (
        "top",
        "TopCommand",
        "Watch a running procksm daemon live: memory saved, per target, at what cost.",
    ),
    "guard": (
        "guard",
        "GuardCommand",
        "The madvise guard: the resident processes that keep merged memory behaving like",
    ),
}


def load_command(name: str) -> Command:
    module, cls, _ = COMMANDS[name]
    command: Command = getattr(importlib.import_module(f"procksm.commands.{module}"), cls)()
    return command


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        # one line, names the problem; argparse's exit code for usage errors is 2
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser, with the options of ``command`` (None: of every command)."""
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
    for name, (_, _, summary) in COMMANDS.items():
        if command is not None and name != command:
            sub.add_parser(name, help=summary, description=summary)
            continue
        cmd = load_command(name)
        p = sub.add_parser(
            name,
            help=summary,
            description=(type(cmd).__doc__ or "").strip(),
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        cmd.prepare_parser(p)
        p.set_defaults(_run=cmd.run)
    return parser


def _command_in(argv: list[str]) -> str | None:
    """The command ``argv`` names (the first word that is not an option; procksm's own
    options take no value), None without one: ``procksm --help`` needs no command."""
    word = next((a for a in argv if not a.startswith("-")), None)
    return word if word in COMMANDS else None


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser(_command_in(argv) or "")
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
