"""The madvise guard (procksm.guard; docs/design.md §3.1, §3.2).

The filter program is checked by an interpreter of the instructions it uses (pure);
the guard process itself with real targets: it outlives the procksm that started it,
what happens when it is killed (calls fail with ENOSYS, memory never stale), how a new
procksm re-guards, its control socket, and that it exits when nothing is left to guard.
Each test runs its own guard (PROCKSM_LOCK_DIR), so killing it touches nobody else.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from procksm import PAGE_SIZE
from procksm.guard import (
    AUDIT_ARCH_I386,
    AUDIT_ARCH_X86_64,
    GUARDED_ADVICE,
    SECCOMP_RET_ALLOW,
    SECCOMP_RET_USER_NOTIF,
    X32_SYSCALL_BIT,
    GuardClient,
    build_filter,
    guarded_range,
    mremap_may_keep_merged,
    run_filter,
)
from procksm.merge import MergeEngine, MergeOptions
from procksm.scanner import AddressRange, ScanOptions
from procksm.unmerge import merged_ranges
from tests.conftest import (
    ROOT,
    Target,
    build_c_target,
    guard_pids,
    require_privileges,
    run_procksm,
)
from tests.daemon_helpers import Truth

N, U = 32, 4
ALLOW, NOTIFY = SECCOMP_RET_ALLOW, SECCOMP_RET_USER_NOTIF
X64 = AUDIT_ARCH_X86_64

# --------------------------------------------------------------------------------------
# the filter and the range rules (pure)
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("exempt", [None, 0x7FFF_1234_5002])
def test_filter_notifies_exactly_the_guarded_calls(exempt: int | None) -> None:
    prog = build_filter(exempt)
    ip = 0x4000_1000
    for advice in range(0, 120):
        want = NOTIFY if advice in GUARDED_ADVICE else ALLOW
        assert run_filter(prog, 28, X64, ip, (0x1000, 0x1000, advice)) == want, advice
        assert run_filter(prog, 28 | X32_SYSCALL_BIT, X64, ip, (0, 0, advice)) == want
        assert run_filter(prog, 219, AUDIT_ARCH_I386, ip, (0, 0, advice)) == want
    # the high word of the advice argument is ignored, like the kernel's int
    assert run_filter(prog, 28, X64, ip, (0, 0, (1 << 32) | 4)) == NOTIFY
    assert run_filter(prog, 25, X64, ip, (0, 0, 0)) == NOTIFY  # mremap
    assert run_filter(prog, 163, AUDIT_ARCH_I386, ip, (0, 0, 0)) == NOTIFY
    for nr in (0, 1, 9, 10, 11, 12, 59, 60, 202, 231, 317, 440):  # read .. process_madvise
        assert run_filter(prog, nr, X64, ip, (0, 0, 4)) == ALLOW, nr
    assert run_filter(prog, 28, 0xC00000B7, ip, (0, 0, 4)) == ALLOW  # another arch


def test_filter_lets_procksm_own_calls_through() -> None:
    ip = 0x7FFF_1234_5002
    prog = build_filter(ip)
    assert run_filter(prog, 28, X64, ip, (0, 0, 4)) == ALLOW
    # same low word, other high word; and the other way round
    assert run_filter(prog, 28, X64, ip + (1 << 32), (0, 0, 4)) == NOTIFY
    assert run_filter(prog, 28, X64, ip + 2, (0, 0, 4)) == NOTIFY
    assert run_filter(build_filter(None), 28, X64, ip, (0, 0, 4)) == NOTIFY


def test_guarded_range_follows_the_kernel() -> None:
    p = PAGE_SIZE
    assert guarded_range(28, X64, (p, 1, 4)) == (p, 2 * p)  # length rounded up
    assert guarded_range(28, X64, (p + 1, p, 4)) is None  # misaligned: EINVAL anyway
    assert guarded_range(28, X64, (p, 0, 4)) is None
    assert guarded_range(28, X64, (p, p, 3)) is None  # MADV_WILLNEED is not guarded
    assert guarded_range(25, X64, (p, 3 * p, p, 1)) == (p, 4 * p)
    assert guarded_range(219, AUDIT_ARCH_I386, ((1 << 32) | p, p, 8)) == (p, 2 * p)


def test_mremap_keeps_merged_mappings_only_when_anonymous_memory_would_move_alike() -> None:
    p = PAGE_SIZE
    assert mremap_may_keep_merged(25, X64, (p, 4 * p, 4 * p, 3, 8 * p))  # move
    assert mremap_may_keep_merged(25, X64, (p, 4 * p, 2 * p, 1, 0))  # shrink
    assert not mremap_may_keep_merged(25, X64, (p, 4 * p, 8 * p, 1, 0))  # grow
    assert not mremap_may_keep_merged(25, X64, (p, 4 * p, 4 * p, 1 | 2 | 4, 8 * p))  # DONTUNMAP
    assert not mremap_may_keep_merged(28, X64, (p, 4 * p, 4 * p, 0, 0))


# --------------------------------------------------------------------------------------
# the guard process, with real targets
# --------------------------------------------------------------------------------------


def status(pid: int, key: str) -> str:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return line.split(":", 1)[1].strip()
    raise AssertionError(key)


def start_pair(spawn) -> list[Target]:  # type: ignore[no-untyped-def]
    require_privileges()
    exe = build_c_target("planted")
    return [spawn([exe, "--identical", N, "--unique", U, "--seed", 7]) for _ in "ab"]


def merge_pair(targets: list[Target], *, expect: int = 2 * N) -> None:
    ranges = [
        AddressRange(t.int(r), t.int(r) + t.int(r + "_pages") * PAGE_SIZE)
        for t in targets
        for r in ("identical", "unique")
    ]
    with MergeEngine(
        [t.pid for t in targets], MergeOptions(selection=ScanOptions(ranges=ranges))
    ) as eng:
        res = eng.run()
    assert res.pages_merged == expect, res.as_json()


def test_the_guard_outlives_the_procksm_that_started_it(spawn, guard_dir) -> None:  # type: ignore[no-untyped-def]
    a, b = start_pair(spawn)
    proc = run_procksm("merge", "--json", a.pid, b.pid)
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert all(p["guard_installed"] for p in doc["processes"])
    # procksm is gone; the guards are not (an active one and its
    # standby), and they answer for both
    assert len(guard_pids(guard_dir)) == 2
    listed = run_procksm("guard", "--list", "--json")
    assert {k.split("-")[0] for k in json.loads(listed.stdout)["guarded"]} == {
        str(a.pid),
        str(b.pid),
    }
    assert merged_ranges(a.pid)
    assert a.command("dontneed identical 3 2") == "OK"
    assert a.command("madvise identical 8 2 free") == "OK"
    for t in (a, b):
        assert t.command("check").startswith("OK"), t.pid
        assert t.command("errors") == "ERRORS 0"
    assert status(a.pid, "Seccomp") == "2" and status(a.pid, "Seccomp_filters") == "1"
    # a second merge of the same targets does not stack another filter
    proc = run_procksm("merge", "--json", a.pid, b.pid)
    assert proc.returncode == 0, proc.stderr
    assert status(a.pid, "Seccomp_filters") == "1"
    assert not any(p["guard_installed"] for p in json.loads(proc.stdout)["processes"])


def test_both_guards_killed_fail_the_calls_and_never_let_memory_read_stale(  # type: ignore[no-untyped-def]
    spawn, guard_dir
) -> None:
    """The exposure that remains: both guards SIGKILLed at the same instant (one kill
    is survived: tests/test_guard_life.py)."""
    a, b = start_pair(spawn)
    merge_pair([a, b])
    deadline = time.monotonic() + 10
    while len(guard_pids(guard_dir)) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    pids = guard_pids(guard_dir)
    assert len(pids) == 2
    for gpid in pids:
        os.kill(gpid, signal.SIGKILL)
    deadline = time.monotonic() + 5
    while guard_pids(guard_dir) and time.monotonic() < deadline:
        time.sleep(0.01)
    # a notify filter without a listener: the kernel fails the call, memory unchanged
    assert a.command("dontneed identical 3 1") == f"ERR errno={errno.ENOSYS}"
    assert a.command("dontneed unique 0 1") == f"ERR errno={errno.ENOSYS}"
    assert a.command("madvise identical 0 1 cold") == "OK"  # not guarded: unaffected
    for t in (a, b):
        assert t.command("check").startswith("OK")
    # procksm merging them again installs a new guard; the newest filter's listener
    # gets the notifications, so the calls work again
    merge_pair([a, b], expect=0)  # nothing new to merge; the guard is new
    assert status(a.pid, "Seccomp_filters") == "2"
    assert a.command("dontneed identical 3 1") == "OK"
    for t in (a, b):
        assert t.command("check").startswith("OK")


def test_a_fresh_guard_has_its_standby_before_any_target(guard_dir) -> None:  # type: ignore[no-untyped-def]
    """`procksm merge` starts the guard before its scan, without waiting for it
    (GuardClient.start), and a fresh guard starts its standby at once: both start while
    procksm scans, not in its first target's stop windows (their start-up on the other
    CPU made those windows 2.7-6.2 ms instead of ~0.9, docs/design.md §8)."""
    client = GuardClient()
    started = time.monotonic()
    client.start()
    assert time.monotonic() - started < 0.05  # it does not wait for the guard
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if len(guard_pids(guard_dir)) == 2 and client.stats().get("peer_ready"):
            break
        time.sleep(0.02)
    assert len(guard_pids(guard_dir)) == 2, guard_pids(guard_dir)
    assert client.stats()["peer_ready"]
    assert client.list() == []  # no target yet
    client.start()  # a guard runs: nothing more is started
    time.sleep(0.2)
    assert len(guard_pids(guard_dir)) == 2


def test_the_guard_exits_when_nothing_is_left_to_guard(spawn, guard_dir) -> None:  # type: ignore[no-untyped-def]
    a, b = start_pair(spawn)
    sock = guard_dir / "guard.sock"
    guard = subprocess.Popen(
        [sys.executable, "-m", "procksm", "guard", "--socket", sock, "--idle-exit", "0.5"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 10
        while not sock.exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        merge_pair([a, b])  # uses the running guard, which started its standby
        pids = guard_pids(guard_dir)
        assert guard.pid in pids and len(pids) == 2
        time.sleep(1.0)
        assert guard.poll() is None  # guarded targets alive: it stays
        a.kill()
        b.kill()
        assert guard.wait(timeout=10) == 0
        out = guard.stdout.read() if guard.stdout else ""
        assert "no task uses the filter any more" in out
        assert not sock.exists()
        deadline = time.monotonic() + 5
        while guard_pids(guard_dir) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert not guard_pids(guard_dir)  # the standby too
    finally:
        if guard.poll() is None:
            guard.kill()


def test_guard_socket_rejects_bad_requests(spawn, guard_dir) -> None:  # type: ignore[no-untyped-def]
    a, b = start_pair(spawn)
    merge_pair([a, b])
    sock = str(guard_dir / "guard.sock")
    assert oct(os.stat(sock).st_mode & 0o777) == "0o600"
    for request in (b"hello\n", b"guard 1 2\n", b"guard x y z\n", b"\xff" * 5000 + b"\n"):
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(5)
            s.connect(sock)
            s.sendall(request)
            assert s.recv(4096).startswith(b"error:"), request[:20]
    # a client of another user is refused even if it could connect
    code = (
        "import os, socket; os.setgid(65534); os.setuid(65534); "
        f"s = socket.socket(socket.AF_UNIX); s.connect({sock!r}); s.sendall(b'list\\n'); "
        "print(s.recv(100).decode().strip())"
    )
    os.chmod(guard_dir, 0o755)
    os.chmod(sock, 0o666)
    try:
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    finally:
        os.chmod(sock, 0o600)
    assert out.stdout.strip() == "error: permission denied", out
    # the guard is unaffected: still guarding, still answering
    assert a.command("dontneed identical 1 1") == "OK"
    assert a.command("check").startswith("OK")


FORKER = r"""
import mmap, os, sys
PRIV = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS
data = mmap.mmap(-1, 8 << 20, flags=PRIV)
for i in range(0, 8 << 20, 4096):
    data[i:i + 8] = (i // 4096 + 1).to_bytes(8, "little")
print("READY pid=%d" % os.getpid(), flush=True)
sys.stdin.readline()                      # "fork"
r, w = os.pipe()
child = os.fork()
if child == 0:
    more = mmap.mmap(-1, 4 << 20, flags=PRIV)   # new memory after the fork, to merge
    for i in range(0, 4 << 20, 4096):
        more[i:i + 8] = (i // 4096 + 7).to_bytes(8, "little")
    os.write(w, b"x")
    os.read(r, 1) if False else sys.stdin.readline()
    os._exit(0)
os.read(r, 1)
print("CHILD pid=%d" % child, flush=True)
sys.stdin.readline()
"""


def test_a_child_of_a_guarded_process_is_guarded_by_the_inherited_filter(  # type: ignore[no-untyped-def]
    spawn, guard_dir
) -> None:
    """The kernel allows one listener per filter chain (seccomp() fails with EBUSY): a
    child forked after its parent was guarded carries the guard's filter already, and
    procksm recognises it (PTRACE_SECCOMP_GET_FILTER) instead of refusing the child."""
    require_privileges()
    parent = spawn([sys.executable, "-c", FORKER])
    twin = spawn([sys.executable, "-c", FORKER])
    with MergeEngine([parent.pid, twin.pid], MergeOptions()) as eng:
        res = eng.run()
    assert all(t.guard_installed for t in res.targets), res.as_json()
    answer = parent.command("fork")
    child = int(answer.split("=")[1])
    assert status(child, "Seccomp_filters") == "1"
    # the child's new memory duplicates the twin's? no: merge it with the child's own
    # copy in the twin after the twin forks too
    answer = twin.command("fork")
    twin_child = int(answer.split("=")[1])
    with MergeEngine([child, twin_child], MergeOptions()) as eng:
        res = eng.run()
    doc = res.as_json()
    assert not [r for r in doc["refused"] if "seccomp" in r["reason"]], doc["refused"]
    assert all(t.error is None for t in res.targets), doc
    assert res.pages_merged >= 2 * 1024  # the 4 MiB each child wrote after its fork
    assert sum(Truth([child, twin_child]).sites.values()) >= 2 * 1024  # pagemap agrees
    assert status(child, "Seccomp_filters") == "1"  # nothing stacked
