"""Real runtimes under `procksm attach` and under the kernel's KSM, in the same run (issue 15).

    .venv/bin/python benchmarks/runtimes.py            # ~22 min; results/runtimes.json
    .venv/bin/python benchmarks/runtimes.py --quick    # 2 processes a row, 20 s runs
    .venv/bin/python benchmarks/runtimes.py --only jvm --only node
    .venv/bin/python benchmarks/suite.py --only runtimes   # the same, inside the suite

Rows, each started as real processes that verify their own data (fresh ones per run):

  jvm           3 JVMs (OpenJDK, G1, -Xms256m -Xmx256m -XX:+AlwaysPreTouch), the same
                64 MiB of byte[], long[] and objects each, allocation churn (GC runs)
  node          3 node, the same 64 MiB of Buffers and 64 MiB of JS objects, churn
  numpy         4 CPython workers, the same 64 MiB numpy array each (numpy's defaults:
                MADV_HUGEPAGE arrays)
  numpy_nohuge  the same with NUMPY_MADVISE_HUGEPAGE=0
  redis         4 redis-server, DEBUG POPULATE 150000 keys x 500 B each

Per row: no tool for 60 s (what the programs free by themselves); `procksm attach PIDS` at
its defaults for 60 s; the kernel's KSM (targets opted in through prctl(PR_SET_MEMORY_MERGE),
set by a wrapper that then execs the runtime: the flag survives exec and fork,
ksm_merge_any is recorded) at its defaults (100 pages / 20 ms) and at full speed
(100000 / 0), 60 s each, use_zero_pages=1.

Truth sources (benchmarks/README.md, "runtimes.py"):
  saved          pagemap, over the targets' private anonymous memory of the start, at 10 s
                 and 60 s: pages sharing a frame (KSM's, procksm's segments) plus the
                 zero-filled pages of the start without a frame now (dropped; zero page)
  CPU            procksm: utime+stime (and reaped children's) of the daemon, its children,
                 both madvise guards and their unmerge helper, over the last 30 s; ksmd:
                 its thread's utime+stime over the last 30 s
  private memory procksm's processes above: smaps Private_Clean + Private_Dirty, by kind of
                 mapping (anonymous; file-backed, e.g. bcc's LLVM) at 60 s
  net            saved at 60 s - procksm's private memory
  pauses         the daemon's own `procksm stats --json` (p50/p99/max of its stop windows)
  checks         each target's own verdict (JVM/node: their checks every second; numpy:
                 the array's sha256; redis: DEBUG DIGEST)

KSM settings are machine-wide: they are restored on every exit path (harness/ksm.py); the
script refuses to start while other processes have KSM pages.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this checkout's procksm

from benchmarks.harness.common import PROCKSM, RESULTS, Json
from benchmarks.harness.ksm import KsmControl, run_script
from benchmarks.harness.report import git_state, machine_line, runtimes_markdown
from benchmarks.harness.runners import ksm_guarded
from benchmarks.harness.runtimes import ROWS, run_runtimes


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--quick", action="store_true", help="2 processes a row, 20 s runs")
    ap.add_argument("--only", action="append", choices=ROWS, help="these rows (repeatable)")
    ap.add_argument("--poll", type=float, default=0.5, help="sampling period, s")
    ap.add_argument("--procksm", default=str(PROCKSM))
    ap.add_argument("--output", type=Path)
    ap.add_argument("--markdown", type=Path, metavar="JSON", help="print a results file's tables")
    a = ap.parse_args(argv)
    if a.output is None:
        a.output = RESULTS / ("runtimes-quick.json" if a.quick else "runtimes.json")
    return a


def main(argv: Sequence[str] | None = None) -> int:
    a = parse_args(argv)
    if a.markdown:
        print(runtimes_markdown(json.loads(a.markdown.read_text())), end="")
        return 0
    if os.geteuid() != 0:
        print("runtimes: needs root (ptrace, pagemap PFNs, KSM sysfs)", file=sys.stderr)
        return 1
    machine = machine_line()
    print(f"machine {machine}", flush=True)
    ctl = KsmControl()
    res: Json = {
        "machine": machine,
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "quick": a.quick,
        "ksm_settings_found": ctl.found,
        "git": git_state(),
    }
    t0 = time.perf_counter()
    with ksm_guarded(ctl):
        res.update(run_runtimes(ctl, [a.procksm], a.quick, a.only or ROWS, a.poll))
    res["elapsed_s"] = time.perf_counter() - t0
    print("\n" + runtimes_markdown(res))
    a.output.parent.mkdir(parents=True, exist_ok=True)
    a.output.write_text(json.dumps(res, indent=1, default=str) + "\n")
    print(f"wrote {a.output} ({res['elapsed_s'] / 60:.1f} min)")
    return 0


if __name__ == "__main__":
    run_script("runtimes", main)
