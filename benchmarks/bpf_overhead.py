"""What procksm's eBPF observer adds to every page fault, in a target and elsewhere.

    .venv/bin/python benchmarks/bpf_overhead.py [--reps 11] [--iters 2000] [--pages 64]
        [--syscalls 400000]

Two copies of benchmarks/fault_loop.c run the same page-fault-heavy loop (mmap P fresh
pages, write one byte in each, munmap; I times). One is a target of the observer: its
own duplicate pages are merged by procksm.merge and watched with set_ranges (the fresh
pages land next to them, in the same 2 MiB region), and a thread polls the observer, as
the daemon would (its mmap/munmap calls are no events since the observer has no syscall
tracepoints: docs/design.md §11). The other is not
a target: the cost every other process on the machine pays; it also runs a getppid loop
(the cheapest system call: what the observer adds to every system call of every process).
One CowObserver is loaded
for the whole run and a thread polls it throughout; per repetition, both loops run with
its probes detached and attached (detach_probes / attach_probes), the order
alternating. Prints the median time per fault (per call) and the median of the paired differences
in % (goal: <= 3 % for both), on the loop's own CPU time (judged) and on the wall clock
(shown: on a shared machine it mostly measures the other processes). Other BPF
programs on fault or syscall tracepoints (another procksm on this machine) are listed in
the output: while one is attached, its cost is in both phases and hides ours.
Writes benchmarks/results/bpf_overhead.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this checkout's procksm

from benchmarks.harness.common import RESULTS, ROOT, Json
from benchmarks.harness.targets import build_c
from procksm import PAGE_SIZE
from procksm.merge import MergeOptions, merge
from procksm.observe import CowObserver
from procksm.scanner import AddressRange, ScanOptions
from procksm.unmerge import merged_ranges

GOAL_PCT = 3.0


def build_loop() -> Path:
    return build_c(ROOT / "benchmarks" / "fault_loop.c", ROOT / "build" / "bench" / "fault_loop")


class Loop:
    def __init__(self, exe: Path) -> None:
        self.proc = subprocess.Popen(
            [str(exe), "--dup", "64"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        assert self.proc.stdout is not None
        info = dict(kv.split("=") for kv in self.proc.stdout.readline().split()[1:])
        self.dup = int(info["dup"], 16)
        self.dup_pages = int(info["dup_pages"])
        self.pid = self.proc.pid

    def run(self, command: str) -> dict[str, float]:
        """Nanoseconds per fault (``run I P``) or per getppid (``sys I``) of one run: on
        the CPU (the loop's own CPU time) and wall."""
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(f"{command}\n")
        self.proc.stdin.flush()
        _, wall, _, cpu, _, faults = self.proc.stdout.readline().split()
        return {"cpu": int(cpu) / int(faults), "wall": int(wall) / int(faults)}

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()


class Consumer(threading.Thread):
    """Polls the observer like the daemon would, in both phases, so that only the
    probes differ between them."""

    def __init__(self, obs: CowObserver, lock: threading.Lock) -> None:
        super().__init__(daemon=True)
        self.obs = obs
        self.lock = lock
        self.stop = threading.Event()
        self.events = 0

    def run(self) -> None:
        while not self.stop.is_set():
            with self.lock:
                self.events += len(self.obs.poll(0.05))


def others_probes() -> list[str]:
    """BPF programs of other processes on fault or syscall tracepoints (``bpftool perf``):
    while one is attached, every task already pays for it in both phases."""
    try:
        out = subprocess.run(
            ["bpftool", "-j", "perf"], capture_output=True, text=True, timeout=30, check=True
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return ["(bpftool perf failed: unknown)"]
    found = {
        f"pid {p['pid']} {p.get('tracepoint', p.get('prog_type'))}"
        for p in json.loads(out or "[]")
        if p["pid"] != os.getpid()
        and any(w in str(p.get("tracepoint", "")) for w in ("sys_", "page_fault"))
    }
    return sorted(found)


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--reps", type=int, default=11)
    ap.add_argument("--iters", type=int, default=2000, help="mmap/touch/munmap rounds per run")
    ap.add_argument("--pages", type=int, default=64, help="pages per round")
    ap.add_argument("--syscalls", type=int, default=400000, help="getppid calls per run")
    ap.add_argument("--output", type=Path, default=RESULTS / "bpf_overhead.json")
    a = ap.parse_args()
    if a.reps < 3:
        ap.error("--reps must be >= 3 (the result is a median)")
    return a


def watch_target(target: Loop) -> CowObserver:
    """Merge the target's duplicate pages and load one observer watching them, for the
    whole run: its probes attached or detached per phase, the phases differ in the
    probes only (not in a BPF compile just before, nor in a polling thread)."""
    dup = AddressRange(target.dup, target.dup + target.dup_pages * PAGE_SIZE)
    res = merge([target.pid], MergeOptions(selection=ScanOptions(ranges=[dup])))
    assert res.pages_merged == target.dup_pages, res.as_json()
    obs = CowObserver(use_bpf=True, reconcile_interval_s=3600)
    obs.set_ranges(target.pid, [(v.start, v.end) for v in merged_ranges(target.pid)])
    return obs


# name -> the loop process and its command (one run)
Workloads = dict[str, tuple[Loop, str]]


def run_reps(
    obs: CowObserver, lock: threading.Lock, loops: Workloads, a: argparse.Namespace
) -> list[Json]:
    """Per repetition, every loop with the probes detached and attached (order alternating)."""
    runs: list[Json] = []
    for rep in range(a.reps):
        order = (False, True) if rep % 2 == 0 else (True, False)
        row: Json = {"rep": rep}
        for probes in order:
            with lock:
                if probes:
                    obs.attach_probes()
                else:
                    obs.detach_probes()
            row["on" if probes else "off"] = {
                name: loop.run(command) for name, (loop, command) in loops.items()
            }
        runs.append(row)
        on, off = row["on"], row["off"]
        cols = [
            f"{k} {off[k]['cpu']:.0f} -> {on[k]['cpu']:.0f} ns "
            f"({(on[k]['cpu'] / off[k]['cpu'] - 1) * 100:+.1f} %)"
            for k in loops
        ]
        print(f"rep {rep} (CPU time): " + "  ".join(cols), flush=True)
    return runs


def observe_reps(target: Loop, loops: Workloads, a: argparse.Namespace) -> tuple[Json, list[Json]]:
    """The repetitions with a thread polling the observer throughout; returns the
    observer's totals and the runs."""
    obs = watch_target(target)
    lock = threading.Lock()
    consumer = Consumer(obs, lock)
    consumer.start()
    for loop, command in loops.values():  # warm up (page tables, allocator, CPU frequency)
        loop.run(command)
    try:
        runs = run_reps(obs, lock, loops, a)
    finally:
        consumer.stop.set()
        consumer.join()
        with lock:
            obs.attach_probes()
            observer = {"events": consumer.events, **obs.kernel_totals()}
            obs.close()
    return observer, runs


def summarize(runs: list[Json], names: list[str]) -> tuple[Json, bool]:
    """Median per fault off and on, and the median paired difference, per loop and clock;
    prints them; True when every loop meets the goal on its CPU time."""
    summary: Json = {}
    print(f"\n{'':30} {'off ns':>8} {'on ns':>8} {'added':>8}  goal")
    ok = True
    for k in names:
        summary[k] = {}
        for clock in ("cpu", "wall"):
            offs = [r["off"][k][clock] for r in runs]
            ons = [r["on"][k][clock] for r in runs]
            pct = statistics.median((n / f - 1) * 100 for n, f in zip(ons, offs, strict=True))
            # the goal is judged on the loop's own CPU time: wall time on this shared
            # machine mostly measures what other processes took
            met = pct <= GOAL_PCT
            if clock == "cpu":
                ok &= met
            summary[k][clock] = {
                "off_ns_per_fault": round(statistics.median(offs), 1),
                "on_ns_per_fault": round(statistics.median(ons), 1),
                "added_pct_median": round(pct, 2),
                "met": met,
            }
            verdict = ("met" if met else "MISSED") if clock == "cpu" else "(not judged)"
            print(
                f"{k + ' ' + clock:30} {statistics.median(offs):8.0f} "
                f"{statistics.median(ons):8.0f} {pct:+7.2f} %  <= {GOAL_PCT:g} % {verdict}"
            )
    return summary, ok


def main() -> int:
    a = parse_args()
    exe = build_loop()
    target, other = Loop(exe), Loop(exe)
    faults = f"run {a.iters} {a.pages}"
    loops: Workloads = {
        "target": (target, faults),
        "non_target": (other, faults),
        # getppid: any syscall tracepoint puts every task of the machine on the slow
        # system call path (kernel/trace/trace_syscalls.c, syscall_regfunc)
        "non_target_getppid": (other, f"sys {a.syscalls}"),
    }
    others = others_probes()
    try:
        observer, runs = observe_reps(target, loops, a)
    finally:
        target.close()
        other.close()
    others = sorted(set(others) | set(others_probes()))
    if others:
        print(f"other processes' probes on fault/syscall tracepoints: {', '.join(others)}")
    summary, ok = summarize(runs, list(loops))
    doc = {
        "machine": f"{platform.machine()} {platform.release()}, {os.cpu_count()} CPUs",
        "iters": a.iters,
        "pages_per_iter": a.pages,
        "faults_per_run": a.iters * a.pages,
        "getppid_per_run": a.syscalls,
        "reps": a.reps,
        "goal_added_pct": GOAL_PCT,
        "observer": observer,
        "others_probes": others,
        "summary": summary,
        "runs": runs,
    }
    a.output.parent.mkdir(parents=True, exist_ok=True)
    a.output.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"\nwrote {a.output}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
