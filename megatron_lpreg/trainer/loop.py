"""The RL loop, run identically on every trainer rank (SPMD): it reads like the algorithm.

sample prompts -> rollout (n responses each) -> rewards -> advantages -> policy update (megatron optimizer,
micro-batches under a token budget) -> weight sync to the engine -> metrics -> checkpoint / preemption.
Each DP rank takes its own slice of the step's prompts; TP/PP ranks of one replica generate in lockstep.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

from megatron_lpreg import telemetry
from megatron_lpreg.config import RunConfig
from megatron_lpreg.rundir import REQUEUE_EXIT_CODE
from megatron_lpreg.trainer.components import Components, build_components
from megatron_lpreg.trainer.rollout_step import rollout_batch
from megatron_lpreg.trainer.signals import PreemptionWatcher
from megatron_lpreg.trainer.state import RunState
from megatron_lpreg.trainer.update import update_policy
from megatron_lpreg.trainer.walltime import WalltimeGuard, job_end_time

logger = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    """Too many consecutive steps had a non-finite loss or gradient."""


def run_rank(cfg: RunConfig, run_dir: str) -> int:
    """Train on this rank until ``trainer.max_steps`` or a preemption request; return the process exit code."""
    run_path = Path(run_dir)
    comp: Components = build_components(cfg, run_path)
    # Rank 0 learns the job's end time (env or one Slurm query); the stop decision is all-reduced like a signal.
    walltime = WalltimeGuard(job_end_time() if comp.ctx.rank == 0 else None, cfg.trainer.walltime_margin_s)
    t_restore = time.perf_counter()
    state: RunState = comp.checkpoints.restore_or_init()  # model, optimizer, LR schedule, RNG
    if state.step > 0:  # resumed: the prompt stream and the engine's weights follow the checkpoint
        walltime.record_load(time.perf_counter() - t_restore)
        comp.data_after_restore(state)
        comp.engine_after_restore(state.weight_version)
    comp.forget_rows_after(state.step)
    # Handlers live only while this rank trains: the SIGTERM with which Ray or srun ends a finished rank must not
    # leave a request that stops the next run in this directory after one step.
    with PreemptionWatcher(run_path) as watcher:
        return _train(cfg, comp, state, watcher, walltime)


def _train(cfg: RunConfig, comp: Components, state: RunState, watcher: PreemptionWatcher,
           walltime: WalltimeGuard) -> int:
    # a resumed run's eval at its checkpoint step was written before that checkpoint; eval.before_training=false
    # (the authors' schedule) skips the evaluation of the initial weights
    if state.step == 0 and cfg.eval.before_training:
        comp.evaluate_if_due(0, force=True)
    steps = telemetry.progress(range(state.step, cfg.trainer.max_steps), total=cfg.trainer.max_steps - state.step,
                               desc="rl", enabled=cfg.logging.progress, rank=comp.ctx.rank)
    for step in steps:
        t0 = time.perf_counter()
        scored, rollout_metrics = rollout_batch(comp, step)
        t1 = time.perf_counter()
        comp.engine.release_memory()  # colocated engines lend their device memory to the update
        result = update_policy(comp.policy, scored, step, algo=cfg.algo, updates=cfg.trainer.updates_per_step,
                               seed=cfg.seed, ctx=comp.ctx)
        t2 = time.perf_counter()
        comp.engine.resume_memory()
        comp.sync_weights(step + 1)
        state = state.advance(skipped=result.skipped, data_state=comp.dataset.state_dict())
        metrics = {**rollout_metrics, **result.metrics, "actor/grad_norm": result.grad_norm,
                   "actor/lr": comp.policy.current_lr(), "actor/skipped": float(result.skipped),
                   "perf/rollout_s": t1 - t0, "perf/update_s": t2 - t1, "perf/step_s": time.perf_counter() - t0}
        metrics["perf/tokens_per_s"] = rollout_metrics["rollout/tokens"] * comp.ctx.dp_size / metrics["perf/step_s"]
        # Plain names scripts and the acceptance checks read (the namespaced keys stay the source of truth).
        metrics.update(loss=metrics.get("loss/total", float("nan")), reward_mean=metrics["reward/mean"],
                       entropy=metrics.get("entropy/mean", float("nan")))
        comp.log(metrics, step)
        if result.skipped:
            logger.warning("step %d: non-finite loss or gradient on some rank; update skipped (%d in a row)",
                           step, state.nan_streak)
        if state.nan_streak >= cfg.trainer.max_consecutive_nan or (result.skipped and cfg.trainer.nan_policy == "stop"):
            raise NonFiniteLossError(
                f"step {step}: non-finite loss or gradient {state.nan_streak} time(s) in a row "
                f"(trainer.nan_policy={cfg.trainer.nan_policy}, trainer.max_consecutive_nan="
                f"{cfg.trainer.max_consecutive_nan}); last metrics: {result.metrics}"
            )
        t_eval = time.perf_counter()
        final = step + 1 == cfg.trainer.max_steps
        comp.evaluate_if_due(step + 1, force=final)
        walltime.record_step(t_eval - t0, evaluation_s=time.perf_counter() - t_eval)
        out_of_time = not final and walltime.should_stop(evaluates=comp.eval_due(step + 2))
        if out_of_time:
            logger.warning("step %d: %s: checkpointing now", step + 1, walltime.reason())
        stop = watcher.should_stop(comp.ctx, local=out_of_time)
        if stop or comp.checkpoints.due(step + 1, final=final):
            t_save = time.perf_counter()
            comp.checkpoints.save(state)
            walltime.record_save(time.perf_counter() - t_save)
        if stop:
            watcher.clear()
            logger.warning("preempted after step %d/%d: checkpoint written, exiting with %d for requeue",
                           step + 1, cfg.trainer.max_steps, REQUEUE_EXIT_CODE)
            comp.close()
            return REQUEUE_EXIT_CODE
    comp.close()
    return 0
