"""The library's dependencies point one way: no import cycle, config imports nothing of ours, and methods and
families never import the stages that use them."""
from __future__ import annotations

import ast
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "style_factory"
STAGES = {"style_factory.curate", "style_factory.train", "style_factory.train_group", "style_factory.worker",
          "style_factory.export", "style_factory.generate", "style_factory.evaluate", "style_factory.report",
          "style_factory.priors", "style_factory.run"}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """Module -> the pipeline modules it imports anywhere in its source (function-level imports included)."""
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module:
                found |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
        graph[name] = {m for m in found if m in modules and m != name}
    return graph


def test_no_import_cycle():
    graph, state, cycles = import_graph(), {}, []

    def visit(node: str, path: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                cycles.append(path[path.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_config_is_a_leaf_and_methods_and_families_never_import_stages():
    graph = import_graph()
    assert graph["style_factory.config"] == set()
    for name, imports in graph.items():
        if name.startswith(("style_factory.methods", "style_factory.families")):
            assert not imports & STAGES, f"{name} imports the stages {sorted(imports & STAGES)}"


def test_the_cycle_check_sees_a_cycle(tmp_path, monkeypatch):
    """The checker itself: two modules importing each other are reported."""
    package = tmp_path / "style_factory"
    package.mkdir()
    (package / "a.py").write_text("from style_factory import b\n")
    (package / "b.py").write_text("def f():\n    from style_factory.a import g\n")
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", package)
    try:
        test_no_import_cycle()
    except AssertionError as err:
        assert "style_factory.a -> style_factory.b -> style_factory.a" in str(err)
    else:
        raise AssertionError("the cycle was not found")
