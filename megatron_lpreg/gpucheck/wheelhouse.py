"""The offline wheelhouse for a GPU node that has Python 3.12, torch and transformers but no network.

The lent GPU nodes (docs/benchmarks.md, GPU check) hold Python 3.12.3, torch 2.11.0+cu130, transformers 5.17.0 and most
common packages (numpy, tokenizers, safetensors, psutil, pyyaml, tqdm, regex, click, joblib, sympy, tensorboard,
...), but not megatron-core or a few of our small dependencies, and at most 64 MiB can be brought along. This
module downloads, for CPython 3.12 on manylinux x86_64 and without dependency resolution, exactly the wheels the
project imports there that the node lacks (:data:`GPU_NODE_REQUIREMENTS`), builds the project's own wheel, writes
``requirements-gpu.txt`` and checks the total size. Never torch, ray, vllm, sglang or transformer-engine.

Install on the node without resolving dependencies (setup.py asks for torch>=2.13, the node has 2.11):
``python3 -m pip install --no-index --no-deps --find-links wheelhouse -r wheelhouse/requirements-gpu.txt``.
"""
from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

GPU_NODE_REQUIREMENTS = (
    "megatron-core==0.16.1",  # the model/parallel core (has a cp312 wheel); declares torch, numpy, packaging only
    "nltk==3.10.4",  # imported by the trainer's exploration metrics (self-BLEU)
    "defusedxml==0.7.1",  # nltk imports it (nltk.xmlsec)
    "math-verify==0.9.0",  # the `math` reward (real runs; the GPU check's tiny run uses its own reward)
    "latex2sympy2_extended==1.11.0",  # math-verify's LaTeX parser
    "antlr4-python3-runtime==4.13.2",  # latex2sympy2_extended's parser runtime
)
"""Wheels the project needs on the GPU node that its image lacks (what the image holds: the module docstring)."""
PYTHON_VERSION = "3.12"
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_24_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")
MAX_BYTES = 64 * 2**20
"""What one call may carry to a lent GPU node (64 MiB), the repository included."""
REQUIREMENTS_FILE = "requirements-gpu.txt"


@dataclass(frozen=True)
class Wheelhouse:
    """What was built: the wheel files and their total size in bytes."""

    directory: Path
    wheels: tuple[Path, ...]
    total_bytes: int

    def describe(self) -> str:
        lines = [f"{w.name}  {w.stat().st_size / 2**20:.2f} MiB" for w in self.wheels]
        return "\n".join(lines + [f"total {self.total_bytes / 2**20:.2f} MiB in {len(self.wheels)} wheels "
                                  f"(limit {MAX_BYTES / 2**20:.0f} MiB), {self.directory}"])


def _pip(args: Sequence[str]) -> None:
    cmd = [sys.executable, "-m", "pip", *args]
    logger.info("%s", " ".join(cmd))
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")


def download_command(out: Path, requirements: Sequence[str], python_version: str = PYTHON_VERSION) -> list[str]:
    """pip arguments that fetch binary wheels for CPython ``python_version`` on manylinux x86_64, no dependencies."""
    platforms = [arg for platform in PLATFORMS for arg in ("--platform", platform)]
    return ["download", "--no-deps", "--only-binary=:all:", "--python-version", python_version, "--implementation",
            "cp", *platforms, "--dest", str(out), *requirements]


def build_wheelhouse(out_dir: str | os.PathLike, project_dir: str | os.PathLike, *,
                     requirements: Sequence[str] = GPU_NODE_REQUIREMENTS, max_bytes: int = MAX_BYTES) -> Wheelhouse:
    """Download :data:`GPU_NODE_REQUIREMENTS`, build the project's wheel and write ``requirements-gpu.txt``.

    ``out_dir`` is emptied first (a stale second version of a wheel would break the install).

    Raises:
        RuntimeError: pip failed (no such wheel for Python 3.12, no network).
        ValueError: the wheels exceed ``max_bytes``.
    """
    out = Path(out_dir)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    _pip(download_command(out, requirements))
    _pip(["wheel", "--no-deps", "--no-build-isolation", "--wheel-dir", str(out), str(Path(project_dir).resolve())])
    wheels = tuple(sorted(out.glob("*.whl")))
    names = [req.split("==")[0] for req in requirements] + ["megatron_lpreg"]
    (out / REQUIREMENTS_FILE).write_text("\n".join(names) + "\n")
    total = sum(w.stat().st_size for w in wheels)
    house = Wheelhouse(directory=out, wheels=wheels, total_bytes=total)
    if total > max_bytes:
        raise ValueError(f"wheelhouse {out} is {total / 2**20:.1f} MiB > {max_bytes / 2**20:.0f} MiB:\n"
                         f"{house.describe()}")
    return house
