"""What each kernel mechanism for watching page faults or system calls costs, by itself
(empty BPF programs, no procksm filter): to the process it watches and to one it does
not (issue 15: the observer must cost nothing to processes that are not targets).

    .venv/bin/python benchmarks/fault_hooks.py [--reps 15] [--iters 1000] [--pages 64]

Two benchmarks/fault_loop.c processes: A (watched by the per-task mechanisms) and B
(never watched). Per repetition, in a random order, each mechanism is set up, A's fault
loop, B's fault loop and B's getppid loop run once, and it is taken down:

* ``raw_tracepoint``: page_fault_user/kernel raw tracepoints, an empty program (main's
  observer: machine-wide);
* ``sw_event_count``: a software PERF_COUNT_SW_PAGE_FAULTS event on A (inherit), counting;
* ``sw_event_bpf``: the same, sample_period 1, an empty BPF_PROG_TYPE_PERF_EVENT program;
* ``tracepoint_event``: a perf event of exceptions:page_fault_user on A, counting (a BPF
  program on a tracepoint event would run for every task: the tracepoint's programs are
  one array per tracepoint, not per event);
* ``syscall_tracepoint``: one syscalls:sys_enter_munmap event with an empty program.

Judged on each loop's own CPU time per fault (per call); the paired difference against
``off`` of the same repetition, medians. Loads the programs with bcc (this process).
Writes benchmarks/results/fault_hooks.json.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import random
import statistics
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this checkout's procksm

from benchmarks.bpf_overhead import Loop, build_loop, others_probes
from benchmarks.harness.common import RESULTS, ROOT, Json
from procksm import procfs
from procksm.observe.bpf_syscall import raw_tracepoint_open
from procksm.observe.probes import (
    PERF_ATTR,
    PERF_TYPE_TRACEPOINT,
    perf_event_open,
    perf_tracepoint_open,
)

# include/uapi/linux/perf_event.h
PERF_TYPE_SOFTWARE = 1
PERF_COUNT_SW_PAGE_FAULTS = 2
DISABLED = 1 << 0  # perf_event_attr flag bits
INHERIT = 1 << 1  # new threads (and children) of the task get a copy of the event
INHERIT_THREAD = 1 << 35  # 5.13+: new threads only

Setup = Callable[[], list[int]]  # attaches a mechanism: the fds that hold it
Runs = dict[str, dict[str, list[float]]]  # mechanism -> workload -> ns per fault (call)


def counting_event(kind: int, config: int, pid: int) -> int:
    """A counting perf event (no samples, no program) on ``pid`` and its new threads."""
    fields = (kind, PERF_ATTR.size, config, 0, 0, 0, INHERIT | INHERIT_THREAD, 0)
    return perf_event_open(fields, pid, -1, None)


def mechanisms(progs: dict[str, int], a_pid: int) -> dict[str, Setup]:
    sampled = (PERF_TYPE_SOFTWARE, PERF_ATTR.size, PERF_COUNT_SW_PAGE_FAULTS, 1, 0, 0)
    flags = DISABLED | INHERIT | INHERIT_THREAD
    fault_tp = procfs.tracepoint_id("exceptions", "page_fault_user")
    return {
        "off": lambda: [],
        "raw_tracepoint": lambda: [
            raw_tracepoint_open(tp, progs[f"raw_tracepoint__{tp}"])
            for tp in ("page_fault_user", "page_fault_kernel")
        ],
        "sw_event_count": lambda: [
            counting_event(PERF_TYPE_SOFTWARE, PERF_COUNT_SW_PAGE_FAULTS, a_pid)
        ],
        "sw_event_bpf": lambda: [
            perf_event_open((*sampled, flags, 0), a_pid, -1, progs["on_perf_event"])
        ],
        "tracepoint_event": lambda: [counting_event(PERF_TYPE_TRACEPOINT, fault_tp, a_pid)],
        "syscall_tracepoint": lambda: [
            perf_tracepoint_open(
                "syscalls", "sys_enter_munmap", progs["tracepoint__syscalls__sys_enter_munmap"]
            )
        ],
    }


@contextlib.contextmanager
def attached(setup: Setup) -> Iterator[None]:
    fds = setup()
    try:
        yield
    finally:
        for fd in fds:
            os.close(fd)


def load_programs() -> tuple[Any, dict[str, int]]:
    from bcc import BPF  # the benchmark process loads them: it is not the daemon

    src = ROOT / "benchmarks" / "fault_hooks.bpf.c"
    bpf = BPF(text=src.read_text().encode())
    kinds = {
        "raw_tracepoint__page_fault_user": BPF.RAW_TRACEPOINT,
        "raw_tracepoint__page_fault_kernel": BPF.RAW_TRACEPOINT,
        "on_perf_event": BPF.PERF_EVENT,
        "tracepoint__syscalls__sys_enter_munmap": BPF.TRACEPOINT,
    }
    return bpf, {name: bpf.load_func(name.encode(), kind).fd for name, kind in kinds.items()}


def measure(
    a: argparse.Namespace, exe: Path
) -> tuple[dict[str, dict[str, list[float]]], list[str]]:
    bpf, progs = load_programs()
    # raw tracepoints attach when bcc loads them: detach, this harness attaches itself
    for tp in (b"page_fault_user", b"page_fault_kernel"):
        with contextlib.suppress(Exception):
            bpf.detach_raw_tracepoint(tp=tp)
    with contextlib.suppress(Exception):
        bpf.detach_tracepoint(tp=b"syscalls:sys_enter_munmap")
    target, other = Loop(exe), Loop(exe)
    faults, calls = f"run {a.iters} {a.pages}", f"sys {a.syscalls}"
    work = {"target": (target, faults), "non_target": (other, faults)}
    work["non_target_getppid"] = (other, calls)
    mech = mechanisms(progs, target.pid)
    runs: Runs = {m: {w: [] for w in work} for m in mech}
    others = others_probes()
    rng = random.Random(a.seed)
    try:
        for loop, command in work.values():
            loop.run(command)  # warm up
        for rep in range(a.reps):
            order = list(mech)
            rng.shuffle(order)
            for m in order:
                with attached(mech[m]):
                    for w, (loop, command) in work.items():
                        runs[m][w].append(loop.run(command)["cpu"])
            print(f"rep {rep} done", flush=True)
    finally:
        target.close()
        other.close()
        bpf.cleanup()
    return runs, sorted(set(others) | set(others_probes()))


def summarize(runs: Runs) -> Json:
    out: Json = {}
    base = runs["off"]
    print(f"\n{'':20} " + " ".join(f"{w:>26}" for w in base))
    for m, per in runs.items():
        out[m] = {}
        cols = []
        for w, vals in per.items():
            pct = statistics.median(x / y - 1 for x, y in zip(vals, base[w], strict=True)) * 100
            med = statistics.median(vals)
            out[m][w] = {"ns_median": round(med, 1), "added_pct_median": round(pct, 2)}
            cols.append(f"{med:9.0f} ns {pct:+7.2f} %     ")
        print(f"{m:20} " + " ".join(f"{c:>26}" for c in cols))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--iters", type=int, default=1000)
    ap.add_argument("--pages", type=int, default=64)
    ap.add_argument("--syscalls", type=int, default=200000)
    ap.add_argument("--seed", type=int, default=15)
    ap.add_argument("--output", type=Path, default=RESULTS / "fault_hooks.json")
    a = ap.parse_args()
    runs, others = measure(a, build_loop())
    summary = summarize(runs)
    if others:
        print(f"other processes' probes on fault/syscall tracepoints: {', '.join(others)}")
    doc = {
        "machine": f"{platform.machine()} {platform.release()}, {os.cpu_count()} CPUs",
        "reps": a.reps,
        "faults_per_run": a.iters * a.pages,
        "getppid_per_run": a.syscalls,
        "others_probes": others,
        "summary": summary,
        "runs": runs,
    }
    a.output.parent.mkdir(parents=True, exist_ok=True)
    a.output.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"\nwrote {a.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
