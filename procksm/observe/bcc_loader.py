"""``python -m procksm.observe.bcc_loader FD PARENT_PID``: the short-lived child that compiles
cow.bpf.c with bcc (clang/LLVM), loads its maps and programs into the kernel without
attaching them, sends their fds and a :mod:`~procksm.observe.manifest` over the
SOCK_SEQPACKET socket FD (one message, SCM_RIGHTS), and exits.

The only module of procksm that imports bcc. The daemon never does: libLLVM's
relocations and bcc's allocations cost it ~80 MiB of private file-backed and ~35 MiB of
anonymous memory for its whole life when it compiled the program itself (issue 15,
measured with smaps_rollup; docs/design.md, the observer). A loaded BPF object lives as
long as an fd of it: once the daemon holds them, this process has nothing left to do.

It dies with its parent (PR_SET_PDEATHSIG), so a daemon killed during the compile leaves
no loader behind; the loader attaches nothing, so a loader killed at any instant leaves
nothing attached either, and its fds close with it.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import socket
import sys
import tempfile
from collections.abc import Callable, Iterator
from typing import Any

from procksm.observe.bpf_program import bcc_import_failure, bpf_source
from procksm.observe.bpf_syscall import map_info
from procksm.observe.manifest import Manifest, MapSpec, ProbeSpec, encode, probe_of_function

_PR_SET_PDEATHSIG = 1


@contextlib.contextmanager
def _stderr_captured() -> Iterator[Callable[[], str]]:
    """Collect what C code writes to fd 2 (clang's diagnostics from bcc) instead of
    letting it reach the daemon's log; the caller gets it to name the cause in one line."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield lambda: (tmp.seek(0), tmp.read().decode("utf-8", "replace"))[1]
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def _first_error(text: str, exc: BaseException) -> str:
    for line in text.splitlines():
        if "error" in line.lower():
            return line.strip()
    return str(exc)


def _compile() -> tuple[Any, Any, list[ProbeSpec]]:
    """Compile and load every map and program, attaching nothing: (bcc's module, libbcc,
    the probes). Raises RuntimeError with the one-line reason if it does not load."""
    try:
        from bcc import BPF
        from bcc.libbcc import lib
    except ImportError as e:
        raise RuntimeError(bcc_import_failure(e)) from None
    # two libbcc calls bcc's Python binding does not declare (bcc's bpf_module.h)
    lib.bpf_num_tables.restype = ctypes.c_size_t
    lib.bpf_num_tables.argtypes = [ctypes.c_void_p]
    lib.bpf_table_name.restype = ctypes.c_char_p
    lib.bpf_table_name.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    probes: list[ProbeSpec] = []

    class LoadOnly(BPF):  # type: ignore[misc, valid-type]
        """bcc attaches the functions it recognises by name while it loads them
        (BPF._trace_autoload); here they are only loaded: the daemon attaches them."""

        def _trace_autoload(self) -> None:
            for i in range(lib.bpf_num_functions(self.module)):
                name = lib.bpf_function_name(self.module, i).decode()
                probe = probe_of_function(name)
                if probe is not None:
                    raw = probe.kind == "raw_tracepoint"
                    self.load_func(name.encode(), BPF.RAW_TRACEPOINT if raw else BPF.TRACEPOINT)
                    probes.append(probe)

    with _stderr_captured() as err:
        try:
            bpf = LoadOnly(text=bpf_source().encode())
        except Exception as e:
            raise RuntimeError(
                f"the BPF program did not load ({_first_error(err(), e)}); try `make setup` "
                "(kernel headers, bcc) or see `python -m procksm.observe --ebpf`"
            ) from None
    return bpf, lib, probes


def _loaded(bpf: Any, lib: Any, probes: list[ProbeSpec]) -> tuple[Manifest, list[int]]:
    """The manifest of what bcc loaded, from the kernel's own description of each map,
    and the fds in the manifest's order (maps, then programs)."""
    maps: list[MapSpec] = []
    fds: list[int] = []
    for i in range(lib.bpf_num_tables(bpf.module)):
        name = lib.bpf_table_name(bpf.module, i)
        fd = lib.bpf_table_fd(bpf.module, name)
        info = map_info(fd)
        spec = (info.type, info.key_size, info.value_size, info.max_entries, info.flags)
        maps.append(MapSpec(name.decode(), *spec))
        fds.append(fd)
    fds += [bpf.funcs[p.function.encode()].fd for p in probes]
    return Manifest(tuple(maps), tuple(probes)), fds


def main(argv: list[str]) -> int:
    """argv: the socket's fd and the daemon's pid."""
    if len(argv) != 2:
        print("usage: python -m procksm.observe.bcc_loader FD PARENT_PID", file=sys.stderr)
        return 2
    sock = socket.socket(fileno=int(argv[0]))
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != int(argv[1]):  # the daemon died before the line above
        return 1
    try:
        bpf, lib, probes = _compile()
        doc, fds = _loaded(bpf, lib, probes)
    except Exception as e:  # one line for the daemon's warning, whatever it was
        reason = str(e) if isinstance(e, RuntimeError) else f"the BPF loader failed: {e!r}"
        sock.sendmsg([encode(reason)])
        return 1
    socket.send_fds(sock, [encode(doc)], fds)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
