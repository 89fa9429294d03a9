"""setup.py against the source tree, read with ``ast`` (nothing is installed or imported): every file listed in
``package_data`` exists, and every runtime requirement is imported somewhere in the repository (a dependency that
nothing imports is dead weight in every install), apart from the few pinned for a stated reason."""
from __future__ import annotations

import ast
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SOURCE_DIRS = ("megatron_lpreg", "tests", "tools", "benchmarks")

IMPORT_NAMES = {"pyyaml": "yaml", "math-verify": "math_verify", "megatron-core": "megatron",
                "tensorboard": "torch.utils.tensorboard"}
"""Distribution name -> the module the code imports, where they differ."""

PINNED_NOT_IMPORTED = {"numpy": "the version torch and megatron-core were verified with (setup.py pins)"}


def _setup_literal(name: str):
    tree = ast.parse((REPO / "setup.py").read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == name for t in node.targets):
            return ast.literal_eval(node.value)
    for node in ast.walk(tree):
        if isinstance(node, ast.keyword) and node.arg == name:
            return ast.literal_eval(node.value)
    raise AssertionError(f"setup.py has no {name}")


def _imported_modules() -> set[str]:
    found: set[str] = set()
    for folder in SOURCE_DIRS:
        for path in (REPO / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
                if isinstance(node, ast.Import):
                    found.update(alias.name for alias in node.names)
                elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                    found.add(node.module)
                    found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def test_package_data_files_exist():
    for package, files in _setup_literal("package_data").items():
        for name in files:
            assert (REPO / package.replace(".", "/") / name).is_file(), f"setup.py ships {package}/{name}: missing"


def test_every_runtime_requirement_is_imported():
    imported = _imported_modules()
    unused = []
    for requirement in _setup_literal("INSTALL_REQUIRES"):
        dist = re.split(r"[\[=<>!~ ]", requirement, maxsplit=1)[0]
        if dist in PINNED_NOT_IMPORTED:
            continue
        module = IMPORT_NAMES.get(dist, dist.replace("-", "_"))
        if not any(name == module or name.startswith(module + ".") for name in imported):
            unused.append(f"{requirement} (module {module})")
    assert not unused, "setup.py declares what nothing imports:\n" + "\n".join(unused)
