"""The package's import graph, read from the source with ``ast`` (nothing is imported): no module imports another
in a circle, function-level imports included (``if TYPE_CHECKING:`` blocks excluded, they never run), and the
layer rules of docs/architecture.md hold: ``reward/`` is pure text scoring (nothing from ``rollout/`` or
``trainer/``), the trainer knows no scheduler (nothing from ``launch/``), the launcher no trainer internals
(nothing from ``trainer/``), and ``algo/`` and ``ops/`` import no Ray, HTTP or trainer code.

An edge ``a -> b`` is any ``import``/``from ... import`` in ``a`` that names module ``b`` of the package (a
``from pkg import name`` names ``pkg.name`` when that is a module, else ``pkg``'s ``__init__``). The implicit import
of a parent package's ``__init__`` is not an edge.
"""
from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import pytest

PACKAGE = "megatron_lpreg"
ROOT = Path(__file__).resolve().parents[1] / PACKAGE


def _modules() -> dict[str, Path]:
    found = {}
    for path in ROOT.rglob("*.py"):
        parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


MODULES = _modules()


def _resolve(name: str) -> str | None:
    """The package module that ``name`` (a dotted module or ``module.attribute``) refers to."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    skipped: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.body:
                skipped.update(id(n) for n in ast.walk(child))
    return skipped


def _imports(module: str, path: Path) -> set[str]:
    """The package modules that ``module`` imports anywhere in its body (see the module docstring)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    skipped = _type_checking_nodes(tree)
    targets: set[str | None] = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            targets.update(_resolve(alias.name) for alias in node.names if alias.name.startswith(PACKAGE))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            if not source.startswith(PACKAGE):
                continue
            targets.update(_resolve(f"{source}.{alias.name}") or _resolve(source) for alias in node.names)
    return {t for t in targets if t and t != module}


GRAPH: dict[str, set[str]] = defaultdict(set, {m: _imports(m, p) for m, p in MODULES.items()})


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            for child in children:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
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
                        member = stack.pop()
                        on_stack.discard(member)
                        component.append(member)
                        if member == node:
                            break
                    if len(component) > 1:
                        found.append(sorted(component))
    return found


def _path(graph: dict[str, set[str]], source: str, target: str) -> list[str]:
    """One import chain from ``source`` to ``target`` (breadth first), for the failure message."""
    parents = {source: source}
    queue = [source]
    while queue:
        node = queue.pop(0)
        for child in sorted(graph[node]):
            if child not in parents:
                parents[child] = node
                if child == target:
                    chain = [target]
                    while chain[-1] != source:
                        chain.append(parents[chain[-1]])
                    return chain[::-1]
                queue.append(child)
    return []


def test_the_checker_sees_function_level_imports_and_finds_cycles():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []
    # trainer.cli imports the launcher inside a function; the checker must see that edge.
    assert f"{PACKAGE}.trainer.launch" in GRAPH[f"{PACKAGE}.trainer.cli"]


def test_no_import_cycles():
    problems = []
    for component in _cycles(GRAPH):
        first = component[0]
        back = next(m for m in component if first in GRAPH[m])
        problems.append(" -> ".join(_path(GRAPH, first, back) + [first]))
    assert not problems, "import cycles (function-level imports count):\n" + "\n".join(problems)


LAYER_RULES = [
    ("reward", ("rollout", "trainer", "launch", "eval")),
    ("trainer", ("launch",)),
    ("launch", ("trainer",)),
    ("algo", ("trainer", "rollout", "launch", "reward", "eval")),
    ("ops", ("trainer", "rollout", "launch", "reward", "eval", "algo")),
    ("config", ("trainer", "rollout", "launch", "reward", "eval", "algo", "ops", "models", "data")),
    ("metrics", ("trainer", "rollout", "launch", "eval", "study")),
]


@pytest.mark.parametrize("layer,forbidden", LAYER_RULES, ids=[rule[0] for rule in LAYER_RULES])
def test_layer_rules(layer, forbidden):
    prefix = f"{PACKAGE}.{layer}"
    bad = sorted(
        f"{module} imports {target}"
        for module, targets in GRAPH.items() if module == prefix or module.startswith(prefix + ".")
        for target in targets if any(target == f"{PACKAGE}.{f}" or target.startswith(f"{PACKAGE}.{f}.")
                                     for f in forbidden)
    )
    assert not bad, f"{layer}/ must not import {', '.join(forbidden)}:\n" + "\n".join(bad)


THIRD_PARTY_BANNED = {"algo": ("ray", "requests", "aiohttp", "fastapi", "uvicorn"),
                      "ops": ("ray", "requests", "aiohttp", "fastapi", "uvicorn")}


@pytest.mark.parametrize("layer", sorted(THIRD_PARTY_BANNED))
def test_pure_layers_import_no_ray_or_http(layer):
    bad = []
    for module, path in MODULES.items():
        if not module.startswith(f"{PACKAGE}.{layer}"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else [])
            bad += [f"{module} imports {n}" for n in names if n.split(".")[0] in THIRD_PARTY_BANNED[layer]]
    assert not bad, "\n".join(bad)
