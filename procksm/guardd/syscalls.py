"""The system calls the guard needs and the os module lacks, through libc (ctypes)."""

from __future__ import annotations

import ctypes
import os

from procksm.arch.x86_64 import SYS_kcmp, SYS_pidfd_getfd

# include/uapi/linux/sched.h, kcmp.h
CLONE_NEWCGROUP = 0x02000000
CLONE_NEWNS = 0x00020000
KCMP_FILE = 0

libc = ctypes.CDLL(None, use_errno=True)
libc.ptrace.restype = ctypes.c_long
libc.ptrace.argtypes = [ctypes.c_long, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p]
libc.syscall.restype = ctypes.c_long


def _errno_error() -> OSError:
    err = ctypes.get_errno()
    return OSError(err, os.strerror(err))


def ptrace(req: int, tid: int, data: int = 0) -> None:
    if libc.ptrace(req, tid, None, ctypes.c_void_p(data)) < 0:
        raise _errno_error()


def same_file(fd1: int, fd2: int) -> bool:
    """Do two of our fds name the same open file (kcmp)?"""
    me = os.getpid()
    return int(libc.syscall(SYS_kcmp, me, me, KCMP_FILE, fd1, fd2)) == 0


def pidfd_getfd(pidfd: int, fd: int) -> int:
    """A copy of fd ``fd`` of the process ``pidfd`` names."""
    got = int(libc.syscall(SYS_pidfd_getfd, pidfd, fd, 0))
    if got < 0:
        raise _errno_error()
    return got


def setns(fd: int, nstype: int) -> None:
    if libc.setns(fd, nstype) != 0:
        raise _errno_error()


def malloc_trim() -> None:
    libc.malloc_trim(0)
