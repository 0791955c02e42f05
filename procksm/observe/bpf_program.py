"""cow.bpf.c: why it cannot be loaded here (cause and fix, before compiling), the program
as loaded (``--ebpf``), and :class:`BpfProgram`, which owns the loaded program (compiled
and loaded by a child, :mod:`~procksm.observe.bcc_loader`: this process never imports
bcc), its probes, kernel counters, event buffer and armed-page maps."""

from __future__ import annotations

import contextlib
import importlib.util
import os
import sys
from pathlib import Path

from procksm import procfs
from procksm.closing import Closing
from procksm.errors import Unsupported
from procksm.observe.armed_maps import ArmedPageMaps
from procksm.observe.bpf_maps import BpfMap, IntArray, PerCpuU64Array
from procksm.observe.bpf_syscall import BpfError, ring_buffer_supported
from procksm.observe.cow_header import CFG_FOLLOW_CHILDREN, KERNEL_COUNTER_NAMES
from procksm.observe.event_buffer import EventBuffer
from procksm.observe.handoff import load_in_child
from procksm.observe.probes import Probes
from procksm.observe.ring_buffer import RingBuffer

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
    if importlib.util.find_spec("bcc") is None:
        return bcc_import_failure(ImportError("No module named 'bcc'"))
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
    try:
        ring_buffer = ring_buffer_supported()
    except BpfError as e:
        return f"cannot create a BPF map ({e.message}): run procksm as root"
    if not ring_buffer:
        return (
            f"kernel {release} has no BPF ring buffer (5.8+): procksm reads COW "
            "breaks from one; run a newer kernel"
        )
    return None


def bcc_import_failure(e: ImportError) -> str:
    """Why bcc cannot be imported, and how to get it (the loader child imports it)."""
    return (
        f"bcc is not importable from {sys.executable} ({e}): install the distro package "
        "python3-bpfcc (PyPI's 'bcc' is another project) and use a venv made with "
        "--system-site-packages (`make setup` does both)"
    )


class BpfProgram(Closing):
    """The loaded program, in this process without bcc: its probes (detached and attached
    again without reloading), its per-CPU counters, and the two ways user space talks to
    it, :attr:`events` (what the kernel reports) and :attr:`maps` (which pages are
    armed). Loading happens in a child (:func:`~procksm.observe.handoff.load_in_child`);
    raises :class:`~procksm.errors.Unsupported` with its one-line reason if it fails."""

    def __init__(self, follow_children: bool) -> None:
        with contextlib.ExitStack() as stack:
            objects = stack.enter_context(load_in_child())
            maps = {
                spec.name: BpfMap(objects.map_fds[spec.name], spec)
                for spec in objects.manifest.maps
            }
            self._totals = PerCpuU64Array(maps["totals"])
            if follow_children:
                IntArray(maps["config"])[CFG_FOLLOW_CHILDREN] = 1
            self.maps = ArmedPageMaps(maps)
            ring = maps["events"]
            self.events = EventBuffer(
                stack.enter_context(RingBuffer(ring.fd, ring.spec.max_entries))
            )
            probes = zip(objects.manifest.probes, objects.prog_fds, strict=True)
            self._probes = stack.enter_context(Probes(list(probes)))
            self._probes.attach()
            # closed in reverse: the probes (nothing runs any more), the ring's mappings,
            # the fds; the kernel frees each object with its last reference
            self._resources = stack.pop_all()

    def kernel_counter(self, idx: int) -> int:
        """One of the per-CPU counters (``C_*``), summed."""
        return self._totals.sum(idx)

    def kernel_totals(self) -> dict[str, int]:
        return {name: self.kernel_counter(i) for i, name in enumerate(KERNEL_COUNTER_NAMES)}

    @property
    def probes_attached(self) -> bool:
        return self._probes.attached

    def detach_probes(self) -> None:
        self._probes.detach()

    def attach_probes(self) -> None:
        self._probes.attach()

    def close(self) -> None:
        self._resources.close()


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
