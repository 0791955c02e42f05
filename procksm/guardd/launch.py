"""How a guard image starts: its command line, its environment, and the state words that
name the fds it inherits (from the guard that spawned it, or from itself before an
upgrade's execve). The words are read by guards of other versions: keep their format."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable

import procksm
from procksm.guardd import TEST_OFF

STATE_ENV = "PROCKSM_GUARD_STATE"  # the fds and role a guard hands to its next image
LEAN_ENV = "PROCKSM_GUARD_LEAN"  # procksm/__init__ skips numpy in the guard


def procksm_root() -> str:
    """The directory that holds this procksm package (a PYTHONPATH entry)."""
    return os.path.dirname(os.path.dirname(os.path.abspath(procksm.__file__ or "")))


def guard_argv(exe: str | None = None) -> list[str]:
    """The command line of a guard (-S: no site imports, ~2 MiB less)."""
    if TEST_OFF == "lean":
        return [exe or sys.executable, "-m", "procksm.guardd"]
    return [exe or sys.executable, "-S", "-m", "procksm.guardd"]


def guard_env(pythonpath: str | None = None) -> dict[str, str]:
    env = dict(os.environ)
    if TEST_OFF != "lean":
        env[LEAN_ENV] = "1"
    # Compiling the guard's modules at each start leaves ~3 MiB of the compiler's memory
    # behind: let the guard read (and write, once) its cached bytecode.
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    # -S drops site-packages from sys.path: name procksm's own directory instead
    env["PYTHONPATH"] = pythonpath or procksm_root()
    env.pop(STATE_ENV, None)
    return env


def format_state(
    role: str, numbers: dict[str, int], targets: Iterable[tuple[int, str, int]]
) -> str:
    """What the next image needs: its role, the numbers of the fds it inherits (lock,
    srv, link, peer_pidfd) and a few others (gen, peer_pid, handled, unmerged), as
    ``key=value`` words, and one ``t=FD,KEY,IP`` per guarded process (no json: ~1 MiB
    less)."""
    words = [f"role={role}", *(f"{k}={v}" for k, v in numbers.items())]
    words += [f"t={fd},{key},{ip}" for fd, key, ip in targets]
    return " ".join(words)


def parse_state(state: str) -> tuple[dict[str, int], list[tuple[int, str, int]]]:
    """format_state's words back: numbers (role: 1 active, 0 standby), and the
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


def exec_guard(argv: list[str], env: dict[str, str], state: str) -> None:
    """Replace this process's image with a guard that inherits the fds ``state`` names
    (OSError when it cannot be executed)."""
    doc, targets = parse_state(state)
    listeners = [] if TEST_OFF == "inherit" else [t[0] for t in targets]
    for fd in [doc["lock"], doc["srv"], doc["link"], doc["peer_pidfd"], *listeners]:
        if fd >= 0:
            os.set_inheritable(fd, True)
    env[STATE_ENV] = state
    os.execve(argv[0], argv, env)
