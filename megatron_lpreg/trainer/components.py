"""Everything one trainer rank holds, built once from the config (the loop only calls into it)."""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from megatron_lpreg import rundir, telemetry
from megatron_lpreg.config import RunConfig, TokenClasses
from megatron_lpreg.eval.in_training import TrainingEvaluator
from megatron_lpreg.parallel.bootstrap import ParallelContext, init_parallel
from megatron_lpreg.trainer.engine_host import EngineHost
from megatron_lpreg.trainer.evaluation import evaluate_heldout
from megatron_lpreg.trainer.policy import Policy
from megatron_lpreg.trainer.state import CheckpointManager, RunState, drop_rows_after

logger = logging.getLogger(__name__)


@dataclass(kw_only=True)
class Components:
    cfg: RunConfig
    ctx: ParallelContext
    run_dir: Path
    tokenizer: Any
    policy: Policy
    engine: EngineHost
    dataset: Any
    reward: Any
    checkpoints: CheckpointManager
    sinks: telemetry.MetricSinks | None
    evaluator: TrainingEvaluator | None = None
    """The run's benchmarks, loaded at start."""
    token_classes: TokenClasses | None = None
    """``diagnostics:`` resolved once with the tokenizer (None: no ``diag/*`` metrics)."""
    _step_s: float | None = None

    def log(self, metrics: dict[str, float], step: int) -> None:
        if self.sinks is not None:
            self.sinks.log(metrics, step)
            keys = ("reward/mean", "loss/policy", "entropy/mean", "lpreg/num_regularized", "perf/step_s")
            shown = " ".join(f"{k}={metrics[k]:.4g}" for k in keys if k in metrics)
            # ETA from a moving average of the step time (the log is the progress bar of non-TTY runs).
            self._step_s = metrics["perf/step_s"] if self._step_s is None else (
                0.9 * self._step_s + 0.1 * metrics["perf/step_s"])
            left = max(0, self.cfg.trainer.max_steps - step - 1) * self._step_s
            logger.info("step %d/%d %s eta %dm%02ds", step + 1, self.cfg.trainer.max_steps, shown,
                        left // 60, left % 60)

    def metrics_truncate(self, step: int) -> None:
        """Drop the metric rows of steps >= ``step`` from the sinks that can (rank 0)."""
        if self.sinks is not None:
            self.sinks.truncate_after(step)

    def data_after_restore(self, state: RunState) -> None:
        """Continue the prompt stream from a restored checkpoint's cursor."""
        self.dataset.load_state_dict(state.data_state)

    def engine_after_restore(self, version: int) -> None:
        """Push restored weights to an engine that keeps its own copy (no-op when embedded). Collective."""
        if self.engine.hosted:
            self.sync_weights(version)

    def sync_weights(self, version: int) -> None:
        """Send the policy's weights to the engine as ``version`` (collective). SGLang engines also get the trainer's
        probe (``trainer/sync_probe.py``), which every server must match after the sync."""
        probe = None
        if self.engine.hosted and self.cfg.rollout.engine == "sglang":
            from megatron_lpreg.trainer.sync_probe import trainer_probe

            probe = trainer_probe(self.policy, params_dtype=self.cfg.model.params_dtype)
        self.engine.update_weights(version, probe=probe)

    def forget_rows_after(self, step: int) -> None:
        """Rank 0: drop the metric and eval rows a killed run logged after the checkpoint of ``step``."""
        if self.ctx.rank == 0:
            drop_rows_after(self.run_dir, step, self.metrics_truncate)

    def eval_due(self, step: int) -> bool:
        """Whether ``eval.interval`` asks for a held-out evaluation after ``step`` steps (and there is one)."""
        interval = self.cfg.eval.interval
        return self.evaluator is not None and self.evaluator.enabled and interval > 0 and step % interval == 0

    def evaluate_if_due(self, step: int, *, force: bool = False) -> None:
        """Score the held-out benchmarks after ``step`` steps if ``eval.interval`` says so (or ``force``);
        collective. Rank 0 appends the row to ``eval.jsonl``."""
        if self.evaluator is None or not self.evaluator.enabled or not (force or self.eval_due(step)):
            return
        result = evaluate_heldout(self.evaluator, self.engine, self.ctx, seed=self.cfg.seed, step=step)
        if self.ctx.rank == 0:
            with open(self.run_dir / rundir.EVAL_FILE, "a") as fh:
                fh.write(json.dumps(result) + "\n")
        if self.sinks is not None:  # eval/<benchmark>/* curves in TensorBoard / W&B
            self.sinks.log({k: v for k, v in result.items() if k != "step"}, step, jsonl=False)

    def close(self) -> None:
        """Close the metric sinks, the engine and the reward workers."""
        if self.sinks is not None:
            self.sinks.close()
        self.engine.shutdown()
        self.reward.close()


def build_components(cfg: RunConfig, run_dir: Path) -> Components:
    """Everything this rank needs, from the config: process groups, logging, tokenizer, policy (with its initial
    weights), engine, dataset, reward, checkpoint manager and (rank 0) metric sinks."""
    from transformers import AutoTokenizer

    from megatron_lpreg.data import build_dataset
    from megatron_lpreg.reward import build_reward

    ctx = init_parallel(cfg.parallel, seed=cfg.seed)
    telemetry.setup(ctx.rank, ctx.world_size, level=cfg.logging.level, all_ranks=cfg.logging.all_ranks,
                    log_file=run_dir / rundir.LOGS_DIR / f"rank{ctx.rank}.log")
    if not cfg.model.hf_path:
        raise ValueError("model.hf_path is empty: set it to a Hugging Face model directory (config.json + "
                         "tokenizer), e.g. one made by tools/make_tiny_model.py")
    tokenizer = AutoTokenizer.from_pretrained(cfg.model.hf_path)
    evaluator = TrainingEvaluator(cfg.eval, cfg.data, cfg.reward, tokenizer)  # refuses evals that score nothing
    token_classes = cfg.diagnostics.resolve(tokenizer) if cfg.diagnostics.enabled else None
    policy = Policy(cfg.model, cfg.parallel, cfg.optimizer, cfg.algo, ctx, temperature=cfg.rollout.temperature,
                    micro_batch_tokens=cfg.trainer.micro_batch_tokens, total_steps=cfg.trainer.max_steps,
                    packing=cfg.trainer.packing, token_classes=token_classes)
    _load_initial_weights(cfg, policy, ctx)
    engine = EngineHost(cfg, ctx, policy.raw_chunks)
    dataset = build_dataset(cfg.data, tokenizer, seed=cfg.seed)
    reward = build_reward(cfg.reward)
    checkpoints = CheckpointManager(run_dir, model=policy, stateful={"scheduler": policy.scheduler}, ctx=ctx,
                                    model_cfg=cfg.model, config_yaml=cfg.to_yaml(),
                                    hf_assets_dir=cfg.model.hf_path or None, interval=cfg.checkpoint.interval,
                                    keep_last=cfg.checkpoint.keep_last, keep_every=cfg.checkpoint.keep_every,
                                    save_optimizer=cfg.checkpoint.save_optimizer,
                                    optimizer_format=cfg.checkpoint.optimizer_format, resume=cfg.trainer.resume)
    sinks = None
    if ctx.rank == 0:
        sinks = telemetry.MetricSinks(run_dir, tensorboard=cfg.logging.tensorboard, wandb=cfg.logging.wandb,
                                      wandb_project=cfg.logging.wandb_project, config=cfg.to_dict())
    return Components(cfg=cfg, ctx=ctx, run_dir=run_dir, tokenizer=tokenizer, policy=policy, engine=engine,
                      dataset=dataset, reward=reward, checkpoints=checkpoints, sinks=sinks, evaluator=evaluator,
                      token_classes=token_classes)


def _load_initial_weights(cfg: RunConfig, policy: Policy, ctx: ParallelContext) -> None:
    """Fresh run: weights from model.mcore_path (dist checkpoint) or model.hf_path (HF safetensors)."""
    if cfg.model.mcore_path:
        from megatron_lpreg.models.checkpoint import load_checkpoint

        load_checkpoint(cfg.model.mcore_path, policy.raw_chunks, cfg.model, ctx)
    else:
        from megatron_lpreg.models.bridge import load_hf_weights

        load_hf_weights(policy.raw_chunks, cfg.model.hf_path, cfg.model, ctx)
