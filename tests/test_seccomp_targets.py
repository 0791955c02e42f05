"""Targets whose seccomp filters would kill or fail a call procksm injects are refused
before anything is injected (issue 13); the filter interpreter against the kernel's."""

from __future__ import annotations

import struct
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from procksm.attach import call_batch, seccomp_bpf
from procksm.guard import build_filter, run_filter
from procksm.merge.engine import merge
from procksm.merge.records import MergeOptions
from procksm.unmerge import merged_ranges
from tests.conftest import require_privileges, run_procksm

# struct sock_filter: code, jt, jf, k
LD_NR = (0x20, 0, 0, 0)  # A = seccomp_data.nr
LD_ARCH = (0x20, 0, 0, 4)


def prog(*insns: tuple[int, int, int, int]) -> bytes:
    return b"".join(struct.pack("=HBBI", *i) for i in insns)


def kill_on(nr: int) -> bytes:
    return prog(
        LD_NR,
        (0x15, 0, 1, nr),  # JEQ nr
        (0x06, 0, 0, seccomp_bpf.SECCOMP_RET_KILL_PROCESS),
        (0x06, 0, 0, seccomp_bpf.SECCOMP_RET_ALLOW),
    )


def test_interpreter_agrees_with_the_guards_filter() -> None:
    for exempt in (None, 0x7FFF_0000_1002):
        f = build_filter(exempt)
        for nr, args in ((28, (0, 4096, 4)), (28, (0, 4096, 0)), (25, (0, 1, 2, 0, 0)), (0, ())):
            for ip in (0x1000, 0x7FFF_0000_1002):
                expect = run_filter(f, nr, seccomp_bpf.AUDIT_ARCH_X86_64, ip, args)
                assert seccomp_bpf.run(f, nr, ip, args) == expect


def test_interpreter_alu_jumps_and_precedence() -> None:
    # A = args[0] low word; A &= 0xff; if A >= 0x10 errno(1) else allow; JSET, JA, TAX
    p = prog(
        (0x20, 0, 0, 16),  # A = args[0] (low)
        (0x54, 0, 0, 0xFF),  # A &= 0xff
        (0x35, 0, 2, 0x10),  # JGE 0x10 -> next, else skip 2
        (0x45, 1, 0, 0x01),  # JSET 1 -> skip 1
        (0x06, 0, 0, seccomp_bpf.SECCOMP_RET_ERRNO | 1),
        (0x06, 0, 0, seccomp_bpf.SECCOMP_RET_ALLOW),
    )
    assert seccomp_bpf.run(p, 0, 0, (0x112,)) == seccomp_bpf.SECCOMP_RET_ERRNO | 1
    assert seccomp_bpf.run(p, 0, 0, (0x111,)) == seccomp_bpf.SECCOMP_RET_ALLOW
    assert seccomp_bpf.run(p, 0, 0, (0x105,)) == seccomp_bpf.SECCOMP_RET_ALLOW
    errno_all = prog((0x06, 0, 0, seccomp_bpf.SECCOMP_RET_ERRNO | 1))
    # the most restrictive action of all filters wins; KILL_PROCESS beats everything
    both = [errno_all, kill_on(319)]
    assert seccomp_bpf.verdict(both, 319, 0, ()) == seccomp_bpf.SECCOMP_RET_KILL_PROCESS
    assert seccomp_bpf.verdict(both, 9, 0, ()) == seccomp_bpf.SECCOMP_RET_ERRNO


TARGET = textwrap.dedent(
    """
    import ctypes, mmap, struct, sys
    libc = ctypes.CDLL(None, use_errno=True)
    prog = bytes.fromhex(sys.argv[1])
    buf = ctypes.create_string_buffer(prog)
    fprog = struct.pack("=HxxxxxxQ", len(prog) // 8, ctypes.addressof(buf))
    fbuf = ctypes.create_string_buffer(fprog)
    assert libc.prctl(38, 1, 0, 0, 0) == 0  # PR_SET_NO_NEW_PRIVS
    assert libc.syscall(317, 1, 0, fbuf) == 0, ctypes.get_errno()  # seccomp(SET_MODE_FILTER)
    region = mmap.mmap(-1, 64 * 4096)
    for i in range(64):
        region[i * 4096 : (i + 1) * 4096] = bytes([7]) * 4096
    print("READY", flush=True)
    for line in sys.stdin:
        print("ALIVE", bytes(region[:4096]) == bytes([7]) * 4096, flush=True)
    """
)


def start_filtered(program: bytes, n: int = 2) -> list[subprocess.Popen[str]]:
    """``n`` TARGETs under seccomp filter ``program``, each once it printed READY."""
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", TARGET, program.hex()],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(n)
    ]
    for p in procs:
        assert p.stdout is not None and p.stdout.readline().strip() == "READY"
    return procs


def assert_alive(p: subprocess.Popen[str]) -> None:
    """The target runs and its region holds what it wrote."""
    assert p.poll() is None, "the target died"
    assert p.stdin is not None and p.stdout is not None
    p.stdin.write("x\n")
    p.stdin.flush()
    assert p.stdout.readline().strip() == "ALIVE True"


def stop_all(procs: list[subprocess.Popen[str]]) -> None:
    for p in procs:
        p.kill()
        p.wait()


def test_a_target_whose_filter_kills_an_injected_call_is_refused(spawn: Any) -> None:
    require_privileges()
    procs = start_filtered(kill_on(319))  # memfd_create
    try:
        maps_before = [Path(f"/proc/{p.pid}/maps").read_text() for p in procs]
        cores_before = [Path(f"/proc/{p.pid}/coredump_filter").read_text() for p in procs]
        res = run_procksm("merge", *(p.pid for p in procs))
        assert res.returncode != 0
        said = " ".join((res.stderr + res.stdout).split())  # the console wraps lines
        assert "its seccomp filter kills the process memfd_create(), which procksm" in said
        cores_after = [Path(f"/proc/{p.pid}/coredump_filter").read_text() for p in procs]
        assert cores_after == cores_before
        for p, before in zip(procs, maps_before, strict=True):
            assert p.poll() is None, "the target died"
            assert merged_ranges(p.pid) == []
            assert Path(f"/proc/{p.pid}/maps").read_text() == before  # nothing injected
            assert_alive(p)
    finally:
        stop_all(procs)


def refuse_shared_futex_wake() -> bytes:
    """futex(..., FUTEX_WAKE, ...) (not private) fails with EPERM; all else runs."""
    return prog(
        LD_NR,
        (0x15, 0, 3, 202),  # JEQ futex, else ALLOW
        (0x20, 0, 0, 24),  # A = args[1] (low word): the op
        (0x15, 0, 1, 1),  # JEQ FUTEX_WAKE, else ALLOW
        (0x06, 0, 0, seccomp_bpf.SECCOMP_RET_ERRNO | 1),
        (0x06, 0, 0, seccomp_bpf.SECCOMP_RET_ALLOW),
    )


def test_a_target_whose_filter_refuses_the_routines_wake_up_is_merged(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The call routine wakes procksm with a FUTEX_WAKE at the end of a window's table
    (procksm.attach.call_batch). A filter that refuses that call with an errno only makes
    procksm poll for the end instead: the targets are merged and intact. With procksm's
    sleep bounded at 20 s here, sleeping on a wake-up that never comes would take that
    long per window."""
    require_privileges()
    monkeypatch.setattr(call_batch, "WAKE_WAIT_S", 20.0)
    procs = start_filtered(refuse_shared_futex_wake())
    try:
        res = merge([p.pid for p in procs], MergeOptions())
        assert res.refused_processes() == []
        assert res.elapsed_s < 10.0, "procksm slept on a wake-up the filter refused"
        assert all(t.pages_merged > 0 and t.error is None for t in res.targets)
        for p in procs:
            assert merged_ranges(p.pid) != []
            assert_alive(p)
    finally:
        stop_all(procs)
