"""The bpf(2) commands the observer uses, made from Python with ctypes: the daemon drives
the program the loader child compiled (procksm/observe/bcc_loader.py) without bcc.

``union bpf_attr`` and ``struct bpf_map_info`` as in include/uapi/linux/bpf.h; the command
numbers are ``enum bpf_cmd``'s. Every call packs its part of the union into one buffer of
the union's size (zero-filled: the kernel rejects non-zero bytes past the fields of a
command), and errors become :class:`BpfError` here.
"""

from __future__ import annotations

import ctypes
import errno
import os
import struct
from dataclasses import dataclass

from procksm.arch.x86_64 import SYS_bpf
from procksm.errors import ProcksmError

# enum bpf_cmd
BPF_MAP_CREATE = 0
BPF_MAP_LOOKUP_ELEM = 1
BPF_MAP_UPDATE_ELEM = 2
BPF_MAP_DELETE_ELEM = 3
BPF_OBJ_GET_INFO_BY_FD = 15
BPF_RAW_TRACEPOINT_OPEN = 17
_COMMAND_NAMES = {0: "map create", 1: "map lookup", 2: "map update", 3: "map delete",
                  15: "object info", 17: "raw tracepoint open"}  # fmt: skip

# enum bpf_map_type (the ones cow.bpf.c declares)
BPF_MAP_TYPE_HASH = 1
BPF_MAP_TYPE_ARRAY = 2
BPF_MAP_TYPE_PERCPU_ARRAY = 6
BPF_MAP_TYPE_RINGBUF = 27

BPF_ANY = 0  # update flag: create or replace

_ATTR_SIZE = 144  # sizeof(union bpf_attr) of the 6.1 uapi header; smaller is accepted
# the BPF_MAP_*_ELEM struct: map_fd, (pad), key, value, flags
_ELEM = struct.Struct("=I4xQQQ")
# BPF_MAP_CREATE's first fields: map_type, key_size, value_size, max_entries, map_flags
_CREATE = struct.Struct("=IIIII")
# BPF_OBJ_GET_INFO_BY_FD: bpf_fd, info_len, info
_INFO = struct.Struct("=IIQ")
# BPF_RAW_TRACEPOINT_OPEN: name, prog_fd
_RAW_TP = struct.Struct("=QI")
# struct bpf_map_info up to its name: type, id, key_size, value_size, max_entries,
# map_flags, name[BPF_OBJ_NAME_LEN]
_MAP_INFO = struct.Struct("=IIIIII16s")
_MAP_INFO_SIZE = 88  # the whole struct (the kernel fills at most this many bytes)

_libc = ctypes.CDLL(None, use_errno=True)
_syscall = _libc.syscall
_syscall.restype = ctypes.c_long
_syscall.argtypes = [ctypes.c_long, ctypes.c_int, ctypes.c_void_p, ctypes.c_uint]


class BpfError(ProcksmError):
    """A bpf(2) command failed."""

    def __init__(self, command: int, err: int) -> None:
        what = _COMMAND_NAMES.get(command, f"command {command}")
        super().__init__(f"bpf {what}: {os.strerror(err)}")
        self.errno = err


def bpf(command: int, attr: ctypes.Array[ctypes.c_char]) -> int:
    """bpf(command, attr): the result (an fd for the commands that make one)."""
    ret = int(_syscall(SYS_bpf, command, ctypes.addressof(attr), len(attr)))
    if ret < 0:
        raise BpfError(command, ctypes.get_errno())
    return ret


class ElementCall:
    """One map's lookup, update and delete, with the attr, key and value buffers made once
    (the observer writes the maps on every merge and reads a counter on every poll)."""

    def __init__(self, map_fd: int, key_size: int, value_size: int) -> None:
        self.key = ctypes.create_string_buffer(max(key_size, 1))
        self.value = ctypes.create_string_buffer(max(value_size, 1))
        self._attr = ctypes.create_string_buffer(_ATTR_SIZE)
        self._fd = map_fd

    def lookup(self) -> bool:
        """Fill :attr:`value` with the element of :attr:`key`; False if there is none."""
        return self._call(BPF_MAP_LOOKUP_ELEM, ctypes.addressof(self.value), 0)

    def update(self) -> None:
        """Set the element of :attr:`key` to :attr:`value`."""
        self._call(BPF_MAP_UPDATE_ELEM, ctypes.addressof(self.value), BPF_ANY)

    def delete(self) -> bool:
        """Remove the element of :attr:`key`; False if there was none. (Its last field
        is the key: the value and flags must be zero, or the kernel answers EINVAL.)"""
        return self._call(BPF_MAP_DELETE_ELEM, 0, 0)

    def _call(self, command: int, value: int, flags: int) -> bool:
        _ELEM.pack_into(self._attr, 0, self._fd, ctypes.addressof(self.key), value, flags)
        try:
            bpf(command, self._attr)
        except BpfError as e:
            if e.errno == errno.ENOENT:
                return False
            raise
        return True


@dataclass(frozen=True, slots=True)
class MapInfo:
    """What the kernel says a map is (``struct bpf_map_info``)."""

    type: int
    key_size: int
    value_size: int
    max_entries: int
    flags: int
    name: str


def map_info(fd: int) -> MapInfo:
    info = ctypes.create_string_buffer(_MAP_INFO_SIZE)
    attr = ctypes.create_string_buffer(_ATTR_SIZE)
    _INFO.pack_into(attr, 0, fd, _MAP_INFO_SIZE, ctypes.addressof(info))
    bpf(BPF_OBJ_GET_INFO_BY_FD, attr)
    kind, _id, key, value, entries, flags, name = _MAP_INFO.unpack_from(info)
    return MapInfo(kind, key, value, entries, flags, name.split(b"\0", 1)[0].decode())


def raw_tracepoint_open(name: str, prog_fd: int) -> int:
    """Attach ``prog_fd`` to raw tracepoint ``name``: an fd whose close detaches it."""
    c_name = ctypes.create_string_buffer(name.encode())
    attr = ctypes.create_string_buffer(_ATTR_SIZE)
    _RAW_TP.pack_into(attr, 0, ctypes.addressof(c_name), prog_fd)
    return bpf(BPF_RAW_TRACEPOINT_OPEN, attr)


def ring_buffer_supported() -> bool:
    """Whether this kernel has BPF ring buffers (5.8+; some distributions backport them,
    so ask the kernel rather than its version): a one-page ring made and closed."""
    attr = ctypes.create_string_buffer(_ATTR_SIZE)
    _CREATE.pack_into(attr, 0, BPF_MAP_TYPE_RINGBUF, 0, 0, os.sysconf("SC_PAGE_SIZE"), 0)
    try:
        os.close(bpf(BPF_MAP_CREATE, attr))
    except BpfError as e:
        if e.errno == errno.EINVAL:
            return False
        raise
    return True
