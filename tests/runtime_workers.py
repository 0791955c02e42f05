"""The JVM and node workers of tests/targets/runtimes/ (issue 15): how to start them and
read their verdicts. Used by tests/test_real_programs.py and benchmarks/runtimes.py.

Each worker holds the same data as every other one started with the same seed, churns
its heap so that its garbage collector runs, checks its own data every second, prints
``READY pid=N data_mib=M`` once its data is built, and answers ``status`` on stdin with
``STATUS checks=N mismatches=M`` (and ``quit``).
"""

from __future__ import annotations

import shutil
from pathlib import Path

RUNTIMES_SRC = Path(__file__).resolve().parent / "targets" / "runtimes"
# OpenJDK 17's G1 with a 256 MiB heap, every page of it touched at start (issue 15)
JVM_FLAGS = ("-Xms256m", "-Xmx256m", "-XX:+AlwaysPreTouch", "-XX:+UseG1GC")
RUNTIMES = ("jvm", "node")


def runtime_exe(runtime: str) -> str | None:
    """The `java` or `node` on PATH, None if absent (scripts/setup.sh installs both)."""
    return shutil.which({"jvm": "java", "node": "node"}[runtime])


def worker_argv(runtime: str, seed: int, data_mib: int) -> list[str]:
    """The command line of one worker: `java Worker.java` (the single-file source
    launcher: no build step) or `node worker.js`."""
    exe = runtime_exe(runtime)
    if exe is None:
        raise FileNotFoundError(f"{runtime}: no {'java' if runtime == 'jvm' else 'node'} on PATH")
    if runtime == "jvm":
        return [exe, *JVM_FLAGS, str(RUNTIMES_SRC / "Worker.java"), str(seed), str(data_mib)]
    return [exe, str(RUNTIMES_SRC / "worker.js"), str(seed), str(data_mib)]


def parse_status(line: str) -> tuple[int, int]:
    """``STATUS checks=N mismatches=M`` -> (N, M); ValueError for anything else."""
    fields = line.split()
    if not fields or fields[0] != "STATUS":
        raise ValueError(f"not a worker's status line: {line!r}")
    values = dict(f.split("=", 1) for f in fields[1:])
    return int(values["checks"]), int(values["mismatches"])


# The data a CPython + numpy worker holds (tests/test_real_programs.py's WORKER,
# benchmarks/many_vmas.py's): the same in every worker but the dict's layout.
NUMPY_WORKER_DATA = r"""
import hashlib, sys
import numpy as np

rng = np.random.default_rng(1234)
table = rng.standard_normal((2048, 2048))            # 32 MiB, the same in every worker
ints = np.arange(4_000_000, dtype=np.int64) * 7       # 30 MiB
objects = {f"k{i}": ("v" * (i % 50), i, float(i)) for i in range(200_000)}
zeros = np.zeros(8 << 20, dtype=np.uint8)             # 8 MiB of zeros
zeros[::4096] = 0                                     # touched: present zero pages
"""
