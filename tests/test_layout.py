"""The pack's layout: modules import one way (no import circle anywhere in nodes/, patches/ and kernels/), and
every module reads top to bottom in at most 450 lines."""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Dict, List, Set

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("nodes", "patches", "kernels")
MAX_LINES = 450


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> Dict[str, Path]:
    return {module_name(p): p for package in PACKAGES for p in (ROOT / package).rglob("*.py")}


def imports(name: str, path: Path, known: Dict[str, Path]) -> Set[str]:
    """The pack modules ``name`` imports, at the top or inside functions (a lazy import is still an edge)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if not isinstance(node, ast.ImportFrom) or node.level == 0:
            continue
        base = package.split(".")
        base = base[:len(base) - (node.level - 1)] if node.level > 1 else base
        target = ".".join(base + ([node.module] if node.module else []))
        for alias in node.names:
            child = f"{target}.{alias.name}"
            found.add(child if child in known else target)
    return {m for m in found if m in known and m != name}


def cycles(graph: Dict[str, Set[str]]) -> List[List[str]]:
    """Every import circle, as the list of modules along it."""
    found, state, stack = [], {}, []

    def visit(node: str) -> None:
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                found.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node)
    return found


def test_the_graph_sees_the_imports_it_should():
    known = modules()
    graph = {name: imports(name, path, known) for name, path in known.items()}
    assert "patches.nag.core" in graph["patches.nag.flux"]
    assert "patches.unet" in graph["patches.nag.unet"]


def test_no_module_of_the_pack_imports_itself_back():
    known = modules()
    graph = {name: imports(name, path, known) for name, path in known.items()}
    assert cycles(graph) == []


def test_a_circle_is_found_when_there_is_one():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == [["a", "b", "c", "a"]]


def test_no_module_of_the_pack_passes_450_lines():
    long = {name: n for name, path in modules().items() if (n := len(path.read_text().splitlines())) > MAX_LINES}
    assert not long, f"split these by technique (docs/development.md, Layout): {long}"
