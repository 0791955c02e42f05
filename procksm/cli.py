"""procksm command line (placeholder until subcommands land)."""

from __future__ import annotations


def main(argv: list[str] | None = None) -> int:
    return 0
