"""Giving a target an fd of a sealed segment (docs/design.md §2.6, §3.6).

Options evaluated (kernel 6.18):

* ``pidfd_getfd()`` takes an fd *from* another process and needs ptrace-attach rights over
  it: usable by targets that may ptrace procksm (root, same pid namespace); it duplicates
  procksm's open file description. The merge engine uses it for those targets.
* The target opens ``/proc/<procksm>/fd/N``: one injected syscall (the merge engine no
  longer uses it: an open creates a new file description, and mappings of different
  file descriptions never merge into one VMA), but the kernel checks
  PTRACE_MODE_READ of procksm by the target (EACCES for a uid-65534 target, measured), and
  the path means something else in a target with its own pid or mount namespace.
  :func:`proc_open_plan` builds it for the cases where it applies; fall back on EACCES.
* **SCM_RIGHTS over abstract AF_UNIX datagram sockets** (this module's main path): works
  for any uid. Abstract names live in a network namespace, so procksm creates its sending
  socket inside the target's netns (a socket keeps its netns for life, also after the
  creating thread switched back -- measured). One datagram carries up to 253 fds (the
  kernel's SCM_MAX_FD): one hand-over per target per merge batch.

Protocol (4 injected syscalls, the target never blocks)::

    with FdSender(pid) as sender:                                   # procksm side
        layout = build_recv_layout(scratch, sender.target_address, max_fds=len(fds))
        write layout.blob at scratch (process_vm_writev)
        sock = inject(layout.socket_call())        # socket(AF_UNIX, SOCK_DGRAM|CLOEXEC, 0)
        inject(layout.bind_call(sock))             # bind(sock, target_address)
        sender.send_fds(fds)                       # datagram is queued synchronously
        ret = inject(layout.recvmsg_call(sock))    # recvmsg(MSG_DONTWAIT|MSG_CMSG_CLOEXEC)
        inject(layout.close_call(sock))
        got = parse_recv_result(layout, read(scratch, layout.size), ret)
        if not got.is_from(sender) or not all(verify_received_fd(pid, fd, seg) ...):
            inject close() of every fd in got.fds and give up on this hand-over

Security (§3.6): anyone in the target's netns can send to an abstract name. (1) Both names
carry 128 random bits and exist for well under a millisecond. (2) The target's recvmsg
returns the *sender's* address; procksm's socket is bound to its own random abstract name,
and a bound abstract name is exclusive within a netns, so no other process can send with
that source address -- this identifies the sender without the extra setsockopt(SO_PASSCRED)
syscall SCM_CREDENTIALS would need in the target. The datagram also carries a random
token. (3) Each received fd is checked to be the segment's inode via
``/proc/PID/fd/N`` (:func:`verify_received_fd`) before anything maps it.

Namespaces: ``setns(fd, CLONE_NEWNET)`` changes the namespace of the *calling thread* only
(measured: /proc/thread-self/ns/net changes, the main thread's does not) and needs
CAP_SYS_ADMIN in the user namespace that owns the target's netns and in procksm's own.
:func:`run_in_netns` does it on a short-lived thread so procksm's own threads never leave
their namespace, even if switching back failed.
"""

from __future__ import annotations

import array
import contextlib
import ctypes
import errno
import os
import platform
import secrets
import socket
import struct
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol, TypeVar

from procksm import procfs
from procksm.arch import x86_64
from procksm.closing import Closing
from procksm.errors import AccessDenied, NoSuchProcess, ProcksmError, Unsupported
from procksm.slots import FileIdentity

T = TypeVar("T")

CLONE_NEWNET = 0x40000000
SCM_MAX_FD = 253  # include/net/scm.h: fds per SCM_RIGHTS message
AT_FDCWD = -100

# Linux syscall numbers of what the target must execute, per architecture.
_SYSCALLS: dict[str, dict[str, int]] = {
    "x86_64": {
        "socket": x86_64.SYS_socket,
        "bind": x86_64.SYS_bind,
        "recvmsg": x86_64.SYS_recvmsg,
        "close": x86_64.SYS_close,
        "openat": x86_64.SYS_openat,
    },
    "aarch64": {"socket": 198, "bind": 200, "recvmsg": 212, "close": 57, "openat": 56},
}

# struct layouts (LP64: identical on x86_64 and aarch64)
_MSGHDR = struct.Struct("=QI4xQQQQi4x")  # name, namelen, iov, iovlen, control, controllen, flags
_IOVEC = struct.Struct("=QQ")
_CMSGHDR = struct.Struct("=Qii")  # cmsg_len (size_t), cmsg_level, cmsg_type
_SOCKADDR_UN_SIZE = 110  # sa_family_t + char sun_path[108]
_TOKEN_BYTES = 16

_libc = ctypes.CDLL(None, use_errno=True)
_libc_setns = _libc.setns
_libc_setns.argtypes = [ctypes.c_int, ctypes.c_int]
_libc_setns.restype = ctypes.c_int


class FdHandoverError(ProcksmError):
    """Handing an fd to a target failed or was not verifiably ours."""


def _align8(n: int) -> int:
    return (n + 7) & ~7


def cmsg_space(nbytes: int) -> int:
    return _CMSGHDR.size + _align8(nbytes)


def _syscall_numbers() -> dict[str, int]:
    machine = platform.machine()
    try:
        return _SYSCALLS[machine]
    except KeyError:
        raise Unsupported(f"fd hand-over: syscall table for {machine} not known") from None


# --------------------------------------------------------------------------------------
# Network namespaces
# --------------------------------------------------------------------------------------


def _ns_error(pid: int, exc: OSError, what: str) -> ProcksmError:
    if isinstance(exc, FileNotFoundError | ProcessLookupError):
        return NoSuchProcess(pid)
    if isinstance(exc, PermissionError):
        return AccessDenied(
            pid,
            f"cannot {what} the network namespace of pid {pid}: permission denied; "
            "setns(CLONE_NEWNET) needs CAP_SYS_ADMIN in the user namespace owning it",
        )
    return ProcksmError(f"cannot {what} the network namespace of pid {pid}: {exc.strerror}")


def netns_identity(pid: int | None = None) -> FileIdentity:
    """(dev, ino) of the network namespace of ``pid`` (None: the calling thread)."""
    return FileIdentity(*procfs.namespace_identity(pid, "net"))


def current_netns_inode(pid: int | None = None) -> int:
    return netns_identity(pid).ino


def same_netns(pid: int) -> bool:
    return netns_identity(pid) == netns_identity(None)


def _enter_netns(fd: int, pid: int) -> None:
    if _libc_setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise _ns_error(pid, OSError(err, os.strerror(err)), "enter")


@contextlib.contextmanager
def in_netns(pid: int) -> Iterator[None]:
    """Run the body with the *calling thread* in ``pid``'s network namespace; restore it
    on every exit path. Prefer :func:`run_in_netns`, which never moves a thread that
    outlives the body."""
    target_fd = procfs.open_namespace(pid, "net")
    try:
        own_fd = procfs.open_namespace(None, "net")
        try:
            _enter_netns(target_fd, pid)
            try:
                yield
            finally:
                if _libc_setns(own_fd, CLONE_NEWNET) != 0:
                    err = ctypes.get_errno()
                    # Should not happen (we were in it a moment ago); the thread is now
                    # stuck in a foreign namespace, which is why run_in_netns exists.
                    raise ProcksmError(
                        f"cannot return to procksm's network namespace: {os.strerror(err)}"
                    )
        finally:
            os.close(own_fd)
    finally:
        os.close(target_fd)


def run_in_netns(pid: int, fn: Callable[[], T]) -> T:
    """Call ``fn`` on a short-lived thread inside ``pid``'s network namespace (or directly
    when it is ours: no setns, no privilege needed)."""
    if same_netns(pid):
        return fn()
    result: list[T] = []
    error: list[BaseException] = []

    def body() -> None:
        try:
            with in_netns(pid):
                result.append(fn())
        except BaseException as exc:
            error.append(exc)

    thread = threading.Thread(target=body, name=f"procksm-netns-{pid}", daemon=True)
    thread.start()
    thread.join()
    if error:
        raise error[0]
    return result[0]


# --------------------------------------------------------------------------------------
# The sender (procksm side)
# --------------------------------------------------------------------------------------


def _abstract_name(kind: str) -> bytes:
    return b"\0procksm-" + kind.encode() + b"-" + secrets.token_hex(16).encode()


class FdSender(Closing):
    """procksm's end of one hand-over to one target: a datagram socket created in the
    target's netns and bound to an unguessable abstract name (the sender check)."""

    def __init__(self, target_pid: int) -> None:
        self.target_pid = target_pid
        self.same_netns = same_netns(target_pid)
        # The name the target binds to (written into its scratch memory) ...
        self.target_address = _abstract_name("r")
        # ... and ours, which the target's recvmsg reports as the source address.
        self.own_address = _abstract_name("s")
        self.token = secrets.token_bytes(_TOKEN_BYTES)
        self._sock = run_in_netns(target_pid, self._make_socket)

    def _make_socket(self) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        try:
            sock.bind(self.own_address)
            # Never wait: the target's fresh socket has an empty queue; a full one means
            # something else is going on.
            sock.setblocking(False)
        except OSError:
            sock.close()
            raise
        return sock

    @property
    def netns(self) -> FileIdentity:
        return netns_identity(self.target_pid)

    def send_fds(self, fds: Sequence[int]) -> None:
        """Send ``fds`` (+ the token) in one datagram to :attr:`target_address`. The target
        must have bound that name already."""
        if not 0 < len(fds) <= SCM_MAX_FD:
            raise ValueError(f"1..{SCM_MAX_FD} fds per hand-over, not {len(fds)}")
        control = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))]
        try:
            self._sock.sendmsg([self.token], control, 0, self.target_address)
        except OSError as exc:
            if exc.errno in (errno.ECONNREFUSED, errno.ENOENT):
                raise FdHandoverError(
                    f"pid {self.target_pid} has no socket bound to the hand-over name "
                    "(the injected bind failed, or it is in another network namespace)"
                ) from exc
            raise FdHandoverError(
                f"cannot send fds to pid {self.target_pid}: {exc.strerror}"
            ) from exc

    def close(self) -> None:
        self._sock.close()


# --------------------------------------------------------------------------------------
# The target side: memory layout for the injected syscalls, and parsing the result
# --------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class InjectedCall:
    """One syscall for the injector to run in the target: ``rax = nr; args in order``."""

    name: str
    nr: int
    args: tuple[int, ...]


def _call(name: str, *args: int) -> InjectedCall:
    return InjectedCall(name, _syscall_numbers()[name], tuple(args))


def _sockaddr_un(address: bytes) -> tuple[bytes, int]:
    """sockaddr_un bytes (110, zero padded) and the addrlen for ``address``. For an
    abstract name, addrlen counts exactly the name: trailing NULs would be part of it."""
    if not address.startswith(b"\0") or not 1 < len(address) <= 108:
        raise ValueError(f"not an abstract AF_UNIX name: {address!r}")
    raw = struct.pack("=H", socket.AF_UNIX) + address
    return raw.ljust(_SOCKADDR_UN_SIZE, b"\0"), 2 + len(address)


@dataclass(frozen=True, slots=True)
class RecvLayout:
    """Where everything lives in the target's scratch memory (all 8-byte aligned)::

    +0    struct msghdr         (for recvmsg; the kernel updates namelen/controllen/flags)
    +56   struct iovec          -> data buffer
    +72   sockaddr_un           the name to bind() (target_address)
    +184  sockaddr_un buffer    msg_name: the sender's address after recvmsg
    +296  data buffer           the token
    +360  control buffer        CMSG_SPACE(4 * max_fds)
    """

    scratch_addr: int
    blob: bytes  # write at scratch_addr before the bind
    max_fds: int
    msghdr_off: int
    bind_addr_off: int
    bind_addrlen: int
    name_off: int
    data_off: int
    data_len: int
    control_off: int
    control_len: int

    @property
    def size(self) -> int:
        """Bytes to read back from scratch_addr after recvmsg."""
        return len(self.blob)

    # SOCK_CLOEXEC / MSG_CMSG_CLOEXEC: nothing procksm puts into the target may leak
    # into a program it execs. MSG_DONTWAIT: if procksm's datagram is not there (send
    # failed) the injected recvmsg returns -EAGAIN instead of blocking a stopped target.
    RECV_FLAGS = socket.MSG_DONTWAIT | socket.MSG_CMSG_CLOEXEC

    def socket_call(self) -> InjectedCall:
        return _call("socket", socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC, 0)

    def bind_call(self, sockfd: int) -> InjectedCall:
        return _call("bind", sockfd, self.scratch_addr + self.bind_addr_off, self.bind_addrlen)

    def recvmsg_call(self, sockfd: int) -> InjectedCall:
        return _call("recvmsg", sockfd, self.scratch_addr + self.msghdr_off, self.RECV_FLAGS)

    def close_call(self, fd: int) -> InjectedCall:
        return _call("close", fd)


def build_recv_layout(scratch_addr: int, target_address: bytes, max_fds: int = 1) -> RecvLayout:
    """The bytes to write at ``scratch_addr`` in the target and the calls that use them."""
    if scratch_addr % 8:
        raise ValueError("scratch_addr must be 8-byte aligned")
    if not 0 < max_fds <= SCM_MAX_FD:
        raise ValueError(f"max_fds must be 1..{SCM_MAX_FD}")
    bind_raw, bind_len = _sockaddr_un(target_address)
    msghdr_off = 0
    iov_off = msghdr_off + _MSGHDR.size
    bind_off = iov_off + _IOVEC.size
    name_off = bind_off + _align8(_SOCKADDR_UN_SIZE)
    data_off = name_off + _align8(_SOCKADDR_UN_SIZE)
    data_len = 64  # > token: a longer datagram shows as MSG_TRUNC
    control_off = data_off + data_len
    control_len = cmsg_space(4 * max_fds)
    base = scratch_addr
    blob = bytearray(control_off + control_len)
    _MSGHDR.pack_into(
        blob,
        msghdr_off,
        base + name_off,
        _SOCKADDR_UN_SIZE,
        base + iov_off,
        1,
        base + control_off,
        control_len,
        0,
    )
    _IOVEC.pack_into(blob, iov_off, base + data_off, data_len)
    blob[bind_off : bind_off + _SOCKADDR_UN_SIZE] = bind_raw
    return RecvLayout(
        scratch_addr=scratch_addr,
        blob=bytes(blob),
        max_fds=max_fds,
        msghdr_off=msghdr_off,
        bind_addr_off=bind_off,
        bind_addrlen=bind_len,
        name_off=name_off,
        data_off=data_off,
        data_len=data_len,
        control_off=control_off,
        control_len=control_len,
    )


def parse_scm_rights(control: bytes) -> list[int]:
    """All fds of all SCM_RIGHTS messages in a control buffer (as filled in by recvmsg)."""
    fds: list[int] = []
    off = 0
    while off + _CMSGHDR.size <= len(control):
        cmsg_len, level, kind = _CMSGHDR.unpack_from(control, off)
        if cmsg_len < _CMSGHDR.size or off + cmsg_len > len(control):
            break
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            n = (cmsg_len - _CMSGHDR.size) // 4
            fds.extend(struct.unpack_from(f"={n}i", control, off + _CMSGHDR.size))
        off += _align8(cmsg_len)
    return fds


def parse_received_fd(control: bytes) -> int:
    """The single fd of a one-fd hand-over."""
    fds = parse_scm_rights(control)
    if len(fds) != 1:
        raise FdHandoverError(f"expected one fd in the control message, got {len(fds)}")
    return fds[0]


class _Sender(Protocol):
    own_address: bytes
    token: bytes


@dataclass(frozen=True, slots=True)
class ReceivedMessage:
    """What the target's recvmsg got. ``fds`` are fd numbers *in the target*: whatever
    else is wrong, the engine closes every one of them in the target if it rejects the
    message."""

    fds: tuple[int, ...]
    sender_address: bytes
    payload: bytes
    msg_flags: int

    @property
    def truncated(self) -> bool:
        """MSG_CTRUNC: fds did not fit (the kernel closed the excess); MSG_TRUNC: data."""
        return bool(self.msg_flags & (socket.MSG_CTRUNC | socket.MSG_TRUNC))

    def is_from(self, sender: _Sender) -> bool:
        return (
            not self.truncated
            and self.sender_address == sender.own_address
            and self.payload == sender.token
        )


def parse_recv_result(layout: RecvLayout, scratch: bytes, recvmsg_ret: int) -> ReceivedMessage:
    """Decode the target's scratch memory after the injected recvmsg returned
    ``recvmsg_ret`` (a byte count, or -errno as the syscall returns it)."""
    if recvmsg_ret < 0:
        err = -recvmsg_ret
        raise FdHandoverError(
            f"injected recvmsg failed: {errno.errorcode.get(err, err)} ({os.strerror(err)})"
            + ("; nothing was queued for the target" if err == errno.EAGAIN else "")
        )
    if len(scratch) < layout.size:
        raise ValueError(f"need {layout.size} bytes of scratch, got {len(scratch)}")
    _, namelen, _, _, _, controllen, flags = _MSGHDR.unpack_from(scratch, layout.msghdr_off)
    name = scratch[layout.name_off : layout.name_off + min(namelen, _SOCKADDR_UN_SIZE)]
    sender_address = name[2:] if len(name) >= 2 else b""
    payload = scratch[layout.data_off : layout.data_off + min(recvmsg_ret, layout.data_len)]
    control = scratch[layout.control_off : layout.control_off + min(controllen, layout.control_len)]
    return ReceivedMessage(tuple(parse_scm_rights(control)), sender_address, payload, flags)


# --------------------------------------------------------------------------------------
# Verification and the root-only shortcut
# --------------------------------------------------------------------------------------


class _HasIdentity(Protocol):
    identity: FileIdentity


def verify_received_fd(pid: int, fd: int, segment: _HasIdentity | FileIdentity) -> bool:
    """Is fd ``fd`` of ``pid`` the memfd of ``segment``? (stat through /proc/PID/fd/N,
    which follows to the open file; needs PTRACE_MODE_READ on the target.)"""
    want = segment if isinstance(segment, FileIdentity) else segment.identity
    found = procfs.fd_identity(pid, fd)
    return found is not None and FileIdentity(*found) == want


def proc_open_possible(target_pid: int) -> bool:
    """Whether ``/proc/<procksm>/fd/N`` names the same thing in the target: same pid and
    mount namespaces. The kernel still checks PTRACE_MODE_READ of procksm by the target
    (root or same-uid targets only): the injected openat may return -EACCES; fall back to
    SCM_RIGHTS then."""
    return all(
        procfs.namespace_identity(target_pid, k) == procfs.namespace_identity("self", k)
        for k in ("pid", "mnt")
    )


@dataclass(frozen=True, slots=True)
class ProcOpenPlan:
    scratch_addr: int
    blob: bytes  # NUL-terminated path, write at scratch_addr

    def openat_call(self) -> InjectedCall:
        return _call("openat", AT_FDCWD, self.scratch_addr, os.O_RDONLY | os.O_CLOEXEC, 0)


def proc_open_plan(scratch_addr: int, procksm_fd: int) -> ProcOpenPlan:
    """The one-syscall hand-over for targets that may open procksm's /proc fds.

    Opening the magic link creates a new open file description with the mode the opener
    asks for (O_RDONLY here); only the seals stop a privileged target that asked for more.
    Verify the result with :func:`verify_received_fd` all the same."""
    path = procfs.own_fd_path(procksm_fd).encode() + b"\0"
    return ProcOpenPlan(scratch_addr, path)
