"""No import cycle anywhere in ebtrain/: every module's imports, at the top or inside a function, point
to modules that do not import it back. A package importing its own submodules (to re-export them, or a
registry loading its families) is how packages work, not a cycle."""
import ast
from pathlib import Path

from conftest import ROOT

PACKAGE = ROOT / "ebtrain"


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """Module -> the ebtrain modules it imports (`from X import y` counts X, and X.y when y is a module)."""
    paths = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in paths.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                targets |= {base} | {f"{base}.{alias.name}" for alias in node.names}
            elif isinstance(node, ast.Import):
                targets |= {alias.name for alias in node.names}
        own = f"{name}." if path.name == "__init__.py" else None
        graph[name] = {t for t in targets & paths.keys() if t != name and not (own and t.startswith(own))}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None."""
    state: dict[str, str] = {}
    path: list[str] = []

    def visit(module: str) -> list[str] | None:
        state[module] = "open"
        path.append(module)
        for target in sorted(graph[module]):
            if state.get(target) == "open":
                return path[path.index(target):] + [target]
            if target not in state and (cycle := visit(target)):
                return cycle
        state[module] = "done"
        path.pop()
        return None

    for module in sorted(graph):
        if module not in state and (cycle := visit(module)):
            return cycle
    return None


def test_the_checker_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycle_in_ebtrain():
    graph = import_graph()
    assert "ebtrain.lottery.experiment" in graph and "ebtrain.report" in graph
    assert find_cycle(graph) is None


def test_report_and_lottery_do_not_import_each_other():
    graph = import_graph()
    lottery = {m for m in graph if m == "ebtrain.lottery" or m.startswith("ebtrain.lottery.")}
    assert not graph["ebtrain.report"] & lottery
    assert all("ebtrain.report" not in graph[m] for m in lottery)
