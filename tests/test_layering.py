"""The house has floors and no circles: every `shardline` import (module level or inside a function,
and every `python -m shardline.x` written as a string) points down, and no modules import each
other round in a circle.

Floors, top to bottom: client → router → shard → common → proto (demo, the packaged model, sits
with common). A package may import itself and anything below it, never a package above it or
beside it. The files are found through pyproject's `package-dir`, so the test follows the layout.
"""

from __future__ import annotations

import ast
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FLOORS = {"proto": 0, "common": 1, "demo": 1, "shard": 2, "router": 3, "client": 4}


def _modules() -> dict[str, Path]:
    """Map every module name of the distribution to its file."""
    setup = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    modules = {}
    for package, folder in setup["package-dir"].items():
        assert package in setup["packages"], f"{package} has a package-dir but is not in packages"
        for path in sorted((ROOT / folder).glob("*.py")):
            name = package if path.stem == "__init__" else f"{package}.{path.stem}"
            modules[name] = path
    return modules


MODULES = _modules()


def _target(name: str) -> str | None:
    """The module an imported name lands in (a module, or the package whose attribute it is)."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def _imports(module: str, path: Path) -> list[tuple[str, int, bool]]:
    """(imported module, line, at module level) for every shardline reference in one file."""
    tree = ast.parse(path.read_text(), str(path))
    top = {id(node) for node in tree.body}
    for node in tree.body:  # `if TYPE_CHECKING:` / `try:` blocks at top level count as top level
        if isinstance(node, (ast.If, ast.Try)):
            top.update(id(n) for n in ast.walk(node))
    package = module if path.stem == "__init__" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            names = [f"{base}.{alias.name}" for alias in node.names]
        elif isinstance(node, (ast.List, ast.Tuple)):  # a command line: [python, "-m", "shardline.shard", ...]
            words = [e.value if isinstance(e, ast.Constant) else None for e in node.elts]
            names = [b for a, b in zip(words, words[1:]) if a == "-m" and isinstance(b, str)]
        for name in names:
            target = _target(name) if name.startswith("shardline.") else None
            if target and target != module:
                found.append((target, node.lineno, id(node) in top))
    return found


GRAPH = {module: _imports(module, path) for module, path in MODULES.items()}


def _floor(module: str) -> tuple[str, int]:
    component = module.split(".")[1]
    assert component in FLOORS, f"{module}: package {component!r} has no floor in FLOORS"
    return component, FLOORS[component]


def test_every_package_has_a_floor_and_files():
    assert len(MODULES) > 50
    for module in MODULES:
        _floor(module)


def test_no_import_goes_up_or_sideways():
    arrows = set()
    for module, imports in GRAPH.items():
        component, floor = _floor(module)
        for target, line, _ in imports:
            other, other_floor = _floor(target)
            if other != component and other_floor >= floor:
                arrows.add(f"{MODULES[module].relative_to(ROOT)}:{line}: {module} -> {target}")
    assert not arrows, "imports that go up (or sideways) the floors:\n" + "\n".join(sorted(arrows))


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index, low, on_stack, stack, result, counter = {}, {}, set(), [], [], [0]
    for root in edges:
        if root in index:
            continue
        work = [(root, iter(sorted(edges[root])))]
        index[root] = low[root] = counter[0]; counter[0] += 1
        stack.append(root); on_stack.add(root)
        while work:
            node, children = work[-1]
            for child in children:
                if child not in index:
                    index[child] = low[child] = counter[0]; counter[0] += 1
                    stack.append(child); on_stack.add(child)
                    work.append((child, iter(sorted(edges[child]))))
                    break
                if child in on_stack:
                    low[node] = min(low[node], index[child])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        member = stack.pop(); on_stack.discard(member); component.append(member)
                        if member == node:
                            break
                    if len(component) > 1:
                        result.append(sorted(component))
    return result


@pytest.mark.parametrize("lazy", [False, True], ids=["module-level", "with-lazy-imports"])
def test_no_import_circle(lazy):
    edges = {m: {t for t, _, top in imports if top or lazy} for m, imports in GRAPH.items()}
    circles = _cycles(edges)
    assert not circles, "modules importing each other round in a circle:\n" + "\n".join(
        " <-> ".join(c) for c in circles)


def test_the_cycle_finder_finds_cycles():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_a_shard_starts_without_the_sdk_or_the_router():
    """`python -m shardline.shard` (what launch and shard nodes run) loads only shard, common, proto."""
    probe = ("import runpy, sys\nsys.argv = ['shardline.shard', '--help']\n"
             "try:\n    runpy.run_module('shardline.shard', run_name='__main__')\nexcept SystemExit:\n    pass\n"
             "print(sorted(m for m in sys.modules if m.startswith(('shardline.client', 'shardline.router'))))")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "--ranks-per-node" in done.stdout
    assert done.stdout.strip().splitlines()[-1] == "[]", done.stdout.strip().splitlines()[-1]
