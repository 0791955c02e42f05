"""Attaching the loaded programs to their tracepoints, and taking them off again (the
daemon pauses the observer by detaching: a detached probe costs no fault or syscall).

Each attachment is one fd whose last close detaches the program, so a killed daemon
leaves nothing attached:

* a raw tracepoint: ``bpf(BPF_RAW_TRACEPOINT_OPEN)`` gives the fd;
* a tracepoint: a perf event of the tracepoint (``perf_event_open`` of type
  ``PERF_TYPE_TRACEPOINT``, config = its tracefs id, on CPU 0 for every process: a BPF
  program set on a tracepoint event runs on every CPU), given the program with
  ``PERF_EVENT_IOC_SET_BPF`` and enabled, as bcc's ``bpf_attach_tracepoint`` does.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import os
import struct
from collections.abc import Sequence

from procksm import procfs
from procksm.arch.x86_64 import SYS_perf_event_open
from procksm.closing import Closing
from procksm.errors import Unsupported
from procksm.observe.bpf_syscall import BpfError, raw_tracepoint_open
from procksm.observe.manifest import ProbeSpec

# include/uapi/linux/perf_event.h
PERF_TYPE_TRACEPOINT = 2
PERF_SAMPLE_RAW = 1 << 10
PERF_FLAG_FD_CLOEXEC = 1 << 3
PERF_EVENT_IOC_ENABLE = 0x2400  # _IO('$', 0)
PERF_EVENT_IOC_SET_BPF = 0x40042408  # _IOW('$', 8, __u32)
# struct perf_event_attr up to wakeup_events (PERF_ATTR_SIZE_VER0 = 64 bytes): type,
# size, config, sample_period, sample_type, read_format, flag bits, wakeup_events
PERF_ATTR = struct.Struct("=IIQQQQQI4x8x")

_libc = ctypes.CDLL(None, use_errno=True)
_syscall = _libc.syscall
_syscall.restype = ctypes.c_long


def perf_event_open(fields: tuple[int, ...], pid: int, cpu: int, prog_fd: int | None) -> int:
    """A perf event (``PERF_ATTR`` ``fields``), given program ``prog_fd`` (None: a
    counting event, benchmarks/fault_hooks.py) and enabled: its fd."""
    attr = ctypes.create_string_buffer(PERF_ATTR.pack(*fields), PERF_ATTR.size)
    c_pid, c_cpu, group = ctypes.c_int(pid), ctypes.c_int(cpu), ctypes.c_int(-1)
    flags = ctypes.c_ulong(PERF_FLAG_FD_CLOEXEC)
    fd = int(_syscall(ctypes.c_long(SYS_perf_event_open), attr, c_pid, c_cpu, group, flags))
    if fd < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"perf_event_open: {os.strerror(err)}")
    try:
        if prog_fd is not None:
            fcntl.ioctl(fd, PERF_EVENT_IOC_SET_BPF, prog_fd)
        fcntl.ioctl(fd, PERF_EVENT_IOC_ENABLE, 0)
    except OSError:
        os.close(fd)
        raise
    return fd


def perf_tracepoint_open(category: str, name: str, prog_fd: int) -> int:
    """Run ``prog_fd`` on tracepoint ``category:name``: the perf event's fd."""
    tp_id = procfs.tracepoint_id(category, name)
    # sample_period 1 and wakeup_events 1, as bcc: the program runs on every hit
    fields = (PERF_TYPE_TRACEPOINT, PERF_ATTR.size, tp_id, 1, PERF_SAMPLE_RAW, 0, 0, 1)
    try:
        return perf_event_open(fields, -1, 0, prog_fd)
    except OSError as e:
        raise OSError(e.errno, f"perf_event_open of {category}:{name}: {e.strerror}") from None


def attach(probe: ProbeSpec, prog_fd: int) -> int:
    """Attach one probe; returns the fd that holds the attachment."""
    try:
        if probe.kind == "raw_tracepoint":
            return raw_tracepoint_open(probe.target, prog_fd)
        category, _, name = probe.target.partition(":")
        return perf_tracepoint_open(category, name, prog_fd)
    except (OSError, BpfError) as e:
        reason = e.message if isinstance(e, BpfError) else e.strerror
        raise Unsupported(f"cannot attach {probe.function} to {probe.target}: {reason}") from e


class Probes(Closing):
    """The program's probes: attached together, detached together, any number of times."""

    def __init__(self, probes: Sequence[tuple[ProbeSpec, int]]) -> None:
        self._probes = list(probes)  # (where, program fd)
        self._links: list[int] = []

    @property
    def attached(self) -> bool:
        return bool(self._links)

    def attach(self) -> None:
        if self._links:
            return
        try:
            for probe, prog_fd in self._probes:
                self._links.append(attach(probe, prog_fd))
        except BaseException:
            self.detach()
            raise

    def detach(self) -> None:
        links, self._links = self._links, []
        for fd in links:
            with contextlib.suppress(OSError):
                os.close(fd)

    def close(self) -> None:
        self.detach()
