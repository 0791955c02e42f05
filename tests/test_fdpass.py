"""procksm.fdpass: handing a sealed segment's fd to a target, with real processes.

The "target" is a small Python child (``FAKE_TARGET``) that executes raw syscalls with the
arguments it is told, in its own memory -- exactly what the ptrace injector will make a real
target do -- so the layout, the pointers and the parsing are tested against the kernel.
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import os
import socket
import struct
import sys
import threading
from collections.abc import Callable, Iterator

import pytest

from procksm import PAGE_SIZE
from procksm.errors import NoSuchProcess
from procksm.fdpass import (
    FdHandoverError,
    FdSender,
    InjectedCall,
    ReceivedMessage,
    build_recv_layout,
    cmsg_space,
    current_netns_inode,
    in_netns,
    netns_identity,
    parse_received_fd,
    parse_recv_result,
    parse_scm_rights,
    proc_open_plan,
    proc_open_possible,
    run_in_netns,
    same_netns,
    verify_received_fd,
)
from procksm.slots import FileIdentity, Segment, SlotStore
from tests.conftest import Target, require_privileges

NOBODY = 65534

# A stand-in for a ptrace'd target: line commands on stdin, one answer line each.
#   syscall NR A0 A1 ...   raw syscall; answers the kernel's return value (-errno on error)
#   write ADDR HEX / read ADDR LEN / sha ADDR LEN / poke ADDR BYTE   its own memory
#   map FD OFF LEN         mmap(PROT_READ|PROT_WRITE, MAP_PRIVATE) + MADV_POPULATE_READ
#   unmap ADDR LEN / close FD
# Options: --netns (unshare(CLONE_NEWNET) first), --uid N (drop to uid/gid N).
FAKE_TARGET = r"""
import ctypes, hashlib, mmap, os, sys
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
libc.mmap.restype = ctypes.c_void_p
libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                      ctypes.c_int, ctypes.c_long]
libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
def fail():
    return -ctypes.get_errno()
def raw(nr, *args):
    r = libc.syscall(ctypes.c_long(nr), *[ctypes.c_long(a) for a in args])
    return fail() if r == -1 else r
argv = sys.argv[1:]
if "--netns" in argv and libc.unshare(0x40000000) != 0:
    print("FAILED unshare", fail(), flush=True)
    sys.exit(1)
if "--uid" in argv:
    uid = int(argv[argv.index("--uid") + 1])
    os.setgroups([])
    os.setgid(uid)
    os.setuid(uid)
scratch = mmap.mmap(-1, 4096)
addr = ctypes.addressof(ctypes.c_char.from_buffer(scratch))
print(f"READY scratch={addr:#x} uid={os.getuid()}", flush=True)
for line in sys.stdin:
    cmd, *a = line.split()
    n = [int(x, 0) for x in a] if cmd != "write" else [int(a[0], 0)]
    if cmd == "syscall":
        out = raw(*n)
    elif cmd == "write":
        data = bytes.fromhex(a[1])
        ctypes.memmove(n[0], data, len(data))
        out = 0
    elif cmd == "read":
        out = ctypes.string_at(n[0], n[1]).hex()
    elif cmd == "sha":
        out = hashlib.sha256(ctypes.string_at(n[0], n[1])).hexdigest()
    elif cmd == "poke":
        ctypes.memset(n[0], n[1], 1)
        out = 0
    elif cmd == "map":
        p = libc.mmap(None, n[2], 3, 0x02, n[0], n[1])  # PROT_READ|WRITE, MAP_PRIVATE
        if p is None or p == ctypes.c_void_p(-1).value:
            out = fail()
        else:
            out = p if libc.madvise(p, n[2], 22) == 0 else fail()  # MADV_POPULATE_READ
    elif cmd == "unmap":
        out = libc.munmap(n[0], n[1])
    elif cmd == "close":
        out = raw(3, n[0]) if os.uname().machine == "x86_64" else os.close(n[0]) or 0
    else:
        out = "ERR unknown command"
    print(out, flush=True)
"""

SpawnFn = Callable[..., Target]


def fake_target(spawn: SpawnFn, *opts: str) -> Target:
    return spawn([sys.executable, "-c", FAKE_TARGET, *opts])


def inject(target: Target, call: InjectedCall) -> int:
    return int(target.command(f"syscall {call.nr} " + " ".join(str(a) for a in call.args)))


def page_pattern(seed: int, npages: int) -> bytes:
    return b"".join(
        hashlib.sha256(f"{seed}:{i}".encode()).digest() * (PAGE_SIZE // 32) for i in range(npages)
    )


def sealed_segment(store: SlotStore, content: bytes) -> Segment:
    run = store.add_run(content)
    (seg,) = store.seal_pending()
    assert seg.id == run.segment_id
    return seg


def hand_over(target: Target, fds: list[int]) -> tuple[ReceivedMessage, FdSender]:
    """The whole protocol, as the engine runs it (module docstring of procksm.fdpass)."""
    scratch = target.int("scratch")
    with FdSender(target.pid) as sender:
        layout = build_recv_layout(scratch, sender.target_address, max_fds=len(fds))
        assert layout.size <= PAGE_SIZE
        target.command(f"write {scratch:#x} {layout.blob.hex()}")
        sock = inject(target, layout.socket_call())
        assert sock >= 0, f"injected socket() failed: {sock}"
        assert inject(target, layout.bind_call(sock)) == 0
        sender.send_fds(fds)
        ret = inject(target, layout.recvmsg_call(sock))
        assert inject(target, layout.close_call(sock)) == 0
        raw = bytes.fromhex(target.command(f"read {scratch:#x} {layout.size}"))
        return parse_recv_result(layout, raw, ret), sender


def check_mapped_content(target: Target, fd: int, content: bytes) -> int:
    addr = int(target.command(f"map {fd} 0 {len(content)}"))
    assert addr > 0, f"target mmap failed: {addr}"
    assert target.command(f"sha {addr:#x} {len(content)}") == hashlib.sha256(content).hexdigest()
    return addr


# --------------------------------------------------------------------------------------
# Pure: layout and control-message parsing
# --------------------------------------------------------------------------------------


def test_layout_pointers_and_bind_address() -> None:
    scratch = 0x7F0000001000
    name = b"\0procksm-r-" + b"a" * 32
    layout = build_recv_layout(scratch, name, max_fds=3)
    blob = layout.blob
    name_ptr, namelen, iov_ptr, iovlen, ctl_ptr, ctllen, flags = struct.unpack_from(
        "=QI4xQQQQi4x", blob, layout.msghdr_off
    )
    assert (name_ptr, namelen) == (scratch + layout.name_off, 110)
    assert iovlen == 1 and flags == 0
    assert ctl_ptr == scratch + layout.control_off and ctllen == cmsg_space(12) == 32
    base, length = struct.unpack_from("=QQ", blob, iov_ptr - scratch)
    assert (base, length) == (scratch + layout.data_off, layout.data_len)
    # bind(): family + name, and addrlen counting exactly the name (abstract names are not
    # NUL-terminated: a longer addrlen would bind a different name).
    family = struct.unpack_from("=H", blob, layout.bind_addr_off)[0]
    assert family == socket.AF_UNIX
    assert blob[layout.bind_addr_off + 2 : layout.bind_addr_off + 2 + len(name)] == name
    assert layout.bind_addrlen == 2 + len(name)
    assert all(off % 8 == 0 for off in (layout.name_off, layout.data_off, layout.control_off))
    call = layout.bind_call(7)
    assert call.args == (7, scratch + layout.bind_addr_off, layout.bind_addrlen)
    assert layout.recvmsg_call(7).args[2] & socket.MSG_DONTWAIT
    assert build_recv_layout(scratch, name, max_fds=253).size <= PAGE_SIZE


def test_layout_rejects_bad_input() -> None:
    with pytest.raises(ValueError):
        build_recv_layout(0x1000, b"/tmp/not-abstract")
    with pytest.raises(ValueError):
        build_recv_layout(0x1001, b"\0x")
    with pytest.raises(ValueError):
        build_recv_layout(0x1000, b"\0x", max_fds=254)


def _cmsg(level: int, kind: int, data: bytes) -> bytes:
    raw = struct.pack("=Qii", 16 + len(data), level, kind) + data
    return raw.ljust(cmsg_space(len(data)), b"\0")


def test_parse_scm_rights() -> None:
    rights = _cmsg(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack("=3i", 5, 9, 12))
    creds = _cmsg(socket.SOL_SOCKET, socket.SCM_CREDENTIALS, struct.pack("=3i", 1, 0, 0))
    assert parse_scm_rights(rights) == [5, 9, 12]
    assert parse_scm_rights(creds + rights) == [5, 9, 12]
    assert parse_scm_rights(b"") == []
    assert parse_scm_rights(rights[:20]) == []  # cut short: no fd invented
    one = _cmsg(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack("=i", 4))
    assert parse_received_fd(one) == 4
    with pytest.raises(FdHandoverError):
        parse_received_fd(rights)


def test_is_from_needs_address_and_token_and_no_truncation() -> None:
    class Sender:
        own_address = b"\0procksm-s-1"
        token = b"t" * 16

    good = ReceivedMessage((5,), Sender.own_address, Sender.token, 0)
    assert good.is_from(Sender)
    assert not ReceivedMessage((5,), b"\0other", Sender.token, 0).is_from(Sender)
    assert not ReceivedMessage((5,), Sender.own_address, b"x" * 16, 0).is_from(Sender)
    ctrunc = ReceivedMessage((5,), Sender.own_address, Sender.token, socket.MSG_CTRUNC)
    assert ctrunc.truncated and not ctrunc.is_from(Sender)


def test_parse_recv_result_errors() -> None:
    layout = build_recv_layout(0x1000, b"\0name")
    with pytest.raises(FdHandoverError, match="EAGAIN"):
        parse_recv_result(layout, layout.blob, -errno.EAGAIN)


def test_parse_against_the_kernel_in_process() -> None:
    """A recvmsg done with raw pointers into our own memory, parsed like target scratch."""
    buf = ctypes.create_string_buffer(PAGE_SIZE)
    addr = ctypes.addressof(buf)
    recv_name = b"\0procksm-test-r-" + os.urandom(8).hex().encode()
    layout = build_recv_layout(addr, recv_name, max_fds=2)
    ctypes.memmove(addr, layout.blob, layout.size)
    receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    receiver.bind(recv_name)
    r_fd, w_fd = os.pipe()
    try:
        with FdSender(os.getpid()) as sender:
            # FdSender picks its own random target name; send to ours instead.
            sender.target_address = recv_name
            sender.send_fds([r_fd, w_fd])
            libc = ctypes.CDLL(None, use_errno=True)
            libc.recvmsg.restype = ctypes.c_ssize_t
            ret = libc.recvmsg(
                receiver.fileno(), ctypes.c_void_p(addr + layout.msghdr_off), layout.RECV_FLAGS
            )
            msg = parse_recv_result(layout, ctypes.string_at(addr, layout.size), ret)
            assert msg.is_from(sender)
            assert len(msg.fds) == 2 and not msg.truncated
            for fd, orig in zip(msg.fds, (r_fd, w_fd), strict=True):
                assert os.fstat(fd).st_ino == os.fstat(orig).st_ino
                assert os.get_inheritable(fd) is False  # MSG_CMSG_CLOEXEC
                os.close(fd)
    finally:
        receiver.close()
        os.close(r_fd)
        os.close(w_fd)


# --------------------------------------------------------------------------------------
# Network namespaces
# --------------------------------------------------------------------------------------


def test_netns_identity_of_self() -> None:
    assert current_netns_inode(os.getpid()) == os.stat("/proc/self/ns/net").st_ino
    assert same_netns(os.getpid())
    with pytest.raises(NoSuchProcess):
        netns_identity(2**22 + 12345)


@pytest.fixture
def netns_child(spawn: SpawnFn) -> Target:
    require_privileges()
    target = fake_target(spawn, "--netns")
    assert not same_netns(target.pid)
    return target


def test_setns_moves_only_the_calling_thread(netns_child: Target) -> None:
    ours = netns_identity(None)
    theirs = netns_identity(netns_child.pid)
    seen: dict[str, FileIdentity] = {}
    inside = threading.Event()
    leave = threading.Event()

    def body() -> None:
        with in_netns(netns_child.pid):
            seen["thread"] = netns_identity(None)
            inside.set()
            leave.wait(10)
        seen["after"] = netns_identity(None)

    thread = threading.Thread(target=body)
    thread.start()
    assert inside.wait(10)
    seen["main"] = netns_identity(None)  # while the other thread is inside
    leave.set()
    thread.join()
    assert seen == {"thread": theirs, "main": ours, "after": ours}


def test_in_netns_restores_on_exception(netns_child: Target) -> None:
    def body() -> None:
        with in_netns(netns_child.pid):
            raise KeyError("boom")

    errors: list[BaseException] = []
    after: list[FileIdentity] = []

    def thread_main() -> None:
        try:
            body()
        except KeyError as exc:
            errors.append(exc)
        after.append(netns_identity(None))

    thread = threading.Thread(target=thread_main)
    thread.start()
    thread.join()
    assert errors and after == [netns_identity(None)]


def test_socket_keeps_its_netns(netns_child: Target) -> None:
    name = b"\0procksm-test-" + os.urandom(8).hex().encode()

    threads: list[int] = []

    def make() -> socket.socket:
        threads.append(threading.get_ident())
        s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        s.bind(name)
        return s

    sock = run_in_netns(netns_child.pid, make)
    assert threads != [threading.get_ident()]  # a helper thread did the setns
    try:
        visible = name[1:].decode()
        with open(f"/proc/{netns_child.pid}/net/unix") as f:
            assert visible in f.read()
        with open("/proc/self/net/unix") as f:
            assert visible not in f.read()
        assert netns_identity(None) != netns_identity(netns_child.pid)
    finally:
        sock.close()


def test_setns_denied_without_privilege(netns_child: Target) -> None:
    """Documented requirement: CAP_SYS_ADMIN. A uid-65534 child of ours cannot do it."""
    child = os.fork()
    if child == 0:  # pragma: no cover - runs in the child
        code = 1
        try:
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            try:
                run_in_netns(netns_child.pid, lambda: None)
            except Exception as exc:
                code = 0 if type(exc).__name__ == "AccessDenied" else 2
        finally:
            os._exit(code)
    _, status = os.waitpid(child, 0)
    assert os.waitstatus_to_exitcode(status) == 0


# --------------------------------------------------------------------------------------
# The hand-over, end to end
# --------------------------------------------------------------------------------------


@pytest.fixture
def store() -> Iterator[SlotStore]:
    with SlotStore(segment_pages=64) as s:
        yield s


@pytest.mark.parametrize(
    "opts", [(), ("--uid", str(NOBODY)), ("--netns",), ("--netns", "--uid", str(NOBODY))]
)
def test_hand_over_and_map(spawn: SpawnFn, store: SlotStore, opts: tuple[str, ...]) -> None:
    require_privileges()
    content = page_pattern(1, 8)
    seg = sealed_segment(store, content)
    target = fake_target(spawn, *opts)
    assert target.info["uid"] == (str(NOBODY) if "--uid" in opts else "0")
    assert same_netns(target.pid) == ("--netns" not in opts)
    ro = seg.readonly_fd()
    try:
        msg, sender = hand_over(target, [ro])
    finally:
        os.close(ro)
    assert msg.is_from(sender)
    (fd,) = msg.fds
    assert verify_received_fd(target.pid, fd, seg)
    # The target got a read-only open file description.
    with open(f"/proc/{target.pid}/fdinfo/{fd}") as f:
        flags = int(next(x for x in f if x.startswith("flags:")).split()[1], 8)
    assert flags & os.O_ACCMODE == os.O_RDONLY and flags & os.O_CLOEXEC
    check_mapped_content(target, fd, content)
    assert int(target.command(f"close {fd}")) == 0
    assert not verify_received_fd(target.pid, fd, seg)


def test_several_segments_in_one_datagram(spawn: SpawnFn) -> None:
    require_privileges()
    with SlotStore(segment_pages=4) as store:
        contents = [page_pattern(i, 4) for i in range(3)]
        for c in contents:
            store.add_run(c)  # each fills a segment: 3 segments
        segs = store.seal_pending()
        assert len(segs) == 3
        target = fake_target(spawn, "--uid", str(NOBODY))
        ros = [s.readonly_fd() for s in segs]
        try:
            msg, sender = hand_over(target, ros)
        finally:
            for fd in ros:
                os.close(fd)
        assert msg.is_from(sender) and len(msg.fds) == 3
        for fd, seg, content in zip(msg.fds, segs, contents, strict=True):
            assert verify_received_fd(target.pid, fd, seg)
            assert not verify_received_fd(target.pid, fd, segs[(segs.index(seg) + 1) % 3])
            check_mapped_content(target, fd, content)


def test_sender_outside_the_target_netns_cannot_reach_it(
    netns_child: Target, store: SlotStore
) -> None:
    """Why FdSender setns()es: from procksm's own netns the abstract name does not exist."""
    seg = sealed_segment(store, page_pattern(2, 1))
    scratch = netns_child.int("scratch")
    name = b"\0procksm-test-" + os.urandom(16).hex().encode()
    layout = build_recv_layout(scratch, name)
    netns_child.command(f"write {scratch:#x} {layout.blob.hex()}")
    sock = inject(netns_child, layout.socket_call())
    assert inject(netns_child, layout.bind_call(sock)) == 0
    outside = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        with pytest.raises(OSError) as info:
            outside.sendmsg([b"x"], [], 0, name)
        assert info.value.errno in (errno.ECONNREFUSED, errno.ENOENT)
    finally:
        outside.close()
    # And the target does not block when nothing came: -EAGAIN, reported clearly.
    ret = inject(netns_child, layout.recvmsg_call(sock))
    assert ret == -errno.EAGAIN
    with pytest.raises(FdHandoverError, match="nothing was queued"):
        parse_recv_result(layout, layout.blob, ret)
    assert seg.sealed


def test_send_without_bound_target_fails_clearly(spawn: SpawnFn, store: SlotStore) -> None:
    seg = sealed_segment(store, page_pattern(3, 1))
    target = fake_target(spawn)
    ro = seg.readonly_fd()
    try:
        with FdSender(target.pid) as sender, pytest.raises(FdHandoverError, match="no socket"):
            sender.send_fds([ro])
    finally:
        os.close(ro)


def test_impostor_datagram_is_detected(spawn: SpawnFn, store: SlotStore) -> None:
    """Another process in the netns sends its own memfd to the target's name first: the
    sender address, the token and the inode check all reject it."""
    require_privileges()
    seg = sealed_segment(store, page_pattern(4, 1))
    target = fake_target(spawn, "--uid", str(NOBODY))
    scratch = target.int("scratch")
    with FdSender(target.pid) as sender:
        layout = build_recv_layout(scratch, sender.target_address)
        target.command(f"write {scratch:#x} {layout.blob.hex()}")
        sock = inject(target, layout.socket_call())
        assert inject(target, layout.bind_call(sock)) == 0
        evil_fd = os.memfd_create("evil")
        os.write(evil_fd, page_pattern(5, 1))
        evil = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        evil.bind(b"\0procksm-s-" + b"0" * 32)  # even a look-alike name
        try:
            evil.sendmsg(
                [sender.token],  # worst case: even knowing the token
                [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack("=i", evil_fd))],
                0,
                sender.target_address,
            )
        finally:
            evil.close()
            os.close(evil_fd)
        ro = seg.readonly_fd()
        try:
            sender.send_fds([ro])
        finally:
            os.close(ro)
        ret = inject(target, layout.recvmsg_call(sock))
        raw = bytes.fromhex(target.command(f"read {scratch:#x} {layout.size}"))
        msg = parse_recv_result(layout, raw, ret)
        assert not msg.is_from(sender)
        assert msg.sender_address != sender.own_address
        (fd,) = msg.fds
        assert not verify_received_fd(target.pid, fd, seg)
        assert int(target.command(f"close {fd}")) == 0  # what the engine does on reject
        assert inject(target, layout.close_call(sock)) == 0


def test_proc_open_root_only(spawn: SpawnFn, store: SlotStore) -> None:
    """The one-syscall alternative: works for a root target, EACCES for uid 65534."""
    require_privileges()
    content = page_pattern(6, 2)
    seg = sealed_segment(store, content)
    ro = seg.readonly_fd()
    try:
        for opts, works in (((), True), (("--uid", str(NOBODY)), False)):
            target = fake_target(spawn, *opts)
            assert proc_open_possible(target.pid)
            scratch = target.int("scratch")
            plan = proc_open_plan(scratch, ro)
            target.command(f"write {scratch:#x} {plan.blob.hex()}")
            fd = inject(target, plan.openat_call())
            if works:
                assert fd >= 0 and verify_received_fd(target.pid, fd, seg)
                check_mapped_content(target, fd, content)
            else:
                assert fd == -errno.EACCES
    finally:
        os.close(ro)


def test_proc_open_not_possible_across_pid_namespace(spawn: SpawnFn) -> None:
    require_privileges()
    # --kill-child: the target in the new pid namespace dies with unshare (the fixture
    # kills unshare).
    argv = ["unshare", "--pid", "--fork", "--mount-proc", "--kill-child"]
    target = spawn([*argv, sys.executable, "-c", FAKE_TARGET])
    children = [int(p) for p in os.listdir("/proc") if p.isdigit() and _ppid(int(p)) == target.pid]
    assert children
    assert not proc_open_possible(children[0])


def _ppid(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1])
    except OSError:
        return -1


def test_verify_received_fd_of_gone_process() -> None:
    with pytest.raises(NoSuchProcess):
        verify_received_fd(2**22 + 12345, 3, FileIdentity(1, 1))
