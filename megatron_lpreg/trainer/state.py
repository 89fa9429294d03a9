"""Resumable run state and the checkpoint manager (atomic dist checkpoints, keep-last-N, ``latest`` pointer).

A checkpoint holds the model (megatron dist checkpoint, reshardable to another TP/PP), the optimizer and LR
schedule, and a :class:`RunState` (step, data cursor, NaN streak, engine weight version). Sampling seeds derive
from (run seed, step, rank), so no generator state needs saving for rollouts; the torch/python RNG states of
every rank are saved anyway for anything else that draws from them.
"""
from __future__ import annotations

import logging
import os
import random
import shutil
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

if TYPE_CHECKING:
    from megatron_lpreg.trainer.components import Components

logger = logging.getLogger(__name__)

LATEST = "latest"


@dataclass(frozen=True, kw_only=True)
class RunState:
    step: int = 0
    """Completed RL steps."""
    nan_streak: int = 0
    """Consecutive skipped (non-finite) steps."""
    weight_version: int = 0
    """Version of the weights last pushed to the rollout engine."""
    data_state: dict[str, Any] = field(default_factory=dict)
    """Prompt dataset cursor (``PromptDataset.state_dict()``)."""

    def advance(self, *, skipped: bool) -> "RunState":
        return replace(self, step=self.step + 1, nan_streak=self.nan_streak + 1 if skipped else 0,
                       weight_version=self.step + 1)


def derive_seed(root: int, *parts: int) -> int:
    """The one seed helper: a stable 31-bit seed from the run seed and (step, rank, ...)."""
    value = root & 0xFFFFFFFF
    for part in parts:
        value = (value * 1_000_003 + (part & 0xFFFFFFFF) + 0x9E3779B9) & 0xFFFFFFFF
    return value & 0x7FFFFFFF


def refuse_fresh_start_over_checkpoints(run_dir: Path, resume: str) -> None:
    """``trainer.resume=never`` would write over (and, with keep_last, delete) ``run_dir``'s checkpoints.

    Raises:
        FileExistsError: there are checkpoints; the message names them and the ways out.
    """
    from megatron_lpreg.launch.runs import list_checkpoints

    found = list_checkpoints(run_dir) if resume == "never" else []
    if found:
        raise FileExistsError(
            f"trainer.resume=never, but {found[0].parent} already holds {len(found)} checkpoint(s) "
            f"({found[0].name} .. {found[-1].name}); a fresh run there would overwrite them. Use a new "
            f"trainer.output_dir, move the checkpoints away, or trainer.resume=auto to continue that run.")


class CheckpointManager:
    """Save/restore checkpoints under ``run_dir/checkpoints/step_<7-digit step>`` with a ``latest`` pointer file."""

    def __init__(self, run_dir: Path, *, interval: int, keep_last: int, save_optimizer: bool, resume: str) -> None:
        self.root = Path(run_dir) / "checkpoints"
        self.interval, self.keep_last, self.save_optimizer, self.resume = interval, keep_last, save_optimizer, resume

    def due(self, step: int, *, final: bool) -> bool:
        return final or (self.interval > 0 and step % self.interval == 0)

    def latest(self) -> Path | None:
        pointer = self.root / LATEST
        if not pointer.exists():
            return None
        path = self.root / pointer.read_text().strip()
        if not path.is_dir():
            raise FileNotFoundError(f"{pointer} names {path.name}, which does not exist; delete the pointer or "
                                    f"point it at an existing checkpoint in {self.root}")
        return path

    def restore_or_init(self, comp: "Components") -> RunState:
        from megatron_lpreg.models.checkpoint import load_checkpoint

        refuse_fresh_start_over_checkpoints(self.root.parent, self.resume)
        path = self.latest() if self.resume != "never" else None
        if path is None:
            if self.resume == "must":
                raise FileNotFoundError(f"trainer.resume=must but no checkpoint under {self.root}")
            return RunState()
        logger.info("resuming from %s", path)
        extra = load_checkpoint(str(path), comp.policy.raw_chunks, comp.cfg.model, comp.ctx,
                                optimizer=comp.policy.optimizer if self.save_optimizer else None)
        state = RunState(**extra["run_state"])
        comp.policy.scheduler.load_state_dict(extra["scheduler"])
        comp.dataset.load_state_dict(state.data_state)
        rng = _load_rank_file(path, comp.ctx.rank)
        if rng is not None:
            torch.set_rng_state(rng["torch"])
            random.setstate(rng["python"])
        comp.engine_after_restore(state.weight_version)
        comp.metrics_truncate(state.step)
        return state

    def save(self, comp: "Components", state: RunState) -> Path:
        from megatron_lpreg.models.checkpoint import save_checkpoint

        state = replace(state, data_state=comp.dataset.state_dict())
        name = f"step_{state.step:07d}"
        path = self.root / name
        extra = {"run_state": asdict(state), "scheduler": comp.policy.scheduler.state_dict(),
                 "config_yaml": comp.cfg.to_yaml()}
        save_checkpoint(str(path), comp.policy.raw_chunks, comp.cfg.model, comp.ctx,
                        optimizer=comp.policy.optimizer if self.save_optimizer else None, extra=extra,
                        hf_assets_dir=comp.cfg.model.hf_path or None)
        if dist.is_initialized():
            dist.barrier()
        # Per-rank RNG files go in after the (atomic) model/optimizer save and before the `latest` pointer
        # moves, so a reader following `latest` never sees a half-written checkpoint.
        rng_file = path / f"rng_rank{comp.ctx.rank}.pt"
        torch.save({"torch": torch.get_rng_state(), "python": random.getstate()}, str(rng_file) + ".tmp")
        os.replace(str(rng_file) + ".tmp", rng_file)
        if dist.is_initialized():
            dist.barrier()
        if comp.ctx.rank == 0:
            tmp = self.root / (LATEST + ".tmp")
            tmp.write_text(name)
            os.replace(tmp, self.root / LATEST)
            self._prune(keep=name)
            logger.info("checkpoint %s written", path)
        if dist.is_initialized():
            dist.barrier()
        return path

    def _prune(self, keep: str) -> None:
        ckpts = sorted(p for p in self.root.glob("step_*") if p.is_dir())
        for old in ckpts[: max(0, len(ckpts) - self.keep_last)]:
            if old.name != keep:
                shutil.rmtree(old, ignore_errors=True)


def _load_rank_file(path: Path, rank: int) -> dict | None:
    f = path / f"rng_rank{rank}.pt"
    return torch.load(f, weights_only=False) if f.exists() else None
