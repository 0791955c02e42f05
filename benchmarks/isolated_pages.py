"""The kernel's own cost of merging isolated pages by mapping them (issue 16, item 2:
"scattered duplicates at kernel speed"): what the targets spend in the kernel for W2,
whatever procksm does around it, against what ksmd spends on the same pages.

    .venv/bin/python benchmarks/isolated_pages.py [--pages 8192] [--reps 7]

benchmarks/isolated_pages.c maps a memfd page over every other page of a private
anonymous region (W2's layout, one target's worth: 8,192 pages, 4,096 merged), with
the calls of procksm's call routine: the mmap, the advice again, the populate; then
without the advice, without the populate. Medians of CPU microseconds per merged page.
No ptrace and no Python: a floor for any design that maps a page per isolated
duplicate. Writes benchmarks/results/isolated_pages.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this checkout's procksm

from benchmarks.harness.common import RESULTS, ROOT, Json
from benchmarks.harness.targets import build_c

VARIANTS = {"mmap+advice+populate": (1, 1), "mmap+populate": (0, 1), "mmap": (0, 0)}


def run_once(exe: Path, pages: int, advice: int, populate: int) -> float:
    """CPU microseconds per merged page."""
    out = subprocess.run(
        [str(exe), str(pages), str(advice), str(populate)],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    fields = dict(kv.split("=") for kv in out.split())
    return float(fields["cpu_s"]) / int(fields["pages"]) * 1e6


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pages", type=int, default=8192, help="pages of the region (half merged)")
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--output", type=Path, default=RESULTS / "isolated_pages.json")
    a = ap.parse_args(argv)
    exe = build_c(
        ROOT / "benchmarks" / "isolated_pages.c", ROOT / "build" / "bench" / "isolated_pages"
    )
    runs: dict[str, list[float]] = {v: [] for v in VARIANTS}
    for _ in range(a.reps):  # interleaved: the VM's speed drifts
        for name, (advice, populate) in VARIANTS.items():
            runs[name].append(run_once(exe, a.pages, advice, populate))
    med = {name: statistics.median(v) for name, v in runs.items()}
    doc: Json = {
        "machine": f"{platform.node()} {platform.release()}",
        "pages": a.pages,
        "merged_pages": a.pages // 2,
        "us_per_page_median": med,
        "runs": runs,
    }
    a.output.write_text(json.dumps(doc, indent=2) + "\n")
    for name, us in med.items():
        print(f"{name:22} {us:6.2f} us CPU per merged page (median of {a.reps})")
    print(f"wrote {a.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
