"""What the eBPF observer costs: its start, its memory, its CPU per event (as root).

    .venv/bin/python benchmarks/observe_cpu.py [--pages 8192] [--reps 5]

Start: wall time and CPU (the observer's process and its children: the loader child
that compiles the program) of ``CowObserver(use_bpf=True)``, and the observer's process
memory afterwards (smaps_rollup: Anonymous, Private_Clean, Private_Dirty, Rss), against
an interpreter that imported the same modules and made a pagemap observer.

CPU per event: two planted targets (tests/targets/planted.c) whose identical regions of
``--pages`` pages are merged with each other; the observer watches one, which then
writes every merged page from the kernel (``readinto``: one read() per page, each a
``page_fault_kernel`` COW break) while the observer polls, as the daemon does. The
observer process's CPU (time.process_time) from the command to the last event, divided
by the events: draining the ring buffer, decoding and applying each event. Each
repetition merges the pages again first (not counted).
Writes benchmarks/results/observe_cpu.json.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this checkout's procksm

from benchmarks.harness.common import RESULTS, ROOT
from procksm import PAGE_SIZE
from procksm.merge import MergeOptions, merge
from procksm.observe import CowBreak, CowObserver
from procksm.scanner import AddressRange, ScanOptions
from procksm.unmerge import merged_ranges
from tests.conftest import Target, build_c_target

CHUNK = 1024  # the ring holds 3640 events (cow.bpf.c: 64 pages of 72-byte records)

_START = """
import json, resource, time
from procksm.observe import CowObserver
t0, c0 = time.monotonic(), time.process_time()
obs = CowObserver(use_bpf={use_bpf}, warn=lambda m: None)
wall, cpu = time.monotonic() - t0, time.process_time() - c0
kids = resource.getrusage(resource.RUSAGE_CHILDREN)
roll = {{}}
for line in open("/proc/self/smaps_rollup"):
    k, _, v = line.partition(":")
    if v.strip().endswith("kB"):
        roll[k] = int(v.split()[0])
maps = open("/proc/self/maps").read()
KEYS = ("Rss", "Anonymous", "Private_Clean", "Private_Dirty")
print(json.dumps({{"mode": obs.mode, "wall_s": wall, "cpu_s": cpu,
                  "children_cpu_s": kids.ru_utime + kids.ru_stime,
                  "bcc_or_llvm_mapped": "libbcc" in maps or "libLLVM" in maps,
                  **{{k: roll[k] for k in KEYS}}}}))
"""


def start_costs(use_bpf: bool) -> dict[str, object]:
    """Start an observer in a fresh interpreter; what it took and what it holds."""
    code = _START.format(use_bpf=use_bpf)
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True
    )
    doc: dict[str, object] = json.loads(out.stdout)
    return doc


def merged_pair(exe: str, pages: int) -> list[Target]:
    targets = [Target([exe, "--identical", str(pages), "--seed", "31"]) for _ in range(2)]
    ranges = [
        AddressRange(t.int("identical"), t.int("identical") + pages * PAGE_SIZE) for t in targets
    ]
    got = merge([t.pid for t in targets], MergeOptions(selection=ScanOptions(ranges=ranges)))
    if got.pages_merged != 2 * pages:
        for t in targets:
            t.kill()
        raise RuntimeError(f"merged {got.pages_merged} of {2 * pages} pages")
    return targets


def cpu_per_event(obs: CowObserver, a: Target, pages: int) -> float:
    """CPU seconds of this process per COW break while ``a`` writes all its pages, in
    batches of CHUNK pages (fewer than the ring buffer holds: a writer that outruns the
    reader makes the kernel drop events, which the reconcile then finds in pagemap)."""
    obs.set_ranges(a.pid, [(v.start, v.end) for v in merged_ranges(a.pid)])
    obs.poll(0)
    lost = obs.kernel_totals()["lost"]
    cpu = 0.0
    for first in range(0, pages, CHUNK):
        n = min(CHUNK, pages - first)
        reply: list[str] = []
        cmd = f"readinto identical {first} {n}"
        writer = threading.Thread(target=lambda r=reply, c=cmd: r.append(a.command(c, 120)))
        c0 = time.process_time()
        writer.start()
        seen = 0
        deadline = time.monotonic() + 60
        while seen < n and time.monotonic() < deadline:
            seen += sum(isinstance(e, CowBreak) and e.pid == a.pid for e in obs.poll(0.05))
        cpu += time.process_time() - c0
        writer.join()
        if reply != ["OK"] or seen != n:
            raise RuntimeError(f"{seen} of {n} breaks seen, target said {reply}")
    if obs.kernel_totals()["lost"] != lost:
        raise RuntimeError("the ring buffer dropped events")
    return cpu / pages


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pages", type=int, default=8192)
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args()
    starts = {"bpf": start_costs(True), "pagemap": start_costs(False)}
    for mode, doc in starts.items():
        print(f"start ({mode}): " + " ".join(f"{k}={v}" for k, v in doc.items()))
    exe = str(build_c_target("planted"))
    per_event: list[float] = []
    with CowObserver(use_bpf=True, reconcile_interval_s=3600) as obs:
        if obs.mode != "bpf":
            print(f"eBPF unavailable: {obs.fallback_reason}", file=sys.stderr)
            return 1
        for rep in range(args.reps):  # fresh targets each time: written pages stay copies
            targets = merged_pair(exe, args.pages)
            try:
                per_event.append(cpu_per_event(obs, targets[0], args.pages))
                obs.remove_target(targets[0].pid)
                reply = targets[0].command("check")
                if not reply.startswith("OK"):
                    raise RuntimeError(f"target {targets[0].pid}: {reply}")
            finally:
                for t in targets:
                    t.kill()
            print(f"rep {rep}: {per_event[-1] * 1e6:.2f} us CPU per COW break")
    median = statistics.median(per_event)
    print(f"CPU per COW break: median {median * 1e6:.2f} us of {args.reps} x {args.pages} events")
    results = RESULTS / "observe_cpu.json"
    results.parent.mkdir(parents=True, exist_ok=True)
    doc = {"start": starts, "cpu_per_event_s": per_event, "median_cpu_per_event_s": median,
           "pages": args.pages, "maxrss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
           "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}  # fmt: skip
    results.write_text(json.dumps(doc, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
