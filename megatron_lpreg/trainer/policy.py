"""The trainable policy on one rank: megatron model chunks (DDP), megatron optimizer and LR schedule, and the
micro-batch forward/backward through megatron's pipeline schedules, calling the fused op and the algorithm.

On-policy fast path (``updates_per_step == 1``): pi_old == pi_theta at update time, so the old log-probs and the
min-p proxy are taken *detached from the same forward* as the loss: one forward + one backward per micro-batch,
where the authors' code runs two extra no-grad forwards. Off-policy: ``compute_old_logprobs`` runs one no-grad
pass first, then several updates use the stored values.
"""
from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass
from functools import partial
from typing import Any, TypeVar

import torch

from megatron_lpreg.algo.registry import PolicyLossInputs, compute_policy_loss, loss_requirements
from megatron_lpreg.config import AlgoConfig, ModelConfig, OptimizerConfig, ParallelConfig, TokenClasses
from megatron_lpreg.config.base import ConfigError
from megatron_lpreg.models.packed import (
    attention_takes_packed_seq_params,
    installed_te_version,
    thd_packed_seq_params,
    thd_unsupported_reason,
)
from megatron_lpreg.models.qwen import build_model_chunks, use_transformer_engine
from megatron_lpreg.ops.vocab_parallel import vocab_parallel_logprob_stats
from megatron_lpreg.parallel import collectives as coll
from megatron_lpreg.parallel.bootstrap import ParallelContext
from megatron_lpreg.trainer.batch import (
    PackedMicroBatch,
    TrainBatch,
    micro_batch_size_for,
    pack_micro_batches,
    split_micro_batches,
)

logger = logging.getLogger(__name__)

_Batch = TypeVar("_Batch", TrainBatch, PackedMicroBatch)


@dataclass(kw_only=True)
class StepResult:
    """What one optimizer update reports (already reduced over ranks where it matters)."""

    metrics: dict[str, float]
    grad_norm: float
    skipped: bool
    """True when a non-finite loss or gradient made us skip the update."""


class Policy:
    """Model chunks + optimizer + scheduler of one trainer rank."""

    def __init__(self, model_cfg: ModelConfig, parallel_cfg: ParallelConfig, optim_cfg: OptimizerConfig,
                 algo_cfg: AlgoConfig, ctx: ParallelContext, *, temperature: float, micro_batch_tokens: int,
                 total_steps: int, packing: bool = False, token_classes: TokenClasses | None = None) -> None:
        from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
        from megatron.core.distributed.finalize_model_grads import finalize_model_grads
        from megatron.core.optimizer import OptimizerConfig as McoreOptimizerConfig
        from megatron.core.optimizer import get_megatron_optimizer
        from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

        _refuse_fp16(model_cfg)
        self.model_cfg, self.algo_cfg, self.ctx = model_cfg, algo_cfg, ctx
        self.temperature = temperature
        self.token_classes = token_classes  # diagnostics: (Lp-Reg selections by class); None = not configured
        self.loss_generator: torch.Generator | None = None
        self.micro_batch_tokens = micro_batch_tokens
        self.packing = packing  # trainer.packing: token-balanced packed micro-batches (trainer/batch.py)
        if packing:
            _check_packing_supported(model_cfg)
        raw_chunks = build_model_chunks(model_cfg, parallel_cfg)
        # How a packed row keeps its sequences apart: THD cu_seqlens where the core attention reads
        # PackedSeqParams (Transformer Engine), else a block-diagonal mask (megatron's local attention).
        self.packed_thd = any(attention_takes_packed_seq_params(chunk) for chunk in raw_chunks)
        self.pack_multiple = parallel_cfg.tp if parallel_cfg.sequence_parallel else 1
        if packing:
            logger.info("trainer.packing: packed rows kept apart by %s", "THD cu_seqlens (PackedSeqParams)"
                        if self.packed_thd else "a block-diagonal causal mask (local attention)")
        for chunk in raw_chunks:
            if model_cfg.params_dtype == "bfloat16":
                chunk.bfloat16()
        self.tf_config = raw_chunks[0].config
        self.tf_config.finalize_model_grads_func = finalize_model_grads
        bf16 = model_cfg.params_dtype == "bfloat16"
        fp16 = model_cfg.params_dtype == "float16"
        ddp_cfg = DistributedDataParallelConfig(
            grad_reduce_in_fp32=True, overlap_grad_reduce=parallel_cfg.overlap_grad_reduce,
            overlap_param_gather=parallel_cfg.overlap_param_gather,
            use_distributed_optimizer=parallel_cfg.use_distributed_optimizer,
        )
        self.chunks = [
            DistributedDataParallel(config=self.tf_config, ddp_config=ddp_cfg, module=chunk)
            for chunk in raw_chunks
        ]
        if parallel_cfg.overlap_grad_reduce:
            _overlap_grad_reduce_hooks(self.tf_config, self.chunks)
        self.overlap_param_gather = parallel_cfg.overlap_param_gather
        self.raw_chunks = raw_chunks
        self.optimizer = get_megatron_optimizer(
            McoreOptimizerConfig(
                optimizer="adam", lr=optim_cfg.lr, min_lr=optim_cfg.min_lr, weight_decay=optim_cfg.weight_decay,
                adam_beta1=optim_cfg.adam_beta1, adam_beta2=optim_cfg.adam_beta2, adam_eps=optim_cfg.adam_eps,
                clip_grad=optim_cfg.clip_grad, bf16=bf16, fp16=fp16,
                params_dtype=self.tf_config.params_dtype,
                use_distributed_optimizer=parallel_cfg.use_distributed_optimizer,
            ),
            self.chunks,
        )
        decay_steps = max(1, total_steps - optim_cfg.warmup_steps)
        self.scheduler = OptimizerParamScheduler(
            self.optimizer, init_lr=0.0 if optim_cfg.warmup_steps else optim_cfg.lr, max_lr=optim_cfg.lr,
            min_lr=optim_cfg.min_lr, lr_warmup_steps=optim_cfg.warmup_steps,
            lr_decay_steps=decay_steps + optim_cfg.warmup_steps, lr_decay_style=optim_cfg.lr_schedule,
            start_wd=optim_cfg.weight_decay, end_wd=optim_cfg.weight_decay, wd_incr_steps=1,
            wd_incr_style="constant",
        )

    # ---- forward/backward ---------------------------------------------------------------------------------
    def _micro_batches(self, batch: TrainBatch) -> tuple[list[Any], int]:
        if self.packing:  # one packed row per micro-batch; all the same width so pipeline p2p shapes match
            packs = pack_micro_batches(batch, self.micro_batch_tokens, uniform=self.ctx.pp_size > 1,
                                       multiple=self.pack_multiple)
            return [_on_device(p, self.ctx) for p in packs], 1
        batch = _on_device(batch, self.ctx)  # the rollout builds batches on the host; the model reads them here
        mbs = micro_batch_size_for(batch.seq_len, self.micro_batch_tokens)
        mbs = min(mbs, batch.num_sequences)
        if self.ctx.pp_size > 1 and batch.num_sequences % mbs:
            # Pipeline p2p sends fixed [mbs, L] shapes: pad with loss-masked copies of the first row.
            extra = mbs - batch.num_sequences % mbs
            filler = batch.select(slice(0, 1))
            rows = [batch] + [filler] * extra
            batch = TrainBatch(**{
                name: (torch.cat([getattr(r, name) for r in rows]) if isinstance(getattr(batch, name), torch.Tensor)
                       else getattr(batch, name))
                for name in batch.__dataclass_fields__
            })
            batch.loss_mask[-extra:] = 0.0
            batch.advantages[-extra:] = 0.0
        return split_micro_batches(batch, mbs), mbs

    def _forward_step(self, loss_fn, data_iterator, model):
        mb = next(data_iterator)
        if isinstance(mb, PackedMicroBatch) and self.packed_thd:  # RoPE restarts at every cu_seqlens boundary
            params = thd_packed_seq_params(mb.segment_lengths, mb.tokens.device)
            output = model(mb.tokens, mb.position_ids, None, packed_seq_params=params)
            return output, partial(loss_fn, mb)
        if isinstance(mb, PackedMicroBatch):
            with _per_sequence_rope(model, mb.position_ids):
                output = model(mb.tokens, mb.position_ids, mb.attention_mask())
            return output, partial(loss_fn, mb)
        seq = mb.tokens.shape[1]
        position_ids = coll.arange(seq, self.ctx).unsqueeze(0).expand_as(mb.tokens)
        output = model(mb.tokens, position_ids, None)
        return output, partial(loss_fn, mb)

    def _row_stats(self, mb, logits_shard: torch.Tensor, with_proxy_kl: bool = False):
        """``(stats, rows)``: per-token stats as ``[n, L]`` sequence rows and the micro-batch's ``TrainBatch``
        (a packed micro-batch's stats are computed on the packed row, then gathered back into its rows)."""
        stats = self._stats(mb, logits_shard, with_proxy_kl)
        if not isinstance(mb, PackedMicroBatch):
            return stats, mb
        rows = {f.name: mb.unpack(getattr(stats, f.name)) for f in dataclasses.fields(stats)
                if isinstance(getattr(stats, f.name), torch.Tensor)}
        return dataclasses.replace(stats, **rows), mb.batch

    def _stats(self, mb: TrainBatch, logits_shard: torch.Tensor, with_proxy_kl: bool = False):
        direction = loss_requirements(self.algo_cfg).proxy_kl_direction or "proxy_to_policy"
        return vocab_parallel_logprob_stats(
            logits_shard, mb.targets, group=self.ctx.tp_group, kappa=self.algo_cfg.kappa,
            temperature=self.temperature, vocab_size=self.model_cfg.vocab_size, with_proxy_kl=with_proxy_kl,
            proxy_kl_direction=direction, chunk_size=self.algo_cfg.logprob_chunk_size or None,
        )

    def _run(self, micro_batches: list[TrainBatch], mbs: int, loss_fn, *, forward_only: bool) -> list[Any]:
        from megatron.core.pipeline_parallel import get_forward_backward_func

        forward_backward = get_forward_backward_func()
        data = iter(micro_batches)
        data_iterator: Any = data if len(self.chunks) == 1 else [iter(micro_batches) for _ in self.chunks]
        return forward_backward(
            forward_step_func=partial(self._forward_step, loss_fn),
            data_iterator=data_iterator,
            model=self.chunks if len(self.chunks) > 1 else self.chunks[0],
            num_microbatches=len(micro_batches),
            seq_length=micro_batches[0].seq_len,
            micro_batch_size=mbs,
            forward_only=forward_only,
        )

    @torch.no_grad()
    def compute_old_logprobs(self, batch: TrainBatch) -> TrainBatch:
        """One no-grad pass: fill ``old_logprobs`` and ``proxy_logprobs`` (off-policy path)."""
        for chunk in self.chunks:
            chunk.eval()
        micro_batches, mbs = self._micro_batches(batch)

        def loss_fn(mb, logits: torch.Tensor):
            stats, rows = self._row_stats(mb, logits)
            out = {"logprobs": stats.logprobs.float(), "proxy": stats.proxy_logprobs.float()}
            if isinstance(mb, PackedMicroBatch):
                out["index"] = mb.indices
            return coll.zeros((), self.ctx), out

        outputs = self._run(micro_batches, mbs, loss_fn, forward_only=True)
        old, proxy = self._gather_from_last_stage(outputs, batch)
        for chunk in self.chunks:
            chunk.train()
        return dataclasses.replace(batch, old_logprobs=old, proxy_logprobs=proxy)

    def _gather_from_last_stage(self, outputs: list[dict], batch: TrainBatch):
        """Concatenate per-micro-batch tensors on the last stage and broadcast them over the PP group."""
        shape = batch.tokens.shape
        if self.ctx.is_last_pp_stage and self.packing:  # micro-batches hold index subsets: put rows back
            old, proxy = coll.zeros(shape, self.ctx), coll.zeros(shape, self.ctx)
            for o in outputs:
                rows, width = torch.tensor(o["index"], device=old.device), o["logprobs"].shape[1]
                old[rows, :width] = o["logprobs"]
                proxy[rows, :width] = o["proxy"]
        elif self.ctx.is_last_pp_stage:
            n = batch.num_sequences  # drop pipeline filler rows
            old = torch.cat([o["logprobs"] for o in outputs])[:n].contiguous()
            proxy = torch.cat([o["proxy"] for o in outputs])[:n].contiguous()
        else:
            old, proxy = coll.empty(shape, self.ctx), coll.empty(shape, self.ctx)
        if self.ctx.pp_size > 1:
            src = coll.global_rank(self.ctx.pp_group, self.ctx.pp_size - 1)
            coll.broadcast(old, src=src, group=self.ctx.pp_group)
            coll.broadcast(proxy, src=src, group=self.ctx.pp_group)
        return old, proxy

    def set_step_seed(self, seed: int) -> None:
        """Seed the generator of losses that draw random numbers (Clip-Cov) for this step and rank."""
        self.loss_generator = torch.Generator().manual_seed(seed)

    def accumulate_gradients(self, batch: TrainBatch, *, lowprob_threshold: float | None = None,
                             global_valid_tokens: float | None = None) -> dict[str, float]:
        """Zero the grads, run forward+backward over all micro-batches of ``batch``; return the last stage's
        micro-batch-averaged metrics (empty on other stages). Grads end up reduced in ``param.main_grad``."""
        for chunk in self.chunks:
            chunk.zero_grad_buffer()
        self.optimizer.zero_grad()
        micro_batches, mbs = self._micro_batches(batch)
        n_seq_rank = _real_sequences(batch)
        n_micro = len(micro_batches)
        dp = self.ctx.dp_size

        def loss_fn(mb, logits: torch.Tensor):
            exact_kl = loss_requirements(self.algo_cfg).proxy_kl_direction is not None
            stats, mb = self._row_stats(mb, logits, with_proxy_kl=exact_kl)
            logprobs = stats.logprobs.float()
            old = mb.old_logprobs if mb.old_logprobs is not None else logprobs.detach()
            proxy = mb.proxy_logprobs if mb.proxy_logprobs is not None else stats.proxy_logprobs.detach().float()
            inputs = PolicyLossInputs(
                logprobs=logprobs, old_logprobs=old, proxy_logprobs=proxy, entropy=stats.entropy.float(),
                advantages=mb.advantages, response_mask=mb.loss_mask, lowprob_threshold=lowprob_threshold,
                global_valid_tokens=global_valid_tokens,
                proxy_kl=stats.proxy_kl.float() if exact_kl else None, generator=self.loss_generator,
            )
            loss, metrics = compute_policy_loss(self.algo_cfg, inputs)
            # megatron divides by the number of micro-batches and DDP averages over DP ranks; undo that and
            # apply the aggregation's own weight instead.
            if self.algo_cfg.loss_agg == "global_token_mean":
                weight = n_micro * dp  # loss is already sum / global_valid_tokens (all ranks, all micro-batches)
            else:
                weight = n_micro * _real_sequences(mb) / n_seq_rank  # the authors' n_seq_micro / n_seq_rank
            mask = mb.loss_mask
            ntok = mask.sum().clamp(min=1)
            metrics = dict(metrics)
            metrics["loss/total"] = float(loss.detach())
            metrics["entropy/mean"] = float((stats.entropy.float() * mask).sum() / ntok)
            mismatch = (logprobs.detach() - mb.engine_logprobs).abs()
            metrics["rollout/logprob_mismatch"] = float((mismatch * mask).sum() / ntok)
            metrics.update(self._diag_metrics(inputs, stats.entropy, mb.targets))
            return loss * weight, metrics

        outputs = self._run(micro_batches, mbs, loss_fn, forward_only=False)
        return _mean_dicts(outputs) if self.ctx.is_last_pp_stage else {}

    def _diag_metrics(self, inputs: PolicyLossInputs, entropy: torch.Tensor, targets: torch.Tensor) -> dict[str, float]:
        """Loss-side diagnostics of one micro-batch (docs/diagnostics.md): ``entropy/first_token`` always; with
        token classes and ``algo.name=lpreg`` the loss's own regularised tokens by class and the share of their
        push-down the k3 term cancels (``diag/lpreg_*``). Absent keys (no response row, nothing regularised) are
        left out of the micro-batch mean rather than counted as 0."""
        from megatron_lpreg.metrics.diagnostics import first_token_entropy, lpreg_class_metrics

        out: dict[str, float] = {}
        first = first_token_entropy(entropy, inputs.response_mask)
        if first is not None:
            out["entropy/first_token"] = first
        cfg = self.algo_cfg
        if self.token_classes is not None and cfg.name == "lpreg":
            out.update(lpreg_class_metrics(
                inputs.logprobs, inputs.old_logprobs, inputs.proxy_logprobs, inputs.advantages, inputs.response_mask,
                targets, self.token_classes, rho=cfg.rho, beta=cfg.beta, selection=cfg.selection,
                lowprob_threshold=inputs.lowprob_threshold, with_kl_cancel=cfg.proxy_kl == "k3"))
        return out

    def train_step(self, batch: TrainBatch, *, lowprob_threshold: float | None = None,
                   global_valid_tokens: float | None = None) -> StepResult:
        """One optimizer update over all micro-batches of ``batch`` (this rank's share); a non-finite loss or
        gradient on any rank skips the update on all ranks."""
        local_metrics = self.accumulate_gradients(batch, lowprob_threshold=lowprob_threshold,
                                                  global_valid_tokens=global_valid_tokens)
        metrics_finite = all(math.isfinite(v) for v in local_metrics.values())
        finite = self._all_ranks_finite(self._grads_finite() & metrics_finite)
        if not finite:
            self.optimizer.zero_grad()
            for chunk in self.chunks:
                chunk.zero_grad_buffer()
            return StepResult(metrics=self.reduce_metrics(local_metrics), grad_norm=float("nan"), skipped=True)
        ok, grad_norm, _ = self.optimizer.step()
        if self.overlap_param_gather:
            # the distributed optimizer left the gather of the updated parameters to the next forward's pre-hooks
            # (distrib_optimizer.py:2610-2619); the weight sync and checkpoints read them before any forward
            for chunk in self.chunks:
                chunk.start_param_sync(force_sync=True)
        self.scheduler.step(increment=1)
        grad_norm = float(grad_norm) if grad_norm is not None else 0.0
        return StepResult(metrics=self.reduce_metrics(local_metrics), grad_norm=grad_norm, skipped=not ok)

    # ---- helpers ----------------------------------------------------------------------------------------
    def _grads_finite(self) -> torch.Tensor:
        """Whether every ``main_grad`` of this rank is finite, as a 0-dim bool tensor on the rank's device.

        One small reduction per parameter queued on the device and one over their flags; no host sync here (a
        per-parameter ``bool()`` waited on the device ~400 times per step for a 28-layer model).
        """
        flags = [torch.isfinite(param.main_grad).all() for chunk in self.chunks for param in chunk.parameters()
                 if getattr(param, "main_grad", None) is not None]
        return torch.stack(flags).all() if flags else coll.tensor(True, self.ctx)

    def _all_ranks_finite(self, flag: torch.Tensor) -> bool:
        """``flag`` (0-dim bool tensor) AND-ed over all ranks: one all-reduce, then the step's one host sync."""
        bad = (~flag).float().reshape(1)
        return coll.all_reduce(bad, op="max").item() == 0.0

    def reduce_metrics(self, local: dict[str, float]) -> dict[str, float]:
        """Average metric dicts of the last-stage TP-rank-0 ranks over data parallel; every rank gets the result."""
        if coll.world_size() == 1:
            return dict(local)
        contributes = self.ctx.is_last_pp_stage and self.ctx.tp_rank == 0
        rows = [g for g in coll.all_gather_object(local if contributes else None) if g is not None]
        return _mean_dicts(rows)

    def current_lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])


def _overlap_grad_reduce_hooks(tf_config: Any, chunks: list[Any]) -> None:
    """Let megatron's schedules drive DDP's overlapped gradient reduction, as Megatron-LM's training setup does.

    ``no_sync_func`` holds the reduction back until the last micro-batch (else the first micro-batch's backward
    would dispatch every bucket, megatron DDP ``no_sync``); ``grad_sync_func`` lets the pipeline schedules start a
    chunk's reduction as soon as its last backward is done (``schedules.py`` reads both from the config).
    """
    no_sync = [chunk.no_sync for chunk in chunks]
    grad_sync = [chunk.start_grad_sync for chunk in chunks]
    tf_config.no_sync_func = no_sync[0] if len(chunks) == 1 else no_sync
    tf_config.grad_sync_func = grad_sync[0] if len(chunks) == 1 else grad_sync


def _refuse_fp16(model_cfg: ModelConfig) -> None:
    """Refuse ``model.params_dtype=float16`` for training.

    megatron's fp16 optimizer unscales every gradient by its DynamicGradScaler (``prepare_grads`` in
    megatron/core/optimizer/optimizer.py:524-555, initial scale 2**32, optimizer_config.py:220) but only a
    ``TransformerConfig.grad_scale_func`` scales the loss before backward (schedules.py:477-478; Megatron-LM's
    training loop sets it to ``optimizer.scale_loss``). Without it every update shrinks by ~2**-32; with it the
    first ~17 steps overflow and are skipped while the scale backs off, which an RL step (a whole rollout) cannot
    afford and the loop's non-finite-step policy would count as failures. bf16 needs no loss scaling.
    """
    if model_cfg.params_dtype == "float16":
        raise ConfigError("model.params_dtype=float16 cannot be trained here: megatron's fp16 path needs dynamic loss "
                          "scaling (overflow-skipped steps while the scale backs off from 2**32); use "
                          "model.params_dtype=bfloat16 (same memory, no loss scale) or float32")


def _check_packing_supported(model_cfg: ModelConfig) -> None:
    """Refuse ``trainer.packing`` where the packed THD path cannot run (Transformer Engine too old)."""
    if not use_transformer_engine(model_cfg):
        return  # local spec: block-diagonal mask
    reason = thd_unsupported_reason(installed_te_version())
    if reason:
        raise ValueError(f"trainer.packing=true with the Transformer Engine spec needs THD attention: {reason}; "
                         f"upgrade transformer_engine, or set model.transformer_impl=local or trainer.packing=false")


def _on_device(batch: _Batch, ctx: ParallelContext) -> _Batch:
    """``batch`` (a TrainBatch or PackedMicroBatch) with every tensor field on the rank's device; a packed
    micro-batch's own TrainBatch goes along."""
    moved = {f.name: coll.on_device(getattr(batch, f.name), ctx) for f in dataclasses.fields(batch)
             if isinstance(getattr(batch, f.name), torch.Tensor)}
    if isinstance(batch, PackedMicroBatch):
        moved["batch"] = _on_device(batch.batch, ctx)
    return dataclasses.replace(batch, **moved)


class _per_sequence_rope:
    """While active, the model's RoPE table is looked up at ``position_ids`` (each packed sequence restarts at 0)
    instead of at 0..T-1: megatron's GPTModel builds RoPE from the sequence length only."""

    def __init__(self, model: Any, position_ids: torch.Tensor) -> None:
        module = model
        while not hasattr(module, "rotary_pos_emb") and hasattr(module, "module"):
            module = module.module
        self.rope = module.rotary_pos_emb
        self.positions = position_ids.transpose(0, 1)  # [T, B]
        self.handle = None

    def _hook(self, _module: Any, _args: Any, emb: torch.Tensor) -> torch.Tensor:
        return emb[:, 0, 0, :][self.positions].unsqueeze(2)  # [T, 1, 1, D] table -> [T, B, 1, D]

    def __enter__(self) -> _per_sequence_rope:
        self.handle = self.rope.register_forward_hook(self._hook)
        return self

    def __exit__(self, *exc: object) -> None:
        self.handle.remove()


def _real_sequences(batch: TrainBatch) -> int:
    """Sequences with at least one response token (pipeline filler rows have none)."""
    return int((batch.loss_mask.sum(dim=1) > 0).sum())


def _mean_dicts(rows: list[dict[str, float]]) -> dict[str, float]:
    keys = sorted({k for row in rows for k in row})
    out = {}
    for key in keys:
        values = [float(row[key]) for row in rows if key in row]
        out[key] = sum(values) / len(values)
    return out
