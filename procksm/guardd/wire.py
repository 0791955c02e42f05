"""What goes over the guard's sockets: messages with fds, and the control replies' JSON."""

from __future__ import annotations

import socket
import struct


def recv_fds(
    sock: socket.socket, flags: int, size: int = 4096, max_fds: int = 4
) -> tuple[bytes, list[int]]:
    """One message (up to ``size`` bytes) and the fds (SCM_RIGHTS, at most ``max_fds``)
    that came with it. (socket.recv_fds of Python 3.11 drops its ``flags`` argument.)"""
    msg, anc, _flags, _addr = sock.recvmsg(size, socket.CMSG_SPACE(4 * max_fds), flags)
    fds: list[int] = []
    for level, typ, data in anc:
        if level == socket.SOL_SOCKET and typ == socket.SCM_RIGHTS:
            n = len(data) // 4
            fds += struct.unpack(f"={n}i", data[: 4 * n])
    return msg, fds


def to_json(obj: object) -> str:
    """JSON of the few types the control replies hold (the json module costs ~1 MiB)."""
    if obj is None:
        return "null"
    if isinstance(obj, bool):
        return "true" if obj else "false"
    if isinstance(obj, int):
        return str(obj)
    if isinstance(obj, str):
        return (
            '"'
            + "".join(c if c.isalnum() or c in " -_./:" else f"\\u{ord(c):04x}" for c in obj)
            + '"'
        )
    if isinstance(obj, dict):
        return "{" + ", ".join(f"{to_json(str(k))}: {to_json(v)}" for k, v in obj.items()) + "}"
    if isinstance(obj, (list, tuple)):
        return "[" + ", ".join(to_json(v) for v in obj) + "]"
    raise TypeError(type(obj))
