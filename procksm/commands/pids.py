"""The PID arguments every command takes (no rich here: 'procksm attach' imports it)."""

from __future__ import annotations

from procksm.errors import UsageError

# PID_MAX_LIMIT in include/linux/threads.h (64-bit): no pid_max setting goes higher
PID_MAX_LIMIT = 1 << 22


def parse_pids(values: list[str]) -> list[int]:
    pids: list[int] = []
    for v in values:
        for part in v.replace(",", " ").split():
            shown = repr(part if len(part) <= 24 else part[:20] + "...")
            try:
                pid = int(part)
            except ValueError:
                raise UsageError(f"bad PID {shown}: PIDs are positive integers") from None
            if pid <= 0:
                raise UsageError(f"bad PID {shown}: PIDs are positive integers")
            if pid > PID_MAX_LIMIT:
                raise UsageError(f"bad PID {shown}: PIDs are at most {PID_MAX_LIMIT}")
            if pid not in pids:
                pids.append(pid)
    if not pids:
        raise UsageError("no PID given: pass one or more process IDs")
    return pids
