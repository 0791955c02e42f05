"""What a target's seccomp filters answer to the calls procksm injects (pure logic).

A filter that kills, traps or fails one of procksm's calls (a container profile, a
sandbox) would turn an injection into a crash: the target is refused instead, before
anything is injected (procksm.attach.seccomp_precheck). The filters come from
PTRACE_SECCOMP_GET_FILTER as classic BPF; this module runs them on a seccomp_data like the kernel
(kernel/seccomp.c, net/core/filter.c: the instructions seccomp_check_filter allows).
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

from procksm.arch.x86_64 import AUDIT_ARCH_X86_64

SECCOMP_RET_ACTION_FULL = 0xFFFF0000
SECCOMP_RET_KILL_PROCESS = 0x80000000
SECCOMP_RET_KILL_THREAD = 0x00000000
SECCOMP_RET_TRAP = 0x00030000
SECCOMP_RET_ERRNO = 0x00050000
SECCOMP_RET_USER_NOTIF = 0x7FC00000
SECCOMP_RET_TRACE = 0x7FF00000
SECCOMP_RET_LOG = 0x7FFC0000
SECCOMP_RET_ALLOW = 0x7FFF0000
# Actions under which an injected call runs as procksm asked: ALLOW, LOG, and a
# notification (the madvise guard's filter answers procksm's own calls with CONTINUE).
RUNS = frozenset({SECCOMP_RET_ALLOW, SECCOMP_RET_LOG, SECCOMP_RET_USER_NOTIF})
ACTION_NAMES = {
    SECCOMP_RET_KILL_PROCESS: "kills the process",
    SECCOMP_RET_KILL_THREAD: "kills the thread",
    SECCOMP_RET_TRAP: "raises SIGSYS",
    SECCOMP_RET_ERRNO: "fails it",
    SECCOMP_RET_TRACE: "sends it to a tracer",
}

# BPF instruction classes and fields (include/uapi/linux/bpf_common.h)
_LD, _LDX, _ST, _STX, _ALU, _JMP, _RET, _MISC = range(8)
_W, _ABS, _MEM, _IMM, _LEN = 0x00, 0x20, 0x60, 0x00, 0x80
_K, _X, _A = 0x00, 0x08, 0x10


def run(prog: bytes, nr: int, ip: int, args: Sequence[int], arch: int = AUDIT_ARCH_X86_64) -> int:
    """The filter's return value for system call `nr` at instruction pointer `ip`."""
    data = struct.pack("=iIQ6Q", nr, arch, ip, *args, *([0] * (6 - len(args))))
    insns = [struct.unpack_from("=HBBI", prog, i) for i in range(0, len(prog), 8)]
    a = x = 0
    mem = [0] * 16
    pc = 0
    mask = 0xFFFFFFFF
    while pc < len(insns):
        code, jt, jf, k = insns[pc]
        pc += 1
        cls = code & 0x07
        if cls == _LD:
            mode = code & 0xE0
            if mode == _ABS:
                a = struct.unpack_from("=I", data, k)[0]
            elif mode == _IMM:
                a = k
            elif mode == _MEM:
                a = mem[k]
            elif mode == _LEN:
                a = len(data)
            else:
                raise ValueError(f"BPF load mode {code:#x}")
        elif cls == _LDX:
            mode = code & 0xE0
            x = k if mode == _IMM else mem[k] if mode == _MEM else len(data)
        elif cls == _ST:
            mem[k] = a
        elif cls == _STX:
            mem[k] = x
        elif cls == _ALU:
            a = _alu(code, a, x if code & _X else k) & mask
        elif cls == _JMP:
            op = code & 0xF0
            if op == 0x00:  # JA
                pc += k
                continue
            src = x if code & _X else k
            taken = {0x10: a == src, 0x20: a > src, 0x30: a >= src, 0x40: bool(a & src)}[op]
            pc += jt if taken else jf
        elif cls == _RET:
            return a if code & 0x18 == _A else k
        else:  # MISC: TAX / TXA
            if code & 0xF8 == 0x00:
                x = a
            else:
                a = x
    raise ValueError("BPF program fell off its end")


def _alu(code: int, a: int, src: int) -> int:
    op = code & 0xF0
    if op == 0x00:
        return a + src
    if op == 0x10:
        return a - src
    if op == 0x20:
        return a * src
    if op == 0x30:
        return a // src if src else 0
    if op == 0x40:
        return a | src
    if op == 0x50:
        return a & src
    if op == 0x60:
        return a << src if src < 32 else 0
    if op == 0x70:
        return a >> src if src < 32 else 0
    if op == 0x80:
        return -a
    if op == 0x90:
        return a % src if src else 0
    if op == 0xA0:
        return a ^ src
    raise ValueError(f"BPF ALU op {code:#x}")


def verdict(filters: Sequence[bytes], nr: int, ip: int, args: Sequence[int]) -> int:
    """The action the kernel takes: every filter runs, the most restrictive one wins
    (seccomp_run_filters; actions are ordered by their value, KILL_PROCESS first)."""
    best = SECCOMP_RET_ALLOW
    for prog in filters:
        ret = run(prog, nr, ip, args)
        if _precedence(ret) < _precedence(best):
            best = ret
    return best & SECCOMP_RET_ACTION_FULL


def _precedence(ret: int) -> int:
    action = ret & SECCOMP_RET_ACTION_FULL
    # KILL_PROCESS (0x80000000) is the most restrictive although it is the largest value
    return -1 if action == SECCOMP_RET_KILL_PROCESS else action
