"""Run the GPU check: each section in a fresh Python process, then one report (``report.json`` + ``report.md``).

A fresh process per section keeps CUDA state, megatron's globals and any crash (a segfault in a kernel, a hang)
inside that section; the parent never touches the GPU's compute. Each section process gets the environment of a
one-rank torchrun launch (``RANK=0``, ``WORLD_SIZE=1``, a free ``MASTER_PORT``), so megatron-based code runs in it
directly, without forking ranks. ``--device cpu`` hides every GPU from the sections (``CUDA_VISIBLE_DEVICES=``),
so the same command is a CPU rehearsal of the GPU run.

The section process is ``python -m megatron_lpreg.gpucheck --section NAME ...`` (internal).
"""
from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import platform
import signal
import subprocess
import sys
import time
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from megatron_lpreg.gpucheck.report import (
    ALL_SECTIONS,
    SECTION_NAMES,
    section_failed,
    section_ok,
    section_skipped,
    write_report,
)

logger = logging.getLogger(__name__)

DEFAULT_SECTION_TIMEOUT_S = 600.0
_LOG_TAIL_CHARS = 2000


def resolve_device(requested: str | None) -> str:
    """``"cuda"`` when available and not asked otherwise, else ``"cpu"``.

    Raises:
        ValueError: ``cuda`` asked for where torch sees no GPU, or an unknown device.
    """
    import torch

    if requested is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested not in ("cpu", "cuda"):
        raise ValueError(f"device={requested!r} must be 'cpu' or 'cuda'")
    if requested == "cuda" and not torch.cuda.is_available():
        raise ValueError("device=cuda but torch.cuda.is_available() is False here; use --device cpu for a rehearsal")
    return requested


def environment_info(device: str) -> dict[str, Any]:
    """What ran where: date, host, Python, torch/CUDA, the GPU, megatron-core, transformers, transformer_engine."""
    from importlib import metadata

    import torch

    def version(dist: str) -> str:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return "not installed"

    info: dict[str, Any] = {
        "date_utc": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "host": platform.node(), "python": platform.python_version(), "device": device,
        "torch": torch.__version__, "torch_cuda": torch.version.cuda or "none",
        "megatron_core": version("megatron-core"), "transformers": version("transformers"),
        "transformer_engine": version("transformer-engine"), "cpu_count": os.cpu_count(),
    }
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1),
                    gpu_multiprocessors=props.multi_processor_count)
    return info


def run_section(name: str, device_name: str, work_dir: Path, config: Path) -> dict[str, Any]:
    """Run one section in this process and return its report dict (never raises for a failed check)."""
    import torch

    from megatron_lpreg.gpucheck import model, ops, rollout, train

    device = torch.device(device_name)
    start = time.perf_counter()
    try:
        if name == "op_parity":
            numbers = ops.op_parity(device)
        elif name == "op_speed":
            numbers = ops.op_speed(device)
        elif name == "model_parity":
            numbers = model.model_parity(device, work_dir)
        elif name == "train_steps":
            numbers = train.train_steps(device, work_dir, config)
        elif name == "rollout":
            numbers = rollout.rollout_section(device, work_dir, config)
        else:
            raise ValueError(f"unknown section {name!r}; sections are {ALL_SECTIONS}")
        result = section_ok(numbers)
    except rollout.SectionSkipped as exc:
        result = section_skipped(str(exc))
    except ops.CheckFailed as exc:
        result = section_failed(str(exc), exc.numbers)
    except Exception as exc:  # noqa: BLE001 (any error is this section's result, with its traceback)
        result = section_failed(f"{type(exc).__name__}: {exc}",
                                {"traceback": traceback.format_exc()[-_LOG_TAIL_CHARS:]})
    result["seconds"] = time.perf_counter() - start
    return result


def _section_env(device: str) -> dict[str, str]:
    import megatron_lpreg
    from megatron_lpreg.parallel.spawn import free_port

    env = dict(os.environ)
    env.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()),
               PYTHONUNBUFFERED="1", RAY_AUTH_MODE="disabled")
    # The sections import the same megatron_lpreg as this process (a checkout or an installed wheel), whatever the
    # caller's working directory holds (they run in the report's work/ directory).
    package_root = str(Path(megatron_lpreg.__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH", "")) if p)
    if device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    return env


def _run_in_subprocess(name: str, device: str, out_dir: Path, config: Path, timeout_s: float) -> dict[str, Any]:
    work_dir, log_dir = out_dir / "work", out_dir / "logs"
    work_dir.mkdir(parents=True, exist_ok=True)
    log_dir.mkdir(parents=True, exist_ok=True)
    result_file = work_dir / f"{name}.result.json"
    result_file.unlink(missing_ok=True)
    log_file = log_dir / f"{name}.log"
    cmd = [sys.executable, "-m", "megatron_lpreg.gpucheck", "--section", name, "--device", device,
           "--work", str(work_dir), "--config", str(config), "--result", str(result_file)]
    start = time.perf_counter()
    with open(log_file, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=_section_env(device), cwd=work_dir,
                                start_new_session=True)
        try:
            code = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the section's own process group (its ranks, reward workers)
            proc.wait()
            return section_failed(f"timed out after {timeout_s:.0f} s (log: {log_file})",
                                  {"seconds": time.perf_counter() - start})
    if result_file.exists():
        return json.loads(result_file.read_text())
    tail = log_file.read_text()[-_LOG_TAIL_CHARS:]
    return section_failed(f"section process exited with code {code} and wrote no result; log tail:\n{tail}",
                          {"seconds": time.perf_counter() - start})


def run_checks(out_dir: str | os.PathLike, *, device: str | None = None, config: str | os.PathLike,
               sections: Sequence[str] = SECTION_NAMES, timeout_s: float = DEFAULT_SECTION_TIMEOUT_S,
               skip: Sequence[str] = ()) -> dict[str, Any]:
    """Run ``sections`` (each in its own process) and write ``out_dir/report.{json,md}``; return the report.

    Args:
        out_dir: report directory (also holds ``logs/<section>.log`` and the sections' scratch in ``work/``).
        device: ``"cuda"`` or ``"cpu"``; None picks CUDA when available.
        config: the training config of ``train_steps`` (configs/tiny_cpu.yaml; single-rank overrides are added).
        sections: which sections to run, in :data:`SECTION_NAMES` order.
        timeout_s: wall-clock limit per section.
        skip: sections to report as skipped (by request) instead of running.

    Raises:
        ValueError: an unknown section, a missing config file, or a device that is not available.
    """
    unknown = sorted(set(sections) - set(ALL_SECTIONS))
    if unknown:
        raise ValueError(f"unknown sections {unknown}; sections are {list(ALL_SECTIONS)}")
    if not Path(config).is_file():
        raise ValueError(f"config={str(config)!r} is not a file (the train_steps section needs configs/tiny_cpu.yaml)")
    device = resolve_device(device)
    out = Path(out_dir).resolve()
    results: dict[str, dict[str, Any]] = {}
    for name in ALL_SECTIONS:
        if name not in sections:
            continue
        if name in skip:
            results[name] = section_skipped("skipped on request (--skip)")
            continue
        logger.info("gpu check: %s on %s ...", name, device)
        results[name] = _run_in_subprocess(name, device, out, Path(config).resolve(), timeout_s)
        logger.info("gpu check: %s %s in %.1f s", name, results[name]["status"], results[name].get("seconds", 0.0))
    return write_report(out, results, environment_info(device))


def section_main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="one GPU-check section (internal; use tools/gpu_check.py)")
    parser.add_argument("--section", required=True, choices=ALL_SECTIONS)
    parser.add_argument("--device", required=True, choices=("cpu", "cuda"))
    parser.add_argument("--work", required=True, type=Path)
    parser.add_argument("--config", required=True, type=Path)
    parser.add_argument("--result", required=True, type=Path)
    args = parser.parse_args(argv)
    from megatron_lpreg import telemetry

    telemetry.setup(0, 1)  # the trainer's CLI calls it again (idempotent)
    result = run_section(args.section, args.device, args.work, args.config)
    tmp = args.result.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=2, default=str))
    tmp.replace(args.result)
    return 0
