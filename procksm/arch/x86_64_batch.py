"""procksm's call routine for x86_64: the machine code of x86_64_batch.S and its table.

One stop window's system calls (a merge window's hand-over, mmaps, advice, populates,
zero-page drops, closes) run in the target in one go: procksm writes a table of calls,
points a stopped thread at this routine and lets it run, instead of one ptrace round
trip per call (issue 16; the round trips were ~0.3 ms each, docs/design.md §7). The
routine is mapped once per session in the scratch area (procksm.attach.scratch), run by
procksm.attach.call_batch. The source, with the calling convention, is x86_64_batch.S
next to this file; tests/unit/test_call_batch.py assembles it and compares with
:data:`ROUTINE`.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

# as x86_64_batch.S -o b.o && objcopy -O binary -j .text b.o b.bin
ROUTINE = bytes.fromhex(
    "4989fc4989f54989d64889fd4531ff4d85ed0f84ac000000498b1c244d85ff740cf7c3020000000f"
    "848b000000f7c304000000742689d9c1e90881e1ffff0000486bc950488b440d484885c0786a89d9"
    "c1e90483e10f498944cc10f7c3000000030f8591000000f7c308000000740a498b442410488b00eb"
    "25498b442408498b7c2410498b742418498b5424204d8b5424284d8b4424304d8b4c24380f054989"
    "442448f7c301000000740d493b442440740641bf010000004983c45049ffcde94bffffff49c70601"
    "0000004c89f7be01000000ba01000000b8ca0000000f05498d560831ff31f64531d241b808000000"
    "b80f0100000f05c3498b742410f7c300000001744b498b7c2418498b4c2420488b06483307488b56"
    "08483357084809d0488b5610483357104809d0488b5618483357184809d075424883c6204883c720"
    "4883e92077c9498b442428e94effffff498b4c2418488b06480b4608480b4610480b461875144883"
    "c6204883e92077e5498b442418e924ffffff48c7c0b6ffffffe918ffffff"
)
CALL_INSN = 0x9C  # the `syscall` that runs the table's calls (seccomp sees ip + 2)
WAKE_INSN = 0xDD  # the `syscall` that wakes procksm once the table is done (futex)
PARK_INSN = 0xF5  # the park's `syscall` (ppoll); procksm interrupts the thread there

ENTRY_SIZE = 80  # flags, nr, a0..a5, expect, result
RESULT = 72  # offset of the result in an entry
EXPECT, ALWAYS, ARG_FROM, LOAD = 1, 2, 4, 8
EQUAL, ZERO = 1 << 24, 1 << 25  # above ARG_FROM's slot (bits 4-7) and source (8-23)
COMPARE_STEP = 32  # EQUAL and ZERO lengths are multiples of it
UNEQUAL = -74  # -EBADMSG: EQUAL's or ZERO's result when the bytes differ
NOT_RUN = -(1 << 63)  # preset result: skipped (after an abort, or its source failed)

# The table's header: the done word, then the park's timespec (ppoll writes the time
# left back into it when interrupted: rewritten before every run).
HEADER_DONE, HEADER_PARK = 0, 8
HEADER_SIZE = 24


@dataclass(frozen=True, slots=True)
class Entry:
    """One row of the table: a system call, or with LOAD a quadword read back, or with
    EQUAL or ZERO a comparison of the target's bytes."""

    nr: int
    args: tuple[int, ...]
    flags: int = 0
    expect: int = 0
    source: int = -1  # with ARG_FROM: the entry whose result becomes argument `slot`
    slot: int = 0

    def encode_into(self, table: bytearray, at: int) -> None:
        flags = self.flags
        if flags & ARG_FROM:
            flags |= (self.slot << 4) | (self.source << 8)
        args = [a & _U64 for a in self.args]
        args += _NO_ARGS[len(args) :]
        _ENTRY.pack_into(table, at, flags, self.nr, *args, self.expect & _U64, NOT_RUN)


_U64 = (1 << 64) - 1
_NO_ARGS = [0] * 6
_ENTRY = struct.Struct("<QQ6QQq")


def encode_table(entries: list[Entry]) -> bytes:
    """The entries, one after the other (one buffer packed in place: ~1 us an entry,
    a window of scattered pages has ~40 of them)."""
    table = bytearray(len(entries) * ENTRY_SIZE)
    for i, e in enumerate(entries):
        if e.flags & ARG_FROM:
            if not 0 <= e.source < i:
                raise ValueError(
                    f"entry {i} takes an argument from entry {e.source}, not before it"
                )
            if not 0 <= e.slot < 6:
                raise ValueError(f"entry {i}: argument slot {e.slot}")
        e.encode_into(table, i * ENTRY_SIZE)
    return bytes(table)


def header(park_ns: int) -> bytes:
    """The header before a run: not done, the park's timeout."""
    return struct.pack("<QQQ", 0, park_ns // 1_000_000_000, park_ns % 1_000_000_000)


def decode_results(table: bytes | bytearray, count: int) -> list[int]:
    """Each entry's result, from the table the routine ran (read back whole)."""
    if len(table) < count * ENTRY_SIZE:
        raise ValueError(f"a table of {count} entries read back short: {len(table)} bytes")
    results = memoryview(table)[RESULT : count * ENTRY_SIZE].cast("q")
    return list(results[:: ENTRY_SIZE // 8])
