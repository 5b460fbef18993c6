"""No import cycle in lowbit: a static graph of every import (lazy ones and ``import_module("...")``
included), and a fresh interpreter importing every module in one order and then in the reverse."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _modules() -> dict[str, Path]:
    mods = {}
    for path in sorted((ROOT / "lowbit").rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        mods[".".join(parts)] = path
    return mods


def _imported_names(module: str, path: Path) -> set[str]:
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*up, base] if base else up)
            names.add(base)
            names.update(f"{base}.{a.name}" for a in node.names)
        elif (isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", None))
              == "import_module" and node.args and isinstance(node.args[0], ast.Constant)):
            names.add(node.args[0].value)
    return names


def import_graph() -> dict[str, set[str]]:
    """``module -> lowbit modules it imports``, leaving out its own parent packages (which Python
    initialises before any submodule anyway)."""
    mods = _modules()

    def owner(name: str) -> str | None:
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name or None

    graph = {}
    for module, path in mods.items():
        targets = {owner(n) for n in _imported_names(module, path) if n.split(".")[0] == "lowbit"}
        graph[module] = {t for t in targets if t and t != module and not module.startswith(t + ".")}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as a list of modules (first == last), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        path.append(m)
        for t in sorted(graph[m]):
            if state.get(t) == 1:
                return path[path.index(t):] + [t]
            if t not in state and (c := visit(t)):
                return c
        path.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state and (c := visit(m)):
            return c
    return None


def test_find_cycle_finds_a_planted_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_no_import_cycle_in_lowbit():
    graph = import_graph()
    assert "lowbit.cli" in graph and "lowbit.recipes.training" in graph
    assert find_cycle(graph) is None, f"import cycle: {' -> '.join(find_cycle(graph))}"


def test_nothing_imports_the_cli():
    importers = sorted(m for m, targets in import_graph().items() if "lowbit.cli" in targets)
    assert importers == []


@pytest.mark.parametrize("order", ["sorted", "reversed"])
def test_every_module_imports_fresh(order):
    mods = sorted(_modules())
    if order == "reversed":
        mods.reverse()
    code = "import importlib, sys\nfor m in sys.argv[1:]:\n    importlib.import_module(m)\n"
    r = subprocess.run([sys.executable, "-c", code, *mods], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]


# docs/design.md, "Layout": which lowbit packages each package may import
ALLOWED = {
    "quant": set(), "models": set(), "data": set(),
    "qat": {"quant"}, "float8": {"quant"}, "optim": {"quant"},
    "recipes": {"quant", "qat", "float8", "optim", "models", "data"},
    "eval": {"quant", "qat", "models", "data"},
    "demo": {"recipes", "eval", "models", "data"},
}


def test_packages_import_only_the_layers_below():
    def package(module: str) -> str:
        return module.split(".")[1] if "." in module else module

    wrong = sorted(
        f"{m} -> {t}" for m, targets in import_graph().items() for t in targets
        if package(m) in ALLOWED and package(t) != package(m) and package(t) not in ALLOWED[package(m)]
    )
    assert wrong == []
