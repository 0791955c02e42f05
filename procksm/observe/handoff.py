"""The daemon's side of loading the program: start the loader child
(:mod:`~procksm.observe.bcc_loader`), take the fds of the maps and programs it loaded and
their manifest, wait for it to exit. Nothing of bcc or LLVM enters this process."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from typing import IO

from procksm.closing import Closing
from procksm.errors import Unsupported
from procksm.guardd.launch import procksm_root
from procksm.guardd.wire import recv_fds
from procksm.observe.manifest import Manifest, decode

# Measured here: the loader takes 0.55-0.65 s of CPU (~0.45 s of it the compile); a loaded
# 2-CPU machine stretches that several times. A loader still silent after this is stuck.
LOAD_TIMEOUT_S = 120.0
_MESSAGE_BYTES = 1 << 16  # the manifest is ~3 KiB
_MAX_FDS = 253  # SCM_MAX_FD: the program has 9 maps and 18 programs


@dataclass
class LoadedObjects(Closing):
    """The fds of the loaded maps and programs (this process's only references to them:
    closed, the kernel frees what no attachment holds)."""

    manifest: Manifest
    map_fds: dict[str, int]
    prog_fds: list[int]  # one per manifest.probes, in its order

    def close(self) -> None:
        fds = [*self.map_fds.values(), *self.prog_fds]
        self.map_fds, self.prog_fds = {}, []
        for fd in fds:
            os.close(fd)


def loader_argv(sock_fd: int) -> list[str]:
    return [sys.executable, "-m", "procksm.observe.bcc_loader", str(sock_fd), str(os.getpid())]


def _loader_env() -> dict[str, str]:
    env = dict(os.environ)
    # the loader imports this procksm, wherever the daemon found it
    env["PYTHONPATH"] = os.pathsep.join(filter(None, (procksm_root(), env.get("PYTHONPATH"))))
    return env


def _start(sock: socket.socket, stderr: IO[bytes]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        loader_argv(sock.fileno()),
        pass_fds=[sock.fileno()],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=stderr,
        env=_loader_env(),
    )


def _receive(
    sock: socket.socket, proc: subprocess.Popen[bytes], stderr: IO[bytes]
) -> tuple[bytes, list[int]]:
    """The loader's one message and its fds; Unsupported if it ends without sending it."""
    fds: list[int] = []
    try:
        sock.settimeout(LOAD_TIMEOUT_S)
        # MSG_CMSG_CLOEXEC: the fds never reach a program the daemon starts
        data, fds = recv_fds(sock, socket.MSG_CMSG_CLOEXEC, _MESSAGE_BYTES, _MAX_FDS)
        code = proc.wait(LOAD_TIMEOUT_S)  # it exits once it has sent
    except BaseException as e:
        proc.kill()
        proc.wait()
        for fd in fds:
            os.close(fd)
        if isinstance(e, TimeoutError | subprocess.TimeoutExpired):
            raise Unsupported(f"the BPF loader did not finish in {LOAD_TIMEOUT_S:g} s") from None
        raise
    if not data:  # the loader closed its end without a word: it died
        stderr.seek(0)
        lines = stderr.read().decode("utf-8", "replace").strip().splitlines()
        last = f": {lines[-1].strip()}" if lines else ""
        raise Unsupported(
            f"the BPF loader ({' '.join(loader_argv(0)[:3])}) exited with status {code} "
            f"before handing over the program{last}"
        )
    return data, fds


def _objects(data: bytes, fds: list[int]) -> LoadedObjects:
    try:
        result = decode(data)
    except ValueError as e:
        result = f"the BPF loader: {e}"
    if isinstance(result, str) or len(fds) != result.fd_count:
        for fd in fds:
            os.close(fd)
        if isinstance(result, str):
            raise Unsupported(result)
        raise Unsupported(f"the BPF loader sent {len(fds)} fds for {result.fd_count} objects")
    n = len(result.maps)
    names = [m.name for m in result.maps]
    return LoadedObjects(result, dict(zip(names, fds[:n], strict=True)), fds[n:])


def load_in_child() -> LoadedObjects:
    """Compile and load the program in a child; its maps' and programs' fds, or
    :class:`~procksm.errors.Unsupported` with the child's one-line reason."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    with ours, tempfile.TemporaryFile() as stderr:
        with theirs:  # closed here once the child has it: its exit ends our recv
            proc = _start(theirs, stderr)
        data, fds = _receive(ours, proc, stderr)
    return _objects(data, fds)
