"""Where a guard process stands in the system: its own cgroup (out of the service's), the
mount namespace of the procksm that upgrades it, the OOM killer's last choice."""

from __future__ import annotations

import os

from procksm.guardd import log
from procksm.guardd.syscalls import CLONE_NEWCGROUP, CLONE_NEWNS, setns

CGROUP_ENV = "PROCKSM_GUARD_CGROUP"  # the guards' cgroup; "none": stay where started
CGROUPNS_ENV = "PROCKSM_GUARD_CGROUPNS"  # a cgroup namespace to join first (Kubernetes)
CGROUP_NAME = "procksm-guard"


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
            setns(fd, CLONE_NEWCGROUP)
        except OSError as e:
            return f"cannot join cgroup namespace {ns}: {e.strerror}"
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


def protect_from_oom() -> None:
    # Targets depend on the guard: the OOM killer must pick anything else first.
    try:
        with open("/proc/self/oom_score_adj", "w") as f:
            f.write("-1000")
    except OSError:
        pass


def join_mount_namespace(pid: int) -> None:
    """setns(CLONE_NEWNS) into ``pid``'s mount namespace when it is not ours (needs
    CAP_SYS_ADMIN and CAP_SYS_CHROOT, and a single-threaded caller: the guard is)."""
    if pid <= 0:
        return
    try:
        if os.stat(f"/proc/{pid}/ns/mnt").st_ino == os.stat("/proc/self/ns/mnt").st_ino:
            return
        fd = os.open(f"/proc/{pid}/ns/mnt", os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        log(f"mount namespace of pid {pid}: {e.strerror}; stays in its own")
        return
    try:
        try:
            setns(fd, CLONE_NEWNS)
        except OSError as e:
            log(f"cannot join the mount namespace of pid {pid}: {e.strerror}")
            return
        os.chdir("/")
        log(f"joined the mount namespace of pid {pid}")
    finally:
        os.close(fd)
