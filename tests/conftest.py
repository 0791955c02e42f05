"""Shared test fixtures.

Tests that need root, ptrace or PFNs in pagemap use ``require_privileges()``: on a user's
machine they skip with the reason; under ``CI=true`` they *fail*, because CI's machine
supports everything and a skip there would hide a broken test.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
TARGETS_SRC = ROOT / "tests" / "targets"
BUILD = ROOT / "build" / "targets"
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def _typed_libc() -> ctypes.CDLL:
    """libc with the signatures the tests call on their own memory (64-bit pointers)."""
    lib = ctypes.CDLL(None, use_errno=True)
    lib.mmap.restype = ctypes.c_void_p
    lib.mmap.argtypes = [
        ctypes.c_void_p,
        ctypes.c_size_t,
        ctypes.c_int,
        ctypes.c_int,
        ctypes.c_int,
        ctypes.c_long,
    ]
    lib.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    lib.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    lib.mlock.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    lib.syscall.restype = ctypes.c_long
    return lib


LIBC = _typed_libc()


def run_procksm(*args: object, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """`python -m procksm ARGS` from the repository root, output captured."""
    return subprocess.run(
        [sys.executable, "-m", "procksm", *(str(a) for a in args)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=timeout,
    )


def skip_or_fail(reason: str) -> None:
    """Skip on a user's machine; fail under CI=true (CI supports everything)."""
    if IN_CI:
        pytest.fail(f"CI=true and this test cannot run: {reason}")
    pytest.skip(reason)


def machine_lacks(feature: str, unit_tested_in: str) -> None:
    """Skip, also under CI=true: this machine's CPU or kernel does not have ``feature``
    (protection keys, named anonymous VMAs), so no process here can carry it and the
    test has nothing real to run on. The only skip CI allows: it is a fact about the
    machine, not a broken test, and it is reported (-ra), never counted as a pass. The
    rule itself is unit-tested on parsed /proc text (``unit_tested_in``)."""
    pytest.skip(f"this machine lacks {feature}; the rule is unit-tested in {unit_tested_in}")


def _pagemap_has_pfns() -> bool:
    try:
        with open("/proc/self/pagemap", "rb") as f:
            import struct

            buf = bytearray(8)
            addr = id(buf)  # some present heap page
            f.seek((addr // 4096) * 8)
            (entry,) = struct.unpack("<Q", f.read(8))
            return bool(entry >> 63) and (entry & ((1 << 55) - 1)) != 0
    except OSError:
        return False


def require_privileges() -> None:
    if os.geteuid() != 0:
        skip_or_fail("needs root (ptrace of any process, PFNs in /proc/PID/pagemap)")
    if not _pagemap_has_pfns():
        skip_or_fail("/proc/PID/pagemap does not expose PFNs (needs CAP_SYS_ADMIN)")


@pytest.fixture
def privileged() -> None:
    require_privileges()


def build_c_target(name: str, *extra: str) -> Path:
    """Compile tests/targets/<name>.c (cached by mtime) and return the binary's path."""
    src = TARGETS_SRC / f"{name}.c"
    out = BUILD / name
    BUILD.mkdir(parents=True, exist_ok=True)
    if not out.exists() or out.stat().st_mtime < src.stat().st_mtime:
        tmp = out.with_suffix(f".tmp{os.getpid()}")
        subprocess.run(
            ["gcc", "-O2", "-g", "-Wall", "-pthread", "-o", str(tmp), str(src), *extra],
            check=True,
        )
        os.replace(tmp, out)
    return out


@pytest.fixture(scope="session")
def python_exe() -> str:
    return sys.executable


class Target:
    """A started target process that prints ``READY ...`` once set up.

    The READY line carries ``key=value`` pairs (addresses, page counts) that the test
    asserts against. ``check()`` asks the target to verify its own memory (SIGUSR1) and
    returns its verdict line.
    """

    def __init__(self, argv: list[str], env: dict[str, str] | None = None, **popen: object) -> None:
        self.proc = subprocess.Popen(
            argv,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=None,
            text=True,
            env=env,
            **popen,  # type: ignore[arg-type,call-overload]
        )
        self.pid = self.proc.pid
        self.info: dict[str, str] = {}
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line.startswith("READY"):
            self.kill()
            raise RuntimeError(f"target {argv[0]} did not start: {line!r}")
        for tok in line.split()[1:]:
            k, _, v = tok.partition("=")
            self.info[k] = v

    def int(self, key: str) -> int:
        return int(self.info[key], 0)

    def command(self, cmd: str, timeout: float = 30.0) -> str:
        """Send one command line on stdin, return the target's one-line answer."""
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(cmd + "\n")
        self.proc.stdin.flush()
        import select

        r, _, _ = select.select([self.proc.stdout], [], [], timeout)
        if not r:
            raise TimeoutError(f"target {self.pid} did not answer {cmd!r}")
        line = self.proc.stdout.readline()
        if not line:
            rc = self.proc.wait(timeout=5)
            how = f"signal {-rc}" if rc < 0 else f"exit code {rc}"
            raise RuntimeError(f"target {self.pid} died ({how}) before answering {cmd!r}")
        return line.strip()

    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


@pytest.fixture
def spawn() -> Iterator[object]:
    started: list[Target] = []

    def _spawn(argv: list[str], **kw: object) -> Target:
        t = Target([str(a) for a in argv], **kw)  # type: ignore[arg-type]
        started.append(t)
        return t

    yield _spawn
    for t in started:
        t.kill()


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--long",
        action="store_true",
        help="longer variants of the reliability suite (10x the rounds; PROCKSM_LONG=1)",
    )


def pytest_configure(config: pytest.Config) -> None:
    # Read at import time by the test modules, which are imported after this hook.
    if config.getoption("--long", default=False):
        os.environ["PROCKSM_LONG"] = "1"


# --- two tiers: unit tests (no root, seconds) and integration tests (`root`) ---
#
# `pytest -m "not root"` (= `make unit`) is the unit tier: pure parsing and logic, no
# root, no process of its own. A test is marked `root` when it, one of its fixtures or a
# helper of its module (transitively) asks for privileges, starts a process or runs
# procksm: the names below. A test can also say so itself with @pytest.mark.root or a
# module's `pytestmark`. `make test` runs both tiers.

ROOT_FIXTURES = frozenset({"privileged", "planted", "guard_dir", "daemons", "spawn"})
ROOT_CALLS = (
    "require_privileges(",
    "skip_or_fail(",
    "run_procksm(",
    "build_c_target(",
    "spawn_planted(",
    "spawn_canary_targets(",
    "subprocess.",
    "os.fork(",
)
# A call by name, not a longer name that ends the same way or a method of that name.
_ROOT_CALL = re.compile(r"(?<![\w.])(?:" + "|".join(re.escape(c) for c in ROOT_CALLS) + ")")


def _calls(src: str, names: set[str] | frozenset[str]) -> bool:
    """Does `src` call a ROOT_CALLS entry or one of `names` (helpers that need root)?"""
    return bool(_ROOT_CALL.search(src)) or any(
        re.search(rf"(?<![\w.]){re.escape(n)}\(", src) for n in names
    )


def _source(obj: object) -> str:
    import inspect

    try:
        return inspect.getsource(obj)  # type: ignore[arg-type]
    except (OSError, TypeError):
        return ""


_module_cache: dict[str, frozenset[str]] = {}


def _root_helpers(module: Any) -> frozenset[str]:
    """Names of the module's own functions and classes that need root (to a fixpoint)."""
    import inspect

    name = module.__name__
    if name in _module_cache:
        return _module_cache[name]
    own = {
        n: _source(obj)
        for n, obj in vars(module).items()
        if (inspect.isfunction(obj) or inspect.isclass(obj))
        and getattr(obj, "__module__", None) == name
        and not n.startswith("test_")
    }
    found: set[str] = set()
    changed = True
    while changed:
        changed = False
        for n, src in own.items():
            if n in found:
                continue
            if _calls(src, found):
                found.add(n)
                changed = True
    _module_cache[name] = frozenset(found)
    return _module_cache[name]


def _needs_root(item: pytest.Function) -> bool:
    if item.get_closest_marker("root"):
        return True
    if ROOT_FIXTURES & set(item.fixturenames):
        return True
    helpers = _root_helpers(item.module)
    sources = [_source(item.function)]
    for defs in item._fixtureinfo.name2fixturedefs.values():
        func = defs[-1].func
        if getattr(func, "__module__", "").startswith("tests"):
            sources.append(_source(func))
    return any(_calls(src, helpers) for src in sources)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if isinstance(item, pytest.Function) and _needs_root(item):
            item.add_marker(pytest.mark.root)


# --- the madvise guard's tests (tests/test_guard.py, tests/test_guard_life.py) ---

CGROUP2 = "/sys/fs/cgroup/unified"  # this machine's cgroup v2 mount (docs/design.md §4)


def scratch_cgroup(prefix: str) -> Path:
    """A new cgroup v2 directory for one test (remove it with remove_cgroup)."""
    import tempfile

    root = Path(CGROUP2)
    if not (root / "cgroup.procs").exists():
        skip_or_fail(f"no cgroup v2 hierarchy at {CGROUP2}")
    return Path(tempfile.mkdtemp(prefix=prefix, dir=root))


def cgroup_pids(cg: Path) -> list[int]:
    try:
        return [int(x) for x in (cg / "cgroup.procs").read_text().split()]
    except FileNotFoundError:
        return []


def remove_cgroup(cg: Path) -> None:
    """SIGKILL what is left in it, then remove it (rmdir of an empty cgroup)."""
    import time

    deadline = time.monotonic() + 10
    while True:
        pids = cgroup_pids(cg)
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        try:
            cg.rmdir()
            return
        except FileNotFoundError:
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.02)


def guard_pids(d: Path) -> list[int]:
    """The guard processes (procksm.guardd) serving the socket in directory ``d``."""
    out = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"procksm.guardd" in cmd and str(d / "guard.sock").encode() in cmd:
            out.append(int(pid))
    return out


@pytest.fixture
def guard_dir(monkeypatch):  # type: ignore[no-untyped-def]
    """A private lock directory, hence a private guard pair, in a scratch cgroup of its
    own (PROCKSM_GUARD_CGROUP); killed at the end. Directly under /tmp, so a test can
    let another user reach the socket."""
    import shutil
    import tempfile

    require_privileges()
    d = Path(tempfile.mkdtemp(prefix="procksm-guard-test-"))
    cg = scratch_cgroup("procksm-test-guard-")
    monkeypatch.setenv("PROCKSM_LOCK_DIR", str(d))
    # PROCKSM_GUARD_TEST_OFF=cgroup: the guards stay where they start (to see
    # tests/test_guard_life.py fail without their own cgroup)
    off = os.environ.get("PROCKSM_GUARD_TEST_OFF") == "cgroup"
    monkeypatch.setenv("PROCKSM_GUARD_CGROUP", "none" if off else str(cg))
    yield d
    for pid in guard_pids(d):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    remove_cgroup(cg)
    shutil.rmtree(d, ignore_errors=True)


def thread_states(pid: int) -> dict[int, tuple[str, str]]:
    """{tid: (state letter, TracerPid)} of a process's threads (exited ones skipped)."""
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            stat = Path(f"/proc/{pid}/task/{tid}/stat").read_text()
            status = Path(f"/proc/{pid}/task/{tid}/status").read_text()
        except OSError:
            continue
        tracer = next(x for x in status.splitlines() if x.startswith("TracerPid:")).split()[1]
        out[int(tid)] = (stat.rsplit(")", 1)[1].split()[0], tracer)
    return out


def _describe_held(pid: int, held: dict[int, tuple[str, str]]) -> str:
    """Each held thread's state, where it sleeps and in which call, and its tracer's
    command line: enough to tell a procksm left behind from a guard's short kick."""

    def read(path: str) -> str:
        try:
            return Path(path).read_bytes()[:120].replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            return "?"

    parts = []
    for tid, (state, tracer) in sorted(held.items()):
        task = f"/proc/{pid}/task/{tid}"
        who = read(f"/proc/{tracer}/cmdline").strip() if tracer != "0" else "-"
        parts.append(
            f"tid {tid} state {state} wchan {read(task + '/wchan')} "
            f"syscall {read(task + '/syscall').split(' ')[0]} tracer {tracer} ({who})"
        )
    return "; ".join(parts)


def spawn_planted(
    spawn: Any, n: int, identical: int, zero: int, unique: int, seed: int, *extra: object
) -> list[Target]:
    """``n`` planted targets with the same regions (identical across them, by ``seed``)."""
    exe = build_c_target("planted")
    argv = [exe, "--identical", identical, "--zero", zero, "--unique", unique, "--seed", seed]
    return [spawn([*argv, *extra]) for _ in range(n)]


def spawn_canary_targets(
    spawn: Any, n: int, identical: int, seed: int, *extra: object
) -> list[Target]:
    """``n`` planted targets with ``--canaries`` (register/FPU, signal mask/altstack, SIGUSR1
    and counters-writer canaries, plus the blockers) and ``identical`` pages by ``seed``."""
    exe = build_c_target("planted")
    argv = [exe, "--identical", identical, "--seed", seed, "--canaries"]
    return [spawn([*argv, *extra]) for _ in range(n)]


def assert_not_held(pid: int) -> None:
    """No thread of ``pid`` stopped or traced (a procksm left behind would hold them)."""
    # A live procksm process's window (the guard's unmerge helper ending its session,
    # a guard's kick) holds threads for milliseconds: wait that out, not more.
    deadline = time.monotonic() + 5
    while True:
        states = thread_states(pid)
        held = {tid: st for tid, st in states.items() if st[0] in ("t", "T") or st[1] != "0"}
        if not held or time.monotonic() > deadline:
            break
        time.sleep(0.01)
    assert not held, f"threads stopped or traced for 5 s: {_describe_held(pid, held)}"


def assert_target_intact(t: Target) -> None:
    """Alive, no thread stopped or traced, memory, blockers and canaries all clean."""
    assert t.alive(), f"target {t.pid} died"
    assert_not_held(t.pid)
    verdict = t.command("check")
    assert verdict.startswith("OK"), verdict
    assert t.command("errors") == "ERRORS 0"
    assert t.command("canaries") == "CANARIES 0 -"


# --- the daemon tests' shared fixtures (tests/test_daemon.py, tests/test_remerge.py) ---


@pytest.fixture
def planted() -> Path:
    require_privileges()
    return build_c_target("planted")


@pytest.fixture
def daemons() -> Any:
    from tests.daemon_helpers import DaemonProc

    started: list[DaemonProc] = []

    def start(sock: Path, pids: list[int], *args: object, wait: bool = True) -> DaemonProc:
        d = DaemonProc(sock, pids, *args, wait=wait)
        started.append(d)
        return d

    yield start
    for d in started:
        d.stop(signal.SIGKILL if d.proc.poll() is None else signal.SIGTERM, timeout=10)
