"""Why attaching to a process would fail, found without touching it, and said with what to
do next (like memray's attach diagnosis: no such process, another user's, no permission to
trace, already traced by PID N, a kernel thread, another namespace).

:func:`check_attachable` runs before procksm touches a target (``procksm merge`` checks
every target before the first is stopped); :class:`procksm.attach.session.PtraceSession` runs it
again when it seizes one. The rules are the kernel's ptrace access check
(``__ptrace_may_access``, ``cap_ptrace_access_check``, Yama), so the message can name the
one that refuses.
"""

from __future__ import annotations

import os
import pwd
from dataclasses import dataclass

from procksm import procfs
from procksm.arch.x86_64 import require_x86_64
from procksm.errors import (
    AccessDenied,
    NoSuchProcess,
    ProcksmError,
    TargetBusy,
    Unsupported,
    UsageError,
    ZombieProcess,
)
from procksm.procfs import parse_status_fields, read_stat_fields, read_status_fields

PF_KTHREAD = 0x00200000  # task flag (include/linux/sched.h), field 9 of /proc/PID/stat
CAP_SYS_PTRACE = 19

# /proc/PID/status parsing lives in procksm.procfs (one place for /proc, like psutil).
parse_status = parse_status_fields
_read_status = read_status_fields


def process_name(pid: int) -> str:
    """/proc/PID/comm for messages; "?" when it cannot be read."""
    try:
        return procfs.read_comm(pid)
    except (ProcksmError, OSError):
        return "?"


def _user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


# Bit numbers of include/uapi/linux/capability.h, for messages.
# fmt: off
CAPABILITY_NAMES = (
    "chown", "dac_override", "dac_read_search", "fowner", "fsetid", "kill", "setgid", "setuid",
    "setpcap", "linux_immutable", "net_bind_service", "net_broadcast", "net_admin", "net_raw",
    "ipc_lock", "ipc_owner", "sys_module", "sys_rawio", "sys_chroot", "sys_ptrace", "sys_pacct",
    "sys_admin", "sys_boot", "sys_nice", "sys_resource", "sys_time", "sys_tty_config", "mknod",
    "lease", "audit_write", "audit_control", "setfcap", "mac_override", "mac_admin", "syslog",
    "wake_alarm", "block_suspend", "audit_read", "perfmon", "bpf", "checkpoint_restore",
)
# fmt: on


def capability_names(mask: int) -> list[str]:
    return [
        f"CAP_{CAPABILITY_NAMES[bit].upper()}" if bit < len(CAPABILITY_NAMES) else f"cap {bit}"
        for bit in range(64)
        if mask >> bit & 1
    ]


def _own_capabilities() -> tuple[int, int]:
    """(effective, permitted) capability masks of this process."""
    status = _read_status(os.getpid())
    return int(status.get("CapEff", "0"), 16), int(status.get("CapPrm", "0"), 16)


def _yama_scope() -> int | None:
    return procfs.yama_ptrace_scope()  # None: no Yama LSM, only the classic rules apply


def _is_descendant(pid: int, ancestor: int) -> bool:
    seen = set()
    while pid > 1 and pid not in seen:
        seen.add(pid)
        try:
            pid = int(_read_status(pid).get("PPid", "0"))
        except (ProcksmError, OSError, ValueError):
            return False
        if pid == ancestor:
            return True
    return False


def yama_denial(scope: int | None, has_cap: bool, is_descendant: bool) -> str | None:
    """Why Yama's kernel.yama.ptrace_scope forbids the attach, or None."""
    if scope is None or scope == 0:
        return None
    if scope >= 3:
        return (
            "ptrace is disabled on this machine (kernel.yama.ptrace_scope=3; only a reboot "
            "can lower it)"
        )
    if has_cap:
        return None
    if scope == 2:
        return (
            "kernel.yama.ptrace_scope=2 allows ptrace only with CAP_SYS_PTRACE: run procksm as root"
        )
    if not is_descendant:
        return (
            "kernel.yama.ptrace_scope=1 allows tracing only descendants: run procksm as root, "
            "or lower it with `sysctl kernel.yama.ptrace_scope=0`"
        )
    return None


def permission_denial(
    *,
    pid: int,
    name: str,
    target_uids: tuple[int, ...],
    target_gids: tuple[int, ...],
    dumpable: bool,
    my_uid: int,
    my_gid: int,
    has_cap: bool,
    target_cap_prm: int = 0,
    my_cap_prm: int = 0,
    other_user_ns: bool = False,
) -> str | None:
    """Why the kernel's ptrace access check would fail, or None.

    Without CAP_SYS_PTRACE (__ptrace_may_access, then cap_ptrace_access_check): the
    caller's real uid and gid must equal all of the target's real/effective/saved ids,
    the target must be dumpable, live in the caller's user namespace, and hold no
    permitted capability the caller lacks.
    """
    if has_cap:
        return None
    if my_uid == 0:
        # Root without CAP_SYS_PTRACE is a container (or a unit with capabilities dropped).
        how = (
            "procksm runs as root but without CAP_SYS_PTRACE (in a container: docker run "
            "--cap-add SYS_PTRACE; Kubernetes: securityContext.capabilities.add: [SYS_PTRACE])"
        )
    else:
        how = "run procksm as root, or as the same user"
    owner = target_uids[0]
    if any(u != my_uid for u in target_uids[:3]) or any(g != my_gid for g in target_gids[:3]):
        return (
            f"not permitted to trace pid {pid} ({name}), owned by uid {owner} "
            f"({_user_name(owner)}), from uid {my_uid} ({_user_name(my_uid)}): {how}"
        )
    if not dumpable:
        return (
            f"not permitted to trace pid {pid} ({name}): it is not dumpable (a setuid/setgid "
            f"program, or PR_SET_DUMPABLE=0), which needs CAP_SYS_PTRACE: {how}"
        )
    if other_user_ns:
        return (
            f"not permitted to trace pid {pid} ({name}): it is in another user namespace, "
            f"which needs CAP_SYS_PTRACE: {how}"
        )
    extra = target_cap_prm & ~my_cap_prm
    if extra:
        names = capability_names(extra)
        shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
        return (
            f"not permitted to trace pid {pid} ({name}): it holds capabilities procksm lacks "
            f"({shown}), which needs CAP_SYS_PTRACE: {how}"
        )
    return None


def _ids(field_value: str) -> tuple[int, ...]:
    return tuple(int(x) for x in field_value.split())


@dataclass(frozen=True)
class AttachStatus:
    """What check_attachable learned about a target (nothing in it was changed)."""

    pid: int
    name: str
    state: str  # one letter, as in /proc/PID/status (R, S, D, T, ...)
    uid: int
    threads: int
    nspid: tuple[int, ...]  # the pid in each nested PID namespace, outermost first
    other_namespaces: tuple[str, ...]  # namespaces (pid, mnt, net, user) not shared with us
    seccomp: int  # 0 none, 1 strict, 2 filter: injected syscalls pass through the filter
    start_time: int  # clock ticks since boot (field 22 of stat): detects pid reuse
    notes: tuple[str, ...] = ()

    @property
    def stopped_by_signal(self) -> bool:
        return self.state == "T"


def check_attachable(pid: int) -> AttachStatus:
    """Diagnose, without touching the process, why attaching to `pid` would fail.

    Raises NoSuchProcess, ZombieProcess, Unsupported (kernel thread, procksm itself, not
    x86_64), UsageError (a thread id), TargetBusy (already traced) or AccessDenied
    (uid, capability, Yama), each with a one-line message that says what to do.
    """
    require_x86_64()
    if pid <= 0:
        raise NoSuchProcess(pid)
    if pid == os.getpid():
        raise Unsupported(f"pid {pid} is procksm itself; it cannot attach to itself")
    status, stat, proc_owner = _read_proc(pid)
    name = status.get("Name", "?")
    state = status.get("State", "?")[:1]
    _refuse_unattachable(pid, name, state, status, stat)
    other = _other_namespaces(pid)
    _refuse_unpermitted(pid, name, status, proc_owner, other)
    nspid = _ids(status.get("NSpid", str(pid)))
    seccomp = int(status.get("Seccomp", "0"))
    return AttachStatus(
        pid=pid,
        name=name,
        state=state,
        uid=_ids(status.get("Uid", "0 0 0 0"))[0],
        threads=int(status.get("Threads", "1")),
        nspid=nspid,
        other_namespaces=tuple(other),
        seccomp=seccomp,
        start_time=int(stat[19]),
        notes=_notes(state, nspid, other, seccomp),
    )


def _read_proc(pid: int) -> tuple[dict[str, str], list[str], int]:
    """/proc/PID/status fields, /proc/PID/stat fields, and the owner of /proc/PID."""
    try:
        return _read_status(pid), read_stat_fields(pid), procfs.owner_uid(pid)
    except NoSuchProcess:
        raise NoSuchProcess(pid) from None
    except AccessDenied:
        raise AccessDenied(
            pid, f"cannot read /proc/{pid} (is /proc mounted with hidepid=?): run as root"
        ) from None


def _refuse_unattachable(
    pid: int, name: str, state: str, status: dict[str, str], stat: list[str]
) -> None:
    """Raise if `pid` is no process procksm can attach to, whoever asks: a thread (of
    procksm's own, or of another process), a process gone, a kernel thread, a zombie,
    one traced already, one with a user shadow stack."""
    tgid = int(status.get("Tgid", pid))
    if tgid == os.getpid():
        raise Unsupported(f"pid {pid} is a thread of procksm itself; it cannot attach to itself")
    if tgid != pid:
        raise UsageError(f"pid {pid} is a thread of process {tgid} ({name}); give pid {tgid}")
    if state == "X":
        raise NoSuchProcess(pid)
    if int(stat[6]) & PF_KTHREAD:
        raise Unsupported(f"pid {pid} ({name}) is a kernel thread: it has no user memory to merge")
    if state == "Z" and not procfs.live_threads(pid):
        raise ZombieProcess(pid, name)
    tracer = int(status.get("TracerPid", "0"))
    if tracer:
        raise TargetBusy(pid, _traced_message(pid, name, tracer))
    if "shstk" in status.get("x86_Thread_features", "").split():
        # The way back of an injected call is a `ret` into the sigreturn trampoline
        # (procksm.arch.x86_64), which a user shadow stack would refuse (SIGSEGV).
        raise Unsupported(
            f"pid {pid} ({name}) uses a user shadow stack (x86_Thread_features: shstk): "
            "procksm's injected calls return with `ret`, which it would refuse"
        )


def _refuse_unpermitted(
    pid: int, name: str, status: dict[str, str], proc_owner: int, other: list[str]
) -> None:
    """Raise AccessDenied if Yama or the kernel's ptrace access check would refuse."""
    uids, gids = _ids(status.get("Uid", "0 0 0 0")), _ids(status.get("Gid", "0 0 0 0"))
    my_cap_eff, my_cap_prm = _own_capabilities()
    has_cap = bool(my_cap_eff >> CAP_SYS_PTRACE & 1)
    yama = yama_denial(_yama_scope(), has_cap, _is_descendant(pid, os.getpid()))
    if yama:
        raise AccessDenied(pid, f"not permitted to trace pid {pid} ({name}): {yama}")
    denial = permission_denial(
        pid=pid,
        name=name,
        target_uids=uids,
        target_gids=gids,
        # A non-dumpable process has its /proc files owned by root instead of its euid.
        dumpable=proc_owner == uids[1],
        my_uid=os.getuid(),
        my_gid=os.getgid(),
        has_cap=has_cap,
        target_cap_prm=int(status.get("CapPrm", "0"), 16),
        my_cap_prm=my_cap_prm,
        other_user_ns="user" in other,
    )
    if denial:
        raise AccessDenied(pid, denial)


def _notes(state: str, nspid: tuple[int, ...], other: list[str], seccomp: int) -> tuple[str, ...]:
    """What is worth saying about an attachable target."""
    notes = []
    if "pid" in other:
        notes.append(
            f"in another PID namespace (pid {nspid[-1]} there); ptrace and process_vm_readv "
            "work across namespaces"
        )
    if "mnt" in other:
        notes.append("in another mount namespace (memfds are handed over by socket, not path)")
    if "user" in other:
        notes.append("in another user namespace")
    if state == "T":
        notes.append("stopped by job control (SIGSTOP/SIGTSTP): procksm keeps it stopped")
    if seccomp:
        notes.append("has a seccomp filter: injected system calls pass through it")
    return tuple(notes)


def _traced_message(pid: int, name: str, tracer: int) -> str:
    if _is_own_thread(tracer):
        return f"pid {pid} ({name}) is already being traced by this procksm process"
    return (
        f"pid {pid} ({name}) is already traced by pid {tracer} ({process_name(tracer)}); "
        "detach that debugger or tracer first"
    )


def _is_own_thread(tid: int) -> bool:
    return procfs.thread_exists(os.getpid(), tid)


def _other_namespaces(pid: int) -> list[str]:
    other = []
    for ns in ("pid", "mnt", "net", "user"):
        theirs, ours = procfs.namespace_link(pid, ns), procfs.namespace_link("self", ns)
        if theirs is not None and ours is not None and theirs != ours:
            other.append(ns)  # (not permitted to look: unknown, not an error)
    return other
