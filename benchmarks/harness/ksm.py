"""The kernel's KSM, driven and measured from a benchmark: /sys/kernel/mm/ksm and ksmd.
The benchmarks talk to it only through this module.

KSM settings are machine-wide. :class:`KsmControl` remembers the values it found before
writing any, and ``restore()`` puts them back (the caller runs it on every exit path).
Counters are read as deltas from a baseline taken when KSM is idle, so that what the
kernel had counted before (ksm_zero_pages is never reset) does not leak into a result.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import NoReturn

from benchmarks.harness.truth import parent_pid, read_thread_cpu

KSM_DIR = Path("/sys/kernel/mm/ksm")

# The settings this benchmark writes, in the order they are restored: tunables first and
# `run` last, so that a restored run=1 never scans with the benchmark's speed settings.
# advisor_mode is written only to switch the auto-tuner off (it would override
# pages_to_scan); max_page_sharing, smart_scan and merge_across_nodes are never written.
WRITTEN_SETTINGS = ("pages_to_scan", "sleep_millisecs", "use_zero_pages", "advisor_mode", "run")

RUN_STOP = 0  # stop ksmd, keep merged pages merged
RUN_MERGE = 1
RUN_UNMERGE = 2  # stop ksmd and unmerge every KSM page of every process


class KsmError(RuntimeError):
    """KSM is missing, busy with someone else's pages, or did not do what it was told."""


def run_script(name: str, main: Callable[[], int]) -> NoReturn:
    """A benchmark script's entry point: KsmError and Ctrl-C end it with one line (its
    targets are killed and the KSM settings restored by the script's own cleanup)."""
    try:
        raise SystemExit(main())
    except KsmError as exc:
        print(f"{name}: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    except KeyboardInterrupt:
        print(f"{name}: interrupted; targets killed, KSM settings restored", file=sys.stderr)
        raise SystemExit(130) from None


def ksm_available() -> bool:
    return (KSM_DIR / "run").exists()


def read_setting(name: str) -> str:
    """A /sys/kernel/mm/ksm file as text; choice files ("[none] scan-time") give the choice."""
    text = (KSM_DIR / name).read_text().strip()
    if "[" in text:
        return text[text.index("[") + 1 : text.index("]")]
    return text


def write_setting(name: str, value: int | str) -> None:
    # Writing `run` takes ksm_thread_mutex, which ksmd holds for a whole batch of
    # pages_to_scan pages: at 100000 pages the write can block for about a second.
    (KSM_DIR / name).write_text(f"{value}\n")


@dataclass(frozen=True, slots=True)
class KsmCounters:
    """The counters of /sys/kernel/mm/ksm (pages, except general_profit in bytes)."""

    pages_shared: int  # KSM pages in use (one per distinct content)
    pages_sharing: int  # further mappings of them: the pages saved by merging
    pages_unshared: int  # scanned, unique so far (in the unstable tree)
    pages_volatile: int  # changing too fast to be put in a tree
    full_scans: int
    pages_scanned: int
    ksm_zero_pages: int  # empty pages replaced by the zero page (use_zero_pages=1)
    general_profit: int  # (pages_sharing + ksm_zero_pages) * 4096 - rmap_item memory

    @property
    def saved_pages(self) -> int:
        """Pages the kernel's KSM saves: each sharing mapping plus each dropped zero page."""
        return self.pages_sharing + self.ksm_zero_pages

    def minus(self, base: KsmCounters) -> KsmCounters:
        a, b = asdict(self), asdict(base)
        return KsmCounters(**{k: a[k] - b[k] for k in a})


def read_counters() -> KsmCounters:
    values = {}
    for name in KsmCounters.__dataclass_fields__:
        path = KSM_DIR / name
        # pages_scanned (6.10+) and ksm_zero_pages (6.1+) are missing on older kernels
        values[name] = int(path.read_text()) if path.exists() else 0
    return KsmCounters(**values)


def find_ksmd() -> int:
    """The pid of the ksmd kernel thread (a child of kthreadd, pid 2)."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            comm = Path(f"/proc/{entry}/comm").read_text().strip()
            ppid = parent_pid(int(entry))
        except OSError:
            continue
        if comm == "ksmd" and ppid == 2:
            return int(entry)
    raise KsmError("no ksmd kernel thread found (kernel built without CONFIG_KSM?)")


class KsmControl:
    """Writes KSM settings and restores, on ``restore()``, the values found at creation."""

    def __init__(self) -> None:
        if not ksm_available():
            raise KsmError(f"{KSM_DIR} does not exist: kernel built without CONFIG_KSM")
        self.saved = {name: read_setting(name) for name in WRITTEN_SETTINGS}
        self.found = {p.name: read_setting(p.name) for p in sorted(KSM_DIR.iterdir())}
        self.ksmd_pid = find_ksmd()
        self._restored = False

    def check_unused(self) -> None:
        """Refuse to run when somebody else's pages are merged: run=2 would unmerge them."""
        c = read_counters()
        if self.saved["run"] != str(RUN_STOP) or c.pages_shared or c.pages_sharing:
            raise KsmError(
                f"KSM is in use on this machine (run={self.saved['run']}, "
                f"pages_shared={c.pages_shared}, pages_sharing={c.pages_sharing}): the "
                "benchmark would unmerge other processes' pages and count them as its own; "
                "stop it first (echo 2 > /sys/kernel/mm/ksm/run)"
            )

    def configure(self, pages_to_scan: int, sleep_millisecs: int, use_zero_pages: int) -> None:
        """Set the speed with ksmd stopped (run=0); the caller writes run=1 to start."""
        write_setting("run", RUN_STOP)
        if self.saved["advisor_mode"] != "none":
            write_setting("advisor_mode", "none")
        write_setting("pages_to_scan", pages_to_scan)
        write_setting("sleep_millisecs", sleep_millisecs)
        write_setting("use_zero_pages", use_zero_pages)

    def start(self) -> None:
        write_setting("run", RUN_MERGE)

    def stop(self) -> None:
        write_setting("run", RUN_STOP)

    def unmerge_all(self, timeout_s: float = 60.0) -> None:
        """run=2 (unmerge everything, drop stale stable nodes), wait for it, then run=0."""
        write_setting("run", RUN_UNMERGE)
        deadline = time.monotonic() + timeout_s
        while True:
            c = read_counters()
            if c.pages_shared == 0 and c.pages_sharing == 0:
                break
            if time.monotonic() > deadline:
                raise KsmError(
                    f"run=2 did not unmerge in {timeout_s:.0f} s "
                    f"(pages_shared={c.pages_shared}, pages_sharing={c.pages_sharing})"
                )
            time.sleep(0.05)
        write_setting("run", RUN_STOP)

    def wait_idle(self, settle_s: float = 0.2, timeout_s: float = 30.0) -> None:
        """Wait until ksmd sleeps and its pages_scanned and CPU time stop moving."""
        deadline = time.monotonic() + timeout_s
        last = (read_counters().pages_scanned, read_thread_cpu(self.ksmd_pid).runtime_s)
        while True:
            time.sleep(settle_s)
            cpu = read_thread_cpu(self.ksmd_pid)
            now = (read_counters().pages_scanned, cpu.runtime_s)
            if now == last and cpu.state in ("S", "I"):
                return
            if time.monotonic() > deadline:
                raise KsmError(f"ksmd (pid {self.ksmd_pid}) did not go idle in {timeout_s} s")
            last = now

    def restore(self) -> None:
        """Put back every setting written, as found at creation; idempotent."""
        if self._restored:
            return
        errors = []
        for name in WRITTEN_SETTINGS:
            try:
                if read_setting(name) != self.saved[name]:
                    write_setting(name, self.saved[name])
            except OSError as exc:  # keep restoring the others
                errors.append(f"{name}={self.saved[name]}: {exc}")
        self._restored = True
        if errors:
            raise KsmError("could not restore KSM settings: " + "; ".join(errors))
