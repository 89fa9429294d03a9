"""Uneven pipeline stages: the even-as-possible default split, explicit first/last stage counts, a 3-layer model
converted at TP2 x PP2 ([2, 1] layers) and back bit-exactly, and a training step at PP2 on it."""
from __future__ import annotations

import json

import pytest

from megatron_lpreg.config.base import ConfigError
from megatron_lpreg.config.model import ModelConfig, ParallelConfig, pipeline_layers, uneven_pipeline_fields
from tests.models.test_convert import assert_same, hf_to_mcore, mcore_to_hf, tensors
from tests.support.tiny import tiny_model_dir


@pytest.mark.parametrize("layers,pp,vpp,split", [
    (3, 2, 1, [2, 1]), (28, 8, 1, [2, 4, 4, 4, 4, 4, 4, 2]), (36, 8, 1, [3, 5, 5, 5, 5, 5, 5, 3]),
    (40, 3, 1, [14, 13, 13]), (64, 2, 1, [32, 32]), (28, 3, 2, [10, 10, 8]), (9, 8, 1, [2, 1, 1, 1, 1, 1, 1, 1]),
])
def test_default_split_is_even_as_possible(layers, pp, vpp, split):
    parallel = ParallelConfig(pp=pp, vpp=vpp)
    assert pipeline_layers(layers, parallel) == split and sum(split) == layers
    fields = uneven_pipeline_fields(layers, parallel)
    if len(set(split)) == 1:
        assert fields == {"num_layers_in_first_pipeline_stage": None, "num_layers_in_last_pipeline_stage": None}
    else:
        assert (fields["num_layers_in_first_pipeline_stage"], fields["num_layers_in_last_pipeline_stage"]) == (
            split[0], split[-1])


def test_explicit_first_and_last_stage_counts():
    assert pipeline_layers(64, ParallelConfig(pp=4, num_layers_in_last_pipeline_stage=10)) == [18, 18, 18, 10]
    assert pipeline_layers(28, ParallelConfig(pp=3, num_layers_in_first_pipeline_stage=8,
                                              num_layers_in_last_pipeline_stage=8)) == [8, 12, 8]
    with pytest.raises(ConfigError, match="cannot share the remaining 55 layers"):
        pipeline_layers(64, ParallelConfig(pp=3, num_layers_in_first_pipeline_stage=9))
    with pytest.raises(ConfigError, match="need parallel.pp >= 2"):
        ParallelConfig(num_layers_in_last_pipeline_stage=3).validate()
    with pytest.raises(ConfigError, match="multiples of vpp"):
        pipeline_layers(28, ParallelConfig(pp=2, vpp=2, num_layers_in_first_pipeline_stage=15))
    base = ModelConfig(num_layers=3, hidden_size=64, num_attention_heads=4, num_query_groups=2, head_dim=16,
                       ffn_hidden_size=128, vocab_size=1000)
    base.validate(ParallelConfig(pp=2))  # 3 layers at PP2 used to be refused


@pytest.mark.slow
@pytest.mark.parametrize("split", [[], ["--last-stage-layers", "2"]])  # default [2, 1]; explicit [1, 2]
def test_three_layers_convert_at_tp2_pp2_and_back_bit_exact(split, tmp_path, capsys):
    src = tiny_model_dir("qwen2", num_layers=3)
    mcore, back = tmp_path / "mcore", tmp_path / "back"
    assert hf_to_mcore(["--hf", str(src), "--out", str(mcore), "--tp", "2", "--pp", "2", *split]) == 0
    assert mcore_to_hf(["--mcore", str(mcore), "--out", str(back)]) == 0
    assert_same(tensors(src), tensors(back))
    assert json.loads((back / "config.json").read_text())["num_hidden_layers"] == 3
    bad = ["--hf", str(src), "--out", str(tmp_path / "bad"), "--pp", "2", "--first-stage-layers", "3"]
    assert hf_to_mcore(bad) == 2 and "cannot share the remaining 0 layers" in capsys.readouterr().err


@pytest.mark.slow
def test_training_step_at_pp2_on_three_layers(tmp_path):
    from megatron_lpreg.cli import main as cli_main

    src = tiny_model_dir("qwen2", num_layers=3)
    out = tmp_path / "run"
    code = cli_main(["train", "configs/tiny_cpu.yaml", f"model.hf_path={src}", "model.num_layers=3",
                     "model.vocab_size=1000", "model.hidden_size=64", "model.ffn_hidden_size=128",
                     "model.num_attention_heads=4", "model.num_query_groups=2", "model.head_dim=16",
                     "model.tie_word_embeddings=false", "parallel.tp=1", "parallel.pp=2", "trainer.max_steps=1",
                     "rollout.prompts_per_step=2", "rollout.n=2", "eval.benchmarks=[]",
                     f"trainer.output_dir={out}"])
    assert code == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 1 and rows[0]["actor/skipped"] == 0.0
