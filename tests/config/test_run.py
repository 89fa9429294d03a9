"""RunConfig's cross-section checks that need more than one section: the trainer's world size against the
parallel layout (refused at load time, before any submission) and the checkpoint retention keys."""
from __future__ import annotations

import pytest

from megatron_lpreg.config import ConfigError, RunConfig

BIG = "configs/qwen2.5-32b_lpreg_64gpu.yaml"


def test_world_size_must_be_tp_x_pp_x_dp():
    with pytest.raises(ConfigError) as info:
        RunConfig.load(BIG, ["trainer.world_size=32"])
    assert str(info.value) == ("trainer.world_size=32 != parallel.tp=8 x parallel.pp=2 x parallel.dp=4 = 64; set "
                               "trainer.world_size=64 or parallel.dp=2 (or parallel.dp=0 to derive it)")
    assert RunConfig.load(BIG, ["trainer.world_size=32", "parallel.dp=2"]).trainer.world_size == 32
    assert RunConfig.load(BIG, ["trainer.world_size=32", "parallel.dp=0"]).parallel.dp == 0  # derived: 2


def test_world_size_must_be_a_multiple_of_tp_x_pp():
    with pytest.raises(ConfigError, match=r"trainer.world_size=20 is not a multiple of parallel.tp=8 x "
                                          r"parallel.pp=2 = 16; use trainer.world_size=16"):
        RunConfig.load(BIG, ["trainer.world_size=20", "parallel.dp=0"])
    with pytest.raises(ConfigError, match=r"trainer.world_size=1 is not a multiple of parallel.tp=2"):
        RunConfig.load("configs/tiny_cpu.yaml", ["trainer.world_size=1"])
    with pytest.raises(ConfigError, match=r"trainer.world_size=0 must be >= 1"):
        RunConfig.load("configs/tiny_cpu.yaml", ["trainer.world_size=0"])


def test_checkpoint_retention_keys():
    cfg = RunConfig.load(BIG, ["checkpoint.interval=20", "checkpoint.keep_every=100"])
    assert cfg.checkpoint.keep_every == 100 and RunConfig.from_yaml(cfg.to_yaml()) == cfg
    with pytest.raises(ConfigError, match=r"checkpoint.keep_every=64 is not a multiple of checkpoint.interval=20: "
                                          r"only steps that are multiples of both are saved; use "
                                          r"checkpoint.keep_every=80"):
        RunConfig.load(BIG, ["checkpoint.interval=20", "checkpoint.keep_every=64"])
    with pytest.raises(ConfigError, match=r"checkpoint.keep_last=0 must be >= 1"):
        RunConfig.load(BIG, ["checkpoint.keep_last=0"])
    with pytest.raises(ConfigError, match=r"checkpoint.keep_every=-1 must be >= 0"):
        RunConfig.load(BIG, ["checkpoint.keep_every=-1"])


def test_walltime_margin_is_typed_and_non_negative():
    assert RunConfig.load(BIG, ["trainer.walltime_margin_s=60"]).trainer.walltime_margin_s == 60.0
    with pytest.raises(ConfigError, match=r"trainer.walltime_margin_s=-1.0 must be >= 0"):
        RunConfig.load(BIG, ["trainer.walltime_margin_s=-1"])
