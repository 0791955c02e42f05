"""A seccomp listener fd: receive a notification, answer it, ask whether it still waits,
whether any task still uses the filter."""

from __future__ import annotations

import errno
import fcntl
import select
import struct

from procksm.guardd.calls import Notification

# include/uapi/linux/seccomp.h
SECCOMP_USER_NOTIF_FLAG_CONTINUE = 1
# _IOWR('!', 0, struct seccomp_notif), _IOWR('!', 1, struct seccomp_notif_resp),
# _IOW('!', 2, __u64)
SECCOMP_IOCTL_NOTIF_RECV = 0xC0502100
SECCOMP_IOCTL_NOTIF_SEND = 0xC0182101
SECCOMP_IOCTL_NOTIF_ID_VALID = 0x40082102
_RESP = struct.Struct("=QqiI")  # struct seccomp_notif_resp (24 bytes)


def receive(fd: int) -> Notification | None:
    """The next notification; None when it was withdrawn before we read it (the task was
    stopped or killed)."""
    buf = bytearray(Notification.SIZE)
    try:
        fcntl.ioctl(fd, SECCOMP_IOCTL_NOTIF_RECV, buf, True)
    except OSError as e:
        if e.errno in (errno.ENOENT, errno.EAGAIN, errno.EINTR):
            return None
        raise
    return Notification.unpack(buf)


def respond_continue(fd: int, nid: int) -> None:
    resp = bytearray(_RESP.pack(nid, 0, 0, SECCOMP_USER_NOTIF_FLAG_CONTINUE))
    try:
        fcntl.ioctl(fd, SECCOMP_IOCTL_NOTIF_SEND, resp, True)
    except OSError as e:
        # ENOENT: withdrawn meanwhile (a stop window restarted the call, or the task
        # died); the restarted call notifies again and is answered then
        if e.errno != errno.ENOENT:
            raise


def id_valid(fd: int, nid: int) -> bool:
    try:
        fcntl.ioctl(fd, SECCOMP_IOCTL_NOTIF_ID_VALID, struct.pack("=Q", nid))
        return True
    except OSError:
        return False


def hung_up(fd: int) -> bool:
    """A listener reports POLLHUP once no task uses its filter any more."""
    p = select.poll()
    p.register(fd, select.POLLIN)
    return any(ev & select.POLLHUP for _fd, ev in p.poll(0))
