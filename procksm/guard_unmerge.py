"""The madvise guard's unmerge helper: ``python -m procksm.guard_unmerge``.

The resident guard (procksm.guardd) stays small by never importing the merging code
(numpy alone is ~20 MiB of private memory); when a guarded call touches merged pages it
asks this child, over a pipe, to unmerge them with ``procksm.unmerge.unmerge_pieces``.
One request a line, one answer a line:

    unmerge TGID START END [START END ...]  ->  ok PAGES | error MESSAGE
    all TGID                                ->  ok PAGES | error MESSAGE  (every merged range)

It exits when the guard closes the pipe (the guard died or re-executed itself) or after
``IDLE_S`` seconds without a request; the guard starts another when it needs one.
"""

from __future__ import annotations

import os
import select
import sys

IDLE_S = 30.0


def _answer(words: list[str]) -> str:
    from procksm.errors import ProcksmError
    from procksm.unmerge import merged_ranges, unmerge_pieces

    try:
        tgid = int(words[1])
        if words[0] == "unmerge":
            nums = [int(w) for w in words[2:]]
            pieces = list(zip(nums[::2], nums[1::2], strict=True))
        elif words[0] == "all" and len(words) == 2:
            pieces = [(v.start, v.end) for v in merged_ranges(tgid)]
        else:
            return f"error unknown request {' '.join(words)[:60]!r}"
        return f"ok {unmerge_pieces(tgid, pieces)}"
    except ProcksmError as e:
        return f"error {e.message}"
    except (OSError, ValueError, IndexError) as e:
        return f"error {e}"


def main() -> int:
    import procksm.unmerge  # noqa: F401  (before the first request: ~0.3 s of imports)

    buf = b""
    while True:
        while b"\n" not in buf:
            ready, _, _ = select.select([0], [], [], IDLE_S)
            chunk = os.read(0, 65536) if ready else b""
            if not chunk:
                return 0  # idle, or the guard is gone
            buf += chunk
        line, _, buf = buf.partition(b"\n")
        reply = _answer(line.decode(errors="replace").split())
        os.write(1, reply.encode() + b"\n")


if __name__ == "__main__":
    sys.exit(main())
