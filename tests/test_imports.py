"""The import graph of src/knnlm: no module imports itself back, at module level or inside a function (a lazy import
that closes a loop is a loop all the same)."""
import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "knnlm"


def _modules() -> dict[str, Path]:
    out = {}
    for p in SRC.rglob("*.py"):
        parts = list(p.relative_to(SRC.parent).with_suffix("").parts)
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = p
    return out


def _graph(top_level_only: bool) -> dict[str, set[str]]:
    """module -> the knnlm modules it imports (a name imported from a package counts as its module when it is one)."""
    mods, graph = _modules(), {}
    for name, path in mods.items():
        tree = ast.parse(path.read_text())
        package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
        nodes = tree.body if top_level_only else list(ast.walk(tree))
        for node in nodes:
            if isinstance(node, ast.ImportFrom):
                base = (node.module or "") if not node.level else ".".join(
                    package[: len(package) - node.level + 1] + ([node.module] if node.module else []))
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                continue
            for t in targets:
                while t and t not in mods:
                    t = t.rpartition(".")[0]
                if t and t != name:
                    graph.setdefault(name, set()).add(t)
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    found, state = [], {}

    def visit(u, path):
        state[u] = "open"
        for v in sorted(graph.get(u, ())):
            if state.get(v) == "open":
                found.append(path[path.index(v):] + [u, v] if v in path else [u, v])
            elif v not in state:
                visit(v, path + [u])
        state[u] = "done"

    for u in sorted(graph):
        if u not in state:
            visit(u, [])
    return found


def test_the_graph_sees_known_edges():
    top, every = _graph(True), _graph(False)
    assert "knnlm.datastore" in top["knnlm.index"]  # `from .datastore import check_finite`
    assert "knnlm.serve" in top["knnlm.serve_http"]
    assert "knnlm.search" in every["knnlm.knn"] and "knnlm.search" not in top.get("knnlm.knn", set())  # lazy
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == [["a", "b", "c", "a"]]


def test_no_import_loop_at_module_level():
    assert _cycles(_graph(True)) == []


def test_no_import_loop_through_function_level_imports():
    assert _cycles(_graph(False)) == []
