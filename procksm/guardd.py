"""The madvise guard's resident processes (procksm.guard explains the filter).

Two lean processes, ``python -S -m procksm.guardd``, hold every listener fd:

* the **active** guard answers the notifications and the control socket;
* the **standby** holds duplicates of the same listener fds (a listener fd is a file:
  ``SCM_RIGHTS`` and ``fork`` share it, and the filter keeps a listener while any
  process holds one), the same listening socket and the same lock, and answers nothing.

Each watches the other with a pidfd. When one dies the other takes over at once (the
standby becomes active), kicks the calls the dead one had received but not answered,
and spawns a new standby that inherits every fd. A single SIGKILL therefore never
closes the last listener: the kernel's ENOSYS answer (a notify filter without listener)
is never reached. An active guard that is stopped or hangs is not dead (its pidfd
stays quiet): the standby pings it, and answers too while it does not answer.

Kernel facts behind the rules:

* A notification the dead guard had received (``SECCOMP_IOCTL_NOTIF_RECV``) stays in its
  SENT state as long as the listener file lives (seccomp_notify_release runs only when
  the last holder closes it): the calling thread would wait for ever. The survivor stops
  such threads for an instant (PTRACE_SEIZE + PTRACE_INTERRUPT): the waiting call
  returns -ERESTARTSYS and is restarted when the thread resumes, and its new
  notification reaches the survivor.
* A notification is received by one ``SECCOMP_IOCTL_NOTIF_RECV``; only the active guard
  receives, so a call is never woken twice.
* ``execve`` keeps fds that are not close-on-exec, and a pidfd names the same process
  after its ``execve``: an upgrade re-executes each guard in place, the standby first,
  then the former active after handing the active role over; never both at once.
* A process started by a service is in the service's cgroup, and a service stop, a
  restart or a pod replacement signals every process of that cgroup: the first guard
  moves itself into a cgroup of its own (``<cgroup2 mount>/procksm-guard``) before it
  accepts any listener; its peers are born there.

The guard imports no numpy (``PROCKSM_GUARD_LEAN=1`` keeps procksm/__init__ from
importing it, ``-S`` skips site's imports): unmerging a range runs in a helper
process (``procksm.guard_unmerge``, started on demand, exits when idle) that calls
``procksm.unmerge.unmerge_pieces``.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import select
import signal
import socket
import struct
import sys
import time

from procksm import PAGE_SIZE
from procksm.arch.x86_64 import (
    AUDIT_ARCH_I386,
    AUDIT_ARCH_X86_64,
    MREMAP_DONTUNMAP,
    NR_MADVISE,
    NR_MREMAP,
    X32_SYSCALL_BIT,
    SYS_kcmp,
    SYS_pidfd_getfd,
)

# include/uapi/linux/seccomp.h
SECCOMP_USER_NOTIF_FLAG_CONTINUE = 1
# _IOWR('!', 0, struct seccomp_notif), _IOWR('!', 1, struct seccomp_notif_resp),
# _IOW('!', 2, __u64)
SECCOMP_IOCTL_NOTIF_RECV = 0xC0502100
SECCOMP_IOCTL_NOTIF_SEND = 0xC0182101
SECCOMP_IOCTL_NOTIF_ID_VALID = 0x40082102
_NOTIF = struct.Struct("=QIIiIQ6Q")  # struct seccomp_notif (80 bytes)
_RESP = struct.Struct("=QqiI")  # struct seccomp_notif_resp (24 bytes)

# The advice values whose effect differs on a MAP_PRIVATE file page (docs/design.md §3.1-3.2):
# DONTNEED / DONTNEED_LOCKED refill from the file, FREE and WIPEONFORK fail with EINVAL
# on file mappings, REMOVE punches the file (refused as EACCES for a read-only fd).
GUARDED_ADVICE = {4: "MADV_DONTNEED", 8: "MADV_FREE", 9: "MADV_REMOVE",
                  18: "MADV_WIPEONFORK", 24: "MADV_DONTNEED_LOCKED"}  # fmt: skip

# procksm.slots.SEGMENT_NAME_PREFIX (not imported: procksm.slots imports numpy);
# tests/test_guard_life.py checks that the two agree.
SEGMENT_NAME_PREFIX = "/memfd:procksm-seg-"

# PROCMAP_QUERY on /proc/PID/maps (6.11+; procksm.procfs.MapsQuery, which imports numpy)
_PROCMAP_QUERY = 0xC0686611
_PROCMAP_QUERY_STRUCT = struct.Struct("=QQQQQQQQQIIIIQQ")
_PROCMAP_QUERY_COVERING_OR_NEXT_VMA = 0x10

# include/uapi/linux/ptrace.h, sched.h
PTRACE_DETACH = 17
PTRACE_SEIZE = 0x4206
PTRACE_INTERRUPT = 0x4207
CLONE_NEWCGROUP = 0x02000000
CLONE_NEWNS = 0x00020000
_WALL = 0x40000000

STATE_ENV = "PROCKSM_GUARD_STATE"  # the fds and role a guard hands to its next image
LEAN_ENV = "PROCKSM_GUARD_LEAN"  # procksm/__init__ skips numpy in the guard
CGROUP_ENV = "PROCKSM_GUARD_CGROUP"  # the guards' cgroup; "none": stay where started
CGROUPNS_ENV = "PROCKSM_GUARD_CGROUPNS"  # a cgroup namespace to join first (Kubernetes)
CGROUP_NAME = "procksm-guard"
# Tests only (tests/test_guard_life.py shows each of its tests failing with one of these):
# "standby" (no peer), "kick" (no restart of calls a dead guard received), "inherit"
# (listeners not kept across an upgrade's execve), "lean" (the guard imports numpy),
# "rescue" (no taking of the listener a dead procksm left in a target's fd table),
# "sigterm" (SIGTERM ends a guard), "stop" (--stop unmerges nothing), "stall" (no
# stand-in for a stopped active guard).
TEST_OFF = os.environ.get("PROCKSM_GUARD_TEST_OFF", "")
PING_S, STALL_S = 0.5, 2.0  # the standby's ping of the active guard; no answer: stand in

_libc = ctypes.CDLL(None, use_errno=True)
_libc.ptrace.restype = ctypes.c_long
_libc.ptrace.argtypes = [ctypes.c_long, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p]
_libc.syscall.restype = ctypes.c_long


# --- what a call acts on (pure) ----------------------------------------------------------


class Notification:
    __slots__ = ("arch", "args", "id", "ip", "nr", "tid")

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


# --- small privileged helpers --------------------------------------------------------------


class _Maps:
    """/proc/TID/maps kept open, queried with PROCMAP_QUERY (~10 us a lookup; falls back
    to parsing the file on kernels before 6.11)."""

    __slots__ = ("_addr", "_name", "fd")

    def __init__(self, tid: int) -> None:
        self.fd = os.open(f"/proc/{tid}/maps", os.O_RDONLY | os.O_CLOEXEC)
        self._name = ctypes.create_string_buffer(256)
        self._addr = ctypes.addressof(self._name)

    def vmas_in(self, start: int, end: int) -> list[tuple[int, int, str]]:
        """(start, end, name) of the VMAs that intersect [start, end); OSError when the
        task is gone."""
        out: list[tuple[int, int, str]] = []
        addr = start
        while addr < end:
            req = bytearray(_PROCMAP_QUERY_STRUCT.pack(
                104, _PROCMAP_QUERY_COVERING_OR_NEXT_VMA, addr,
                0, 0, 0, 0, 0, 0, 0, 0, 256, 0, self._addr, 0,
            ))  # fmt: skip
            try:
                fcntl.ioctl(self.fd, _PROCMAP_QUERY, req, True)
            except OSError as e:
                if e.errno == errno.ENOENT:
                    break  # no VMA at or above addr
                if e.errno in (errno.ENOTTY, errno.EINVAL):
                    return self._parse(start, end)
                raise
            f = _PROCMAP_QUERY_STRUCT.unpack(req)
            vstart, vend, name_size = f[3], f[4], f[11]
            if vstart >= end:
                break
            name = self._name.raw[: max(0, name_size - 1)].decode(errors="replace")
            out.append((vstart, vend, name))
            addr = vend
        return out

    def _parse(self, start: int, end: int) -> list[tuple[int, int, str]]:
        out = []
        text = os.pread(self.fd, 1 << 24, 0).decode(errors="replace")
        for line in text.splitlines():
            fields = line.split(maxsplit=5)
            a, b = (int(x, 16) for x in fields[0].split("-"))
            if a < end and b > start:
                out.append((a, b, fields[5] if len(fields) > 5 else ""))
        return out

    def close(self) -> None:
        os.close(self.fd)


def _ptrace(req: int, tid: int, data: int = 0) -> None:
    if _libc.ptrace(req, tid, None, ctypes.c_void_p(data)) < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def _task_syscall(path: str) -> int | None:
    """The system call a task is blocked in (/proc/TID/syscall), None if none."""
    try:
        with open(path, "rb") as f:
            first = f.read(64).split(b" ", 1)[0]
    except OSError:
        return None
    return int(first) if first.isdigit() else None


def _in_notification(task: str) -> bool:
    """Is the task asleep in a seccomp user notification (its wchan), rather than, say,
    stopped by a tracer at an injected madvise or running a long one?"""
    try:
        with open(f"{task}/wchan", "rb") as f:
            return f.read(64).startswith(b"seccomp_do_user_notification")
    except OSError:
        return False


def _waiting_tasks() -> list[int]:
    """Tasks of seccomp-filtered processes waiting in a notification of madvise or mremap
    (x86_64 numbers, and the i386 ones a compat caller shows): every call a guard could
    have received and not answered. Only those are kicked: a kick seizes the task for an
    instant, which a task in any other state does not need (measured: /proc/TID/wchan
    reads `seccomp_do_user_notification.isra.0` for a task waiting for its answer)."""
    wanted = set(NR_MADVISE.values()) | set(NR_MREMAP.values())
    out = []
    me = os.getpid()
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) == me:
            continue
        try:
            tids = os.listdir(f"/proc/{pid}/task")
        except OSError:
            continue
        hits = [
            int(t)
            for t in tids
            if _task_syscall(f"/proc/{pid}/task/{t}/syscall") in wanted
            and _in_notification(f"/proc/{pid}/task/{t}")
        ]
        if hits and _seccomp_mode(pid) == "2":
            out += hits
    return out


def _seccomp_mode(pid: str) -> str:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("Seccomp:"):
                    return line.split()[1]
    except OSError:
        pass
    return ""


def kick(tids: list[int], timeout: float = 0.2) -> list[int]:
    """Stop each task for an instant and let it go: a call waiting in a notification
    (received by a guard that is gone, so never answered) returns -ERESTARTSYS to the
    interrupt and is restarted by the kernel when the task resumes, notifying anew.
    Transparent to the program (PTRACE_INTERRUPT is no signal; the restart is the
    kernel's own). Returns the tasks that could not be kicked now (traced by someone
    else: EPERM), to try again."""
    seized = []
    busy = []
    for tid in tids:
        try:
            _ptrace(PTRACE_SEIZE, tid)
            _ptrace(PTRACE_INTERRUPT, tid)
            seized.append(tid)
        except OSError as e:
            if e.errno == errno.EPERM:
                busy.append(tid)
    deadline = time.monotonic() + timeout
    for tid in seized:
        while True:
            try:
                got, _status = os.waitpid(tid, os.WNOHANG | _WALL)
            except ChildProcessError:
                break  # gone
            if got:
                break
            if time.monotonic() > deadline:
                break  # not stopped yet: it is in no notification wait; detach below
            time.sleep(0.0005)
        try:
            _ptrace(PTRACE_DETACH, tid)
        except OSError:
            # ESRCH: not in a stop yet (an uninterruptible sleep); it stops on its way
            # out, and a tracer that is gone detaches it then: wait for that stop
            try:
                os.waitpid(tid, _WALL)
                _ptrace(PTRACE_DETACH, tid)
            except OSError:
                pass  # gone
    return busy


def cgroup2_mount() -> str | None:
    with open("/proc/self/mountinfo") as f:
        for line in f:
            pre, _, post = line.partition(" - ")
            if post.split(" ", 1)[0] == "cgroup2":
                return pre.split()[4]
    return None


def leave_service_cgroup(spec: str | None) -> str:
    """Move this process into the guards' own cgroup: a service stop, restart or pod
    replacement signals every process of the service's cgroup, whatever session or
    process group it made. ``spec``: a cgroup directory, or "none" (stay). Returns what
    was done, for the log."""
    if spec == "none":
        return "stays in its cgroup (PROCKSM_GUARD_CGROUP=none)"
    ns = os.environ.get(CGROUPNS_ENV)
    if ns:
        # Kubernetes: a container's own cgroup namespace cannot name a cgroup outside
        # the pod's; the host's (hostPID: /proc/1/ns/cgroup) can (CAP_SYS_ADMIN).
        fd = os.open(ns, os.O_RDONLY | os.O_CLOEXEC)
        try:
            if _libc.setns(fd, CLONE_NEWCGROUP) != 0:
                err = ctypes.get_errno()
                return f"cannot join cgroup namespace {ns}: {os.strerror(err)}"
        finally:
            os.close(fd)
    if not spec:
        mount = cgroup2_mount()
        if mount is None:
            return "no cgroup2 mount: stays in its cgroup"
        spec = os.path.join(mount, CGROUP_NAME)
    try:
        os.makedirs(spec, exist_ok=True)
        with open(os.path.join(spec, "cgroup.procs"), "w") as f:
            f.write("0")  # "0": the writing process
    except OSError as e:
        return f"cannot move to cgroup {spec}: {e.strerror}; a stop of its service kills it"
    return f"in cgroup {spec}"


def _protect_from_oom() -> None:
    # Targets depend on the guard: the OOM killer must pick anything else first.
    try:
        with open("/proc/self/oom_score_adj", "w") as f:
            f.write("-1000")
    except OSError:
        pass


def _log(msg: str) -> None:
    print(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} procksm-guard[{os.getpid()}]: {msg}", flush=True)


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


def _hung_up(fd: int) -> bool:
    """A listener reports POLLHUP once no task uses its filter any more."""
    p = select.poll()
    p.register(fd, select.POLLIN)
    return any(ev & select.POLLHUP for _fd, ev in p.poll(0))


def guard_argv(exe: str | None = None) -> list[str]:
    """The command line of a guard (-S: no site imports, ~2 MiB less)."""
    if TEST_OFF == "lean":
        return [exe or sys.executable, "-m", "procksm.guardd"]
    return [exe or sys.executable, "-S", "-m", "procksm.guardd"]


def guard_env(pythonpath: str | None = None) -> dict[str, str]:
    env = dict(os.environ)
    if TEST_OFF != "lean":
        env[LEAN_ENV] = "1"
    # Compiling guardd.py at each start leaves ~3 MiB of the compiler's memory behind:
    # let the guard read (and write, once) its cached bytecode.
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    # -S drops site-packages from sys.path: name procksm's own directory instead
    env["PYTHONPATH"] = pythonpath or os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env.pop(STATE_ENV, None)
    return env


# --- the unmerge helper ----------------------------------------------------------------------


class Unmerger:
    """A ``python -m procksm.guard_unmerge`` child, started on the first unmerge and
    kept until it has been idle for a while (it exits on its own): merging code imports
    numpy (~20 MiB), which the resident guard must not carry."""

    def __init__(self) -> None:
        self.pid = 0
        self.to: int | None = None
        self.frm: int | None = None
        self.buf = b""

    def _start(self) -> None:
        r1, w1 = os.pipe()
        r2, w2 = os.pipe()
        env = dict(os.environ)
        env.pop(LEAN_ENV, None)
        env.pop(STATE_ENV, None)
        env["PYTHONPATH"] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        pid = os.fork()
        if pid == 0:  # pragma: no cover - child
            try:
                os.dup2(r1, 0)
                os.dup2(w2, 1)
                for sig in (signal.SIGCHLD, signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                    signal.signal(sig, signal.SIG_DFL)  # ignored dispositions survive execve
                os.execve(sys.executable, [sys.executable, "-m", "procksm.guard_unmerge"], env)
            finally:
                os._exit(127)
        os.close(r1)
        os.close(w2)
        self.pid, self.to, self.frm, self.buf = pid, w1, r2, b""
        os.set_inheritable(w1, False)
        os.set_inheritable(r2, False)

    def close(self) -> None:
        for fd in (self.to, self.frm):
            if fd is not None:
                os.close(fd)
        self.to = self.frm = None

    def request(self, line: str, timeout: float = 60.0) -> str:
        """One request, one answer line ("ok N" or "error ..."); raises OSError when the
        helper cannot be reached (then the next request starts a new one)."""
        for attempt in range(2):
            if self.to is None:
                self._start()
            assert self.to is not None and self.frm is not None
            try:
                os.write(self.to, line.encode() + b"\n")
            except BrokenPipeError:
                self.close()  # it exited (idle): start another
                if attempt:
                    raise
                continue
            deadline = time.monotonic() + timeout
            while b"\n" not in self.buf:
                left = deadline - time.monotonic()
                r, _, _ = select.select([self.frm], [], [], max(0.0, left))
                chunk = os.read(self.frm, 4096) if r else b""
                if not chunk:
                    self.close()
                    if r and attempt == 0 and not self.buf:
                        break  # exited between its idle check and our request
                    raise OSError(errno.EPIPE, "the unmerge helper died or hung")
                self.buf += chunk
            else:
                answer, _, self.buf = self.buf.partition(b"\n")
                return answer.decode(errors="replace")
        raise OSError(errno.EPIPE, "the unmerge helper died")


# --- the guard -----------------------------------------------------------------------------


class _Target:
    __slots__ = ("fd", "ip", "key")

    def __init__(self, key: str, fd: int, ip: int) -> None:
        self.key, self.fd, self.ip = key, fd, ip


class Guard:
    """One of the two guards. Single-threaded: one poll over the control socket and the
    listeners (active only), the link to the peer and the peer's pidfd."""

    def __init__(self, path: str, idle_exit: float) -> None:
        self.path = path
        self.idle_exit = idle_exit
        self.role = "active"
        self.gen = 0
        self.targets: dict[int, _Target] = {}  # listener fd -> target
        self.srv: socket.socket | None = None
        self.lock = -1
        self.link: socket.socket | None = None
        self.peer_pid = 0
        self.peer_pidfd = -1
        self.peer_gen = 0
        self.peer_ready = False  # its "hello" arrived: it runs its loop
        # A stopped or hung active guard (SIGSTOP, a debugger) is not dead: its pidfd
        # says nothing. The standby pings it; after STALL_S without an answer it answers
        # too (a "stand-in"), until the active one answers again.
        self.stand_in = False
        self.last_pong = time.monotonic()
        self.ping_at = 0.0
        self.respawn_at = 0.0
        self.respawn_delay = 0.0
        # (gen, exe, pythonpath, pid of the procksm that asked)
        self.upgrading: tuple[int, str, str, int] | None = None
        self.exe, self.pythonpath = sys.executable, guard_env()["PYTHONPATH"]
        self.draining = False
        self.handled = 0
        self.unmerged_pages = 0
        self.kicked = 0
        self.last_activity = time.monotonic()
        self._retry: list[tuple[int, Notification]] = []
        self._last_refusal = ""
        self._expecting: dict[int, tuple[socket.socket, int, str, set[int]]] = {}
        self._kick_again: list[int] = []
        self._kick_until = 0.0
        self._maps: dict[int, _Maps] = {}  # per thread id, LRU order
        self.unmerger = Unmerger()
        self.poll = select.poll()

    # startup

    def start_fresh(self) -> bool:
        """The first guard of a pair: own cgroup, lock, socket. False when a guard pair
        serves this socket already."""
        _log(leave_service_cgroup(os.environ.get(CGROUP_ENV)))
        directory = os.path.dirname(self.path)
        os.makedirs(directory, mode=0o700, exist_ok=True)
        # One guard pair per socket: the flock belongs to the open file, which both
        # guards hold (inherited), so it is held while either lives.
        self.lock = os.open(self.path + ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(self.lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        _unlink(self.path)
        srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        old = os.umask(0o177)  # 0600 from the start: root's (or this user's) procksm only
        try:
            srv.bind(self.path)
        finally:
            os.umask(old)
        srv.listen(16)
        srv.setblocking(False)
        self.srv = srv
        _protect_from_oom()
        _log(f"serving {self.path}")
        return True

    def start_inherited(self, state: str) -> None:
        """A guard started by its peer, or re-executed by an upgrade: everything it
        needs is an inherited fd named in ``state``."""
        doc, targets = parse_state(state)
        self.role = "active" if doc["role"] == 1 else "standby"
        self.gen, self.lock = doc["gen"], doc["lock"]
        self.srv = socket.socket(fileno=doc["srv"])
        self.srv.setblocking(False)
        for fd, key, ip in targets:
            try:
                os.set_blocking(fd, False)
            except OSError:
                _log(f"{key}: listener fd {fd} was not inherited")
                continue
            self.targets[fd] = _Target(key, fd, ip)
        self.handled, self.unmerged_pages = doc["handled"], doc["unmerged"]
        if doc["link"] >= 0:
            self.link = socket.socket(fileno=doc["link"])
            self.peer_pid, self.peer_pidfd = doc["peer_pid"], doc["peer_pidfd"]
            self.peer_ready = True  # it started us, or ran before our execve
        for fd in [self.lock, self.srv.fileno(), *self.targets, doc["link"], self.peer_pidfd]:
            if fd >= 0:
                os.set_inheritable(fd, False)
        _log(f"{self.role}, generation {self.gen}, {len(self.targets)} guarded processes")
        if self.link is not None:
            self._send("hello", os.getpid(), self.gen)
        if self.peer_pidfd >= 0 and _pidfd_dead(self.peer_pidfd):
            self._peer_died()  # it died before we could watch it

    # the loop

    def run(self) -> int:
        self._register()
        try:
            while True:
                timeout = PING_S if self.role == "standby" else 1.0
                if self._retry or self._kick_again:
                    timeout = 0.05
                for fd, ev in self.poll.poll(timeout * 1000):
                    if self.srv is not None and fd == self.srv.fileno():
                        self._accept()
                    elif fd == self.peer_pidfd:
                        self._peer_died()
                    elif self.link is not None and fd == self.link.fileno():
                        self._on_link()
                    elif fd in self.targets and self.serving:
                        self._on_listener(fd, ev)
                    elif fd in self._expecting:
                        self._on_expect(fd)
                self._retry_pending()
                self._kick_pending()
                if self._should_exit():
                    return 0
                now = time.monotonic()
                if (
                    self.targets and self.link is None and now >= self.respawn_at
                    and TEST_OFF != "standby"
                ):  # fmt: skip
                    self._spawn_peer()
                if self.role == "standby" and now - self.last_activity > 10:
                    self._sweep()
                if self.role == "standby" and self.peer_ready and TEST_OFF != "stall":
                    self._watch_active(now)
        except _Exit as e:
            return e.code

    def _should_exit(self) -> bool:
        if self.role != "active" or self.targets or self.upgrading:
            return False
        idle = time.monotonic() - self.last_activity
        if not self.draining and idle <= self.idle_exit:
            return False
        _log("no guarded processes left: exiting")
        self._send("exit")
        _unlink(self.path)
        return True

    @property
    def serving(self) -> bool:
        """Does this guard receive notifications and control requests?"""
        return self.role == "active" or self.stand_in

    def _watch_active(self, now: float) -> None:
        if now >= self.ping_at:
            self._send("ping")
            self.ping_at = now + PING_S
        if not self.stand_in and now - self.last_pong > STALL_S:
            _log(f"active guard {self.peer_pid} does not answer for {STALL_S:.0f} s: "
                 "answering too")  # fmt: skip
            self.stand_in = True
            self._register()
            # calls it received before it stopped wait until it runs again: restart
            # them (as after a death), so that they reach this guard
            self._kick(_waiting_tasks())

    def _register(self) -> None:
        self.poll = select.poll()
        if self.link is not None:
            self.poll.register(self.link.fileno(), select.POLLIN)
        if self.peer_pidfd >= 0:
            self.poll.register(self.peer_pidfd, select.POLLIN)
        if self.serving:
            assert self.srv is not None
            self.poll.register(self.srv.fileno(), select.POLLIN)
            for fd in self.targets:
                self.poll.register(fd, select.POLLIN)
        for fd in self._expecting:
            self.poll.register(fd, select.POLLIN)

    # the peer

    def _send(self, *words: object, fds: list[int] | None = None) -> bool:
        if self.link is None:
            return False
        msg = " ".join(str(w) for w in words).encode()
        try:
            if fds:
                socket.send_fds(self.link, [msg], fds)
            else:
                self.link.send(msg)
            return True
        except OSError as e:
            _log(f"peer link: {e.strerror}")
            return False

    def _on_link(self) -> None:
        assert self.link is not None
        while True:
            try:
                msg, fds = _recv_fds(self.link, socket.MSG_DONTWAIT)
            except BlockingIOError:
                return
            except OSError:
                msg, fds = b"", []
            if not msg:
                return  # EOF: the peer's death is seen on its pidfd
            self._link_message(msg.decode(errors="replace").split(), fds)

    def _link_message(self, words: list[str], fds: list[int]) -> None:
        cmd = words[0] if words else ""
        if cmd == "add" and len(fds) == 1 and len(words) == 3:
            os.set_blocking(fds[0], False)
            self.targets[fds[0]] = _Target(words[1], fds[0], int(words[2]))
            self.last_activity = time.monotonic()
            return
        for fd in fds:
            os.close(fd)
        if cmd == "ping":
            self._send("pong")
        elif cmd == "pong":
            self.last_pong = time.monotonic()
            if self.stand_in:
                _log(f"active guard {self.peer_pid} answers again: standby only")
                self.stand_in = False
                self._register()
        elif cmd == "hello":
            self.peer_gen, self.peer_ready = int(words[2]), True
            self.last_pong = time.monotonic()
            if self.upgrading and self.role == "active" and self.peer_gen >= self.upgrading[0]:
                # The standby runs the new code: it takes the active role, then this
                # guard re-executes itself as the standby. Calls arriving in between
                # wait (they are not lost: the listener is held throughout).
                gen, exe, pypath, nspid = self.upgrading
                self.upgrading = None
                self._send("takeover")
                self._become("standby")
                self._reexec(gen, exe, pypath, nspid)
        elif cmd == "takeover":
            self._become("active")
        elif cmd == "reexec" and len(words) == 5:
            self._reexec(int(words[1]), words[2], words[3], int(words[4]))
        elif cmd == "exit":
            _log("the active guard exits: so does its standby")
            raise _Exit(0)

    def _become(self, role: str) -> None:
        if role != self.role or self.stand_in:
            _log(f"{self.role} -> {role}")
            self.role, self.stand_in = role, False
            self.last_pong = time.monotonic()
            self._register()

    def _peer_died(self) -> None:
        """The peer is gone (SIGKILL, OOM, crash). Its listener copies closed with it;
        ours keep every filter answered."""
        if self.link is not None:
            self._on_link()  # what it sent before dying (fds in flight live in the socket)
            self.link.close()
            self.link = None
        if self.peer_pidfd >= 0:
            os.close(self.peer_pidfd)
        try:
            os.waitpid(self.peer_pid, os.WNOHANG)
        except ChildProcessError:
            pass  # reaped by the kernel (SIGCHLD ignored)
        _log(f"peer {self.peer_pid} is gone")
        was_up = self.peer_ready
        self.peer_pid, self.peer_pidfd, self.peer_ready = 0, -1, False
        self.upgrading = None
        self._become("active")
        self._register()
        # Calls it had received and not answered wait for ever otherwise.
        if TEST_OFF != "kick":
            self._kick(_waiting_tasks())
        self._sweep()
        # A new standby at once: until its fork the survivor is the only holder. But a
        # peer that died before it said hello (broken code after an upgrade, a crash at
        # start) is not respawned in a tight loop: 0.5 s, doubling up to 30 s.
        if was_up:
            self.respawn_delay = 0.0
        else:
            self.respawn_delay = min(30.0, max(0.5, self.respawn_delay * 2))
        self.respawn_at = time.monotonic() + self.respawn_delay

    def _kick(self, tids: list[int]) -> None:
        if tids:
            busy = kick(tids)
            self.kicked += len(tids) - len(busy)
            _log(f"restarted {len(tids) - len(busy)} waiting calls; {len(busy)} to retry")
            self._kick_again = busy
            self._kick_until = time.monotonic() + 5

    def _kick_pending(self) -> None:
        if self._kick_again:
            if time.monotonic() > self._kick_until:
                self._kick_again = []
                return
            waiting = set(_waiting_tasks())
            tids = [t for t in self._kick_again if t in waiting]
            self._kick_again = kick(tids)
            if len(tids) > len(self._kick_again):
                done = len(tids) - len(self._kick_again)
                self.kicked += done
                _log(f"restarted {done} waiting calls (their tracer let go)")

    def _spawn_peer(self) -> None:
        """A new standby that inherits every fd; a child of this guard, hence in its
        cgroup. Its pidfd is opened before anyone could reap it (pid reuse impossible);
        it gets ours inherited."""
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        me = os.pidfd_open(os.getpid())
        assert self.srv is not None
        state = self._state("standby", self.gen, theirs.fileno(), os.getpid(), me)
        argv, env = guard_argv(self.exe), guard_env(self.pythonpath)
        env[STATE_ENV] = state
        pid = os.fork()
        if pid == 0:  # pragma: no cover - child
            try:
                # ignored until the new image installs its handler (an ignored
                # disposition survives execve): a SIGTERM in its first milliseconds
                # must not end it
                signal.signal(signal.SIGTERM, signal.SIG_IGN)
                self._exec(argv, env, state)
            finally:
                os._exit(127)
        os.close(me)
        theirs.close()
        self.link, self.peer_pid, self.peer_pidfd = mine, pid, os.pidfd_open(pid)
        self._register()
        _log(f"started standby {pid} (monotonic {time.monotonic():.6f})")  # (for benchmarks)

    def _state(self, role: str, gen: int, link: int | None, peer_pid: int, peer_pidfd: int) -> str:
        """What the next image (a spawned peer, or this guard after execve) needs: its
        role and the numbers of the fds it inherits, as ``key=value`` words and one
        ``t=FD,KEY,IP`` per guarded process (no json: ~1 MiB less)."""
        assert self.srv is not None
        words = [
            f"role={role}", f"gen={gen}", f"lock={self.lock}", f"srv={self.srv.fileno()}",
            f"link={-1 if link is None else link}", f"peer_pid={peer_pid}",
            f"peer_pidfd={peer_pidfd}", f"handled={self.handled}",
            f"unmerged={self.unmerged_pages}",
        ]  # fmt: skip
        words += [f"t={fd},{t.key},{t.ip}" for fd, t in self.targets.items()]
        return " ".join(words)

    def _exec(self, argv: list[str], env: dict[str, str], state: str) -> None:
        doc, targets = parse_state(state)
        listeners = [] if TEST_OFF == "inherit" else [t[0] for t in targets]
        for fd in [doc["lock"], doc["srv"], doc["link"], doc["peer_pidfd"], *listeners]:
            if fd >= 0:
                os.set_inheritable(fd, True)
        argv = [*argv, "--socket", self.path, "--idle-exit", str(self.idle_exit)]
        os.execve(argv[0], argv, env)

    def _reexec(self, gen: int, exe: str, pypath: str, nspid: int) -> None:
        """Upgrade: this process executes the (new) guard code in place, keeping every
        fd; its pid, hence the peer's pidfd on it, stays the same. ``exe`` and
        ``pypath`` are paths in the mount namespace of ``nspid``, the procksm that asked
        for the upgrade: after a pod replacement the new code is only in the new
        container's file system, so the guard joins that mount namespace first."""
        _log(f"re-executing {exe} (generation {gen})")
        _join_mount_namespace(nspid)
        env = guard_env(pypath)
        link = self.link.fileno() if self.link is not None else None
        state = self._state(self.role, gen, link, self.peer_pid, self.peer_pidfd)
        env[STATE_ENV] = state
        for maps in self._maps.values():
            maps.close()
        self._maps.clear()
        self.unmerger.close()  # it exits on EOF
        try:
            self._exec(guard_argv(exe), env, state)
        except OSError as e:
            _log(f"cannot execute {exe}: {e.strerror}; keeps running the old code")
            self._register()

    # control connections (active guard)

    def _accept(self) -> None:
        assert self.srv is not None
        try:
            conn, _ = self.srv.accept()
        except BlockingIOError:
            return
        self.last_activity = time.monotonic()
        keep = False
        try:
            conn.settimeout(5)
            creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12)
            client_pid, uid, _gid = struct.unpack("3i", creds)
            try:
                msg, fds = _recv_fds(conn, 0)
            except OSError:
                return
            line = msg.decode(errors="replace").strip()
            try:
                if uid not in (0, os.geteuid()):
                    reply = "error: permission denied"
                elif line.startswith("expect ") and len(line.split()) == 4 and not fds:
                    reply = self._expect(conn, line.split())
                    keep = reply == "ok"
                else:
                    reply = self._command(line, fds, client_pid)
                    fds = []  # taken
            finally:
                for fd in fds:
                    os.close(fd)
            try:
                conn.sendall(reply.encode() + b"\n")
            except OSError:
                pass  # the client went away
        finally:
            if not keep:
                conn.close()
        if self._stopping:
            raise _Exit(0)

    # installing a filter: procksm may die at any instruction

    def _expect(self, conn: socket.socket, words: list[str]) -> str:
        """``expect PID START OWN``: procksm is about to inject seccomp() into PID, whose
        listener fd will then sit in PID's fd table only. The connection stays open
        until procksm says ``take FD IP`` (the guard copies the fd out with
        pidfd_getfd) or ``cancel``; if it closes without either, procksm died in
        between, and the guard takes every seccomp listener from PID's fd table
        itself, except the listeners it had before (OWN: fd numbers, "-" for none;
        the process is stopped meanwhile, its fd table changes only by procksm's
        seccomp()). Without that, PID's guarded calls would wait for ever on a listener
        nobody reads."""
        pid, start = int(words[1]), words[2]
        own = {int(x) for x in words[3].split(",") if x.isdigit()}
        conn.setblocking(False)
        self._expecting[conn.fileno()] = (conn, pid, start, own)
        self.poll.register(conn.fileno(), select.POLLIN)
        return "ok"

    def _on_expect(self, fd: int) -> None:
        conn, pid, start, own = self._expecting.pop(fd)
        self.poll.unregister(fd)
        try:
            conn.setblocking(True)
            conn.settimeout(5)
            words = conn.recv(256).decode(errors="replace").split()
        except OSError:
            words = []
        try:
            if words[:1] == ["cancel"]:
                return
            if len(words) == 3 and words[0] == "take":
                reply = self._take(pid, start, int(words[1]), int(words[2]))
                try:
                    conn.sendall(reply.encode() + b"\n")
                except OSError:
                    pass  # it died after asking: the listener is ours all the same
                return
            # EOF: procksm died between "expect" and "take"
            taken = 0 if TEST_OFF == "rescue" else self._rescue(pid, start, own)
            _log(f"pid {pid}: procksm died while installing the filter; took {taken} "
                 "listener(s) from the process's fd table (they stay open there)")  # fmt: skip
        finally:
            conn.close()

    def _take(self, pid: int, start: str, fd: int, ip: int) -> str:
        """Copy fd ``fd`` of ``pid`` (a seccomp listener) and guard with it."""
        try:
            got = _pidfd_getfd(pid, start, fd)
        except OSError as e:
            return f"error: pid {pid} fd {fd}: {e.strerror}"
        if os.readlink(f"/proc/self/fd/{got}") != "anon_inode:seccomp notify":
            os.close(got)
            return f"error: pid {pid} fd {fd} is no seccomp listener"
        self._add_target(f"{pid}-{start}", got, ip)
        return "ok"

    def _rescue(self, pid: int, start: str, own: set[int]) -> int:
        n = 0
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            return 0
        for name in fds:
            if int(name) in own:
                continue
            try:
                link = os.readlink(f"/proc/{pid}/fd/{name}")
            except OSError:
                continue
            if link == "anon_inode:seccomp notify" and self._take(pid, start, int(name), 0) == "ok":
                n += 1
        return n

    def _add_target(self, key: str, listener: int, ip: int) -> None:
        """Guard with ``listener`` unless a listener of the same file is held already
        (kcmp: procksm hands over the copy it made too)."""
        for held in self.targets:
            if _same_file(held, listener):
                os.close(listener)
                return
        os.set_blocking(listener, False)
        t = _Target(key, listener, ip)
        # The standby gets its copy first: once sendmsg returns, the kernel holds
        # the file in the message, which survives the death of either of us.
        self._send("add", t.key, ip, fds=[listener])
        self.targets[listener] = t
        if self.serving:  # (an upgrade may have made it the standby meanwhile)
            self.poll.register(listener, select.POLLIN)
        _log(f"guarding pid {key.split('-')[0]}")

    _stopping = False

    def _command(self, line: str, fds: list[int], client_pid: int = 0) -> str:
        words = line.split()
        if words[:1] in (["list"], ["stats"]) and len(words) == 1:
            for fd in fds:
                os.close(fd)
            self._sweep()
            keys = sorted(t.key for t in self.targets.values())
            if words == ["list"]:
                return "ok " + to_json(keys)
            return "ok " + to_json({
                "pid": os.getpid(), "peer": self.peer_pid or None, "role": self.role,
                "gen": self.gen, "peer_gen": self.peer_gen if self.peer_pid else None,
                "peer_ready": self.peer_ready and bool(self.peer_pid),
                "guarded": keys, "notifications": self.handled,
                "pages_unmerged": self.unmerged_pages, "calls_restarted": self.kicked,
            })  # fmt: skip
        if len(words) == 4 and words[0] == "guard" and len(fds) == 1:
            self._add_target(f"{words[1]}-{words[2]}", fds[0], int(words[3]))
            return "ok"
        for fd in fds:
            os.close(fd)
        if len(words) == 5 and words[0] == "take":  # a retry of an expect's take
            return self._take(int(words[1]), words[2], int(words[3]), int(words[4]))
        if len(words) == 4 and words[0] == "upgrade":
            gen, exe, pypath = int(words[1]), words[2], words[3]
            if self.link is None:
                self._reexec(gen, exe, pypath, client_pid)  # alone: calls wait meanwhile
                return "error: cannot execute the new guard (see guard.log)"
            self.upgrading = (gen, exe, pypath, client_pid)
            self._send("reexec", gen, exe, pypath, client_pid)
            return "ok"
        if words == ["stop"]:
            return self._stop()
        return f"error: unknown request {line[:60]!r}"

    def _stop(self) -> str:
        """``procksm guard --stop``: unmerge every guarded process, then both guards
        exit. Their filters stay (seccomp filters cannot be removed): from then on
        their guarded calls fail with ENOSYS, on memory that is all anonymous again."""
        pages, failed = 0, []
        for t in [] if TEST_OFF == "stop" else list(self.targets.values()):
            pid = int(t.key.split("-")[0])
            try:
                answer = self.unmerger.request(f"all {pid}")
            except OSError as e:
                answer = f"error {e.strerror}"
            if answer.startswith("ok"):
                pages += int(answer.split()[1])
            else:
                failed.append(f"{pid}: {answer[6:]}")
        if failed:
            return f"error: not stopped: cannot unmerge {'; '.join(failed)}"
        _log(f"stop: unmerged {pages} pages of {len(self.targets)} processes; exiting")
        self._send("exit")
        _unlink(self.path)
        self._stopping = True
        return f"ok {pages}"

    def _sweep(self) -> None:
        for fd in list(self.targets):
            if _hung_up(fd):
                self._drop(fd)
        self.last_activity = max(self.last_activity, time.monotonic() - 5)

    def _drop(self, fd: int) -> None:
        t = self.targets.pop(fd, None)
        try:
            self.poll.unregister(fd)
        except KeyError:
            pass  # a standby does not poll it
        os.close(fd)
        if t is not None and self.role == "active":
            _log(f"{t.key}: no task uses the filter any more")
        self.last_activity = time.monotonic()

    # notifications (active guard)

    def _on_listener(self, fd: int, ev: int) -> None:
        buf = bytearray(_NOTIF.size)
        try:
            fcntl.ioctl(fd, SECCOMP_IOCTL_NOTIF_RECV, buf, True)
        except OSError as e:
            if e.errno in (errno.ENOENT, errno.EAGAIN, errno.EINTR):
                # withdrawn before we read it (the task was stopped or killed)
                if ev & select.POLLHUP or _hung_up(fd):
                    self._drop(fd)
                return
            raise
        self._handle(fd, Notification.unpack(buf))

    def _handle(self, fd: int, n: Notification) -> None:
        self.handled += 1
        rng = guarded_range(n.nr, n.arch, n.args)
        if rng is not None:
            keep = mremap_may_keep_merged(n.nr, n.arch, n.args)
            if not self._unmerge_range(n, *rng, keep_if_one_vma=keep):
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
        self, n: Notification, start: int, end: int, *, keep_if_one_vma: bool = False
    ) -> bool:
        """Unmerge procksm's pages of [start, end) in the caller's process (not when
        ``keep_if_one_vma`` and one VMA holds the range); False when it could not be
        done now (the target is traced by someone else, say)."""
        tid = n.tid
        vmas = self._vmas(tid, start, end)
        if vmas is None:
            return True  # the task is gone: nothing will run the call
        if keep_if_one_vma and len(vmas) == 1 and vmas[0][0] <= start and vmas[0][1] >= end:
            return True
        pieces = [
            (max(a, start), min(b, end)) for a, b, name in vmas
            if name.startswith(SEGMENT_NAME_PREFIX)
        ]  # fmt: skip
        if not pieces:
            return True
        if injected_by_procksm(n):
            return True  # procksm's own call, in a stop window of its: never wait for it
        try:
            tgid = _tgid(tid)
        except (OSError, ValueError):
            return True
        request = f"unmerge {tgid} " + " ".join(f"{a} {b}" for a, b in pieces)
        try:
            answer = self.unmerger.request(request)
        except OSError as e:
            _log(f"tid {tid}: unmerge helper: {e.strerror}")
            return False
        if not answer.startswith("ok"):
            msg = f"tid {tid}: cannot unmerge {start:#x}-{end:#x} yet: {answer[6:]}"
            if msg != self._last_refusal:  # retried every 50 ms: say it once
                _log(msg)
                self._last_refusal = msg
            return False
        self._last_refusal = ""
        self.unmerged_pages += int(answer.split()[1])
        return True

    def _vmas(self, tid: int, start: int, end: int) -> list[tuple[int, int, str]] | None:
        """The VMAs of [start, end) in tid's process, through a /proc/TID/maps kept open
        per thread (opening it and reading Tgid cost more than the query itself). None
        when the task is gone."""
        for attempt in range(2):
            maps = self._maps.pop(tid, None)
            try:
                if maps is None:
                    maps = _Maps(tid)
                vmas = maps.vmas_in(start, end)
            except OSError:
                if maps is not None:
                    maps.close()  # that task exited; the tid may belong to a new one now
                if attempt:
                    return None
                continue
            self._maps[tid] = maps  # most recently used last
            while len(self._maps) > 256:
                self._maps.pop(next(iter(self._maps))).close()
            return vmas
        return None


class _Exit(Exception):
    def __init__(self, code: int) -> None:
        self.code = code


_FDS = struct.Struct("=4i")


def _recv_fds(sock: socket.socket, flags: int) -> tuple[bytes, list[int]]:
    """One message and the fds (SCM_RIGHTS, at most 4) that came with it.
    (socket.recv_fds of Python 3.11 drops its ``flags`` argument.)"""
    msg, anc, _flags, _addr = sock.recvmsg(4096, socket.CMSG_LEN(_FDS.size), flags)
    fds: list[int] = []
    for level, typ, data in anc:
        if level == socket.SOL_SOCKET and typ == socket.SCM_RIGHTS:
            n = len(data) // 4
            fds += struct.unpack(f"={n}i", data[: 4 * n])
    return msg, fds


def parse_state(state: str) -> tuple[dict[str, int], list[tuple[int, str, int]]]:
    """Guard._state's words back: numbers (role: 1 active, 0 standby), and the
    guarded processes as (listener fd, key, exempt ip)."""
    doc: dict[str, int] = {}
    targets = []
    for word in state.split():
        k, _, v = word.partition("=")
        if k == "t":
            fd, key, ip = v.split(",")
            targets.append((int(fd), key, int(ip)))
        elif k == "role":
            doc[k] = int(v == "active")
        else:
            doc[k] = int(v)
    return doc, targets


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


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass  # gone already


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


def _tgid(tid: int) -> int:
    with open(f"/proc/{tid}/status") as f:
        for line in f:
            if line.startswith("Tgid:"):
                return int(line.split()[1])
    raise ValueError(tid)


KCMP_FILE = 0


def _same_file(fd1: int, fd2: int) -> bool:
    me = os.getpid()
    return int(_libc.syscall(SYS_kcmp, me, me, KCMP_FILE, fd1, fd2)) == 0


def _pidfd_getfd(pid: int, start: str, fd: int) -> int:
    """A copy of ``pid``'s fd ``fd``; ESRCH when ``pid`` is not the process started at
    tick ``start`` any more."""
    pidfd = os.pidfd_open(pid)
    try:
        with open(f"/proc/{pid}/stat") as f:
            if f.read().rsplit(")", 1)[1].split()[19] != start:
                raise OSError(errno.ESRCH, os.strerror(errno.ESRCH))
        got = int(_libc.syscall(SYS_pidfd_getfd, pidfd, fd, 0))
        if got < 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))
        return got
    finally:
        os.close(pidfd)


def _join_mount_namespace(pid: int) -> None:
    """setns(CLONE_NEWNS) into ``pid``'s mount namespace when it is not ours (needs
    CAP_SYS_ADMIN and CAP_SYS_CHROOT, and a single-threaded caller: the guard is)."""
    if pid <= 0:
        return
    try:
        if os.stat(f"/proc/{pid}/ns/mnt").st_ino == os.stat("/proc/self/ns/mnt").st_ino:
            return
        fd = os.open(f"/proc/{pid}/ns/mnt", os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        _log(f"mount namespace of pid {pid}: {e.strerror}; stays in its own")
        return
    try:
        if _libc.setns(fd, CLONE_NEWNS) != 0:
            err = ctypes.get_errno()
            _log(f"cannot join the mount namespace of pid {pid}: {os.strerror(err)}")
            return
        os.chdir("/")
        _log(f"joined the mount namespace of pid {pid}")
    finally:
        os.close(fd)


def _pidfd_dead(pidfd: int) -> bool:
    p = select.poll()
    p.register(pidfd, select.POLLIN)
    return bool(p.poll(0))


def _signals(guard: Guard) -> None:
    # procksm may have started us from a stop window, where it blocks signals
    # (attach._signals_deferred); a blocked mask is inherited across execve.
    signal.pthread_sigmask(signal.SIG_SETMASK, [])
    # nor keep the CPU pinning and SCHED_FIFO of the window that started it
    try:
        os.sched_setaffinity(0, range(os.cpu_count() or 1))
        os.sched_setscheduler(0, os.SCHED_OTHER, os.sched_param(0))
    except OSError:
        pass
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)
    # Children (the peer, the unmerge helper) are reaped by the kernel; their deaths
    # are seen on a pidfd and on a pipe's EOF.
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)

    def on_term(_sig: int, _frame: object) -> None:
        # A guard is in no service's cgroup: a SIGTERM is someone's explicit kill or
        # the system's shutdown. Exiting now would fail every guarded process's
        # guarded calls (ENOSYS): keep answering while one lives, exit once none
        # does (at shutdown: right after the targets). `procksm guard --stop`
        # unmerges them and stops at once.
        if not guard.draining:
            _log(f"SIGTERM: exiting once none of {len(guard.targets)} guarded processes "
                 "is left (procksm guard --stop unmerges them and stops now)")  # fmt: skip
        guard.draining = True

    if TEST_OFF != "sigterm":
        signal.signal(signal.SIGTERM, on_term)


def _trim() -> None:
    """Hand the memory freed after start-up back to the kernel (the interpreter's
    free lists and glibc's heap keep it otherwise)."""
    import gc

    gc.collect()
    _libc.malloc_trim(0)


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    path, idle_exit = "", 10.0
    while args:
        opt = args.pop(0)
        if opt == "--socket" and args:
            path = args.pop(0)
        elif opt == "--idle-exit" and args:
            idle_exit = float(args.pop(0))
        else:
            print(f"procksm.guardd: unknown argument {opt!r}", file=sys.stderr)
            return 2
    if not path:
        # (procksm.locks.lock_dir would import numpy through procksm.procfs)
        print("procksm.guardd: --socket PATH is required", file=sys.stderr)
        return 2
    if TEST_OFF == "lean":
        import numpy  # noqa: F401
    guard = Guard(path, idle_exit)
    _signals(guard)
    state = os.environ.pop(STATE_ENV, None)
    if state:
        guard.start_inherited(state)
    elif not guard.start_fresh():
        return 0  # a guard pair serves this socket already
    _trim()
    return guard.run()


if __name__ == "__main__":
    raise SystemExit(main())
