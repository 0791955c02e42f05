"""The madvise guard: merged memory answers madvise and mremap like the anonymous
memory it replaced (docs/design.md §3.1, §3.2).

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
closed at once: its fd table is as before) and handed to the **guard**: two small
resident processes per host (procksm.guardd: an active one that answers and a standby
that holds duplicates of every listener, each respawning the other; in a cgroup of
their own, so that no service stop kills them; started on demand, OOM-protected).
For each notification the guard asks the kernel (PROCMAP_QUERY) whether the range
touches a merged mapping:

* no (the common case, ~30 us of the guard's CPU): ``SECCOMP_USER_NOTIF_FLAG_CONTINUE``;
  the kernel runs the call as if no filter existed;
* yes: the guard's unmerge helper (procksm.guard_unmerge, a child started on demand,
  so that the resident guard never imports numpy) stops the target (PTRACE_SEIZE +
  INTERRUPT), which withdraws the notification — the waiting thread's call returns
  -ERESTARTSYS and the kernel restarts it when the thread resumes — unmerges the
  merged pages of the range (exact bytes, private anonymous memory again,
  ``procksm.unmerge.unmerge_pieces``) and resumes. The restarted call finds anonymous
  memory only and runs exactly as without procksm.

procksm's own injected ``madvise`` (dropping zero pages) comes from the vDSO's syscall
instruction; the filter lets calls from that address through without a round trip.

When both guards are gone at once (both SIGKILLed within the instant it takes the
survivor to notice, a host-wide kill): the kernel fails the guarded calls of guarded
processes with ENOSYS (a notify filter without a listener). Memory never reads stale;
a call that fails leaves the memory as it was, which allocators handle (jemalloc
treats a failed purge as "not zeroed"; glibc ignores the result). The filter stays
until the process exits (seccomp filters cannot be removed): a new guard stacks a
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
import json
import os
import signal
import socket
import struct
import subprocess
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from procksm import procfs
from procksm.arch.x86_64 import (
    AUDIT_ARCH_I386,
    AUDIT_ARCH_X86_64,
    NR_MADVISE,
    NR_MREMAP,
    X32_SYSCALL_BIT,
    SYS_close,
    SYS_kcmp,
    SYS_pidfd_getfd,
    SYS_prctl,
    SYS_seccomp,
)
from procksm.attach.locks import lock_dir
from procksm.errors import NoSuchProcess, ProcksmError
from procksm.guardd.calls import (
    GUARDED_ADVICE,
    Notification,
    guarded_range,
    mremap_may_keep_merged,
)
from procksm.guardd.launch import guard_argv, guard_env

if TYPE_CHECKING:
    from procksm.attach import StoppedTarget

SECCOMP_SET_MODE_FILTER = 1
SECCOMP_FILTER_FLAG_TSYNC = 1 << 0
SECCOMP_FILTER_FLAG_NEW_LISTENER = 1 << 3
SECCOMP_FILTER_FLAG_TSYNC_ESRCH = 1 << 4
SECCOMP_RET_ALLOW = 0x7FFF0000
SECCOMP_RET_USER_NOTIF = 0x7FC00000

PR_SET_NO_NEW_PRIVS = 38
CAP_SYS_ADMIN = 21


class GuardError(ProcksmError):
    """The guard cannot be installed in a target, or cannot be reached."""


# --- the filter (pure) -----------------------------------------------------------------

_LD_W_ABS, _JEQ_K, _RET_K = 0x20, 0x15, 0x06
# A filter being written: instructions (code, jt, jf, k) whose jumps are offsets or the
# names of labels, and the labels (strings) themselves
_Program = list[tuple[int, str | int, str | int, int] | str]


def build_filter(exempt_ip: int | None = None) -> bytes:
    """The classic BPF program (struct sock_filter[]) of the guard.

    ``exempt_ip``: the address right after procksm's injection instruction; calls from
    there are procksm's own and pass without a notification.
    """
    prog: _Program = []  # labels resolved to relative jumps by _assemble

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
    return _assemble(prog)


def _assemble(prog: _Program) -> bytes:
    """The struct sock_filter[] of ``prog``, its labels resolved to relative jumps."""
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


NOTIFY_FD_LINK = "anon_inode:seccomp notify"  # what /proc/PID/fd/N of a listener reads
KCMP_FILE = 0


def _notify_fds(pid: int) -> list[int]:
    return [fd for fd, link in procfs.list_fd_targets(pid).items() if link == NOTIFY_FD_LINK]


def _same_file(pid1: int, fd1: int, pid2: int, fd2: int) -> bool:
    """kcmp(2): do fd1 of pid1 and fd2 of pid2 refer to one open file?"""
    return int(_libc.syscall(SYS_kcmp, pid1, pid2, KCMP_FILE, fd1, fd2)) == 0


@dataclass(frozen=True, slots=True)
class ListenerCopies:
    """Copies of a guard's listeners in a target's fd table.

    procksm closes the target's copy of the listener right after seccomp() (install);
    one that died in between left it there, and the guard, which rescued the listener
    from the target's fd table (procksm.guardd.intake), cannot close it. A copy of a
    listener the guard holds is such a leftover: the next procksm session closes it in
    its first window (found before the window, checked again under stop)."""

    pid: int
    found: tuple[tuple[int, int, int], ...] = ()  # (target fd, guard pid, guard fd)

    def still_left(self) -> list[int]:
        """Under stop: the target's fds that are still copies of a guard's listener."""
        return sorted({fd for fd, gpid, gfd in self.found if _same_file(self.pid, fd, gpid, gfd)})


def listener_copies_left_in(pid: int, client: GuardClient | None = None) -> ListenerCopies:
    """The listener copies a dead procksm left in ``pid`` (see ListenerCopies); starts no
    guard (none running: nothing can be a copy of its listeners)."""
    try:
        ours = _notify_fds(pid)
        if not ours:
            return ListenerCopies(pid)
        client = client or GuardClient()
        if not client.running():
            return ListenerCopies(pid)
        stats = client.stats()
        guards = [int(g) for g in (stats.get("pid"), stats.get("peer")) if isinstance(g, int)]
        found = tuple(
            (fd, gpid, gfd)
            for gpid in guards
            for gfd in _notify_fds(gpid)
            for fd in ours
            if _same_file(pid, fd, gpid, gfd)
        )
    except (ProcksmError, OSError):
        return ListenerCopies(pid)  # cannot look (gone, another user's guard): leave them
    return ListenerCopies(pid, found)


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
    # procksm's calls run through a libc wrapper `mov eax, imm; syscall; ret` whose
    # immediate is not madvise or mremap (procksm.attach.inject.find_gadgets): the target itself
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
    # From seccomp() on, the listener is in the target's fd table only: if this process
    # dies before the guard holds a copy, the target's guarded calls wait for ever. The
    # guard is told first and watches this connection (procksm.guardd.intake); a guard
    # of an older procksm (None) gets its copy from merge.py afterwards.
    client = GuardClient()
    conn = client.expect(st.pid, st.injector_tid, st.syscall_address())
    try:
        fd = st.syscall(SYS_seccomp, SECCOMP_SET_MODE_FILTER, flags, scratch)
        if os.environ.get("PROCKSM_GUARD_TEST_DIE") == "after-seccomp":
            os.kill(os.getpid(), signal.SIGKILL)  # tests: die at the worst instant
        if fd < 0:
            if conn is not None:
                conn.sendall(b"cancel\n")
            if fd == -errno.EBUSY and has_guard_filter(st.pid):
                # The kernel allows one listener per filter chain: this process
                # inherited the guard's filter (a child forked after its parent was
                # guarded), whose listener the guard holds and which already sends
                # this process's calls to it.
                return None
            raise GuardError(
                f"pid {st.pid}: seccomp() in the target failed: {os.strerror(-fd)}; "
                "not merged (--no-guard merges without the madvise guard)"
            )
        try:
            if conn is not None:
                client.take(conn, st.pid, fd, exempt_ip or 0)
            listener = _pidfd_getfd(st.pid, fd)
        finally:
            # the guards hold copies; if none could take one, better no listener
            # (calls fail with ENOSYS) than one nobody reads (calls wait for ever)
            st.syscall(SYS_close, fd)
    finally:
        if conn is not None:
            conn.close()
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
    from procksm.attach.inject import ptrace

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
        self._started_until = 0.0  # a guard this client started is on its way until then

    def _connect(self) -> socket.socket:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        s.settimeout(10)
        try:
            s.connect(self.path)
        except OSError:
            s.close()
            raise
        return s

    def expect(self, pid: int, tid: int, ip: int) -> socket.socket | None:
        """A connection on which the guard waits for ``take`` (see install); None
        from a guard of an older procksm, which knows no ``expect`` (then the listener
        is handed over as before, after seccomp()). ``tid`` and ``ip``: the thread the
        seccomp() is injected into and the address of the `syscall` it runs at (if this
        procksm dies, the guard waits until that thread has made or can no longer
        make the call before it looks for the listener: procksm.guardd.settle)."""
        start = procfs.start_time(pid)
        # listeners the (stopped) process holds already, of its own: not ours to take
        own = _notify_fds(pid)
        try:
            s = self.connect()
            own_fds = ",".join(map(str, own)) or "-"
            s.sendall(f"expect {pid} {start} {own_fds} {tid} {ip}\n".encode())
            reply = s.recv(256)
            if not reply.startswith(b"ok"):
                s.close()
                if reply.startswith(b"error: unknown request"):
                    return None
                raise GuardError(f"madvise guard: {reply.decode(errors='replace').strip()}")
        except OSError as e:
            raise GuardError(f"madvise guard: {e.strerror or e}") from None
        return s

    def take(self, conn: socket.socket, pid: int, fd: int, exempt_ip: int) -> None:
        """Let the guard copy the listener (fd ``fd`` of ``pid``) on the expecting
        connection; if that guard died meanwhile, ask the one that took over."""
        try:
            conn.sendall(f"take {fd} {exempt_ip}\n".encode())
            reply = conn.recv(256).decode(errors="replace").strip()
        except OSError:
            reply = ""
        if reply == "ok":
            return
        if reply:
            raise GuardError(f"madvise guard: {reply}")
        start = procfs.start_time(pid)
        deadline = time.monotonic() + 5
        while True:
            try:
                self._request(f"take {pid} {start} {fd} {exempt_ip}")
                return
            except GuardError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def running(self) -> bool:
        """Does a guard answer on the socket (without starting one)?"""
        try:
            self._connect().close()
        except OSError:
            return False
        return True

    def start(self) -> None:
        """Start a guard if none runs, without waiting for it: a procksm about to merge
        calls this before its scan, so that the guard and its standby start meanwhile
        (~0.06 CPU s each), not in the first target's stop windows. Best effort: a
        guard that did not start is started, or reported, by :meth:`connect`."""
        if self.running():
            return
        with contextlib.suppress(OSError):
            self._spawn()
            self._started_until = time.monotonic() + self.start_timeout

    def connect(self) -> socket.socket:
        """A connection to the guard; starts one if none runs (or waits for the one
        :meth:`start` started)."""
        with contextlib.suppress(OSError):
            return self._connect()
        if time.monotonic() >= self._started_until:
            self._spawn()
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

    def _spawn(self) -> None:
        """Start a guard process (it claims the socket, or exits if a guard has it)."""
        os.makedirs(os.path.dirname(self.path), mode=0o700, exist_ok=True)
        log = os.open(os.path.join(os.path.dirname(self.path), "guard.log"),
                      os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)  # fmt: skip
        try:
            # Its own session: it must outlive this procksm (and its process group),
            # since targets depend on it; it leaves this
            # procksm's cgroup on its own (procksm.guardd).
            subprocess.Popen(
                [*guard_argv(), "--socket", self.path],
                stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=guard_env(),
                start_new_session=True, close_fds=True, cwd="/",
            )  # fmt: skip
        finally:
            os.close(log)

    def _request(self, line: str, fds: list[int] | None = None, timeout: float = 10.0) -> str:
        try:
            with self.connect() as s:
                s.settimeout(timeout)
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
        """The active guard's pid, role and generation, its peer's, the guarded
        processes, notifications answered, pages it unmerged because a guarded call
        touched them and calls restarted after a guard died."""
        return dict(json.loads(self._request("stats")))

    def upgrade(self, timeout: float = 30.0) -> dict[str, object]:
        """Make both guards execute the installed code (this process's interpreter and
        procksm), one after the other; returns the stats once both run it."""
        if not self.running():
            raise GuardError("madvise guard: none running")
        before = self.stats()
        if "gen" not in before:
            raise GuardError(
                f"madvise guard: the running guard (pid {before.get('pid')}) is of an older "
                "procksm and cannot re-execute itself; it exits 10 s after its last "
                "guarded process"
            )
        gen = max(int(before["gen"]), int(before.get("peer_gen") or 0)) + 1  # type: ignore[call-overload]
        env = guard_env()
        with contextlib.suppress(GuardError):  # a lone guard re-executes mid-answer
            self._request(f"upgrade {gen} {guard_argv()[0]} {env['PYTHONPATH']}")
        deadline = time.monotonic() + timeout
        while True:
            with contextlib.suppress(GuardError, OSError, ValueError):
                st = self.stats()
                peer_ok = st["peer"] is None or (st.get("peer_gen") or 0) >= gen  # type: ignore[operator]
                if int(st["gen"]) >= gen and peer_ok:  # type: ignore[call-overload]
                    return st
            if time.monotonic() > deadline:
                raise GuardError(
                    f"madvise guard: upgrade not done after {timeout:.0f} s; see guard.log"
                )
            time.sleep(0.05)

    def stop(self) -> int:
        """Unmerge every guarded process, then stop both guards; returns the pages
        unmerged."""
        if not self.running():
            return 0
        return int(self._request("stop", timeout=600.0))


__all__ = [
    "AUDIT_ARCH_I386",
    "AUDIT_ARCH_X86_64",
    "GUARDED_ADVICE",
    "X32_SYSCALL_BIT",
    "GuardClient",
    "GuardError",
    "Notification",
    "build_filter",
    "guarded_range",
    "install",
    "mremap_may_keep_merged",
    "run_filter",
    "why_unguardable",
]
