"""The madvise guard: merged memory answers madvise and mremap like the anonymous
memory it replaced (DESIGN.md §3.1, §3.2).

Why it is needed (measured here): a merged page is a MAP_PRIVATE mapping of a memfd.
``MADV_DONTNEED`` on it brings back the memfd's content instead of zeros, so an
allocator that relies on zero-after-DONTNEED (jemalloc: Redis, many C/C++/Rust
services) would read stale data; ``MADV_FREE``, ``MADV_WIPEONFORK`` fail with EINVAL
where anonymous memory succeeds, also for a range spanning anon|merged|anon; and
``mremap`` that grows a merged mapping in place would map the memfd's next pages
instead of zeros.

The mechanism: with its first merge into a process, procksm injects a seccomp filter
(``SECCOMP_FILTER_FLAG_NEW_LISTENER | TSYNC``: every thread, and every thread and
child created later) that sends ``madvise`` with those advice values, and ``mremap``,
to a user-space listener, and lets every other system call through untouched. The
listener fd is taken out of the target with ``pidfd_getfd`` (the target's copy is
closed at once: its fd table is as before) and handed to the **guard**, one small
resident process per host (``procksm guard``, started on demand, not a child of the
procksm that started it, OOM-protected). For each notification the guard asks the
kernel (PROCMAP_QUERY) whether the range touches a merged mapping:

* no (the common case, ~40 us): ``SECCOMP_USER_NOTIF_FLAG_CONTINUE``; the kernel runs
  the call as if no filter existed;
* yes: the guard stops the target (PTRACE_SEIZE + INTERRUPT), which withdraws the
  notification — the waiting thread's call returns -ERESTARTSYS and the kernel restarts
  it when the thread resumes — unmerges the merged pages of the range (exact bytes,
  private anonymous memory again, ``procksm.merge.unmerge``'s step) and resumes. The
  restarted call finds anonymous memory only and runs exactly as without procksm.

procksm's own injected ``madvise`` (dropping zero pages) comes from the vDSO's syscall
instruction; the filter lets calls from that address through without a round trip.

When the guard is gone (killed, OOM): the kernel fails the guarded calls of guarded
processes with ENOSYS (a notify filter without a listener). Memory never reads stale;
a call that fails leaves the memory as it was, which allocators handle (jemalloc
treats a failed purge as "not zeroed"; glibc ignores the result). The filter stays
until the process exits (seccomp filters cannot be removed): a restarted guard stacks a
new filter (the newest filter's notification wins) when procksm merges the process
again. Targets that cannot take a filter (non-root without no_new_privs, strict
seccomp) are refused unless the user asks for ``--set-no-new-privs`` (then the
target's later execve of setuid programs gains no privileges: a behaviour change the
user accepted) or ``--no-guard`` (then jemalloc processes are refused instead).
io_uring's IORING_OP_MADVISE bypasses seccomp: io_uring processes are refused anyway
(§3.4).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import json
import os
import select
import selectors
import signal
import socket
import struct
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from procksm import PAGE_SIZE, procfs
from procksm.control import bind_owner_only, peer_uid
from procksm.errors import NoSuchProcess, ProcksmError
from procksm.locks import lock_dir

if TYPE_CHECKING:
    from procksm.attach import StoppedTarget

# include/uapi/linux/audit.h, seccomp.h
AUDIT_ARCH_X86_64 = 0xC000003E
AUDIT_ARCH_I386 = 0x40000003
X32_SYSCALL_BIT = 0x40000000
SECCOMP_SET_MODE_FILTER = 1
SECCOMP_FILTER_FLAG_TSYNC = 1 << 0
SECCOMP_FILTER_FLAG_NEW_LISTENER = 1 << 3
SECCOMP_FILTER_FLAG_TSYNC_ESRCH = 1 << 4
SECCOMP_RET_ALLOW = 0x7FFF0000
SECCOMP_RET_USER_NOTIF = 0x7FC00000
SECCOMP_USER_NOTIF_FLAG_CONTINUE = 1
# _IOWR('!', 0, struct seccomp_notif), _IOWR('!', 1, struct seccomp_notif_resp),
# _IOW('!', 2, __u64)
SECCOMP_IOCTL_NOTIF_RECV = 0xC0502100
SECCOMP_IOCTL_NOTIF_SEND = 0xC0182101
SECCOMP_IOCTL_NOTIF_ID_VALID = 0x40082102
_NOTIF = struct.Struct("=QIIiIQ6Q")  # struct seccomp_notif (80 bytes)
_RESP = struct.Struct("=QqiI")  # struct seccomp_notif_resp (24 bytes)

SYS_seccomp = 317
SYS_pidfd_open = 434
SYS_pidfd_getfd = 438
PR_SET_NO_NEW_PRIVS = 38
CAP_SYS_ADMIN = 21

# x86_64 and i386 (int 0x80 from a 64-bit process) system call numbers
NR_MADVISE = {AUDIT_ARCH_X86_64: 28, AUDIT_ARCH_I386: 219}
NR_MREMAP = {AUDIT_ARCH_X86_64: 25, AUDIT_ARCH_I386: 163}
# The advice values whose effect differs on a MAP_PRIVATE file page (DESIGN §3.1-3.2):
# DONTNEED / DONTNEED_LOCKED refill from the file, FREE and WIPEONFORK fail with EINVAL
# on file mappings, REMOVE punches the file (refused as EACCES for a read-only fd).
GUARDED_ADVICE = {4: "MADV_DONTNEED", 8: "MADV_FREE", 9: "MADV_REMOVE",
                  18: "MADV_WIPEONFORK", 24: "MADV_DONTNEED_LOCKED"}  # fmt: skip


class GuardError(ProcksmError):
    """The guard cannot be installed in a target, or cannot be reached."""


# --- the filter (pure) -----------------------------------------------------------------

_LD_W_ABS, _JEQ_K, _RET_K = 0x20, 0x15, 0x06


def build_filter(exempt_ip: int | None = None) -> bytes:
    """The classic BPF program (struct sock_filter[]) of the guard.

    ``exempt_ip``: the address right after procksm's injection instruction; calls from
    there are procksm's own and pass without a notification.
    """
    # (code, jt-label, jf-label, k); labels resolved to relative jumps below
    prog: list[tuple[int, str | int, str | int, int] | str] = []

    def ld(off: int) -> None:
        prog.append((_LD_W_ABS, 0, 0, off))

    def jeq(k: int, jt: str | int = 0, jf: str | int = 0) -> None:
        prog.append((_JEQ_K, jt, jf, k))

    ld(4)  # arch
    jeq(AUDIT_ARCH_X86_64, 0, "i386")
    if exempt_ip is not None:
        ld(8)  # instruction_pointer, low word (little-endian)
        jeq(exempt_ip & 0xFFFFFFFF, 0, "x64")
        ld(12)
        jeq(exempt_ip >> 32, "allow", "x64")
    prog.append("x64")
    ld(0)  # nr
    nr64 = NR_MADVISE[AUDIT_ARCH_X86_64]
    jeq(nr64, "advice")
    jeq(nr64 | X32_SYSCALL_BIT, "advice")
    jeq(NR_MREMAP[AUDIT_ARCH_X86_64], "notify")
    jeq(NR_MREMAP[AUDIT_ARCH_X86_64] | X32_SYSCALL_BIT, "notify", "allow")
    prog.append("i386")
    jeq(AUDIT_ARCH_I386, 0, "allow")
    ld(0)
    jeq(NR_MADVISE[AUDIT_ARCH_I386], "advice")
    jeq(NR_MREMAP[AUDIT_ARCH_I386], "notify", "allow")
    prog.append("advice")
    ld(32)  # args[2], low word: the advice (an int)
    for i, advice in enumerate(sorted(GUARDED_ADVICE)):
        jeq(advice, "notify", "allow" if i == len(GUARDED_ADVICE) - 1 else 0)
    prog.append("allow")
    prog.append((_RET_K, 0, 0, SECCOMP_RET_ALLOW))
    prog.append("notify")
    prog.append((_RET_K, 0, 0, SECCOMP_RET_USER_NOTIF))

    labels: dict[str, int] = {}
    n = 0
    for item in prog:
        if isinstance(item, str):
            labels[item] = n
        else:
            n += 1
    out = bytearray()
    pc = 0
    for item in prog:
        if isinstance(item, str):
            continue
        code, jt, jf, k = item

        def rel(target: str | int, pc: int = pc) -> int:
            if isinstance(target, int):
                return target
            off = labels[target] - pc - 1
            if not 0 <= off <= 255:
                raise AssertionError(f"BPF jump to {target} out of range")
            return off

        out += struct.pack("=HBBI", code, rel(jt), rel(jf), k)
        pc += 1
    return bytes(out)


def run_filter(prog: bytes, nr: int, arch: int, ip: int, args: tuple[int, ...]) -> int:
    """Interpret ``prog`` (the subset build_filter emits) on one seccomp_data: what the
    kernel would return. For tests of the filter without a kernel."""
    data = struct.pack("=iIQ6Q", nr, arch, ip, *args, *([0] * (6 - len(args))))
    insns = [struct.unpack_from("=HBBI", prog, i) for i in range(0, len(prog), 8)]
    acc, pc = 0, 0
    while True:
        code, jt, jf, k = insns[pc]
        if code == _LD_W_ABS:
            acc = struct.unpack_from("=I", data, k)[0]
            pc += 1
        elif code == _JEQ_K:
            pc += 1 + (jt if acc == k else jf)
        elif code == _RET_K:
            return k
        else:
            raise AssertionError(f"unexpected BPF opcode {code:#x}")


@dataclass(frozen=True)
class Notification:
    id: int
    tid: int
    nr: int
    arch: int
    ip: int
    args: tuple[int, ...]

    @classmethod
    def unpack(cls, buf: bytes | bytearray) -> Notification:
        nid, tid, _flags, nr, arch, ip, *args = _NOTIF.unpack(buf)
        return cls(nid, tid, nr, arch, ip, tuple(args))


MREMAP_DONTUNMAP = 4


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


# --- installing the filter in a target (privileged, under stop) -------------------------

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


def _pidfd_getfd(pid: int, fd: int) -> int:
    pidfd = os.pidfd_open(pid)
    try:
        got = _libc.syscall(SYS_pidfd_getfd, pidfd, fd, 0)
        if got < 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))
        return int(got)
    finally:
        os.close(pidfd)


def why_unguardable(pid: int, *, set_no_new_privs: bool = False) -> str | None:
    """Why a seccomp filter cannot be installed in ``pid`` (None: it can). seccomp(2)
    asks for no_new_privs or CAP_SYS_ADMIN in the task's user namespace."""
    try:
        fields = procfs.read_status_fields(pid)
    except OSError:
        raise NoSuchProcess(pid) from None
    if fields.get("Seccomp") == "1":
        return "strict seccomp mode: madvise guard cannot be installed"
    nnp = fields.get("NoNewPrivs") == "1"
    admin = bool(int(fields.get("CapEff", "0"), 16) >> CAP_SYS_ADMIN & 1)
    if not (nnp or admin or set_no_new_privs):
        return (
            "madvise guard needs no_new_privs or CAP_SYS_ADMIN in the target "
            "(use --set-no-new-privs, or --no-guard to merge without it)"
        )
    return None


def install(st: StoppedTarget, *, set_no_new_privs: bool = False) -> tuple[int, int] | None:
    """Install the guard's filter in the stopped target; returns (listener fd in
    procksm, exempt instruction pointer or 0), or None when the process is guarded
    already through a filter it inherited. All threads get it (TSYNC)."""
    from procksm.inject import SYS_close, SYS_prctl

    # procksm's calls run through a libc wrapper `mov eax, imm; syscall; ret` whose
    # immediate is not madvise or mremap (procksm.inject.find_gadgets): the target itself
    # reaches that instruction only with its own immediate, so exempting it exempts
    # procksm's calls only (its unmerge's mremap must not wait for the guard, which
    # would wait for procksm's stop window).
    exempt_ip = st.syscall_address() + 2  # after `syscall` (0f 05)
    prog = build_filter(exempt_ip)
    scratch = st.scratch()
    fprog = struct.pack("=HxxxxxxQ", len(prog) // 8, scratch + 64)
    st.write_memory(scratch, fprog.ljust(64, b"\0") + prog)
    if set_no_new_privs and why_unguardable(st.pid) is not None:
        # only where seccomp(2) needs it: a root target (CAP_SYS_ADMIN) keeps its privs
        st.syscall_checked(SYS_prctl, PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0, name="prctl")
    flags = (
        SECCOMP_FILTER_FLAG_NEW_LISTENER | SECCOMP_FILTER_FLAG_TSYNC
        | SECCOMP_FILTER_FLAG_TSYNC_ESRCH
    )  # fmt: skip
    fd = st.syscall(SYS_seccomp, SECCOMP_SET_MODE_FILTER, flags, scratch)
    if fd == -errno.EBUSY and has_guard_filter(st.pid):
        # The kernel allows one listener per filter chain: this process inherited the
        # guard's filter (a child forked after its parent was guarded), whose listener
        # the guard holds and which already sends this process's calls to it.
        return None
    if fd < 0:
        raise GuardError(
            f"pid {st.pid}: seccomp() in the target failed: {os.strerror(-fd)}; "
            "not merged (--no-guard merges without the madvise guard)"
        )
    try:
        listener = _pidfd_getfd(st.pid, fd)
    finally:
        st.syscall(SYS_close, fd)
    return listener, exempt_ip or 0


PTRACE_SECCOMP_GET_FILTER = 0x420C


def filter_signature(prog: bytes) -> bytes:
    """``prog`` with the exempt instruction pointer's two constants blanked: the same
    for every guard filter whatever the process's vDSO address."""
    insns = [prog[i : i + 8] for i in range(0, len(prog), 8)]
    if (
        len(insns) > 5
        and insns[2][:4] == struct.pack("=HBB", _LD_W_ABS, 0, 0)
        and (struct.unpack_from("=I", insns[2], 4)[0] == 8)
    ):
        for i in (3, 5):
            insns[i] = insns[i][:4] + b"\0\0\0\0"
    return b"".join(insns)


def has_guard_filter(tid: int) -> bool:
    """Does the (ptrace-stopped, by us) task carry a guard filter? PTRACE_SECCOMP_GET_FILTER
    dumps each classic BPF filter of its chain (root only)."""
    from procksm.inject import ptrace

    ours = {filter_signature(build_filter(None)), filter_signature(build_filter(1 << 40))}
    for index in range(64):
        try:
            n = ptrace(PTRACE_SECCOMP_GET_FILTER, tid, index, 0)
        except OSError:
            return False  # ENOENT: past the last filter; EACCES/EINVAL: cannot tell
        buf = ctypes.create_string_buffer(8 * n)
        try:
            ptrace(PTRACE_SECCOMP_GET_FILTER, tid, index, ctypes.addressof(buf))
        except OSError:
            return False
        if filter_signature(buf.raw) in ours:
            return True
    return False


# --- talking to the guard process ------------------------------------------------------


def socket_path() -> str:
    return os.path.join(lock_dir(), "guard.sock")


class GuardClient:
    """procksm's side: make sure a guard runs, and hand it listeners."""

    def __init__(self, path: str | None = None, *, start_timeout: float = 10.0) -> None:
        self.path = path or socket_path()
        self.start_timeout = start_timeout

    def _connect(self) -> socket.socket:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        s.settimeout(10)
        try:
            s.connect(self.path)
        except OSError:
            s.close()
            raise
        return s

    def running(self) -> bool:
        """Does a guard answer on the socket (without starting one)?"""
        try:
            self._connect().close()
        except OSError:
            return False
        return True

    def connect(self) -> socket.socket:
        """A connection to the guard; starts one if none runs."""
        with contextlib.suppress(OSError):
            return self._connect()
        os.makedirs(os.path.dirname(self.path), mode=0o700, exist_ok=True)
        log = os.open(os.path.join(os.path.dirname(self.path), "guard.log"),
                      os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)  # fmt: skip
        try:
            # Its own session: it must outlive this procksm (and its worker's
            # PDEATHSIG and process group), since targets depend on it.
            subprocess.Popen(
                [sys.executable, "-m", "procksm", "guard", "--socket", self.path],
                stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                start_new_session=True, close_fds=True, cwd="/",
            )  # fmt: skip
        finally:
            os.close(log)
        deadline = time.monotonic() + self.start_timeout
        while True:
            try:
                return self._connect()
            except OSError as e:
                if time.monotonic() > deadline:
                    raise GuardError(
                        f"the madvise guard did not start ({e.strerror}); see "
                        f"{os.path.dirname(self.path)}/guard.log"
                    ) from None
                time.sleep(0.02)

    def _request(self, line: str, fds: list[int] | None = None) -> str:
        try:
            with self.connect() as s:
                if fds:
                    socket.send_fds(s, [line.encode() + b"\n"], fds)
                else:
                    s.sendall(line.encode() + b"\n")
                buf = b""
                while not buf.endswith(b"\n"):
                    chunk = s.recv(65536)
                    if not chunk:
                        break
                    buf += chunk
        except OSError as e:  # at the boundary: the guard died or hung up mid-request
            raise GuardError(f"madvise guard: {e.strerror or e}") from None
        reply = buf.decode(errors="replace").strip()
        if not reply.startswith("ok"):
            raise GuardError(f"madvise guard: {reply or 'no answer'}")
        return reply[2:].strip()

    def guarded(self, pid: int) -> bool:
        """Does the guard hold a live listener for this process? Starts a guard if
        none runs (a filter must never exist before its guard)."""
        start = procfs.start_time(pid)
        return f"{pid}-{start}" in json.loads(self._request("list") or "[]")

    def hand_over(self, pid: int, listener: int, exempt_ip: int) -> None:
        start = procfs.start_time(pid)
        self._request(f"guard {pid} {start} {exempt_ip}", [listener])

    def list(self) -> list[str]:
        return list(json.loads(self._request("list") or "[]"))

    def stats(self) -> dict[str, object]:
        """The guard's pid, guarded processes, notifications answered and pages it
        unmerged because a guarded call touched them."""
        return dict(json.loads(self._request("stats")))


# --- the guard process -----------------------------------------------------------------


@dataclass
class _Guarded:
    key: str  # "<pid>-<start time>"
    listener: int
    exempt_ip: int


class GuardService:
    """The resident guard: answers every guarded target's notifications.

    One thread, one selector over the control socket and every listener. A listener
    reports POLLHUP when no task uses its filter any more (the target and all its
    children exited); the guard exits when it holds none and nobody talked to it for
    ``idle_exit`` seconds.
    """

    def __init__(self, path: str, *, idle_exit: float = 10.0) -> None:
        self.path = path
        self.idle_exit = idle_exit
        self.sel = selectors.DefaultSelector()
        self.targets: dict[int, _Guarded] = {}  # listener fd -> target
        self.handled = 0
        self.unmerged_pages = 0
        self._last_activity = time.monotonic()
        self._retry: list[tuple[int, Notification]] = []
        self._maps: dict[int, procfs.MapsQuery] = {}  # per thread id, LRU order

    def serve(self) -> int:
        directory = os.path.dirname(self.path)
        os.makedirs(directory, mode=0o700, exist_ok=True)
        # One guard per socket: the flock is held for the life of the process.
        lock = os.open(self.path + ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return 0  # another guard serves this socket
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        srv = bind_owner_only(self.path)  # root's (or this user's) procksm only
        srv.listen(16)
        srv.setblocking(False)
        self.sel.register(srv, selectors.EVENT_READ, None)
        _protect_from_oom()
        _log(f"guard {os.getpid()} serving {self.path}")
        try:
            while True:
                timeout = 0.05 if self._retry else 1.0
                for key, _ in self.sel.select(timeout):
                    if key.data is None:
                        self._accept(srv)
                    else:
                        self._on_listener(key.fd)
                self._retry_pending()
                idle = time.monotonic() - self._last_activity
                if not self.targets and idle > self.idle_exit:
                    _log("no guarded processes left: exiting")
                    return 0
        finally:
            with contextlib.suppress(OSError):
                os.unlink(self.path)
            srv.close()

    # control connections

    def _accept(self, srv: socket.socket) -> None:
        try:
            conn, _ = srv.accept()
        except BlockingIOError:
            return
        self._last_activity = time.monotonic()
        with conn:
            conn.settimeout(5)
            uid = peer_uid(conn)
            try:
                msg, fds, _flags, _addr = socket.recv_fds(conn, 4096, 4)
            except OSError:
                return
            try:
                if uid not in (0, os.geteuid()):
                    reply = "error: permission denied"
                else:
                    reply = self._command(msg.decode(errors="replace").strip(), fds)
                    fds = []  # taken
            finally:
                for fd in fds:
                    os.close(fd)
            with contextlib.suppress(OSError):
                conn.sendall(reply.encode() + b"\n")

    def _command(self, line: str, fds: list[int]) -> str:
        words = line.split()
        if words in (["list"], ["stats"]):
            for fd in fds:
                os.close(fd)
            self._drop_dead()
            keys = sorted(t.key for t in self.targets.values())
            if words == ["list"]:
                return "ok " + json.dumps(keys)
            return "ok " + json.dumps(
                {
                    "pid": os.getpid(),
                    "guarded": keys,
                    "notifications": self.handled,
                    "pages_unmerged": self.unmerged_pages,
                }
            )
        if len(words) == 4 and words[0] == "guard" and len(fds) == 1:
            pid, start, ip = int(words[1]), words[2], int(words[3])
            listener = fds[0]
            os.set_blocking(listener, False)
            t = _Guarded(f"{pid}-{start}", listener, ip)
            self.targets[listener] = t
            self.sel.register(listener, selectors.EVENT_READ, t)
            _log(f"guarding pid {pid}")
            return "ok"
        for fd in fds:
            os.close(fd)
        return f"error: unknown request {line[:60]!r}"

    def _drop_dead(self) -> None:
        for fd in list(self.targets):
            events = select_poll(fd)
            if events & _POLLHUP:
                self._drop(fd)

    def _drop(self, fd: int) -> None:
        t = self.targets.pop(fd, None)
        with contextlib.suppress(KeyError, ValueError):
            self.sel.unregister(fd)
        os.close(fd)
        if t is not None:
            _log(f"{t.key}: no task uses the filter any more")
        self._last_activity = time.monotonic()

    # notifications

    def _on_listener(self, fd: int) -> None:
        buf = bytearray(_NOTIF.size)
        try:
            fcntl.ioctl(fd, SECCOMP_IOCTL_NOTIF_RECV, buf, True)
        except OSError as e:
            if e.errno in (errno.ENOENT, errno.EAGAIN, errno.EINTR):
                # withdrawn before we read it (the task was stopped or killed)
                if select_poll(fd) & _POLLHUP:
                    self._drop(fd)
                return
            raise
        self._handle(fd, Notification.unpack(buf))

    def _handle(self, fd: int, n: Notification) -> None:
        self.handled += 1
        rng = guarded_range(n.nr, n.arch, n.args)
        if rng is not None and _injected_by_procksm(n):
            rng = None  # procksm's own call, in a stop window of its: never wait for it
        if rng is not None:
            try:
                keep = mremap_may_keep_merged(n.nr, n.arch, n.args)
                done = self._unmerge_range(n.tid, *rng, keep_if_one_vma=keep)
            except ProcksmError as e:
                _log(f"tid {n.tid}: cannot unmerge {rng[0]:#x}-{rng[1]:#x} yet: {e.message}")
                done = False
            if not done:
                # never let the call run on merged pages: answer later
                self._retry.append((fd, n))
                return
        _respond_continue(fd, n.id)

    def _retry_pending(self) -> None:
        pending, self._retry = self._retry, []
        for fd, n in pending:
            if fd not in self.targets or not _id_valid(fd, n.id):
                continue  # the call was restarted (and notifies again) or its task died
            self._handle(fd, n)

    def _unmerge_range(
        self, tid: int, start: int, end: int, *, keep_if_one_vma: bool = False
    ) -> bool:
        """Unmerge procksm's pages of [start, end) in tid's process (not when
        ``keep_if_one_vma`` and one VMA holds the range); False when it could not be
        done now (the target is traced by someone else, say)."""
        from procksm.merge import SEGMENT_NAME_PREFIX, unmerge_pieces

        vmas = self._vmas(tid, start, end)
        if vmas is None:
            return True  # the task is gone: nothing will run the call
        one_vma = len(vmas) == 1 and vmas[0].start <= start and vmas[0].end >= end
        if keep_if_one_vma and one_vma:
            return True
        pieces = [
            (max(v.start, start), min(v.end, end))
            for v in vmas
            if v.name.startswith(SEGMENT_NAME_PREFIX)
        ]
        if not pieces:
            return True
        try:
            tgid = int(procfs.read_status_fields(tid)["Tgid"])
        except (OSError, KeyError, ValueError):
            return True
        if not pieces:
            return True
        self.unmerged_pages += unmerge_pieces(tgid, pieces)
        return True

    def _vmas(self, tid: int, start: int, end: int) -> list[procfs.QueriedVma] | None:
        """The VMAs of [start, end) in tid's process, through a /proc/TID/maps kept open
        per thread (opening it and reading Tgid cost more than the query itself: the
        fast path went from ~60 to ~35 us per call, measured with
        benchmarks/guard_overhead.py). None when the task is gone."""
        for attempt in range(2):
            maps = self._maps.pop(tid, None)
            if maps is None:
                try:
                    maps = procfs.MapsQuery(tid)
                except ProcksmError:
                    return None
            try:
                vmas = list(maps.vmas_in(start, end))
            except ProcksmError:
                maps.close()  # that task exited; the tid may belong to a new one now
                if attempt:
                    return None
                continue
            self._maps[tid] = maps  # most recently used last
            while len(self._maps) > 256:
                self._maps.pop(next(iter(self._maps))).close()
            return vmas
        return None


_POLLHUP = select.POLLHUP


def _injected_by_procksm(n: Notification) -> bool:
    """The call comes from a `mov eax, imm; syscall; ret` wrapper whose immediate is not
    the call: only an injection (procksm.inject.find_gadgets) gets there with another
    number. Filters installed by an older procksm exempt another address; this keeps
    their guard from waiting for the stop window the call runs in."""
    from procksm.inject import read_memory

    try:
        code = read_memory(n.tid, n.ip - 7, 7)
    except OSError:
        return False
    return (
        len(code) == 7
        and code[0] == 0xB8
        and code[5:] == b"\x0f\x05"
        and int.from_bytes(code[1:5], "little") != n.nr
    )


def select_poll(fd: int) -> int:
    p = select.poll()
    p.register(fd, select.POLLIN | select.POLLHUP)
    for _fd, ev in p.poll(0):
        return ev
    return 0


def _respond_continue(fd: int, nid: int) -> None:
    resp = bytearray(_RESP.pack(nid, 0, 0, SECCOMP_USER_NOTIF_FLAG_CONTINUE))
    try:
        fcntl.ioctl(fd, SECCOMP_IOCTL_NOTIF_SEND, resp, True)
    except OSError as e:
        # ENOENT: withdrawn meanwhile (a stop window restarted the call, or the task
        # died); the restarted call notifies again and is answered then
        if e.errno != errno.ENOENT:
            raise


def _id_valid(fd: int, nid: int) -> bool:
    try:
        fcntl.ioctl(fd, SECCOMP_IOCTL_NOTIF_ID_VALID, struct.pack("=Q", nid))
        return True
    except OSError:
        return False


def _protect_from_oom() -> None:
    # Targets depend on the guard: the OOM killer must pick anything else first.
    with contextlib.suppress(OSError), open("/proc/self/oom_score_adj", "w") as f:
        f.write("-1000")


def _log(msg: str) -> None:
    print(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} procksm-guard: {msg}", flush=True)


def _signals_for_service() -> None:
    # Detached: terminal signals are not for the guard; SIGTERM ends it (documented:
    # guarded calls then fail with ENOSYS).
    # procksm may have started us from a stop window, where it blocks signals
    # (attach._signals_deferred); a blocked mask is inherited across execve.
    signal.pthread_sigmask(signal.SIG_SETMASK, [])
    # nor keep the CPU pinning and SCHED_FIFO of the window that started it
    with contextlib.suppress(OSError):
        os.sched_setaffinity(0, range(os.cpu_count() or 1))
        os.sched_setscheduler(0, os.SCHED_OTHER, os.sched_param(0))
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)


def serve(path: str | None = None, *, idle_exit: float = 10.0) -> int:
    _signals_for_service()
    return GuardService(path or socket_path(), idle_exit=idle_exit).serve()


__all__ = [
    "GUARDED_ADVICE",
    "GuardClient",
    "GuardError",
    "GuardService",
    "build_filter",
    "guarded_range",
    "install",
    "run_filter",
    "serve",
    "why_unguardable",
]
