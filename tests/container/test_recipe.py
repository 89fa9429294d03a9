"""The container recipes and lock files against setup.py, read as text (nothing is built here; `make image` builds
and smoke-tests the CPU image): the CPU lock holds every pinned requirement at its pinned version, the GPU constraint
files and the GPU Dockerfile name the versions the extras pin, and the build context leaves local environments out."""
from __future__ import annotations

import ast
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _setup_literal(name: str):
    tree = ast.parse((REPO / "setup.py").read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == name for t in node.targets):
            return ast.literal_eval(node.value)
    raise AssertionError(f"setup.py has no {name}")


def _pins(lines: list[str]) -> dict[str, str]:
    """``name==version`` requirements (extras dropped, names normalised) -> version."""
    pins = {}
    for line in lines:
        match = re.fullmatch(r"\s*([A-Za-z0-9_.-]+)(?:\[[^\]]*\])?==([^\s;#]+)\s*(?:#.*)?", line)
        if match:
            pins[re.sub(r"[-_.]+", "-", match.group(1)).lower()] = match.group(2)
    return pins


def _file_pins(name: str) -> dict[str, str]:
    return _pins((REPO / "requirements" / name).read_text().splitlines())


def test_cpu_lock_pins_every_setup_requirement_at_its_version():
    lock = _file_pins("cpu.lock")
    wanted = _pins(_setup_literal("INSTALL_REQUIRES") + _setup_literal("EXTRAS")["test"])
    assert len(wanted) > 15 and len(lock) > 100
    assert {name: lock.get(name) for name in wanted} == wanted
    assert lock["torch"] == "2.13.0"  # the CPU wheel, written without its +cpu label
    assert "megatron-lpreg" not in lock  # the project itself is installed from the tree


def test_gpu_constraints_agree_with_the_extras():
    extras = _setup_literal("EXTRAS")
    core = _pins(_setup_literal("INSTALL_REQUIRES"))
    for file, engine in (("gpu-sglang.txt", "sglang"), ("gpu-vllm.txt", "vllm")):
        pins = _file_pins(file)
        assert {**_pins(extras[engine]), **_pins(extras["te"])}.items() <= pins.items(), file
        assert pins["transformers"] == core["transformers"] and pins["tokenizers"] == core["tokenizers"], file
        assert pins["transformer-engine-torch"] == pins["transformer-engine"], file


def test_gpu_locks_hold_the_constraints_and_the_project_pins():
    core = _pins(_setup_literal("INSTALL_REQUIRES"))
    for engine in ("sglang", "vllm"):
        lock, constraints = _file_pins(f"gpu-{engine}.lock"), _file_pins(f"gpu-{engine}.txt")
        assert len(lock) > 200, engine
        del constraints["transformer-engine-torch"]  # a source distribution: the resolve leaves it out
        assert constraints.items() <= lock.items(), engine
        assert core.items() <= lock.items(), engine
        assert lock["torch"] == constraints["torch"] and "megatron-lpreg" not in lock


def test_gpu_dockerfile_and_apptainer_definition_use_the_pinned_stack():
    dockerfile = (REPO / "container" / "Dockerfile").read_text()
    te = _pins(_setup_literal("EXTRAS")["te"])["transformer-engine"]
    sglang = _pins(_setup_literal("EXTRAS")["sglang"])["sglang"]
    assert f"ARG TE_VERSION={te}" in dockerfile
    base = re.search(r"^ARG BASE_IMAGE=(\S+)$", dockerfile, re.M)
    assert base and f"v{sglang}-cu13" in base.group(1), "the default base must be SGLang's image of the pinned release"
    assert "--no-build-isolation" in dockerfile
    assert dockerfile.count("-c requirements/gpu-sglang.lock -c requirements/gpu-sglang.txt") == 4
    assert re.search(r"^From: \{\{ IMAGE \}\}$", (REPO / "container" / "mlpreg.def").read_text(), re.M)


def test_build_context_leaves_environments_and_history_out():
    ignored = (REPO / "container" / "containerignore").read_text().split()
    for entry in (".git", ".venv", ".venv-*", ".sglang-contract", "runs", "wheelhouse"):
        assert entry in ignored, entry
