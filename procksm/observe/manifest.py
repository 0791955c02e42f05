"""What the loader child hands the daemon with the program's fds (pure): each map (name,
type, key and value sizes, entries, flags) and each program with the tracepoint it
attaches to, in the order of the fds (maps first), or why the program did not load.
One JSON document in the same message as the fds (SCM_RIGHTS)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Literal

ProbeKind = Literal["raw_tracepoint", "tracepoint"]
VERSION = 1

# bcc's names for the functions it attaches by themselves (bcc/__init__.py,
# _trace_autoload): raw_tracepoint__<name> and tracepoint__<category>__<name>
_RAW_PREFIX = "raw_tracepoint__"
_TP_PREFIX = "tracepoint__"


@dataclass(frozen=True, slots=True)
class MapSpec:
    name: str
    type: int  # enum bpf_map_type
    key_size: int
    value_size: int
    max_entries: int
    flags: int


@dataclass(frozen=True, slots=True)
class ProbeSpec:
    """A program and where it runs: ``raw_tracepoint`` ``page_fault_user``, or
    ``tracepoint`` ``sched:sched_process_fork``."""

    function: str
    kind: ProbeKind
    target: str


def probe_of_function(function: str) -> ProbeSpec | None:
    """The probe a function of cow.bpf.c is, from bcc's naming (None: not a probe)."""
    if function.startswith(_RAW_PREFIX):
        return ProbeSpec(function, "raw_tracepoint", function[len(_RAW_PREFIX) :])
    if function.startswith(_TP_PREFIX):
        category, sep, name = function[len(_TP_PREFIX) :].partition("__")
        if sep and category and name:
            return ProbeSpec(function, "tracepoint", f"{category}:{name}")
    return None


@dataclass(frozen=True, slots=True)
class Manifest:
    maps: tuple[MapSpec, ...]
    probes: tuple[ProbeSpec, ...]

    @property
    def fd_count(self) -> int:
        return len(self.maps) + len(self.probes)

    def map_named(self, name: str) -> MapSpec:
        for m in self.maps:
            if m.name == name:
                return m
        raise KeyError(f"the loaded program has no map {name!r}")


def encode(result: Manifest | str) -> bytes:
    """The message: a manifest, or the one-line reason the program did not load."""
    if isinstance(result, str):
        doc: dict[str, object] = {"version": VERSION, "error": result}
    else:
        doc = {
            "version": VERSION,
            "maps": [asdict(m) for m in result.maps],
            "probes": [asdict(p) for p in result.probes],
        }
    return json.dumps(doc).encode()


def decode(data: bytes) -> Manifest | str:
    """:func:`encode`'s message back; ValueError if it is not one."""
    try:
        doc = json.loads(data)
        if doc["version"] != VERSION:
            raise ValueError(f"manifest version {doc['version']}, expected {VERSION}")
        if "error" in doc:
            return str(doc["error"])
        maps = tuple(MapSpec(**m) for m in doc["maps"])
        probes = tuple(ProbeSpec(**p) for p in doc["probes"])
    except (KeyError, TypeError, json.JSONDecodeError) as e:
        raise ValueError(f"not a loader manifest: {e!r}") from None
    for p in probes:
        if p.kind not in ("raw_tracepoint", "tracepoint"):
            raise ValueError(f"not a loader manifest: probe kind {p.kind!r}")
    return Manifest(maps, probes)
