"""The package's import graph: no cycles, and every import goes down the layers of DESIGN.md

    cli -> pipeline/lottery/report -> search/train -> tickets/prune -> data/models/earlybird -> config

Read from the source with ast, every import counted (those inside functions too: a lazy import that closes
a loop is still a loop). Run as a script to print the graph.
"""
import ast
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT

PACKAGE = ROOT / "ebtrain"

# Layer of each module, by the longest listed prefix of its name; a module may import its own layer and those
# below. A new module needs a line here.
LAYERS = {
    "ebtrain.errors": 0, "ebtrain.config": 0, "ebtrain.host_memory": 0,
    "ebtrain.checkpoint": 1, "ebtrain.distributed": 1, "ebtrain.channel_flops": 1,
    "ebtrain.data": 2, "ebtrain.stream": 2, "ebtrain.models": 2, "ebtrain.earlybird": 2, "ebtrain.monitor": 2, "ebtrain.figures": 2,
    "ebtrain": 3,  # the package itself: its public API (earlybird, models, prune)
    "ebtrain.prune": 3, "ebtrain.tickets": 3, "ebtrain.rundir": 3, "ebtrain.validate": 3,
    "ebtrain.train": 4, "ebtrain.quant": 4, "ebtrain.flops": 4, "ebtrain.search": 4,
    "ebtrain.pipeline": 5, "ebtrain.lottery": 5, "ebtrain.report": 5,
    "ebtrain.cli": 6, "ebtrain.__main__": 6,
}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def is_module(name: str) -> bool:
    path = ROOT.joinpath(*name.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def imports_of(path: Path) -> set[str]:
    """The ebtrain modules that the file at `path` imports, anywhere in it."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([node.module] if node.module else []))
            # `from pkg import sub` imports the module pkg.sub; `from mod import name` imports mod
            found |= {f"{base}.{alias.name}" if is_module(f"{base}.{alias.name}") else base for alias in node.names}
    return {m for m in found if (m == "ebtrain" or m.startswith("ebtrain.")) and m != name}


def import_graph() -> dict[str, set[str]]:
    return {module_name(p): imports_of(p) for p in sorted(PACKAGE.rglob("*.py"))}


def layer(module: str) -> int:
    prefix = max((p for p in LAYERS if module == p or module.startswith(p + ".")), key=len, default=None)
    if prefix is None:
        raise KeyError(f"{module} has no layer: add it to LAYERS in {Path(__file__).name}")
    return LAYERS[prefix]


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index, low, on_stack, stack, found = {}, {}, set(), [], []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
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


def test_no_import_cycle():
    assert cycles(import_graph()) == []


def test_cycle_finder_finds_one():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_every_import_goes_down_the_layers():
    upward = [f"{m} (layer {layer(m)}) imports {t} (layer {layer(t)})"
              for m, targets in import_graph().items() for t in sorted(targets) if layer(t) > layer(m)]
    assert upward == []


def test_channel_surgery_knows_no_model_family():
    families = {m for m in import_graph() if m.startswith("ebtrain.models.")} - {"ebtrain.models.registry"}
    assert not imports_of(PACKAGE / "prune.py") & families


@pytest.mark.parametrize("module", ["ebtrain.train", "ebtrain.monitor"])
def test_training_imports_no_plotting_library(module):
    code = f"import sys, {module}; print('matplotlib' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True).stdout
    assert out.strip() == "False"


if __name__ == "__main__":
    for module, targets in import_graph().items():
        print(f"{module} [{layer(module)}] -> {', '.join(sorted(targets)) or '-'}")
