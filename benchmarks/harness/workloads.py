"""Workloads: what a run starts and how its saving is judged.

``Planted`` is a planted shape (targets x identical/zero/unique pages) with its ideal
saving by formula; ``Workload`` is what the suite runs, one per W1-W5 (``make_workloads``,
sized by ``Sizes``: ``FULL`` for `make bench`, ``QUICK`` for ``--quick``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from benchmarks.harness.common import GIB_PAGES, MIB_PAGES
from benchmarks.harness.targets import Target, spawn_planted, start_numpy, start_redis

MIB = MIB_PAGES
SEED = 7
REAL_IDEAL = (
    "per run, from the fresh targets' memory before the tool starts: distinct frames - "
    "distinct non-zero contents over their private anonymous VMAs (content_ideal)"
)
WORKLOADS = ("W1", "W2", "W3", "W4", "W5numpy", "W5redis")


@dataclass(frozen=True)
class Planted:
    """The shape of a planted workload: ``targets`` processes, each with ``identical``
    pages equal across them, ``zero`` zero-filled and ``unique`` pages (tests/targets/
    planted.c), and its ideal saving by formula."""

    targets: int
    identical: int
    zero: int
    unique: int
    seed: int

    @property
    def planted_pages(self) -> int:
        """Distinct frames: every planted page is its own private frame at start (checked)."""
        return self.targets * (self.identical + self.zero + self.unique)

    @property
    def distinct_contents(self) -> int:
        """Distinct non-zero contents: the identical set once, each target's unique pages."""
        return self.identical + self.targets * self.unique

    @property
    def ideal_pages(self) -> int:
        return self.planted_pages - self.distinct_contents

    def as_json(self) -> dict[str, int]:
        """The workload as the results files record it."""
        return {
            "targets": self.targets,
            "identical_pages": self.identical,
            "zero_pages": self.zero,
            "unique_pages": self.unique,
            "seed": self.seed,
        }

    def start(self, exe: Path, busy: int, threads: int, mergeable: bool) -> list[Target]:
        """Fresh planted processes of this shape; the first ``busy`` spin ``threads``
        extra threads."""
        cmd = [str(exe), "--identical", str(self.identical), "--zero", str(self.zero)]
        cmd += ["--unique", str(self.unique), "--seed", str(self.seed)]
        if mergeable:
            cmd.append("--mergeable")
        return spawn_planted(
            [[*cmd, "--threads", str(threads if i < busy else 0)] for i in range(self.targets)]
        )


@dataclass
class Workload:
    """What a run starts (``start(mergeable)``) and how its saving is judged."""

    name: str
    description: str
    ideal_pages: int  # real programs: set per run by truth.content_ideal()
    has_zero_pages: bool
    start: Callable[[bool], list[Target]]  # mergeable -> started targets
    volatile_region: str | None = None  # W3: the churn region
    stable_regions: tuple[str, ...] = ()  # W3: what the ideal counts
    real: bool = False
    ideal_source: str = "workload formula"


@dataclass(frozen=True)
class Sizes:
    reps: int
    w1: tuple[int, int, int, int]  # targets, identical, zero, unique (pages per target)
    w2: tuple[int, int]  # targets, alternate pages
    w3: tuple[int, int]  # targets, identical pages (as many churn pages)
    w4: tuple[int, int, int, int]  # targets, zero, identical, unique
    numpy: tuple[int, int]  # workers, MiB of array each
    redis: tuple[int, int, int]  # servers, keys, value bytes
    max_timeout_s: float  # ksmd_max
    bounded_s: float  # daemon, ksmd_defaults, daemon_eqcpu
    w1_bounded_s: float  # the same on W1: long enough for ksmd's defaults to reach 95 %
    thrash_window_s: float
    scaling_targets: tuple[int, ...]
    scaling_targets_gib: float
    scaling_gib: tuple[float, ...]
    scaling_gib_targets: int
    scaling_daemon_bound_s: float

    def replace(self, **kw: Any) -> Sizes:
        return Sizes(**{**asdict(self), **kw})

    def bound_of(self, wname: str) -> float:
        """The bound of the daemon and ksmd-defaults runs of a workload."""
        return self.w1_bounded_s if wname == "W1" else self.bounded_s

    def scaling_points(self) -> list[tuple[str, int, int]]:
        """(series, targets, pages per target) in W1's shape 4:1:1."""
        pts = []
        for n in self.scaling_targets:
            pts.append(("targets", n, int(self.scaling_targets_gib * GIB_PAGES) // n))
        for g in self.scaling_gib:
            per = int(g * GIB_PAGES) // self.scaling_gib_targets
            pts.append(("size", self.scaling_gib_targets, per))
        return pts


FULL = Sizes(
    reps=3,
    w1=(4, 64 * MIB, 16 * MIB, 16 * MIB),
    w2=(4, 32 * MIB),
    w3=(4, 32 * MIB),
    w4=(4, 56 * MIB, 4 * MIB, 4 * MIB),
    numpy=(4, 64),
    redis=(4, 100_000, 500),
    max_timeout_s=30.0,
    bounded_s=45.0,
    w1_bounded_s=120.0,
    thrash_window_s=15.0,
    scaling_targets=(1, 4, 16, 64),
    scaling_targets_gib=1.0,
    scaling_gib=(0.25, 0.5, 1.0, 2.0, 4.0, 8.0),
    scaling_gib_targets=4,
    scaling_daemon_bound_s=180.0,
)

QUICK = Sizes(
    reps=1,
    w1=(3, 8 * MIB, 2 * MIB, 2 * MIB),
    w2=(3, 8 * MIB),
    w3=(3, 4 * MIB),
    w4=(3, 8 * MIB, 1 * MIB, 1 * MIB),
    numpy=(2, 16),
    redis=(2, 20_000, 300),
    max_timeout_s=10.0,
    bounded_s=6.0,
    w1_bounded_s=10.0,
    thrash_window_s=2.0,
    scaling_targets=(1, 4),
    scaling_targets_gib=1 / 32,
    scaling_gib=(1 / 32, 1 / 16),
    scaling_gib_targets=2,
    scaling_daemon_bound_s=20.0,
)


# --------------------------------------------------------------------------------------
# W1-W5
# --------------------------------------------------------------------------------------


def planted_workload(
    exe: Path, name: str, desc: str, targets: int, args: Sequence[str], ideal: int, zero: bool
) -> Workload:
    def start(mergeable: bool) -> list[Target]:
        cmd = [str(exe), *args, "--seed", str(SEED)] + (["--mergeable"] if mergeable else [])
        return spawn_planted([cmd] * targets)

    return Workload(name, desc, ideal, zero, start)


def w1_workers(exe: Path, s: Sizes) -> Workload:
    t, i, z, u = s.w1
    return planted_workload(
        exe,
        "W1",
        f"workers: {t} x ({i // MIB} MiB identical + {z // MIB} MiB zero + {u // MIB} MiB unique)",
        t,
        ["--identical", str(i), "--zero", str(z), "--unique", str(u)],
        Planted(t, i, z, u, SEED).ideal_pages,  # T(I+Z+U) - (I+TU)
        z > 0,
    )


def w2_scattered(exe: Path, s: Sizes) -> Workload:
    t, a = s.w2
    return planted_workload(
        exe,
        "W2",
        f"scattered: {t} x {a // MIB} MiB, every other page identical across processes",
        t,
        ["--alternate", str(a)],
        (t - 1) * ((a + 1) // 2),
        False,
    )


def w3_volatile(exe: Path, s: Sizes) -> Workload:
    t, i = s.w3
    w = planted_workload(
        exe,
        "W3",
        f"volatile: {t} x ({i // MIB} MiB identical + {i // MIB} MiB identical but stored "
        "to every ~10 ms); ideal = the stable half",
        t,
        ["--identical", str(i), "--churn", str(i)],
        (t - 1) * i,
        False,
    )
    w.volatile_region, w.stable_regions = "churn", ("identical",)
    return w


def w4_zero_heavy(exe: Path, s: Sizes) -> Workload:
    t, z, i, u = s.w4
    return planted_workload(
        exe,
        "W4",
        f"zero-heavy: {t} x ({z // MIB} MiB zero + {i // MIB} MiB identical + "
        f"{u // MIB} MiB unique)",
        t,
        ["--zero", str(z), "--identical", str(i), "--unique", str(u)],
        Planted(t, i, z, u, SEED).ideal_pages,  # TZ + (T-1)I
        True,
    )


def w5_numpy(s: Sizes) -> Workload:
    workers, mib = s.numpy
    return Workload(
        "W5numpy",
        f"{workers} Python interpreters, each the same {mib} MiB numpy array + a dict of 50k str",
        0,
        True,
        lambda mergeable: start_numpy(workers, mib, mergeable),
        real=True,
        ideal_source=REAL_IDEAL,
    )


def w5_redis(s: Sizes, tmp: Path) -> Workload:
    servers, keys, size = s.redis
    return Workload(
        "W5redis",
        f"{servers} redis-server, each DEBUG POPULATE {keys} keys x {size} B",
        0,
        True,
        lambda mergeable: start_redis(servers, keys, size, mergeable, tmp),
        real=True,
        ideal_source=REAL_IDEAL,
    )


def make_workloads(exe: Path, s: Sizes, tmp: Path) -> dict[str, Workload]:
    """W1-W5 at the given sizes; redis keeps its sockets in ``tmp``."""
    ws = (
        w1_workers(exe, s),
        w2_scattered(exe, s),
        w3_volatile(exe, s),
        w4_zero_heavy(exe, s),
        w5_numpy(s),
        w5_redis(s, tmp),
    )
    return {w.name: w for w in ws}


def scaling_workload(exe: Path, targets: int, per_target: int) -> tuple[Planted, Workload]:
    """A scaling point: ``targets`` x ``per_target`` pages in W1's shape 4:1:1."""
    i, z = per_target * 4 // 6, per_target // 6
    u = per_target - i - z
    shape = Planted(targets, i, z, u, SEED)
    args = ["--identical", str(i), "--zero", str(z), "--unique", str(u)]
    return shape, planted_workload(exe, "scaling", "", targets, args, shape.ideal_pages, z > 0)
