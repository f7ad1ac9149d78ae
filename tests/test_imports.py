"""The package's import graph: one-way (no cycles, lazy imports included) and layered."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"


def import_graph() -> dict[str, set[str]]:
    """module -> plait modules it imports anywhere in its source (read with ast, nothing run)."""
    modules: dict[str, Path] = {}
    for path in SRC.rglob("*.py"):
        parts = path.relative_to(SRC).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        modules[name] = path

    def resolve(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        deps: set[str] = set()
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                deps.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative import
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                # `from pkg import x` runs pkg/__init__.py first, so it depends on pkg itself too.
                deps.add(base)
                deps.update(f"{base}.{a.name}" for a in node.names)
        graph[name] = {r for d in deps if d.startswith("plait") and (r := resolve(d)) and r != name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1 = on the stack, 2 = done
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for d in sorted(graph.get(m, ())):
            if state.get(d) == 1:
                return stack[stack.index(d):] + [d]
            if d not in state and (cycle := visit(d)):
                return cycle
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state and (cycle := visit(m)):
            return cycle
    return None


def test_no_import_cycles():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_cycle_finder_finds_cycles():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def reaches(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for d in graph.get(todo.pop(), ()):
            if d not in seen:
                seen.add(d)
                todo.append(d)
    return seen


def test_layers_flow_one_way():
    graph = import_graph()
    for model in [m for m in graph if m.startswith("plait.models")]:
        bad = {d for d in graph[model] if d.startswith(("plait.parallel", "plait.train", "plait.serve"))}
        assert not bad, f"{model} (a model) imports strategies or the trainer: {sorted(bad)}"
    strategies_and_above = ("plait.parallel", "plait.train", "plait.serve", "plait.cli", "plait.launch")
    bad = {d for d in reaches(graph, "plait.config") if d.startswith(strategies_and_above)}
    assert not bad, f"plait.config reaches {sorted(bad)}; it must import no strategy"
    for mod in [m for m in graph if m.startswith("plait.parallel")]:
        bad = {d for d in graph[mod] if d.startswith(("plait.train.trainer", "plait.cli", "plait.serve"))}
        assert not bad, f"{mod} (a strategy) imports the trainer, CLI or serving: {sorted(bad)}"


def test_no_module_level_getattr_outside_the_top_package():
    """Lazy module attributes hide cycles; only `plait/__init__.py` uses one, to keep
    `import plait` free of torch."""
    offenders = []
    for path in SRC.rglob("*.py"):
        if path == SRC / "plait" / "__init__.py":
            continue
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.FunctionDef) and node.name == "__getattr__":
                offenders.append(str(path.relative_to(SRC)))
    assert not offenders


def test_import_plait_does_not_import_torch():
    code = "import sys, plait, plait.cli; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
