"""GPU-check section ``rollout``: one trainer rank and one real SGLang TP1 server colocated on one GPU.

Opt-in (``tools/gpu_check.py --sections rollout``): it needs SGLang in the node's Python, which the lent GPU machines
lack. Without ``sglang`` (or, for the ``--device cpu`` rehearsal, without the CPU venv's ``sgl_kernel``) the section
is skipped with the reason. Two parts, each with a server launched by the project's own code:

1. Engine (``SGLangEngine`` with ``rollout.mode=colocated``, ``weight_sync=tensor``) on a tiny Qwen2: greedy
   generation with log-probs against transformers fp32; a tensor sync of other weights from this process's GPU
   (CUDA IPC, one payload for the engine's TP rank) with the post-sync probe; the probe re-scored; release and
   resume, with the GPU's free memory read after each (the memory saver must free the server's memory); generation
   after resume unchanged.
2. Training: ``megatron-lpreg train <config>`` for 2 Lp-Reg steps as one rank with ``rollout.engine=sglang``
   (its server colocated on the trainer's GPU, weights synced by the trainer after each step): exit 0, a metrics
   row per step, and ``rollout/logprob_mismatch`` within the dtype's tolerance on every row.

:func:`evaluate` turns the measured numbers into failures (tested on CPU without SGLang).
"""
from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Any

import torch

from megatron_lpreg.gpucheck import train
from megatron_lpreg.gpucheck.ops import CheckFailed
from megatron_lpreg.rundir import METRICS_FILE

logger = logging.getLogger(__name__)

STEPS = 2
PROMPTS = [[5, 6, 7], [9, 10, 11, 12, 13], [42, 43]]
PROBE_TOKENS = [3, 4, 5, 6, 7, 8, 9]
PROBE_PROMPT_LEN = 3
MODEL_ARGS = {"num_attention_heads": 2, "num_kv_heads": 1, "max_position_embeddings": 256}
"""Tiny Qwen2 with head_dim 32 (hidden 64): the smallest head size SGLang's attention backends are built for."""
DTYPE_ATOL = {"float32": 1e-3, "bfloat16": 0.1}
"""Max |SGLang - reference| log-prob per served dtype: fp32 measured ~1e-6 on CPU (torch-native path); bf16 as
vLLM's bf16 engine against transformers fp32 (tests/rollout/test_vllm.py, measured up to 0.055)."""
SERVED_DTYPE = {"cpu": "float32", "cuda": "bfloat16"}
MEM_FRACTION = 0.3
"""--mem-fraction-static of the colocated server: leaves the trainer rank room on the same GPU."""


class SectionSkipped(Exception):
    """The section cannot run in this environment; the message is the reason."""


def unavailable_reason(device_type: str) -> str | None:
    """Why the section cannot run here (None when it can)."""
    try:
        import sglang  # noqa: F401
    except ImportError as exc:
        return (f"sglang is not installed in this Python ({exc}); on a cluster node: pip install "
                f"'megatron_lpreg[sglang]' (docs/benchmarks.md, GPU check); on CPU: run the rehearsal with "
                f".venv-sglang/bin/python (make install-sglang)")
    if device_type == "cpu":
        try:
            import sgl_kernel  # noqa: F401
        except ImportError:
            return ("the CPU rehearsal needs an importable sgl_kernel (.venv-sglang has the shim from "
                    "tools/sglang_cpu: make install-sglang)")
    return None


def rollout_section(device: torch.device, work_dir: Path, config: Path) -> dict[str, Any]:
    """Section ``rollout``; raises SectionSkipped or CheckFailed."""
    reason = unavailable_reason(device.type)
    if reason:
        raise SectionSkipped(reason)
    dtype = SERVED_DTYPE[device.type]
    numbers: dict[str, Any] = {"dtype": dtype, "logprob_atol": DTYPE_ATOL[dtype]}
    numbers.update(engine_checks(device, work_dir / "rollout"))
    numbers.update(train_checks(device, work_dir / "rollout", config))
    failures = evaluate(numbers, device.type)
    if failures:
        raise CheckFailed("; ".join(failures), numbers)
    return numbers


def _rollout_cfg(device_type: str) -> Any:
    from megatron_lpreg.config.rollout import RolloutConfig

    return RolloutConfig(engine="sglang", mode="colocated", engine_tp=1, num_engines=1, weight_sync="tensor",
                         sglang_device=device_type, dtype=SERVED_DTYPE[device_type], mem_fraction_static=MEM_FRACTION,
                         weight_sync_backend="nccl" if device_type == "cuda" else "gloo", launch_timeout_s=600)


def max_logprob_diff(model: Any, completions: list) -> float:
    """Largest |engine - ``model``| log-prob (temperature 1, float64 softmax) over every response token of
    ``completions``; ``model`` has ``sequence_logits(token_ids)`` (rollout.logits_model.HFLogitsModel)."""
    worst = 0.0
    for comp in completions:
        logits = model.sequence_logits(comp.prompt_ids + comp.response_ids).double()
        logp = torch.log_softmax(logits[len(comp.prompt_ids) - 1 : -1], dim=-1)
        ref = logp.gather(-1, torch.tensor(comp.response_ids)[:, None]).squeeze(-1)
        worst = max(worst, float((ref - torch.tensor(comp.logprobs, dtype=torch.float64)).abs().max()))
    return worst


def _free_mib(device: torch.device) -> float | None:
    """Free memory of the whole GPU (every process on it, the server's included); None on CPU."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    return torch.cuda.mem_get_info(device)[0] / 2**20


def engine_checks(device: torch.device, work_dir: Path) -> dict[str, Any]:
    """Part 1 (module docstring): generate, tensor sync + probe, release/resume on one colocated server."""
    from megatron_lpreg.models import hf_dir
    from megatron_lpreg.models.tiny import make_tiny_model
    from megatron_lpreg.rollout.base import SamplingParams, WeightUpdate
    from megatron_lpreg.rollout.logits_model import HFLogitsModel, make_probe, teacher_forced_logprobs
    from megatron_lpreg.rollout.sglang import SGLangEngine

    cfg = _rollout_cfg(device.type)
    atol = DTYPE_ATOL[cfg.dtype]
    base = make_tiny_model(work_dir / "base", "qwen2", seed=3, overwrite=True, **MODEL_ARGS)
    other = make_tiny_model(work_dir / "other", "qwen2", seed=11, overwrite=True, **MODEL_ARGS)
    greedy = SamplingParams(top_k=1, max_new_tokens=8)
    numbers: dict[str, Any] = {}
    start = time.perf_counter()
    engine = SGLangEngine(cfg, str(base), seed=0)
    numbers["server_start_s"] = time.perf_counter() - start
    try:
        numbers["generate_max_abs_logprob_diff"] = max_logprob_diff(
            HFLogitsModel.from_pretrained(base), engine.generate(PROMPTS, greedy))
        other_model = HFLogitsModel.from_pretrained(other)
        probe = make_probe(other_model, PROBE_TOKENS, PROBE_PROMPT_LEN, atol=atol)
        tensors = ((name, tensor.to(device)) for name, tensor in hf_dir.iter_tensors(other))
        start = time.perf_counter()
        engine.update_weights(WeightUpdate(version=1, tensors=tensors, probe=probe))
        numbers["tensor_sync_s"] = time.perf_counter() - start
        served = engine.clients[0].score(PROBE_TOKENS, PROBE_PROMPT_LEN)
        expected = teacher_forced_logprobs(other_model, PROBE_TOKENS, PROBE_PROMPT_LEN)
        numbers["probe_max_abs_diff"] = max(abs(a - b) for a, b in zip(served, expected))
        synced = engine.generate(PROMPTS, greedy)
        numbers["after_sync_max_abs_logprob_diff"] = max_logprob_diff(other_model, synced)
        before = _free_mib(device)
        engine.release_memory()
        released = _free_mib(device)
        engine.resume_memory()
        resumed = _free_mib(device)
        if before is not None:
            numbers.update(released_mib=released - before, retaken_mib=released - resumed)
        numbers["same_tokens_after_resume"] = (
            [c.response_ids for c in engine.generate(PROMPTS, greedy)] == [c.response_ids for c in synced])
    finally:
        engine.shutdown()
    return numbers


def train_checks(device: torch.device, work_dir: Path, config: Path) -> dict[str, Any]:
    """Part 2 (module docstring): 2 training steps with the colocated SGLang server."""
    from megatron_lpreg.cli import main as cli_main

    cfg = _rollout_cfg(device.type)
    run_dir = work_dir / "train"
    overrides = [o for o in train.OVERRIDES if not o.startswith("rollout.engine=")] + [
        "rollout.engine=sglang", "rollout.mode=colocated", "rollout.weight_sync=auto", "rollout.engine_tp=1",
        "rollout.num_engines=1", f"rollout.sglang_device={cfg.sglang_device}", f"rollout.dtype={cfg.dtype}",
        f"rollout.mem_fraction_static={cfg.mem_fraction_static}",
        f"rollout.weight_sync_backend={cfg.weight_sync_backend}"]
    args = ["train", str(config), *overrides, f"trainer.max_steps={STEPS}", f"trainer.output_dir={run_dir}"]
    code = cli_main(args)
    metrics_file = run_dir / METRICS_FILE
    rows = [json.loads(line) for line in metrics_file.read_text().splitlines()] if metrics_file.exists() else []
    return {"train_command": "megatron-lpreg " + " ".join(args), "train_exit_code": code,
            "train_steps": [row.get("step") for row in rows],
            "train_logprob_mismatch": [row.get("rollout/logprob_mismatch") for row in rows]}


def evaluate(numbers: dict[str, Any], device_type: str) -> list[str]:
    """The section's failures, from its numbers (empty = ok). ``numbers["logprob_atol"]`` is the tolerance."""
    atol = numbers["logprob_atol"]
    failures = []
    for key, what in (("generate_max_abs_logprob_diff", "generation log-probs vs transformers"),
                      ("probe_max_abs_diff", "probe after the tensor sync"),
                      ("after_sync_max_abs_logprob_diff", "generation after the tensor sync")):
        value = numbers.get(key, math.nan)
        if not value <= atol:
            failures.append(f"{what}: max |dlogp| {value:.3g} > {atol:g}")
    if numbers.get("same_tokens_after_resume") is not True:
        failures.append("greedy tokens changed across release/resume (weights lost?)")
    if device_type == "cuda":
        if not numbers.get("released_mib", 0.0) > 0:
            failures.append(f"release freed {numbers.get('released_mib')} MiB of GPU memory: the server runs without "
                            f"the memory saver (--enable-memory-saver, torch_memory_saver)")
        if not numbers.get("retaken_mib", 0.0) > 0:
            failures.append(f"resume took back {numbers.get('retaken_mib')} MiB: the server did not re-allocate")
    if numbers.get("train_exit_code") != 0:
        failures.append(f"training exit code {numbers.get('train_exit_code')}")
    if numbers.get("train_steps") != list(range(STEPS)):
        failures.append(f"metrics.jsonl steps {numbers.get('train_steps')} != {list(range(STEPS))}")
    for step, value in enumerate(numbers.get("train_logprob_mismatch") or []):
        if not (isinstance(value, (int, float)) and 0.0 <= value <= atol):
            failures.append(f"step {step}: rollout/logprob_mismatch {value} not in [0, {atol:g}]")
    return failures
