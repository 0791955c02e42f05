"""The processes a benchmark measures, started fresh for each run and killed afterwards:
planted processes (tests/targets/planted.c), Python interpreters holding a numpy array,
redis-server instances, JVM and node workers (tests/targets/runtimes/). Each is a
``Target``: a pid, its regions, and a ``check`` of its own memory after the run."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import ClassVar

from benchmarks.harness.common import ROOT
from procksm import PAGE_SIZE
from tests.runtime_workers import parse_status, worker_argv

# prctl(PR_SET_MEMORY_MERGE=67, 1), then exec: the flag is inherited across exec (6.7+)
MERGE_ANY_WRAPPER = (
    "import ctypes, os, sys\n"
    "libc = ctypes.CDLL(None, use_errno=True)\n"
    "if libc.prctl(67, 1, 0, 0, 0) != 0:\n"
    "    sys.exit(f'prctl(PR_SET_MEMORY_MERGE): {os.strerror(ctypes.get_errno())}')\n"
    "os.execv(sys.argv[1], sys.argv[1:])\n"
)

NUMPY_WORKER = (
    "import hashlib, os, sys\n"
    "import numpy as np\n"
    "a = np.random.default_rng(int(sys.argv[2])).random(int(sys.argv[1]) * 131072)\n"
    "names = {f'key{i}': str(i) * 5 for i in range(50000)}\n"
    "digest = hashlib.sha256(a.data).hexdigest()\n"
    "print(f'READY pid={os.getpid()}', flush=True)\n"
    "for line in sys.stdin:\n"
    "    if line.strip() == 'check':\n"
    "        ok = hashlib.sha256(a.data).hexdigest() == digest and len(names) == 50000\n"
    "        print(f'OK pages={a.nbytes // 4096}' if ok else 'CORRUPT array', flush=True)\n"
    "    elif line.strip() == 'quit':\n"
    "        break\n"
)


def build_c(src: Path, out: Path, *flags: str) -> Path:
    """``src`` compiled to ``out`` (gcc -O2 -Wall ``flags``) unless ``out`` is newer."""
    out.parent.mkdir(parents=True, exist_ok=True)
    if not out.exists() or out.stat().st_mtime < src.stat().st_mtime:
        tmp = out.with_suffix(f".tmp{os.getpid()}")
        subprocess.run(["gcc", "-O2", *flags, "-Wall", "-o", str(tmp), str(src)], check=True)
        os.replace(tmp, out)
    return out


def build_planted() -> Path:
    """Compile tests/targets/planted.c like tests/conftest.py's build_c_target."""
    src = ROOT / "tests" / "targets" / "planted.c"
    return build_c(src, ROOT / "build" / "targets" / "planted", "-g", "-pthread")


@dataclass
class Target:
    proc: subprocess.Popen[str]
    regions: dict[str, tuple[int, int]]  # name -> (start address, pages)
    threads: int = 1

    @property
    def pid(self) -> int:
        return self.proc.pid

    def ask(self, command: str) -> str:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        return self.proc.stdout.readline().strip()


class RealTarget(Target):
    """A real program: its regions are the private anonymous VMAs it had at start."""

    checker: Callable[[], str] | None = None

    def ask(self, command: str) -> str:
        if command == "check" and self.checker is not None:
            return self.checker()
        return super().ask(command)


class Running:
    """The targets of the run in progress, so that an interrupt can stop them."""

    targets: ClassVar[list[Target]] = []


@contextmanager
def fresh_targets(start: Callable[[], list[Target]]) -> Iterator[list[Target]]:
    """Targets started for one run, stopped when it ends, however it ends."""
    Running.targets = start()
    try:
        yield Running.targets
    finally:
        stop_targets(Running.targets)
        Running.targets = []


# --------------------------------------------------------------------------------------
# Planted processes
# --------------------------------------------------------------------------------------


def spawn_planted(cmds: Sequence[Sequence[str]]) -> list[Target]:
    """One planted process per command line, started together; each READY line's regions
    (every ``NAME=addr NAME_pages=n`` pair with n > 0) become the Target's regions."""
    procs = [
        subprocess.Popen(list(cmd), stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        for cmd in cmds
    ]
    targets = []
    try:
        for p in procs:
            assert p.stdout is not None
            line = p.stdout.readline()
            if not line.startswith("READY"):
                raise RuntimeError(f"planted (pid {p.pid}) did not start: {line!r}")
            info = dict(kv.split("=", 1) for kv in line.split()[1:])
            regions = {
                r: (int(info[r], 16), int(info[f"{r}_pages"]))
                for r in info
                if f"{r}_pages" in info and r != "sparse"
            }
            nthreads = 1 + int(info.get("threads", "0"))
            targets.append(Target(p, {r: v for r, v in regions.items() if v[1]}, nthreads))
    except BaseException:
        stop_targets([Target(p, {}) for p in procs])
        raise
    return targets


def stop_targets(targets: Sequence[Target]) -> None:
    for t in targets:
        if t.proc.poll() is None:
            t.proc.kill()
    for t in targets:
        t.proc.wait()
        for f in (t.proc.stdin, t.proc.stdout):
            if f is not None:
                f.close()


def verify_targets(targets: Sequence[Target]) -> str:
    """Each target re-generates its expected content and compares (planted's `check`)."""
    bad = [f"pid {t.pid}: {r}" for t in targets if not (r := t.ask("check")).startswith("OK")]
    return "; ".join(bad) if bad else "OK"


# --------------------------------------------------------------------------------------
# Real programs
# --------------------------------------------------------------------------------------


def anon_vmas(pid: int) -> dict[str, tuple[int, int]]:
    """Private anonymous read-write VMAs (heap included, stacks not): name -> (start, pages)."""
    out: dict[str, tuple[int, int]] = {}
    with open(f"/proc/{pid}/maps") as f:
        for line in f:
            parts = line.split()
            path = parts[5] if len(parts) > 5 else ""
            if parts[1][:2] != "rw" or parts[1][3] != "p" or path not in ("", "[heap]"):
                continue
            a, b = (int(x, 16) for x in parts[0].split("-"))
            out[f"vma{len(out)}"] = (a, (b - a) // PAGE_SIZE)
    return out


def _wrapped(cmd: list[str], mergeable: bool) -> list[str]:
    return [sys.executable, "-c", MERGE_ANY_WRAPPER, *cmd] if mergeable else cmd


def _ready_targets(what: str, procs: Sequence[subprocess.Popen[str]]) -> list[RealTarget]:
    """Processes started together, each a RealTarget once it printed its READY line."""
    targets: list[RealTarget] = []
    try:
        for p in procs:
            assert p.stdout is not None
            line = p.stdout.readline()
            if not line.startswith("READY"):
                raise RuntimeError(f"{what} (pid {p.pid}) did not start: {line!r}")
            targets.append(RealTarget(p, anon_vmas(p.pid)))
    except BaseException:
        stop_targets([Target(p, {}) for p in procs])
        raise
    return targets


def start_numpy(
    workers: int, mib: int, mergeable: bool, hugepage_advice: bool = True
) -> list[Target]:
    """NUMPY_WORKERs; numpy's defaults madvise(MADV_HUGEPAGE) arrays >= 4 MiB (procksm
    keeps the advice), ``hugepage_advice=False`` sets NUMPY_MADVISE_HUGEPAGE=0."""
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1"}
    if not hugepage_advice:
        env["NUMPY_MADVISE_HUGEPAGE"] = "0"
    cmd = _wrapped([sys.executable, "-c", NUMPY_WORKER, str(mib), "11"], mergeable)
    procs = [
        subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
        for _ in range(workers)
    ]
    return list(_ready_targets("numpy worker", procs))


def start_runtime(runtime: str, n: int, data_mib: int, mergeable: bool, cwd: Path) -> list[Target]:
    """``n`` JVM or node workers of tests/targets/runtimes/ (tests/runtime_workers.py)
    holding the same ``data_mib``; each one's check is its own verdict: every second it
    compares its data with the digests it took at start."""
    cmd = _wrapped(worker_argv(runtime, 15, data_mib), mergeable)
    # started together (a JVM compiles Worker.java first); a JVM's crash log
    # (hs_err_pid*.log) would land in cwd
    procs = [
        subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=cwd)
        for _ in range(n)
    ]
    targets = _ready_targets(f"{runtime} worker", procs)
    for t in targets:
        t.checker = partial(_self_check, t)
    return list(targets)


def _self_check(t: RealTarget) -> str:
    """A runtime worker's verdict: "OK" once it checked its data at least once and never
    found it changed."""
    if t.proc.poll() is not None:
        return f"CORRUPT exited {t.proc.returncode}"
    checks, mismatches = parse_status(t.ask("status"))
    if mismatches or not checks:
        return f"CORRUPT {mismatches} of {checks} checks found the data changed"
    return f"OK {checks} checks"


def _redis_cli(sock: str, *args: object) -> str:
    out = subprocess.run(
        ["redis-cli", "-s", sock, *(str(a) for a in args)],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    return out.stdout.strip()


def _redis_target(p: subprocess.Popen[str], sock: str, keys: int, size: int) -> RealTarget:
    """A started redis-server once it listens, populated; its check compares DEBUG DIGEST."""
    deadline = time.monotonic() + 20
    while not Path(sock).exists():
        if p.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"redis-server (pid {p.pid}) did not start")
        time.sleep(0.02)
    if _redis_cli(sock, "DEBUG", "POPULATE", keys, "key", size) != "OK":
        raise RuntimeError("DEBUG POPULATE failed")
    digest = _redis_cli(sock, "DEBUG", "DIGEST")
    t = RealTarget(p, anon_vmas(p.pid))

    def check() -> str:
        if p.poll() is not None:
            return f"CORRUPT exited {p.returncode}"
        now = _redis_cli(sock, "DEBUG", "DIGEST")
        return "OK digest" if now == digest else f"CORRUPT digest {now} != {digest}"

    t.checker = check
    return t


def start_redis(n: int, keys: int, size: int, mergeable: bool, tmp: Path) -> list[Target]:
    exe = shutil.which("redis-server")
    if exe is None or shutil.which("redis-cli") is None:
        raise RuntimeError("redis-server/redis-cli not installed (make setup installs them)")
    procs = []
    socks = []
    for k in range(n):
        sock = str(tmp / f"redis-{os.getpid()}-{k}-{time.monotonic_ns()}.sock")
        cmd = [exe, "--port", "0", "--unixsocket", sock, "--save", "", "--appendonly", "no"]
        cmd += ["--dir", str(tmp), "--enable-debug-command", "yes"]
        procs.append(
            subprocess.Popen(
                _wrapped(cmd, mergeable),
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                text=True,
            )
        )
        socks.append(sock)
    try:
        return [_redis_target(p, sock, keys, size) for p, sock in zip(procs, socks, strict=True)]
    except BaseException:
        stop_targets([Target(p, {}) for p in procs])
        raise
