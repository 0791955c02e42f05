"""``python -m procksm.observe --ebpf``: print the BPF program as loaded and exit (like bcc
tools' hidden ``--ebpf``)."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from procksm.observe.bpf_program import bpf_source


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args == ["--ebpf"]:
        sys.stdout.write(bpf_source())
        return 0
    print("usage: python -m procksm.observe --ebpf", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
