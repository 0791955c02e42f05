"""The layout's one-way data flow: no import cycles among procksm's modules (pure, no root).

Imports are read with ``ast`` from the sources, function-level and TYPE_CHECKING ones
included: a cycle hidden in a function is still a cycle in the design.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "procksm"


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def import_graph() -> dict[str, set[str]]:
    """Module -> the procksm modules it imports (a package counts as its __init__)."""
    modules = _modules()
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        found: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                found.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - node.level + 1]
                    target = ".".join([*base, node.module] if node.module else base)
                else:
                    target = node.module or ""
                found.add(target)
                found.update(f"{target}.{alias.name}" for alias in node.names)
        graph[name] = {m for m in found if m in modules and m != name}
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return cycles


def test_the_cycle_finder_finds_a_cycle() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert find_cycles(graph) == [["a", "b", "c"]]
    assert find_cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle_among_procksm_modules() -> None:
    graph = import_graph()
    assert "procksm.merge.target" in graph["procksm.merge.engine"]
    assert find_cycles(graph) == []


def test_the_architecture_and_the_resident_guard_sit_at_the_bottom() -> None:
    """procksm.arch imports nothing of procksm but errors; the lean guard (the modules
    of procksm.guardd) nothing but the package, the arch module and one another (no
    numpy through procfs or slots); the raw ptrace layer (inject) and /proc (procfs)
    nothing above them."""
    graph = import_graph()
    assert graph["procksm.arch.x86_64"] <= {"procksm.errors"}
    guard_modules = {m for m in graph if m == "procksm.guardd" or m.startswith("procksm.guardd.")}
    assert len(guard_modules) > 1
    for module in guard_modules:
        assert graph[module] <= {"procksm", "procksm.arch", "procksm.arch.x86_64"} | guard_modules
    below_inject = {"procksm", "procksm.arch", "procksm.arch.x86_64", "procksm.errors"}
    assert graph["procksm.attach.inject"] <= below_inject | {"procksm.procfs"}
    # procfs names the madvise values of VmFlags (procfs.REAPPLIED_VMFLAGS) from arch
    assert graph["procksm.procfs"] <= below_inject | {"procksm.closing"}
    # attach diagnosis comes before attaching
    assert "procksm.attach.session" not in graph["procksm.attach.diagnose"]


def test_the_command_table_names_each_command_and_its_first_help_line() -> None:
    """cli.COMMANDS (what lets ``procksm X`` import only X) says what each class does."""
    from procksm.cli import COMMANDS, build_parser, load_command

    for name, (_, _, summary) in COMMANDS.items():
        doc = (type(load_command(name)).__doc__ or "").strip()
        assert doc.splitlines()[0] == summary, name
    assert build_parser().parse_args(["stats", "--json"]).command == "stats"


def test_the_daemon_imports_no_rich_nor_another_command() -> None:
    """``procksm attach`` imports its command, the argument helpers it shares with other
    commands (pids, stops) and the daemon, not rich (~2.4 MiB for the daemon's life) nor
    the other commands; ``procksm --help`` imports no command."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from procksm import cli\n"
        "cli.build_parser('').parse_args([])\n"
        "before = sorted(m for m in sys.modules if m.startswith('procksm.commands.'))\n"
        "cli.build_parser('attach').parse_args(['attach', '1'])\n"
        "import procksm.daemon, procksm.control, procksm.observe\n"
        "print(before, sorted(m for m in sys.modules if m.split('.')[0] == 'rich' "
        "or m.startswith(('procksm.commands.', 'procksm.report', 'procksm.tui'))))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    ).stdout.strip()
    allowed = ["procksm.commands.attach", "procksm.commands.pids", "procksm.commands.stops"]
    assert out == f"[] {allowed}"


def test_importing_procksm_starts_no_blas_threads() -> None:
    """procksm never calls BLAS: numpy's OpenBLAS gets no threads of its own (starting one
    per CPU cost each procksm process ~0.07 CPU s), and the environment procksm's own
    children get is left as it was."""
    import subprocess
    import sys

    probe = (
        "import os; os.environ.pop('OPENBLAS_NUM_THREADS', None); import procksm.cli; "
        "print(len(os.listdir('/proc/self/task')), os.environ.get('OPENBLAS_NUM_THREADS'))"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True
    ).stdout.split()
    assert out == ["1", "None"], out
