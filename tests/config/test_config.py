"""The config tree: strict loading, dotted overrides, YAML round trip for every shipped config, validation."""
from __future__ import annotations

from pathlib import Path

import pytest

from megatron_lpreg.config import ConfigError, RunConfig
from megatron_lpreg.config.base import parse_override

REPO = Path(__file__).resolve().parents[2]
CONFIG_FILES = sorted(p for p in (REPO / "configs").rglob("*.yaml")
                      if "sweeps" not in p.parts and "model" not in p.parts)


@pytest.mark.parametrize("path", CONFIG_FILES, ids=lambda p: str(p.relative_to(REPO)))
def test_every_shipped_config_round_trips(path):
    cfg = RunConfig.load(path)
    assert RunConfig.from_yaml(cfg.to_yaml()) == cfg


def test_unknown_key_names_path_and_closest_key():
    with pytest.raises(ConfigError, match=r"unknown config key 'algo\.rhoo'.*did you mean 'rho'"):
        RunConfig.from_dict({"algo": {"rhoo": 0.1}})
    with pytest.raises(ConfigError, match=r"unknown config key 'trainr'"):
        RunConfig.from_dict({"trainr": {}})


def test_bad_values_name_the_key():
    with pytest.raises(ConfigError, match=r"algo\.name='ppo2' is not allowed"):
        RunConfig.from_dict({"algo": {"name": "ppo2"}})
    with pytest.raises(ConfigError, match=r"trainer\.max_steps='ten' must be an integer"):
        RunConfig.from_dict({"trainer": {"max_steps": "ten"}})
    with pytest.raises(ConfigError, match=r"algo\.kappa=0\.0 must be in \(0, 1\]"):
        RunConfig.from_dict({"algo": {"kappa": 0.0}})


def test_dotted_overrides_are_typed(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("algo:\n  rho: 0.005\n")
    cfg = RunConfig.load(path, ["algo.rho=0.01", "trainer.max_steps=3", "model.tie_word_embeddings=true",
                                "eval.benchmarks=[aime24, math500]"])
    assert cfg.algo.rho == 0.01 and cfg.trainer.max_steps == 3 and cfg.model.tie_word_embeddings is True
    assert cfg.eval.benchmarks == ["aime24", "math500"]
    assert parse_override("a.b=x=y") == ("a.b", "x=y")
    assert RunConfig.load(path, ["optimizer.lr=1e-6"]).optimizer.lr == 1e-6  # YAML reads 1e-6 as a string
    with pytest.raises(ConfigError, match="must look like dotted.key=value"):
        RunConfig.load(path, ["algo.rho"])
    with pytest.raises(ConfigError, match="unknown config key 'algo.roh'"):
        RunConfig.load(path, ["algo.roh=1"])


def test_tp_must_divide_heads_and_pp_not_exceed_layers():
    with pytest.raises(ConfigError, match=r"parallel\.tp=3 must divide model\.num_attention_heads=4; use one of"):
        RunConfig.from_dict({"parallel": {"tp": 3}})
    with pytest.raises(ConfigError, match=r"parallel\.tp=4 must divide model\.num_query_groups=2"):
        RunConfig.from_dict({"parallel": {"tp": 4}})
    with pytest.raises(ConfigError, match=r"parallel\.pp=4 .* model\.num_layers=2"):
        RunConfig.from_dict({"parallel": {"pp": 4}})


def test_base_chain_and_cycle(tmp_path):
    (tmp_path / "a.yaml").write_text("base: b.yaml\nalgo:\n  rho: 0.5\n")
    (tmp_path / "b.yaml").write_text("algo:\n  rho: 0.1\n  kappa: 0.5\n")
    cfg = RunConfig.load(tmp_path / "a.yaml")
    assert (cfg.algo.rho, cfg.algo.kappa) == (0.5, 0.5)
    (tmp_path / "b.yaml").write_text("base: a.yaml\n")
    with pytest.raises(ConfigError, match="cycle"):
        RunConfig.load(tmp_path / "a.yaml")


def test_save_writes_resolved_yaml(tmp_path):
    cfg = RunConfig.from_dict({"algo": {"rho": 0.02}})
    cfg.save(tmp_path / "run" / "config.yaml")
    assert RunConfig.from_yaml((tmp_path / "run" / "config.yaml").read_text()) == cfg
