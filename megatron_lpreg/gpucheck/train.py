"""GPU-check section ``train_steps``: 3 tiny Lp-Reg steps through the trainer's real entry, on the checked device.

The trainer is started in this process exactly as torchrun starts one rank (``megatron-lpreg train CONFIG ...``
with ``RANK``/``WORLD_SIZE`` set by the runner), so after it returns this process can tell whether the trainer
used the GPU (its peak CUDA memory). Checks: exit code 0, one metrics row per step, finite losses, no skipped
update, the rollout engine's log-probs match the trainer's (the local engine shares the trainer's forward), and on
CUDA that the GPU was used, and that some step had a non-zero policy loss and gradient (the weights changed).
"""
from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import torch

from megatron_lpreg.gpucheck.ops import CheckFailed
from megatron_lpreg.rundir import METRICS_FILE

logger = logging.getLogger(__name__)

STEPS = 3
MISMATCH_TOL = 1e-4
"""Max ``rollout/logprob_mismatch`` (the local engine and the trainer run the same fp32 weights; as
tests/trainer/test_layouts.py)."""
OVERRIDES = ("parallel.tp=1", "parallel.pp=1", "trainer.world_size=1", "trainer.launcher=local",
             "rollout.engine=local", "rollout.prompts_per_step=4", "rollout.n=4", "eval.benchmarks=[]",
             "checkpoint.interval=0", "algo.name=lpreg", f"reward.name={__name__}:even_length_reward")
"""Small, single-rank, Lp-Reg with the local engine and a reward that varies (below); the rest comes from the
config file."""


def even_length_reward(response: str, ground_truth: str) -> float:
    """1 for a response with an even number of characters, else 0.

    A random tiny model never solves the config's task, so its reward would be 0 everywhere, every advantage 0
    and no step would change the weights; this reward varies with any model, so the steps really train.
    """
    return float(len(response) % 2 == 0)


def train_steps(device: torch.device, work_dir: Path, config: Path) -> dict[str, Any]:
    """Section ``train_steps``; raises CheckFailed when a check does not hold."""
    from megatron_lpreg.cli import main as cli_main

    run_dir = work_dir / "train"
    args = ["train", str(config), *OVERRIDES, f"trainer.max_steps={STEPS}", f"trainer.output_dir={run_dir}"]
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    code = cli_main(args)
    numbers: dict[str, Any] = {"command": "megatron-lpreg " + " ".join(args), "exit_code": code}
    metrics_file = run_dir / METRICS_FILE
    rows = [json.loads(line) for line in metrics_file.read_text().splitlines()] if metrics_file.exists() else []
    numbers["steps"] = [row.get("step") for row in rows]
    for key in ("loss/policy", "actor/grad_norm", "reward_mean", "entropy", "rollout/logprob_mismatch",
                "lpreg/num_regularized", "perf/step_s"):
        numbers[key] = [row.get(key) for row in rows]
    failures = []
    if device.type == "cuda":
        numbers["peak_cuda_mib"] = torch.cuda.max_memory_allocated() / 2**20
        if numbers["peak_cuda_mib"] <= 0:
            failures.append("the trainer allocated no CUDA memory: it did not run on the GPU")
    if code != 0:
        failures.append(f"trainer exit code {code}")
    if numbers["steps"] != list(range(STEPS)):
        failures.append(f"metrics.jsonl steps {numbers['steps']} != {list(range(STEPS))}")
    for row in rows:
        if not math.isfinite(row.get("loss", math.nan)) or row.get("actor/skipped", 1.0) != 0.0:
            failures.append(f"step {row.get('step')}: loss {row.get('loss')}, skipped {row.get('actor/skipped')}")
        if not row.get("rollout/logprob_mismatch", math.inf) <= MISMATCH_TOL:
            failures.append(f"step {row.get('step')}: rollout/logprob_mismatch "
                            f"{row.get('rollout/logprob_mismatch')} > {MISMATCH_TOL:g}")
    if rows and not any(abs(row.get("loss/policy", 0.0)) > 0 and row.get("actor/grad_norm", 0.0) > 0 for row in rows):
        failures.append("no step had a non-zero policy loss and gradient: nothing was trained")
    if failures:
        raise CheckFailed("; ".join(failures), numbers)
    return numbers
