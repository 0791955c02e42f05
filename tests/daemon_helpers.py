"""Helpers for the `procksm attach` tests: a daemon subprocess and pagemap truth.

The truth is computed here from /proc/PID/maps and /proc/PID/pagemap directly (not with
procksm's own helpers): a page of one of procksm's mappings (path /memfd:procksm-seg-*)
that is present and file-backed (bit 61) shares a memfd frame; present and not
file-backed, a write copied it (a COW break).
"""

from __future__ import annotations

import json
import os
import signal
import struct
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from tests.conftest import ROOT

PAGE = 4096
# `procksm attach` arguments for small targets: no CPU cap, short sleeps (pagemap
# observer; FAST_BPF: the eBPF one)
FAST_BPF = ("--cpu-limit", "0", "--sleep-ms", "5", "-q")
FAST = (*FAST_BPF, "--no-bpf")
PRESENT = 1 << 63
FILE = 1 << 61
PFN = (1 << 55) - 1


def pagemap(pid: int, start: int, end: int) -> np.ndarray:
    n = (end - start) // PAGE
    with open(f"/proc/{pid}/pagemap", "rb") as f:
        f.seek(start // PAGE * 8)
        data = f.read(n * 8)
    return np.frombuffer(data, dtype=np.uint64)


def merged_vmas(pid: int) -> list[tuple[int, int]]:
    out = []
    for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
        parts = line.split()
        if len(parts) >= 6 and parts[5].startswith("/memfd:procksm-seg-"):
            a, b = parts[0].split("-")
            out.append((int(a, 16), int(b, 16)))
    return out


def zero_pfn() -> int:
    import mmap

    m = mmap.mmap(-1, PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    _ = m[0]
    import ctypes

    addr = ctypes.addressof(ctypes.c_char.from_buffer(m))
    (entry,) = struct.unpack("<Q", pagemap(os.getpid(), addr, addr + PAGE).tobytes())
    del addr
    return int(entry & PFN)


class Truth:
    """Counters of procksm's mappings in ``pids`` from pagemap."""

    def __init__(self, pids: list[int]) -> None:
        self.sites: dict[int, int] = {}
        self.cow: dict[int, int] = {}
        pfns = []
        for pid in pids:
            sites = cow = 0
            for a, b in merged_vmas(pid):
                e = pagemap(pid, a, b)
                present = (e & np.uint64(PRESENT)) != 0
                filep = (e & np.uint64(FILE)) != 0
                sites += int((present & filep).sum())
                cow += int((present & ~filep).sum())
                pfns.append(e[present & filep] & np.uint64(PFN))
            self.sites[pid] = sites
            self.cow[pid] = cow
        allp = np.concatenate(pfns) if pfns else np.zeros(0, np.uint64)
        self.pages_shared = int(np.unique(allp).size)
        self.pages_sharing = int(allp.size) - self.pages_shared


def frames_in_use(pids: list[int]) -> int:
    """Distinct frames behind the private read-write anonymous memory of ``pids`` and
    procksm's segment mappings in them (present pages; the kernel's zero page costs
    none): what their private data costs the machine, whoever merged what. Merges and
    dropped zero pages lower it; the programs' own allocations raise it."""
    zero = np.uint64(zero_pfn())
    pfns = []
    for pid in pids:
        for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
            parts = line.split()
            path = parts[5] if len(parts) >= 6 else ""
            ours = path.startswith("/memfd:procksm-seg-")
            if parts[1][:2] != "rw" or parts[1][3] != "p" or not (ours or path in ("", "[heap]")):
                continue
            a, b = (int(x, 16) for x in parts[0].split("-"))
            e = pagemap(pid, a, b)
            frames = e[(e & np.uint64(PRESENT)) != 0] & np.uint64(PFN)
            pfns.append(frames[frames != zero])
    return int(np.unique(np.concatenate(pfns)).size) if pfns else 0


def zero_or_absent(pid: int, start: int, end: int) -> int:
    e = pagemap(pid, start, end)
    present = (e & np.uint64(PRESENT)) != 0
    zp = (e & np.uint64(PFN)) == np.uint64(zero_pfn())
    return int((~present | zp).sum())


def wait_for(pred: Callable[[], Any], timeout: float = 30.0, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = pred()
        if last:
            return last
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout} s waiting for {what} (last: {last!r})")


class DaemonProc:
    """`python -m procksm attach` in a subprocess, with its own control socket."""

    def __init__(self, sock: Path, pids: list[int], *args: object, wait: bool = True) -> None:
        self.sock = str(sock)
        self.stderr_path = sock.with_suffix(".stderr")
        self.err = open(self.stderr_path, "w+")  # noqa: SIM115 (closed in stop)
        cmd = [sys.executable, "-m", "procksm", "attach", *map(str, pids), "--control",
               self.sock, *map(str, args)]  # fmt: skip
        # its own process group, as under a supervisor: SIGKILL goes to all of it (stop)
        self.proc = subprocess.Popen(
            cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=self.err, start_new_session=True
        )
        if wait:
            wait_for(self._ready, 30, "the daemon's control socket")

    def _ready(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"daemon exited {self.proc.returncode}: {self.stderr()}")
        if not os.path.exists(self.sock):
            return False
        try:
            self.stats()
            return True
        except Exception:
            return False

    def request(self, line: str) -> str:
        from procksm.control import request

        return request(self.sock, line)

    def ctl(self, line: str) -> str:
        answer = self.request(line)
        assert answer.startswith("ok"), answer
        return answer

    def stats(self) -> dict[str, Any]:
        return dict(json.loads(self.request("stats --json")))

    def fresh_stats(self) -> dict[str, Any]:
        """A snapshot taken after this call started (the daemon publishes every ~1 s)."""
        t0 = time.time()
        return dict(
            wait_for(lambda: (s := self.stats())["time"] > t0 + 0.05 and s, 10, "fresh stats")
        )

    def pause(self) -> dict[str, Any]:
        """run=0, then a snapshot taken after the current batch has finished."""
        self.ctl("set run=0")
        self.fresh_stats()
        return self.fresh_stats()

    def stderr(self) -> str:
        if not self.err.closed:
            self.err.flush()
        return self.stderr_path.read_text()

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> int:
        if self.proc.poll() is None:
            if sig == signal.SIGKILL:
                from tests.test_kill_steps import kill_group

                kill_group(self.proc)  # every process of procksm's group
            else:
                self.proc.send_signal(sig)
        try:
            rc = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            rc = self.proc.wait()
        self.err.close()
        return rc


def targets_by_pid(stats: dict[str, Any]) -> dict[int, dict[str, Any]]:
    return {t["pid"]: t for t in stats["targets"]}


def traced_by(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("TracerPid:"):
            return int(line.split()[1])
    return 0
