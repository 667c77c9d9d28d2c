"""The package's import graph: no two modules of lehi/ import each other, directly or in a
circle (a circle makes the import order matter and hides which module owns what)."""

from __future__ import annotations

import ast
from pathlib import Path

from conftest import REPO


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph(root: Path) -> dict[str, set[str]]:
    """Module → the lehi modules it imports anywhere in its source (function bodies too).

    ``from package import name`` counts as importing the submodule ``package.name`` when
    there is one, else the package itself.
    """
    files = {module_name(f, root): f for f in (root / "lehi").rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        edges: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                edges.update(a.name for a in node.names if a.name in files)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                for alias in node.names:
                    submodule = f"{node.module}.{alias.name}"
                    if submodule in files:
                        edges.add(submodule)
                    elif node.module in files:
                        edges.add(node.module)
        graph[name] = edges - {name}
    return graph


def cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle of ``graph`` (its modules in order, the first repeated), or None."""
    state: dict[str, str] = {}  # "open" while on the current path, "done" after

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                return [*path[path.index(nxt) :], nxt]
            if nxt not in state and (found := visit(nxt, [*path, nxt])):
                return found
        state[node] = "done"
        return None

    for start in sorted(graph):
        if start not in state and (found := visit(start, [start])):
            return found
    return None


def test_the_check_finds_a_circle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycle(graph) == ["a", "b", "c", "a"]
    assert cycle({"a": {"b"}, "b": set()}) is None


def test_import_graph_reads_function_level_imports(tmp_path):
    package = tmp_path / "lehi"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "one.py").write_text("def f():\n    from lehi import two\n")
    (package / "two.py").write_text("from lehi.one import f\n")
    graph = import_graph(tmp_path)
    assert graph["lehi.one"] == {"lehi.two"} and graph["lehi.two"] == {"lehi.one"}
    assert cycle(graph) is not None


def test_lehi_has_no_import_circle():
    graph = import_graph(REPO)
    assert "lehi.results.report" in graph and graph["lehi.results.report"]  # it read the tree
    assert cycle(graph) is None, " → ".join(cycle(graph) or [])
