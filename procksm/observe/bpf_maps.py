"""The program's maps as the daemon reads and writes them (bpf(2) through
:mod:`~procksm.observe.bpf_syscall`): elements as bytes, and the u64 arrays and per-CPU
counters the observer uses as numbers."""

from __future__ import annotations

import ctypes
import struct

from procksm import procfs
from procksm.observe.bpf_syscall import BPF_MAP_TYPE_PERCPU_ARRAY, ElementCall
from procksm.observe.manifest import MapSpec

_U32 = struct.Struct("=I")
_U64 = struct.Struct("=Q")
_INTS = {4: _U32, 8: _U64}


class BpfMap:
    """One map: lookup, update and delete of whole elements (keys and values as bytes of
    the map's sizes). A per-CPU map's value is one slot per possible CPU, each rounded up
    to 8 bytes (kernel/bpf/syscall.c, bpf_map_value_size)."""

    def __init__(self, fd: int, spec: MapSpec) -> None:
        self.fd = fd
        self.spec = spec
        self.slot_size = (spec.value_size + 7) & ~7
        value_size = spec.value_size
        if spec.type == BPF_MAP_TYPE_PERCPU_ARRAY:
            value_size = self.slot_size * procfs.possible_cpus()
        self._call = ElementCall(fd, spec.key_size, value_size)
        self._value_size = value_size

    def lookup(self, key: bytes) -> bytes | None:
        self._set_key(key)
        if not self._call.lookup():
            return None
        return self._call.value.raw[: self._value_size]

    def update(self, key: bytes, value: bytes) -> None:
        if len(value) != self._value_size:
            raise ValueError(f"{self.spec.name}: a {len(value)}-byte value, not {self._value_size}")
        self._set_key(key)
        ctypes.memmove(self._call.value, value, len(value))
        self._call.update()

    def delete(self, key: bytes) -> bool:
        """Remove ``key``'s element; False if there was none."""
        self._set_key(key)
        return self._call.delete()

    def _set_key(self, key: bytes) -> None:
        if len(key) != self.spec.key_size:
            raise ValueError(f"{self.spec.name}: a {len(key)}-byte key, not {self.spec.key_size}")
        ctypes.memmove(self._call.key, key, len(key))


class IntArray:
    """An array map of unsigned integers (``BPF_ARRAY(name, u64, n)`` or ``u32``) by index."""

    def __init__(self, m: BpfMap) -> None:
        self.map = m
        self._value = _INTS[m.spec.value_size]

    def __getitem__(self, index: int) -> int:
        value = self.map.lookup(_U32.pack(index))
        if value is None:  # an array has every index below max_entries
            raise IndexError(f"{self.map.spec.name}[{index}]")
        return int(self._value.unpack_from(value)[0])

    def __setitem__(self, index: int, value: int) -> None:
        self.map.update(_U32.pack(index), self._value.pack(value))


class PerCpuU64Array:
    """A per-CPU array of u64 counters (``BPF_PERCPU_ARRAY(name, u64, n)``), summed."""

    def __init__(self, m: BpfMap) -> None:
        self.map = m

    def sum(self, index: int) -> int:
        value = self.map.lookup(_U32.pack(index))
        if value is None:
            raise IndexError(f"{self.map.spec.name}[{index}]")
        step = self.map.slot_size
        return sum(_U64.unpack_from(value, off)[0] for off in range(0, len(value), step))
