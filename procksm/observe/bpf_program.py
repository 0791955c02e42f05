"""cow.bpf.c loaded with bcc: why it cannot be (cause and fix, before compiling), the
program as loaded (``--ebpf``), and :class:`BpfProgram`, which owns the loaded program,
its probes, kernel counters, event buffer and armed-page maps."""

from __future__ import annotations

import atexit
import contextlib
import os
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from procksm import procfs
from procksm.closing import Closing
from procksm.errors import Unsupported
from procksm.observe.armed_maps import ArmedPageMaps
from procksm.observe.cow_header import CFG_FOLLOW_CHILDREN, KERNEL_COUNTER_NAMES
from procksm.observe.event_buffer import EventBuffer

BPF_DIR = Path(__file__).resolve().parent.parent / "bpf"


def bpf_source() -> str:
    """The BPF program exactly as loaded: cow.bpf.c with cow.h inlined."""
    header = (BPF_DIR / "cow.h").read_text()
    return (BPF_DIR / "cow.bpf.c").read_text().replace('#include "cow.h"', header, 1)


_CAP_SYS_ADMIN, _CAP_PERFMON, _CAP_BPF = 21, 38, 39


def bpf_unavailable() -> str | None:
    """Why BPF cannot work here (cause and fix, one line), before trying to compile."""
    caps = int(procfs.read_status_fields(os.getpid()).get("CapEff", "0"), 16)
    has = lambda c: bool(caps >> c & 1)  # noqa: E731
    if not (has(_CAP_SYS_ADMIN) or (has(_CAP_BPF) and has(_CAP_PERFMON))):
        return (
            "no CAP_BPF and CAP_PERFMON (or CAP_SYS_ADMIN): run procksm as root, or grant "
            "them (setcap cap_bpf,cap_perfmon+ep, or --cap-add BPF --cap-add PERFMON)"
        )
    try:
        import bcc  # noqa: F401
    except ImportError as e:
        return (
            f"bcc is not importable from {sys.executable} ({e}): install the distro package "
            "python3-bpfcc (PyPI's 'bcc' is another project) and use a venv made with "
            "--system-site-packages (`make setup` does both)"
        )
    release = os.uname().release
    mod = Path("/lib/modules") / release
    if not any((mod / d / "include/linux/kconfig.h").exists() for d in ("source", "build")):
        return (
            f"kernel headers for {release} not found (looked for include/linux/kconfig.h "
            f"under {mod}/source and {mod}/build): install linux-headers-{release}, or "
            "run `make setup`, which links the distro's headers there"
        )
    if not Path("/sys/kernel/tracing/events/exceptions/page_fault_user").exists():
        return (
            "tracefs has no exceptions:page_fault_user (not mounted?): "
            "mount -t tracefs tracefs /sys/kernel/tracing"
        )
    return None


@contextlib.contextmanager
def _stderr_captured() -> Iterator[Callable[[], str]]:
    """Collect what C code writes to fd 2 (clang's diagnostics from bcc) instead of
    letting it reach the terminal; the caller gets it to name the cause in one line."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield lambda: (tmp.seek(0), tmp.read().decode("utf-8", "replace"))[1]
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def _first_error(text: str, exc: BaseException) -> str:
    for line in text.splitlines():
        if "error" in line.lower():
            return line.strip()
    return str(exc)


def _load_bpf(cflags: list[str]) -> tuple[Any, bool]:
    """Compile and load the program: ring buffer first (5.8+), perf buffer otherwise.
    Returns (bcc.BPF, uses_perf_buffer); raises Unsupported with the compiler's error."""
    from bcc import BPF

    src = bpf_source()
    first = ""
    for perf in (False, True):
        flags = [*cflags, "-DPROCKSM_PERF_BUFFER"] if perf else cflags
        with _stderr_captured() as err:
            try:
                return BPF(text=src.encode(), cflags=flags), perf
            except Exception as e:
                first = first or _first_error(err(), e)
    raise Unsupported(
        f"the BPF program did not load ({first}); try `make setup` (kernel headers, bcc) "
        "or see `python -m procksm.observe --ebpf`"
    )


class BpfProgram(Closing):
    """The loaded program: its probes (detached and attached again without reloading),
    its per-CPU counters, and the two ways user space talks to it, :attr:`events` (what
    the kernel reports) and :attr:`maps` (which pages are armed). Raises
    :class:`~procksm.errors.Unsupported` with the compiler's error if it does not load."""

    def __init__(self, follow_children: bool) -> None:
        self._bpf, perf_buffer = _load_bpf([])
        # bcc attached every probe at load; these are their names to detach and attach again
        self._probes: list[tuple[str, bytes, bytes]] = [  # (kind, tracepoint, function)
            ("raw", tp, b"raw_tracepoint__" + tp) for tp in self._bpf.raw_tracepoint_fds
        ] + [
            ("tp", tp, b"tracepoint__" + tp.replace(b":", b"__")) for tp in self._bpf.tracepoint_fds
        ]
        if follow_children:
            cfg = self._bpf[b"config"]
            cfg[cfg.Key(CFG_FOLLOW_CHILDREN)] = cfg.Leaf(1)
        self.events = EventBuffer(self._bpf, perf_buffer)
        self.maps = ArmedPageMaps(self._bpf)

    def kernel_counter(self, idx: int) -> int:
        """One of the per-CPU counters (``C_*``), summed."""
        tab = self._bpf[b"totals"]
        return int(tab.sum(tab.Key(idx)).value)

    def kernel_totals(self) -> dict[str, int]:
        return {name: self.kernel_counter(i) for i, name in enumerate(KERNEL_COUNTER_NAMES)}

    @property
    def probes_attached(self) -> bool:
        return bool(self._bpf.raw_tracepoint_fds or self._bpf.tracepoint_fds)

    def detach_probes(self) -> None:
        for kind, tp, _fn in self._probes:
            with contextlib.suppress(Exception):  # not attached
                if kind == "raw":
                    self._bpf.detach_raw_tracepoint(tp)
                else:
                    self._bpf.detach_tracepoint(tp)

    def attach_probes(self) -> None:
        for kind, tp, fn in self._probes:
            if kind == "raw":
                self._bpf.attach_raw_tracepoint(tp=tp, fn_name=fn)
            else:
                self._bpf.attach_tracepoint(tp=tp, fn_name=fn)

    def close(self) -> None:
        # bcc registers its cleanup at exit, which also keeps the object alive: do it now
        # and unregister it
        self._bpf.cleanup()  # detaches every probe and closes the program and map fds
        atexit.unregister(self._bpf.cleanup)


def load_program(
    use_bpf: bool | None, follow_children: bool
) -> tuple[BpfProgram | None, str | None]:
    """The program, or None and why not (one line, cause and fix). ``use_bpf``: None =
    the program if it loads; True = the program or :class:`~procksm.errors.Unsupported`;
    False = none."""
    if use_bpf is False:
        return None, "eBPF disabled (--no-bpf)"
    reason = bpf_unavailable()
    if reason is None:
        try:
            return BpfProgram(follow_children), None
        except Unsupported as e:
            reason = e.message
    if use_bpf:
        raise Unsupported(f"eBPF observation unavailable: {reason}")
    return None, reason
