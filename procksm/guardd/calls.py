"""What a notified call is and what it acts on (pure, but for injected_by_procksm's read
of the caller's code). procksm.guard's filter and its tests use these too."""

from __future__ import annotations

import os
import struct

from procksm import PAGE_SIZE
from procksm.arch.x86_64 import (
    AUDIT_ARCH_I386,
    AUDIT_ARCH_X86_64,
    MREMAP_DONTUNMAP,
    NR_MADVISE,
    NR_MREMAP,
    X32_SYSCALL_BIT,
)

_NOTIF = struct.Struct("=QIIiIQ6Q")  # struct seccomp_notif (80 bytes)

# The advice values whose effect differs on a MAP_PRIVATE file page (docs/design.md §3.1-3.2):
# DONTNEED / DONTNEED_LOCKED refill from the file, FREE and WIPEONFORK fail with EINVAL
# on file mappings, REMOVE punches the file (refused as EACCES for a read-only fd).
GUARDED_ADVICE = {4: "MADV_DONTNEED", 8: "MADV_FREE", 9: "MADV_REMOVE",
                  18: "MADV_WIPEONFORK", 24: "MADV_DONTNEED_LOCKED"}  # fmt: skip


class Notification:
    __slots__ = ("arch", "args", "id", "ip", "nr", "tid")
    SIZE = _NOTIF.size

    def __init__(
        self, nid: int, tid: int, nr: int, arch: int, ip: int, args: tuple[int, ...]
    ) -> None:
        self.id, self.tid, self.nr, self.arch, self.ip, self.args = nid, tid, nr, arch, ip, args

    @classmethod
    def unpack(cls, buf: bytes | bytearray) -> Notification:
        nid, tid, _flags, nr, arch, ip, *args = _NOTIF.unpack(buf)
        return cls(nid, tid, nr, arch, ip, tuple(args))


def mremap_may_keep_merged(nr: int, arch: int, args: tuple[int, ...]) -> bool:
    """An mremap that moves or shrinks (never grows, never DONTUNMAP) keeps a merged
    mapping's content and sharing as it keeps an anonymous one's, provided the source
    range lies in one VMA (else the kernel fails it with EFAULT where the anonymous
    range, one VMA before merging, would move). Growing maps the memfd's next offsets,
    which after a shrink are the old pages; DONTUNMAP leaves the source refaulting from
    the memfd instead of reading zeros: both need anonymous memory first."""
    if (nr & ~X32_SYSCALL_BIT) != NR_MREMAP.get(arch):
        return False
    mask = 0xFFFFFFFF if arch == AUDIT_ARCH_I386 else (1 << 64) - 1
    old, new, flags = args[1] & mask, args[2] & mask, args[3] & 0xFFFFFFFF
    rounded = lambda x: (x + PAGE_SIZE - 1) & ~(PAGE_SIZE - 1)  # noqa: E731
    return not flags & MREMAP_DONTUNMAP and rounded(new) <= rounded(old)


def guarded_range(nr: int, arch: int, args: tuple[int, ...]) -> tuple[int, int] | None:
    """The address range a notified call would act on, as the kernel would see it;
    None when the call acts on nothing (the kernel will fail it on its own: a
    misaligned start, a wrapping range, an advice we do not guard)."""
    a0, a1 = args[0], args[1]
    if arch == AUDIT_ARCH_I386:
        a0, a1 = a0 & 0xFFFFFFFF, a1 & 0xFFFFFFFF
    elif arch != AUDIT_ARCH_X86_64:
        return None
    nr &= ~X32_SYSCALL_BIT
    if nr == NR_MADVISE.get(arch):
        if (args[2] & 0xFFFFFFFF) not in GUARDED_ADVICE:
            return None
        length = (a1 + PAGE_SIZE - 1) & ~(PAGE_SIZE - 1)
    elif nr == NR_MREMAP.get(arch):
        # the source range moves or grows; mremap(old_size=0) of a private mapping fails
        length = (a1 + PAGE_SIZE - 1) & ~(PAGE_SIZE - 1) or PAGE_SIZE
    else:
        return None
    if a0 % PAGE_SIZE or length == 0 or a0 + length > 1 << 64:
        return None
    return a0, a0 + length


def injected_by_procksm(n: Notification) -> bool:
    """The call comes from a ``mov eax, imm32; syscall`` wrapper whose immediate is not
    the call's number: only an injection gets there with another number (procksm's
    calls run through such a libc wrapper when the filter exempts another address, as
    filters of an older procksm do). Answering it at once keeps the guard from waiting
    for the stop window the call itself runs in (the unmerge helper's own calls)."""
    try:
        fd = os.open(f"/proc/{n.tid}/mem", os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        code = os.pread(fd, 7, n.ip - 7)
    except OSError:
        return False
    finally:
        os.close(fd)
    return (
        len(code) == 7
        and code[0] == 0xB8
        and code[5:] == b"\x0f\x05"
        and int.from_bytes(code[1:5], "little") != n.nr
    )
