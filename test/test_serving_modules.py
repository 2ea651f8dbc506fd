"""The serving package's modules: each imports on its own, and no two import each other (even lazily)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import sglang_mixed_precision

PACKAGE = "sglang_mixed_precision"
ROOT = Path(sglang_mixed_precision.__file__).parent
SERVING = ROOT / "serving"


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path, known: set[str]) -> set[str]:
    """Modules of the package that ``path`` imports anywhere (top level or inside a function)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - node.level + 1]
                base = ".".join(anchor + ([node.module] if node.module else []))
            out.add(base)
            out.update(f"{base}.{alias.name}" for alias in node.names)  # `from . import hooks`
    return {m for m in out if m in known and m != name}


def import_graph(root: Path) -> dict[str, set[str]]:
    files = sorted(root.rglob("*.py"))
    known = {module_name(f) for f in files}
    return {module_name(f): imported_modules(f, known) for f in files}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_the_import_walk_sees_relative_and_lazy_imports():
    graph = import_graph(SERVING)
    assert f"{PACKAGE}.serving.hooks" in graph[f"{PACKAGE}.serving.plugin"]  # top level, relative
    assert f"{PACKAGE}.serving.routes" in graph[f"{PACKAGE}.serving.plugin"]  # inside register()
    assert f"{PACKAGE}.serving" in graph[f"{PACKAGE}.serving.hooks"]  # `from . import QUANT_METHOD`


def test_serving_modules_import_no_cycle():
    """Imports inside functions count too: a lazy cycle is still two modules that need each other."""
    graph = import_graph(SERVING)
    assert len(graph) >= 15
    assert find_cycle({k: {m for m in v if m.startswith(f"{PACKAGE}.serving.")} for k, v in graph.items()}) is None


def test_each_serving_module_imports_fresh():
    """Each module first in a clean package state (SGLang stays loaded: importing it is the slow part)."""
    names = sorted(n for n in import_graph(SERVING) if n != f"{PACKAGE}.serving")
    code = (
        "import importlib, sys\n"
        f"names = {names!r}\n"
        "for name in names:\n"
        f"    for m in [m for m in sys.modules if m == {PACKAGE!r} or m.startswith({PACKAGE + '.'!r})]:\n"
        "        del sys.modules[m]\n"
        "    importlib.import_module(name)\n"
        "print(len(names))\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    assert int(run.stdout.split()[-1]) == len(names)
