"""Resumable run state and the checkpoint manager (atomic dist checkpoints, keep-last-N, ``latest`` pointer).

A checkpoint holds the model (megatron dist checkpoint, reshardable to another TP/PP) and optimizer, handed to
the manager as a :class:`ModelState` (the policy), the ``state_dict()`` of each named :class:`Stateful` it is
given (the LR schedule), and a :class:`RunState` (step, data cursor, NaN streak, engine weight version), which a
restore returns: bringing the dataset, the engine and the metric sinks in line with it is the loop's business.
Sampling seeds derive from (run seed, step, rank) (:mod:`megatron_lpreg.seeding`), so no generator state needs
saving for rollouts; the torch/python RNG states of every rank are saved anyway for anything else that draws
from them.

A save survives a kill at any moment: everything (shards, per-rank RNG files, manifest) goes into a hidden temp
dir that is renamed to ``step_N`` once complete, and only then does ``latest`` move. A restore resumes from the
newest *complete* checkpoint (:func:`plan_resume`) and clears away what a killed run left after it: temp dirs,
incomplete step dirs (set aside, not deleted), and metric/eval rows of the steps it will redo; each with a log
line. The layout itself (names, pointer, pruning) belongs to :mod:`megatron_lpreg.rundir`.
"""
from __future__ import annotations

import logging
import os
import random
import shutil
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

import torch

from megatron_lpreg import rundir
from megatron_lpreg.parallel import collectives
from megatron_lpreg.parallel.bootstrap import ParallelContext
from megatron_lpreg.parallel.faults import arm_timer, fault_point

logger = logging.getLogger(__name__)

RNG_FILE = "rng_rank{rank}.pt"
"""Each rank's torch and Python RNG states, inside the checkpoint (listed in its manifest)."""


@dataclass(frozen=True, kw_only=True)
class RunState:
    """The loop's resumable state, saved in every checkpoint and returned by a restore (everything else a resume
    needs is the model, the optimizer and the manager's named stateful objects)."""

    step: int = 0
    """Completed RL steps."""
    nan_streak: int = 0
    """Consecutive skipped (non-finite) steps."""
    weight_version: int = 0
    """Version of the weights last pushed to the rollout engine."""
    data_state: dict[str, Any] = field(default_factory=dict)
    """Prompt dataset cursor (``PromptDataset.state_dict()``)."""

    def advance(self, *, skipped: bool, data_state: dict[str, Any]) -> RunState:
        """The state after this step: the weights pushed as version ``step + 1``, the dataset at ``data_state``."""
        return replace(self, step=self.step + 1, nan_streak=self.nan_streak + 1 if skipped else 0,
                       weight_version=self.step + 1, data_state=data_state)


class Stateful(Protocol):
    """Something a checkpoint saves by value (an LR scheduler, a data loader): plain, picklable state."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class ModelState(Protocol):
    """The model part of a checkpoint (the trainer's Policy): megatron model chunks and their optimizer, saved as
    a dist checkpoint that reshards to another TP/PP."""

    raw_chunks: list[torch.nn.Module]
    optimizer: Any


def refuse_fresh_start_over_checkpoints(run_dir: Path, resume: str) -> None:
    """``trainer.resume=never`` would write over (and, with keep_last, delete) ``run_dir``'s checkpoints.

    Raises:
        FileExistsError: there are checkpoints; the message names them and the ways out.
    """
    found = rundir.list_checkpoints(run_dir) if resume == "never" else []
    if found:
        raise FileExistsError(
            f"trainer.resume=never, but {found[0].parent} already holds {len(found)} checkpoint(s) "
            f"({found[0].name} .. {found[-1].name}); a fresh run there would overwrite them. Use a new "
            f"trainer.output_dir, move the checkpoints away, or trainer.resume=auto to continue that run.")


@dataclass(frozen=True, kw_only=True)
class ResumePlan:
    """What a restore does to ``<run>/checkpoints`` (decided read-only by every rank, applied by rank 0)."""

    checkpoint: Path | None
    """The newest complete checkpoint, to resume from; None: start at step 0 (there is no checkpoint)."""
    leftovers: tuple[Path, ...] = ()
    """Temp dirs and files of saves or prunes that a kill interrupted; removed."""
    set_aside: tuple[tuple[Path, str], ...] = ()
    """Step dirs newer than ``checkpoint`` that are not complete, with the reason; moved to ``.set_aside/``."""
    repoint: bool = False
    """``latest`` does not name ``checkpoint`` (missing, empty, dangling or behind); rewritten."""
    notes: tuple[str, ...] = ()
    """Why the plan differs from "resume from what ``latest`` names" (logged as warnings)."""


def plan_resume(run_dir: str | os.PathLike) -> ResumePlan:
    """Choose the checkpoint to resume from: the newest complete one (manifest present, every file in it at its
    recorded size; :func:`load_checkpoint` then verifies the checksums).

    ``latest`` is moved only after a checkpoint is complete, so a complete step dir newer than the one it names is
    the save of a run killed just before the pointer moved: it wins. A missing or empty pointer falls back to the
    newest complete checkpoint, never to step 0 over existing checkpoints.

    Raises:
        CheckpointError: ``latest`` names a damaged checkpoint with nothing complete after it, or there are step
            dirs but none is complete; the message names each file and the cause.
    """
    from megatron_lpreg.models.checkpoint import CheckpointError, checkpoint_problems

    root = rundir.checkpoints_root(run_dir)
    if not root.is_dir():
        return ResumePlan(checkpoint=None)
    leftovers = tuple(sorted(p for p in root.iterdir() if p.name.startswith(".step_")
                             or p.name == rundir.LATEST_POINTER + ".tmp"))
    dirs = rundir.list_checkpoints(run_dir)
    problems = {d: checkpoint_problems(d) for d in dirs}
    complete = [d for d in dirs if not problems[d]]
    chosen = complete[-1] if complete else None
    pointer = root / rundir.LATEST_POINTER
    name = rundir.read_latest_pointer(run_dir)
    pointed = root / name if name else None
    notes = []
    if pointed is not None and not pointed.is_dir():
        notes.append(f"{pointer} names {name}, which does not exist")
        pointed = None
    elif pointed is None and dirs:
        notes.append(f"{pointer} is {'empty' if pointer.exists() else 'missing'}")
    step = rundir.checkpoint_step
    if pointed is not None and problems.get(pointed) and (chosen is None or step(chosen) < step(pointed)):
        raise CheckpointError(
            f"{pointer} names {pointed}, which is damaged: {'; '.join(problems[pointed])}. It was complete when "
            f"the pointer moved to it, so it was changed afterwards; restore it, or move it out of {root} to resume "
            f"from {chosen.name if chosen else 'step 0'}.")
    if chosen is None and dirs:
        raise CheckpointError(
            f"no complete checkpoint under {root}, refusing to start again at step 0 over "
            + "; ".join(f"{d.name} ({'; '.join(problems[d])})" for d in dirs)
            + ". Move them away or use a new trainer.output_dir.")
    if chosen is not None and pointed is not None and pointed != chosen:
        notes.append(f"{pointer} names {pointed.name}, but {chosen.name} is complete (a run stopped before the "
                     f"pointer moved)")
    aside = tuple((d, "; ".join(problems[d])) for d in dirs
                  if problems[d] and (chosen is None or step(d) > step(chosen)))
    if chosen is not None and notes:
        notes.append(f"resuming from {chosen.name}, the newest complete checkpoint")
    return ResumePlan(checkpoint=chosen, leftovers=leftovers, set_aside=aside, notes=tuple(notes),
                      repoint=chosen is not None and pointed != chosen)


def apply_resume_plan(run_dir: str | os.PathLike, plan: ResumePlan) -> None:
    """Rank 0: remove the leftovers, set incomplete newer step dirs aside, point ``latest`` at the checkpoint."""
    root = rundir.checkpoints_root(run_dir)
    for note in plan.notes:
        logger.warning("%s", note)
    for path in plan.leftovers:
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)
    if plan.leftovers:
        logger.warning("removed %d leftover(s) of interrupted checkpoint saves in %s: %s", len(plan.leftovers),
                       root, ", ".join(p.name for p in plan.leftovers))
    for path, why in plan.set_aside:
        target = root / rundir.SET_ASIDE / f"{path.name}.{int(time.time())}"
        target.parent.mkdir(exist_ok=True)
        os.replace(path, target)
        logger.warning("set aside %s (newer than the checkpoint resumed from, and incomplete: %s) as %s",
                       path.name, why, target)
    if plan.repoint and plan.checkpoint is not None:
        rundir.write_latest_pointer(run_dir, plan.checkpoint.name)
        logger.warning("%s now names %s", root / rundir.LATEST_POINTER, plan.checkpoint.name)


def drop_rows_after(run_dir: str | os.PathLike, step: int, metrics_truncate: Callable[[int], None]) -> None:
    """Rank 0: forget what a killed run logged after the checkpoint it resumes from (step ``step``): metric rows
    of steps >= ``step`` (the resumed run redoes them) and eval rows after ``step`` (the eval at ``step`` was
    written before that checkpoint; a fresh start, ``step`` 0, evaluates step 0 again)."""
    from megatron_lpreg.telemetry import read_jsonl

    run_dir = Path(run_dir)
    stale = sum(1 for row in read_jsonl(run_dir / rundir.METRICS_FILE) if row.get("step", -1) >= step)
    metrics_truncate(step)
    if stale:
        logger.warning("%s: dropped %d row(s) of step >= %d, logged after the checkpoint",
                       run_dir / rundir.METRICS_FILE, stale, step)
    keep_eval = (lambda row: row.get("step", step + 1) <= step) if step > 0 else (lambda row: False)
    dropped = rundir.rewrite_jsonl(run_dir / rundir.EVAL_FILE, keep_eval)
    if dropped:
        logger.warning("%s: dropped %d row(s) after step %d, logged after the checkpoint", run_dir / rundir.EVAL_FILE,
                       dropped, step)


class CheckpointManager:
    """Save/restore checkpoints under ``run_dir/checkpoints/step_<7-digit step>`` with a ``latest`` pointer file.

    Args:
        run_dir: the run directory.
        model: model chunks and optimizer (the Policy), saved as a dist checkpoint.
        stateful: named objects saved by ``state_dict()`` (each under its name in the checkpoint's ``extra``).
        ctx: this rank's parallel context (the saves and restores are collective).
        model_cfg: the model config the dist checkpoint is checked against.
        config_yaml: the resolved run config, stored in every checkpoint.
        hf_assets_dir: tokenizer/config files copied into every checkpoint (None: none).
        interval, keep_last, keep_every, save_optimizer, optimizer_format: ``checkpoint.*``; resume:
            ``trainer.resume``.

    Raises:
        ValueError: a ``stateful`` name is one the checkpoint uses itself (``run_state``, ``config_yaml``).
    """

    def __init__(self, run_dir: Path, *, model: ModelState, stateful: Mapping[str, Stateful], ctx: ParallelContext,
                 model_cfg: Any, config_yaml: str, hf_assets_dir: str | None, interval: int, keep_last: int,
                 save_optimizer: bool, resume: str, keep_every: int = 0,
                 optimizer_format: str = "fully_reshardable") -> None:
        reserved = sorted(set(stateful) & {"run_state", "config_yaml"})
        if reserved:
            raise ValueError(f"CheckpointManager: stateful names {reserved} are reserved for the checkpoint itself")
        self.run_dir = Path(run_dir)
        self.root = rundir.checkpoints_root(run_dir)
        self.model, self.stateful, self.ctx, self.model_cfg = model, dict(stateful), ctx, model_cfg
        self.config_yaml, self.hf_assets_dir = config_yaml, hf_assets_dir
        self.interval, self.keep_last, self.save_optimizer, self.resume = interval, keep_last, save_optimizer, resume
        self.keep_every, self.optimizer_format = keep_every, optimizer_format

    def due(self, step: int, *, final: bool) -> bool:
        """Whether to save after ``step`` completed steps (every ``interval``, and the last one)."""
        return final or (self.interval > 0 and step % self.interval == 0)

    def restore_or_init(self) -> RunState:
        """Resume from the newest complete checkpoint (``trainer.resume`` auto/must): load the model, optimizer,
        the named stateful objects and this rank's RNG states, and return its :class:`RunState`; or return a fresh
        one (step 0). Either way clear away what an interrupted run left after that point (see
        :func:`plan_resume`). Collective.

        Raises:
            FileExistsError: ``resume=never`` over existing checkpoints.
            FileNotFoundError: ``resume=must`` and no checkpoint.
            CheckpointError: damaged checkpoints (see :func:`plan_resume`) or a failed verification on load.
        """
        from megatron_lpreg.models.checkpoint import CheckpointError, load_checkpoint

        arm_timer()  # fault-injection tests only (MLPREG_FAULT=after:<seconds>)
        refuse_fresh_start_over_checkpoints(self.run_dir, self.resume)
        plan = plan_resume(self.run_dir)
        if self.resume == "must" and plan.checkpoint is None:
            raise FileNotFoundError(f"trainer.resume=must but no checkpoint under {self.root}")
        collectives.barrier()  # every rank has read the directory before rank 0 changes it
        if self.ctx.rank == 0:
            apply_resume_plan(self.run_dir, plan)
        if plan.checkpoint is None:
            return RunState()
        path = plan.checkpoint
        logger.info("resuming from %s", path)
        extra = load_checkpoint(str(path), self.model.raw_chunks, self.model_cfg, self.ctx,
                                optimizer=self.model.optimizer if self.save_optimizer else None)
        for name, obj in self.stateful.items():
            if name not in extra:
                raise CheckpointError(f"{path} holds no '{name}' state (found {sorted(extra)})")
            obj.load_state_dict(extra[name])
        _set_rng_state(path, self.ctx.rank)
        return RunState(**extra["run_state"])

    def save(self, state: RunState) -> Path:
        """Write the checkpoint of ``state.step`` (collective), then move ``latest`` to it and prune.

        Raises:
            CheckpointError: the step dir exists (another run writes here), or a write failed; the message names
                the path and the OS cause (``No space left on device [ENOSPC]``).
        """
        from megatron_lpreg.models.checkpoint import CheckpointError, save_checkpoint, write_failure

        name = rundir.step_dir_name(state.step)
        path = self.root / name
        if path.exists():  # restore set aside everything newer than the checkpoint it resumed from
            raise CheckpointError(f"{path} already exists, although this run resumed from an older checkpoint: is "
                                  f"another run writing to {self.run_dir}? Give each run its own trainer.output_dir")
        extra = {"run_state": asdict(state), **{k: obj.state_dict() for k, obj in self.stateful.items()},
                 "config_yaml": self.config_yaml}
        rng = {"torch": torch.get_rng_state(), "python": random.getstate()}
        save_checkpoint(str(path), self.model.raw_chunks, self.model_cfg, self.ctx,
                        optimizer=self.model.optimizer if self.save_optimizer else None, extra=extra,
                        rank_files={RNG_FILE.format(rank=self.ctx.rank): rng}, hf_assets_dir=self.hf_assets_dir,
                        on_progress=lambda point: fault_point(point, step=state.step),
                        optimizer_format=self.optimizer_format)
        if self.ctx.rank == 0:
            try:
                rundir.write_latest_pointer(self.run_dir, name)
            except OSError as exc:
                raise write_failure(exc, path, where=self.root / rundir.LATEST_POINTER, consequence=(
                    f"{name} is complete, {rundir.LATEST_POINTER} still names the one before; a rerun resumes "
                    f"from {name}")) from exc
            fault_point("pointer_written", step=state.step)
            rundir.prune_checkpoints(self.run_dir, self.keep_last, keep=name, keep_every=self.keep_every)
            fault_point("pruned", step=state.step)
            logger.info("checkpoint %s written", path)
        collectives.barrier()
        return path


def _set_rng_state(path: Path, rank: int) -> None:
    """Restore this rank's torch and Python RNG states (absent for a rank that did not exist at save time).

    Raises:
        CheckpointError: the file is unreadable (names it) or does not hold RNG states.
    """
    from megatron_lpreg.models.checkpoint import CheckpointError, load_rank_file

    file = RNG_FILE.format(rank=rank)
    rng = load_rank_file(path, file)
    if rng is None:
        return
    if not (isinstance(rng, dict) and isinstance(rng.get("torch"), torch.Tensor) and "python" in rng):
        found = sorted(rng) if isinstance(rng, dict) else type(rng).__name__
        raise CheckpointError(f"{path / file} does not hold RNG states (found {found})")
    torch.set_rng_state(rng["torch"])
    random.setstate(rng["python"])
