"""Device discipline: every tensor that enters a collective or the model is on the rank's device (``ctx.device``).

A CPU run cannot tell the default device from the rank's device, so these tests run real gloo ranks whose context
says ``cuda:0`` (computed on the CPU through the shim) under :mod:`tests.support.device_check`, which tags tensors
our code builds on the host and fails where CUDA/NCCL would. The checker is tested first (it must catch a host
tensor in a collective and in the model), then a real training step (rollout, update, weight sync, eval,
preemption vote, checkpoint) runs under it.
"""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from megatron_lpreg.parallel import collectives as coll
from megatron_lpreg.parallel.spawn import RankFailure, run_ranks
from tests.support.device_check import RANK_DEVICE, DeviceViolation, enter_device_discipline, on_host


def _simulated_ctx():
    from megatron_lpreg.config.model import ParallelConfig
    from megatron_lpreg.parallel.bootstrap import init_parallel

    ctx = init_parallel(ParallelConfig())
    enter_device_discipline(packages=("megatron_lpreg.", __name__))  # tensors built here count as ours too
    return dataclasses.replace(ctx, device=RANK_DEVICE)


def _checker_cases(rank: int, world: int) -> dict[str, str]:
    ctx = _simulated_ctx()
    out = {}
    placed = coll.tensor([1.0, 2.0], ctx)
    out["placed_on_host"] = str(on_host(placed))
    out["placed_reduce"] = str(coll.all_reduce(placed.clone()).tolist())
    out["moved_on_host"] = str(on_host(coll.on_device(torch.ones(3), ctx)))
    for name, bad in {
        "default_device_reduce": lambda: coll.all_reduce(torch.tensor([1.0])),
        "explicit_cpu_broadcast": lambda: coll.broadcast(torch.zeros(2, device="cpu"), src=0),
        "host_derived_reduce": lambda: coll.all_reduce(torch.arange(4).float() * 2),
        "moved_back_to_host": lambda: coll.all_reduce(placed.cpu()),
        "host_into_device_op": lambda: placed + torch.ones(2),
        "host_tokens_into_embedding": lambda: torch.nn.functional.embedding(
            torch.tensor([[0, 1]]), coll.zeros((4, 3), ctx)),
    }.items():
        try:
            bad()
            out[name] = "passed"
        except DeviceViolation as exc:
            out[name] = f"caught: {exc}"
    out["host_scalar_ok"] = str((placed + torch.tensor(1.0)).tolist())
    return out


def test_the_checker_catches_host_tensors_in_collectives_and_the_model():
    results = run_ranks(_checker_cases, 2, timeout_s=120)
    for r in results:
        assert r["placed_on_host"] == "False" and r["moved_on_host"] == "False"
        assert r["placed_reduce"] == "[2.0, 4.0]"
        assert r["host_scalar_ok"] == "[2.0, 3.0]"  # 0-dim CPU scalars mix with CUDA tensors on a GPU too
        for name in ("default_device_reduce", "explicit_cpu_broadcast", "host_derived_reduce", "moved_back_to_host"):
            assert r[name].startswith("caught: host tensor") and "torch.distributed." in r[name], (name, r[name])
        for name in ("host_into_device_op", "host_tokens_into_embedding"):
            assert r[name].startswith("caught:") and "mixes host tensor" in r[name], (name, r[name])


def _train_checked(rank: int, world: int, cfg, run_dir: str) -> int:
    from megatron_lpreg.trainer import components, loop

    real_init = components.init_parallel

    def init_on_simulated_device(*args, **kwargs):
        ctx = real_init(*args, **kwargs)
        enter_device_discipline()
        return dataclasses.replace(ctx, device=RANK_DEVICE)

    components.init_parallel = init_on_simulated_device
    return loop.run_rank(cfg, run_dir)


LAYOUTS = {
    # off-policy updates and global Lp-Reg selection: the old-log-prob pass and the DP top-k all-gather
    "dp2": ["parallel.tp=1", "trainer.updates_per_step=2", "algo.selection=global"],
    "tp2": ["parallel.tp=2"],
    "tp2-packed": ["parallel.tp=2", "trainer.packing=true"],  # packed micro-batches built on the host, then moved
    # pipeline: hosted engine on rank 0, weights streamed stage to rank 0, old log-probs broadcast over PP
    "pp2": ["parallel.tp=1", "parallel.pp=2", "trainer.updates_per_step=2"],
}


@pytest.mark.slow
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_a_training_step_keeps_every_collective_and_model_input_on_the_rank_device(tmp_path, layout):
    from megatron_lpreg.trainer.cli import resolve_config

    out = tmp_path / "run"
    cfg = resolve_config("configs/tiny_cpu.yaml", [
        *LAYOUTS[layout], "trainer.world_size=2", "trainer.max_steps=2", f"trainer.output_dir={out}",
        "rollout.prompts_per_step=4", "rollout.n=2", "eval.interval=1", "eval.max_new_tokens=4",
        "rollout.max_new_tokens=6", "checkpoint.interval=1", "reward.name=tests.support.rewards:even_length",
        "data.heldout_size=4",
    ])
    out.mkdir(parents=True)
    try:
        codes = run_ranks(_train_checked, 2, cfg, str(out), timeout_s=600)
    except RankFailure as exc:
        violations = [line for line in str(exc).splitlines() if "DeviceViolation" in line]
        pytest.fail("\n".join(violations) if violations else str(exc)[-4000:])
    assert codes == [0, 0]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1]
