"""config/diagnostics.py: the ``diagnostics:`` section of the run config: off by default, strict keys, YAML round
trip, ids checked against the vocabulary and against each other, the old import path still works."""
from __future__ import annotations

import pytest

from megatron_lpreg.config import ConfigError, DiagnosticsConfig, RunConfig

TASK_A_LIKE = {"spark_ids": [5], "noise_ids": [300, 301, 302], "main_ids": [62], "spark_strings": ["wait"],
               "kappa": 0.02}


def test_default_is_off():
    cfg = RunConfig()
    assert cfg.diagnostics == DiagnosticsConfig() and not cfg.diagnostics.enabled
    assert not DiagnosticsConfig(main_ids=[1]).enabled  # main alone names no class to follow
    assert DiagnosticsConfig(noise_strings=["zz"]).enabled


def test_section_round_trips_through_yaml():
    cfg = RunConfig.from_dict({"model": {"vocab_size": 512}, "diagnostics": TASK_A_LIKE})
    assert cfg.diagnostics.spark_ids == [5] and cfg.diagnostics.spark_strings == ["wait"]
    assert RunConfig.from_yaml(cfg.to_yaml()) == cfg
    assert "diagnostics:" in cfg.to_yaml()


def test_overrides_and_unknown_keys():
    cfg = RunConfig.load("configs/tiny_cpu.yaml", ["diagnostics.spark_strings=[wait, however, perhaps]",
                                                   "diagnostics.noise_ids=[7, 8]"])
    assert cfg.diagnostics.spark_strings == ["wait", "however", "perhaps"] and cfg.diagnostics.noise_ids == [7, 8]
    with pytest.raises(ConfigError, match=r"unknown config key 'diagnostics\.spark_id'.*did you mean 'spark_ids'"):
        RunConfig.from_dict({"diagnostics": {"spark_id": [3]}})
    with pytest.raises(ConfigError, match=r"diagnostics\.spark_ids\[0\]='x' must be an integer"):
        RunConfig.from_dict({"diagnostics": {"spark_ids": ["x"]}})


def test_bad_ids_name_the_key_and_the_fix():
    with pytest.raises(ConfigError, match=r"diagnostics\.noise_ids has ids \[512\] outside the vocabulary "
                                          r"\[0, 512\) \(model\.vocab_size\)"):
        RunConfig.from_dict({"model": {"vocab_size": 512}, "diagnostics": {"noise_ids": [3, 512]}})
    with pytest.raises(ConfigError, match=r"diagnostics\.spark_ids has ids \[-1\]"):
        RunConfig.from_dict({"diagnostics": {"spark_ids": [-1]}})
    with pytest.raises(ConfigError, match=r"\[3\] are in both spark_ids and noise_ids; a token has one class"):
        RunConfig.from_dict({"diagnostics": {"spark_ids": [3, 4], "noise_ids": [3]}})
    with pytest.raises(ConfigError, match=r"\[4\] are in both noise_ids and main_ids"):
        RunConfig.from_dict({"diagnostics": {"noise_ids": [4], "main_ids": [4]}})
    with pytest.raises(ConfigError, match=r"diagnostics\.kappa=0\.0 must be in \(0, 1\]"):
        RunConfig.from_dict({"diagnostics": {"kappa": 0.0}})


class _OneTokenPerWord:
    """A tokenizer whose every text is one token (its length), to check overlaps found only after resolution."""

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return [len(text)]


def test_strings_that_resolve_into_another_class_are_refused():
    with pytest.raises(ConfigError, match=r"\[4\] are in both the spark and noise classes \(ids and strings\)"):
        DiagnosticsConfig(spark_strings=["wait"], noise_ids=[4]).resolve(_OneTokenPerWord())
    classes = DiagnosticsConfig(spark_strings=["wait"], noise_ids=[9]).resolve(_OneTokenPerWord())
    assert classes.spark == {4, 5} and classes.noise == {9}  # "wait"/"Wait" -> 4, " wait"/" Wait" -> 5


def test_old_import_path_is_the_same_class():
    from megatron_lpreg.metrics import diagnostics

    assert diagnostics.DiagnosticsConfig is DiagnosticsConfig
