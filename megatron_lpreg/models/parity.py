"""Logits parity between transformers and our megatron-core model at any TP/PP(/VPP): the conversion sanity check.

One token batch goes through the HF model (this process) and through the megatron model on ``tp*pp*vpp``-laid-out
ranks (forked gloo ranks on CPU, or the ranks of an existing torchrun/srun launch). The megatron forward uses
megatron's own pipeline schedule (forward only), the last stage all-gathers the vocab-parallel logits over TP and
drops the padded vocabulary rows, and the two sides are compared on logits and on log-softmax over the real
vocabulary.

Shapes: B sequences, S tokens, V the real (unpadded) vocabulary.
"""
from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from megatron_lpreg.config.model import ModelConfig, ParallelConfig
from megatron_lpreg.parallel import collectives

logger = logging.getLogger(__name__)

DEFAULT_TOLERANCE = {"float32": 1e-4, "bfloat16": 0.25}
"""Max abs logit/log-prob difference accepted. fp32: the two sides differ only in summation order (measured 0 at
TP1/PP2 and ~3e-6 at TP2 on the tiny models). bf16: each side rounds activations to 8 mantissa bits at different
points (e.g. HF normalizes in fp32 then casts), so logits of size ~4 differ by a few bf16 ulps of 2**-5 each
(measured 0.06-0.08 on the tiny models); 0.25 leaves room for depth without hiding a wrong mapping (wrong weights
give differences of order 1)."""

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class ParityResult:
    """Outcome of one parity run."""

    max_abs_logit_diff: float
    max_abs_logprob_diff: float
    tp: int
    pp: int
    vpp: int
    dtype: str
    tokens: int
    """B * S tokens compared."""
    tolerance: float

    @property
    def ok(self) -> bool:
        return self.max_abs_logit_diff <= self.tolerance and self.max_abs_logprob_diff <= self.tolerance

    def line(self) -> str:
        """The summary line tools print last: ``parity: max_abs_logit_diff=<x> max_abs_logprob_diff=<y>``."""
        return (f"parity: max_abs_logit_diff={self.max_abs_logit_diff:.3e} "
                f"max_abs_logprob_diff={self.max_abs_logprob_diff:.3e}")


def parity_tokens(vocab_size: int, batch: int = 2, seq_len: int = 16, seed: int = 0) -> torch.Tensor:
    """A deterministic ``[B, S]`` int64 batch of token ids, uniform over the real vocabulary ``[0, V)``."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (batch, seq_len), generator=gen, dtype=torch.long)


def hf_logits(hf_dir: str | os.PathLike, tokens: torch.Tensor, dtype: str = "float32") -> torch.Tensor:
    """Logits ``[B, S, V]`` of the transformers model in ``hf_dir`` (eager attention, no cache)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=_DTYPES[dtype], attn_implementation="eager")
    model.eval()
    with torch.no_grad():
        return model(input_ids=tokens, use_cache=False).logits


def _forward_logits(chunks: list[Any], tokens: torch.Tensor, model_cfg: ModelConfig, ctx: Any) -> torch.Tensor | None:
    """Run megatron's forward-only schedule; on the last stage return full-vocab logits ``[B, S, V]``."""
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    batch, seq_len = tokens.shape
    position_ids = torch.arange(seq_len, device=ctx.device).unsqueeze(0)

    def forward_step(data_iterator: Any, model: Any) -> tuple[torch.Tensor, Any]:
        sample = next(data_iterator).to(ctx.device)  # the model lives on the rank's device (CUDA on a GPU node)
        output = model(sample, position_ids, None)

        def collect(logits_shard: torch.Tensor, non_loss_data: bool = True) -> torch.Tensor:
            # [1, S, Vpad/tp] -> [1, S, Vpad] -> drop padded rows -> [1, S, V]
            full = gather_from_tensor_model_parallel_region(logits_shard)
            return full[..., : model_cfg.vocab_size].detach().clone()

        return output, collect

    micro_batches = [tokens[i : i + 1] for i in range(batch)]
    iterators = [iter(micro_batches) for _ in chunks]
    outputs = get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=iterators if len(chunks) > 1 else iterators[0],
        model=chunks if len(chunks) > 1 else chunks[0], num_microbatches=batch, seq_length=seq_len,
        micro_batch_size=1, forward_only=True, collect_non_loss_data=True,
    )
    return torch.cat(list(outputs), dim=0) if ctx.is_last_pp_stage else None


def _rank_logits(rank: int, world: int, model_cfg: ModelConfig, parallel_cfg: ParallelConfig, hf_dir: str | None,
                 mcore_dir: str | None, tokens: torch.Tensor) -> torch.Tensor | None:
    from megatron_lpreg.models.bridge import load_hf_weights
    from megatron_lpreg.models.checkpoint import load_checkpoint
    from megatron_lpreg.models.qwen import build_model_chunks
    from megatron_lpreg.parallel.bootstrap import destroy_parallel, init_parallel

    ctx = init_parallel(parallel_cfg, seed=0)
    try:
        chunks = build_model_chunks(model_cfg, parallel_cfg, initialize=False)
        for chunk in chunks:
            chunk.eval()
        if mcore_dir:
            load_checkpoint(mcore_dir, chunks, model_cfg, ctx)
        else:
            load_hf_weights(chunks, hf_dir, model_cfg, ctx)
        with torch.no_grad():
            logits = _forward_logits(chunks, tokens, model_cfg, ctx)
        # world = tp * pp (dp 1): the last stage's TP rank 0 is global rank (pp - 1) * tp. Every rank returns the
        # logits, so the caller gets them on any rank of a torchrun/srun launch too.
        mine = logits if ctx.is_last_pp_stage and ctx.tp_rank == 0 else None
        return collectives.broadcast_object(mine, src=(ctx.pp_size - 1) * ctx.tp_size)
    finally:
        destroy_parallel(destroy_process_group=False)


def megatron_logits(model_cfg: ModelConfig, parallel_cfg: ParallelConfig, tokens: torch.Tensor, *,
                    hf_dir: str | os.PathLike | None = None, mcore_dir: str | os.PathLike | None = None,
                    timeout_s: float = 600.0) -> torch.Tensor:
    """Logits ``[B, S, V]`` (padded vocab removed) of our megatron model at ``parallel_cfg``'s layout.

    Weights come from ``mcore_dir`` (a dist checkpoint, any layout) if given, else from the HF ``hf_dir``.
    Runs on ``tp*pp`` ranks: forked gloo ranks, or, when launched with torchrun/srun on exactly ``tp*pp`` ranks,
    this process's rank (every rank receives the logits).

    Raises:
        ConfigError: a layout the model cannot be split into (checked before any rank starts).
        ValueError: neither directory given.
    """
    from megatron_lpreg.models.convert import run_job

    if not hf_dir and not mcore_dir:
        raise ValueError("pass hf_dir (HF safetensors) or mcore_dir (megatron dist checkpoint) for the weights")
    model_cfg.validate(parallel_cfg)
    world = parallel_cfg.tp * parallel_cfg.pp
    results = run_job(_rank_logits, world, model_cfg, parallel_cfg, str(hf_dir) if hf_dir else None,
                      str(mcore_dir) if mcore_dir else None, tokens, timeout_s=timeout_s)
    return results[0]


def compare_logits(hf: torch.Tensor, mcore: torch.Tensor) -> tuple[float, float]:
    """Max abs difference of logits and of float64 log-softmax over the last dim (shapes must match)."""
    if hf.shape != mcore.shape:
        raise ValueError(f"logit shapes differ: HF {tuple(hf.shape)} vs megatron {tuple(mcore.shape)}")
    hf64, mc64 = hf.double(), mcore.double()
    logit_diff = (hf64 - mc64).abs().max().item()
    logp_diff = (torch.log_softmax(hf64, -1) - torch.log_softmax(mc64, -1)).abs().max().item()
    return logit_diff, logp_diff


def check_parity(
    hf_dir: str | os.PathLike,
    *,
    mcore_dir: str | os.PathLike | None = None,
    tp: int = 1,
    pp: int = 1,
    vpp: int = 1,
    dtype: Literal["float32", "bfloat16"] = "float32",
    batch: int = 2,
    seq_len: int = 16,
    seed: int = 0,
    tolerance: float | None = None,
) -> ParityResult:
    """Compare transformers (``hf_dir``) with our megatron model at TP/PP/VPP on one random token batch.

    Args:
        hf_dir: HF model directory (config.json + safetensors): the reference, and the weights unless
            ``mcore_dir`` is given.
        mcore_dir: megatron dist checkpoint to load instead (checks a conversion).
        tp, pp, vpp: megatron layout (``tp * pp`` ranks).
        dtype: compute dtype on both sides.
        batch, seq_len, seed: the token batch (``batch`` micro-batches of one sequence each; with vpp > 1,
            ``batch`` must be a multiple of ``pp``, as megatron's interleaved schedule requires).
        tolerance: pass/fail bound for both maxima (default :data:`DEFAULT_TOLERANCE` for the dtype).

    Raises:
        ConfigError: unsupported architecture, or a layout the model cannot be split into.
    """
    from megatron_lpreg.models.qwen import model_config_from_hf

    if dtype not in _DTYPES:
        raise ValueError(f"dtype={dtype!r} is not supported; use one of {sorted(_DTYPES)}")
    model_cfg = dataclasses.replace(model_config_from_hf(hf_dir), params_dtype=dtype)
    parallel_cfg = ParallelConfig(tp=tp, pp=pp, vpp=vpp)
    model_cfg.validate(parallel_cfg)
    if vpp > 1 and batch % pp:
        raise ValueError(f"batch={batch} must be a multiple of pp={pp} with vpp={vpp} (interleaved schedule)")
    tokens = parity_tokens(model_cfg.vocab_size, batch, seq_len, seed)
    reference = hf_logits(hf_dir, tokens, dtype)
    ours = megatron_logits(model_cfg, parallel_cfg, tokens, hf_dir=hf_dir, mcore_dir=mcore_dir)
    logit_diff, logp_diff = compare_logits(reference.float(), ours.float())
    result = ParityResult(max_abs_logit_diff=logit_diff, max_abs_logprob_diff=logp_diff, tp=tp, pp=pp, vpp=vpp,
                          dtype=dtype, tokens=tokens.numel(),
                          tolerance=DEFAULT_TOLERANCE[dtype] if tolerance is None else tolerance)
    logger.info("parity %s vs megatron tp=%d pp=%d vpp=%d (%s): %s", Path(hf_dir).name, tp, pp, vpp, dtype,
                result.line())
    return result
