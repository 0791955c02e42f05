"""procksm on targets with thousands of VMAs, made the way it happens in practice
(issue 15): Python workers holding the same numpy arrays and objects, merged by
`procksm merge`, then unmerged by `procksm unmerge` (each unmerged piece stays a VMA of
its own, docs/design.md §10), then merged again.

    .venv/bin/python benchmarks/many_vmas.py [--workers 3] [--seconds 20] [--no-bpf]
                                             [--profile FILE] [--checkout DIR]

``--checkout DIR`` runs the procksm of another checkout (e.g. main's, for numbers before
and after a change taken in one session on a shared machine).

Phases, on the same workers (each checks its own data after every phase):

1. ``fresh daemon``: `procksm attach --cpu-limit 0` for --seconds on the fresh workers;
   stopped, then `procksm unmerge`;
2. `procksm merge` then `procksm unmerge`: the workers now hold thousands of VMAs;
3. ``many-VMA daemon``: the same daemon run (--profile FILE: under cProfile, the
   functions that took the most time printed); stopped, unmerged;
4. ``many-VMA merge``: one `procksm merge`, timed; unmerged at the end.

Reported per phase: the workers' VMAs, pages merged per second (pagemap: pages of
procksm's segments, present and file-backed, over the workers, gained per second until
90 % of what the run reached, or over the run), the CPU the procksm process tree used
(seconds and % of one CPU). Writes benchmarks/results/many_vmas.json.
"""

from __future__ import annotations

import argparse
import cProfile  # noqa: F401  (run as `python -m cProfile` below)
import json
import os
import pstats
import resource
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.harness.common import RESULTS
from benchmarks.harness.truth import cpu_with_reaped, process_tree
from tests.runtime_workers import NUMPY_WORKER_DATA

Json = dict[str, Any]
PAGE = 4096
PRESENT, FILE = 1 << 63, 1 << 61

# tests/test_real_programs.py's WORKER, with a self-check instead of a computation step:
# it keeps digests of its data and compares them on `check`
WORKER = (
    NUMPY_WORKER_DATA
    + r"""
def digest():
    h = hashlib.sha256()
    h.update(table.tobytes()); h.update(ints.tobytes()); h.update(zeros.tobytes())
    h.update(repr(sorted(objects.items())[::1000]).encode())
    return h.hexdigest()

want = digest()
print("READY", flush=True)
for line in sys.stdin:
    if line.strip() == "check":
        print("OK" if digest() == want and len(objects) == 200_000 else "CORRUPT", flush=True)
"""
)


class Checkout:
    """The procksm checkout that runs (default: this one, not the editable install's)."""

    path = ROOT


def procksm_cmd(*args: object) -> list[str]:
    return [sys.executable, "-m", "procksm", *map(str, args)]


def env() -> dict[str, str]:
    lock = os.environ.get("PROCKSM_LOCK_DIR", "/tmp/lock-many-vmas")
    return {**os.environ, "PYTHONPATH": str(Checkout.path), "PROCKSM_LOCK_DIR": lock}


class Workers:
    def __init__(self, n: int, tmp: Path) -> None:
        script = tmp / "worker.py"
        script.write_text(WORKER)
        e = {"PATH": "/usr/bin:/bin", "OPENBLAS_NUM_THREADS": "1"}
        self.procs = [
            subprocess.Popen(
                [sys.executable, str(script)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
                env=e,
            )
            for _ in range(n)
        ]
        for p in self.procs:
            assert p.stdout is not None
            line = p.stdout.readline().strip()
            if line != "READY":
                raise RuntimeError(f"worker {p.pid} did not start: {line!r}")

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    def check(self, when: str) -> None:
        for p in self.procs:
            assert p.stdin is not None and p.stdout is not None
            p.stdin.write("check\n")
            p.stdin.flush()
            answer = p.stdout.readline().strip()
            if answer != "OK":
                raise RuntimeError(f"worker {p.pid} {when}: {answer!r}")

    def vmas(self) -> list[int]:
        return [Path(f"/proc/{pid}/maps").read_text().count("\n") for pid in self.pids]

    def vma_sizes(self) -> dict[str, int]:
        """The workers' VMAs by size in pages (all workers together)."""
        bins = {"1": 0, "2-16": 0, "17-511": 0, "512": 0, ">512": 0}
        for pid in self.pids:
            for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
                a, b = (int(x, 16) for x in line.split()[0].split("-"))
                n = (b - a) // PAGE
                key = "1" if n == 1 else "2-16" if n <= 16 else "17-511" if n < 512 else "512"
                bins[key if n <= 512 else ">512"] += 1
        return bins

    def stop(self) -> None:
        for p in self.procs:
            p.kill()
            p.wait()


def sharing_pages(pids: list[int]) -> int:
    """Pages of procksm's segment mappings that are present and file-backed (pagemap)."""
    import numpy as np

    total = 0
    for pid in pids:
        spans = []
        for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
            parts = line.split()
            if len(parts) >= 6 and parts[5].startswith("/memfd:procksm-seg-"):
                a, b = (int(x, 16) for x in parts[0].split("-"))
                spans.append((a, b))
        with open(f"/proc/{pid}/pagemap", "rb") as f:
            for a, b in spans:
                f.seek(a // PAGE * 8)
                e = np.frombuffer(f.read((b - a) // PAGE * 8), np.uint64)
                total += int(((e & np.uint64(PRESENT | FILE)) == np.uint64(PRESENT | FILE)).sum())
    return total


def run_cli(
    *args: object, ok: tuple[int, ...] = (0,)
) -> tuple[subprocess.CompletedProcess[str], float, float]:
    """(result, wall s, CPU s of it and its children); an exit code not in ``ok`` raises."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.run(
        procksm_cmd(*args), capture_output=True, text=True, env=env(), cwd=Checkout.path
    )
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    if proc.returncode not in ok:
        out = (proc.stderr.strip() or proc.stdout.strip())[-2000:]
        raise RuntimeError(f"procksm {args[0]}: exit {proc.returncode}: {out}")
    return proc, wall, cpu


def rate(samples: list[tuple[float, int]], base: int) -> tuple[float, float | None]:
    """(pages merged per second, seconds to 90 % of the last sample): the rate up to
    that point, so a run that converged early is not diluted by its idle rest."""
    final = samples[-1][1] - base
    if final <= 0:
        return 0.0, None
    for t, n in samples:
        if n - base >= 0.9 * final:
            return (n - base) / max(t, 1e-3), t
    return final / samples[-1][0], None


def daemon_run(w: Workers, seconds: float, no_bpf: bool, profile: str | None, tmp: Path) -> Json:
    sock = tmp / "attach.sock"
    args = ["attach", *w.pids, "--control", sock, "--cpu-limit", "0", "-q"]
    if no_bpf:
        args.append("--no-bpf")
    cmd = procksm_cmd(*args)
    if profile:
        cmd = [sys.executable, "-m", "cProfile", "-o", profile, *cmd[1:]]
    base = sharing_pages(w.pids)
    vmas = w.vmas()
    err = open(tmp / "attach.stderr", "w+")  # noqa: SIM115 - closed below
    child = subprocess.Popen(
        cmd,
        stdout=subprocess.DEVNULL,
        stderr=err,
        env=env(),
        cwd=Checkout.path,
        start_new_session=True,
    )
    t0 = time.perf_counter()
    cpu0 = cpu_with_reaped(process_tree(child.pid))
    samples: list[tuple[float, int]] = []
    cpu_end = cpu0
    try:
        while time.perf_counter() - t0 < seconds:
            time.sleep(1.0)
            if child.poll() is not None:
                raise RuntimeError(f"the daemon exited: {(tmp / 'attach.stderr').read_text()}")
            cpu_end = cpu_with_reaped(process_tree(child.pid))
            samples.append((time.perf_counter() - t0, sharing_pages(w.pids)))
        child.send_signal(signal.SIGTERM)
        child.wait(60)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        err.close()
    wall = samples[-1][0]
    pages_per_s, t90 = rate(samples, base)
    cpu = cpu_end - cpu0
    return {
        "vmas": vmas,
        "seconds": round(wall, 1),
        "pages_merged": samples[-1][1] - base,
        "pages_per_s": round(pages_per_s, 1),
        "t90_s": None if t90 is None else round(t90, 1),
        "cpu_s": round(cpu, 2),
        "cpu_percent": round(100 * cpu / wall, 1),
        "samples": samples,
    }


def merge_run(w: Workers) -> Json:
    vmas = w.vmas()
    # exit 1: a target's merge ended early (its error is in the JSON): on a saturated
    # machine an injected call can miss its 2 s limit
    proc, wall, cpu = run_cli("merge", "--json", *w.pids, ok=(0, 1))
    doc = json.loads(proc.stdout)
    merged = int(doc["totals"]["pages_merged"])
    return {
        "errors": [p["error"] for p in doc["processes"] if p.get("error")],
        "vmas": vmas,
        "seconds": round(wall, 2),
        "pages_merged": merged,
        "pages_per_s": round(merged / wall, 1),
        "cpu_s": round(cpu, 2),
        "cpu_percent": round(100 * cpu / wall, 1),
        "pause_p99_ms": doc["pauses"]["p99_ms"],
    }


def unmerge(w: Workers, when: str) -> Json:
    _, wall, cpu = run_cli("unmerge", *w.pids)
    w.check(f"after unmerging {when}")
    return {
        "seconds": round(wall, 2),
        "cpu_s": round(cpu, 2),
        "vmas_after": w.vmas(),
        "vma_sizes_after": w.vma_sizes(),
    }


def print_profile(path: str, top: int = 25) -> None:
    stats = pstats.Stats(path)
    stats.sort_stats("cumulative").print_stats(top)
    stats.sort_stats("tottime").print_stats(top)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workers", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=20.0, help="each daemon run")
    ap.add_argument("--no-bpf", action="store_true", help="the daemon's pagemap observer")
    ap.add_argument("--profile", help="cProfile output of the many-VMA daemon run")
    ap.add_argument("--skip-fresh", action="store_true", help="no daemon on fresh workers")
    ap.add_argument("--checkout", type=Path, default=ROOT, help="the procksm to run")
    ap.add_argument("--output", default=str(RESULTS / "many_vmas.json"))
    a = ap.parse_args()
    Checkout.path = a.checkout.resolve()
    out: Json = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "args": {k: str(v) for k, v in vars(a).items()},
        "commit": subprocess.run(
            ["git", "-C", str(Checkout.path), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
        ).stdout.strip(),
        "load_average": os.getloadavg(),
    }
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        w = Workers(a.workers, tmp)
        try:
            w.check("at start")
            if not a.skip_fresh:
                out["fresh_daemon"] = daemon_run(w, a.seconds, a.no_bpf, None, tmp)
                w.check("after the fresh daemon")
                out["fresh_daemon"]["unmerge"] = unmerge(w, "the fresh daemon's merges")
            out["first_merge"] = merge_run(w)
            w.check("after the first merge")
            out["first_merge"]["unmerge"] = unmerge(w, "the first merge")
            out["many_vma_daemon"] = daemon_run(w, a.seconds, a.no_bpf, a.profile, tmp)
            w.check("after the many-VMA daemon")
            out["many_vma_daemon"]["unmerge"] = unmerge(w, "the many-VMA daemon's merges")
            out["many_vma_merge"] = merge_run(w)
            w.check("after the many-VMA merge")
            out["many_vma_merge"]["unmerge"] = unmerge(w, "the many-VMA merge")
        finally:
            w.stop()
            subprocess.run(procksm_cmd("guard", "--stop"), env=env(), cwd=Checkout.path,
                           capture_output=True)  # fmt: skip
    heads = ("VMAs/worker", "pages/s", "t90 s", "CPU s", "CPU %")
    print(f"{'phase':<18} {heads[0]:>12} {heads[1]:>9} {heads[2]:>6} {heads[3]:>6} {heads[4]:>6}")
    for phase in ("fresh_daemon", "first_merge", "many_vma_daemon", "many_vma_merge"):
        r = out.get(phase)
        if r is None:
            continue
        vmas = round(sum(r["vmas"]) / len(r["vmas"]))
        t90 = r.get("t90_s")
        print(
            f"{phase:<18} {vmas:>12} {r['pages_per_s']:>9} {t90 if t90 is not None else '-':>6}"
            f" {r['cpu_s']:>6} {r['cpu_percent']:>6}"
        )
    for phase in ("fresh_daemon", "first_merge", "many_vma_daemon", "many_vma_merge"):
        if phase in out:
            u = out[phase]["unmerge"]
            print(
                f"unmerge after {phase}: {u['seconds']} s, VMAs per worker {u['vmas_after']}, "
                f"by size in pages {u['vma_sizes_after']}"
            )
    Path(a.output).write_text(json.dumps(out, indent=1) + "\n")
    if a.profile:
        print_profile(a.profile)
    return 0


if __name__ == "__main__":
    sys.exit(main())
