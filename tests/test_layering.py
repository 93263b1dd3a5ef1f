"""The package's imports: no cycle between its modules (read from the source, not by importing it)."""

from __future__ import annotations

import ast
from pathlib import Path

import tree_search

ROOT = Path(tree_search.__file__).parent


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """Module -> the package's modules it imports (anywhere in it: module level or inside functions)."""
    modules = {_module_name(p): p for p in ROOT.rglob("*.py")}
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: from the module's package, one level up per extra dot
                    anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                    base = ".".join([*anchor, base] if base else anchor)
                names = [f"{base}.{alias.name}" for alias in node.names]
                targets = [n if n in modules else base for n in names]
            graph[name] |= {t for t in targets if t in modules and t != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

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
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_module_of_the_package_imports_itself_back():
    graph = import_graph()
    assert "tree_search.agents.policy" in graph["tree_search.agents.rllib_search"]  # the reader sees real imports
    # a package's __init__ re-exports its modules, and a module importing a sibling through the package is fine;
    # the cycles that matter are between modules
    modules = {k: {t for t in v if not _is_package(t)} for k, v in graph.items() if not _is_package(k)}
    assert cycles(modules) == []


# The layers, lowest first (docs/architecture.md, "Who imports whom"): a module imports only from its layer or lower.
LAYERS = (
    ("tree",),
    ("cost", "builders", "export"),
    ("split_grammar", "data"),
    ("heads",),
    ("reward", "hierarchy", "interop"),
    ("distributed", "envs"),
    ("agents",),
    ("search",),
    ("cli",),
)


def _room(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def test_imports_point_down_the_layers():
    level = {room: i for i, rooms in enumerate(LAYERS) for room in rooms}
    rooms = {_room(m) for m in import_graph()} - {""}
    assert rooms == set(level), f"rooms without a layer: {sorted(rooms - set(level))}"
    upward = sorted(f"{a} -> {b}" for a, targets in import_graph().items() for b in targets
                    if _room(a) and _room(b) and level[_room(b)] > level[_room(a)])  # fmt: skip
    assert upward == []
    assert "tree_search.heads.tree_head" in import_graph()["tree_search.reward.reward"]  # the reader sees imports


def _is_package(name: str) -> bool:
    return (ROOT.parent / Path(*name.split(".")) / "__init__.py").exists()


def test_a_name_that_moved_out_of_heads_says_where_it_went():
    import pytest

    import tree_search.heads as heads

    with pytest.raises(AttributeError, match="tree_search.reward and the uses of a trained head"):
        heads.evaluate  # noqa: B018
    with pytest.raises(AttributeError, match="are tree_search.hierarchy"):
        heads.early_answer  # noqa: B018
