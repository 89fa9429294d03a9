"""In-training evaluation: the TrainingEvaluator gives the eval CLI's numbers (also when DP shards split the
problems), refuses at start an evaluation that would score nothing, and runs inside `megatron-lpreg train`."""
from __future__ import annotations

import dataclasses
import json

import pytest

from megatron_lpreg.config.data import DataConfig, EvalConfig, RewardConfig
from megatron_lpreg.eval import evaluate
from megatron_lpreg.eval.in_training import TrainingEvaluator
from megatron_lpreg.trainer.rollout_step import stop_ids
from tests.data.byte_tokenizer import byte_tokenizer
from tests.eval.table_engine import TableEngine, table
from tests.eval.test_runner import ANSWERS, FIXTURES

BENCHMARKS = ["aime24", "math500", "minerva"]
REWARD = RewardConfig(timeout_s=10.0, num_workers=1)


def _cfg(**changes) -> EvalConfig:
    base = EvalConfig(benchmarks=BENCHMARKS, data_dir=str(FIXTURES), samples=4, temperature=0.6, top_p=0.9,
                      max_new_tokens=64, template="qwen_chat", batch_size=2, interval=1)
    return dataclasses.replace(base, **changes)


def test_same_numbers_as_the_eval_cli_also_split_over_shards(tmp_path):
    tok = byte_tokenizer()
    cli = evaluate(TableEngine(tok, table(ANSWERS)), tok, BENCHMARKS, _cfg(), tmp_path, reward_cfg=REWARD, seed=7)
    expected = {**cli.metrics(), **{f"eval/{r.name}/num_problems": r.num_problems for r in cli.benchmarks}}
    evaluator = TrainingEvaluator(_cfg(), DataConfig(), REWARD, tok)
    engine = TableEngine(tok, table(ANSWERS))
    one = evaluator.evaluate(3, engine.generate, seed=7)
    assert one == {"step": 3, **expected} and one["eval/math500/num_problems"] == 4
    sampled = [p for _, p in engine.calls if p.n > 1]
    assert sampled and all((p.temperature, p.top_p, p.n) == (0.6, 0.9, 4) for p in sampled)
    assert all(p.stop_token_ids == tuple(stop_ids(tok)) for _, p in engine.calls)  # one stop-token rule
    # two "DP ranks" (threads): each generates its half; the gather exchanges the halves (an all-gather)
    import threading

    barrier = threading.Barrier(2)
    box: dict[tuple[int, int], list] = {}
    calls = [0, 0]

    def run(index: int, results: dict) -> None:
        def gather(graded: list) -> list[list]:
            calls[index] += 1
            box[(calls[index], index)] = graded
            barrier.wait()
            return [box[(calls[index], 0)], box[(calls[index], 1)]]
        results[index] = evaluator.evaluate(3, TableEngine(tok, table(ANSWERS)).generate, seed=7,
                                            shard=(index, 2), gather=gather)

    results: dict[int, dict] = {}
    threads = [threading.Thread(target=run, args=(i, results)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert results == {0: one, 1: one}
    with pytest.raises(ValueError, match="needs a gather"):
        evaluator.evaluate(3, engine.generate, seed=7, shard=(0, 2))


def test_training_samples_gives_the_authors_validation():
    """eval.training_samples=1: AIME sampled once at eval.temperature (the authors' validation), the rest greedy;
    eval.samples (16 for eval-array) is left for the evaluations after training."""
    tok = byte_tokenizer()
    engine = TableEngine(tok, table(ANSWERS))
    evaluator = TrainingEvaluator(_cfg(samples=16, training_samples=1), DataConfig(), REWARD, tok)
    result = evaluator.evaluate(8, engine.generate, seed=7)
    aime = [p for _, p in engine.calls if p.temperature == 0.6]
    greedy = [p for _, p in engine.calls if p.temperature != 0.6]
    assert aime and all((p.n, p.top_p) == (1, 0.9) for p in aime)
    assert greedy and all(p.n == 1 and p.top_k == 1 for p in greedy)
    assert "eval/aime24/avg@1" in result and "eval/aime24/avg@16" not in result
    assert evaluator.cfg.samples == 1
    assert TrainingEvaluator(_cfg(samples=16), DataConfig(), REWARD, tok).cfg.samples == 16  # 0 = eval.samples


def test_an_eval_that_scores_nothing_is_refused_at_start(tmp_path):
    tok = byte_tokenizer()
    (tmp_path / "math500.jsonl").write_text("")
    with pytest.raises(ValueError, match="math500.jsonl: no rows"):
        TrainingEvaluator(_cfg(benchmarks=["math500"], data_dir=str(tmp_path)), DataConfig(), REWARD, tok)
    with pytest.raises(ValueError, match=r"\['synthetic'\] hold no problem"):
        TrainingEvaluator(_cfg(benchmarks=["synthetic"]), DataConfig(heldout_size=0), REWARD, tok)
    with pytest.raises(FileNotFoundError, match="aime24"):
        TrainingEvaluator(_cfg(benchmarks=["aime24"], data_dir=str(tmp_path / "nowhere")), DataConfig(), REWARD, tok)
    assert not TrainingEvaluator(_cfg(benchmarks=[]), DataConfig(), REWARD, tok).enabled


@pytest.mark.slow
def test_train_scores_the_math500_file_during_training(tmp_path, capsys):
    from megatron_lpreg.cli import main as cli_main

    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps({"problem": f"{a}+{a}=", "answer": str(2 * a)}) + "\n" for a in range(8)))
    out = tmp_path / "run"
    common = ["configs/tiny_cpu.yaml", f"data.source={train}", "data.template=plain", "eval.benchmarks=[math500]",
              "trainer.max_steps=1", "rollout.prompts_per_step=2", "rollout.n=2", "eval.max_new_tokens=4",
              "reward.name=math"]
    assert cli_main(["train", *common, f"eval.data_dir={FIXTURES}", "eval.interval=1",
                     f"trainer.output_dir={out}"]) == 0
    rows = [json.loads(line) for line in (out / "eval.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1]
    assert all(r["eval/math500/num_problems"] == 4 and 0.0 <= r["eval/math500/accuracy"] <= 1.0 for r in rows)
    # the authors' schedule: no evaluation before training (the last step is still evaluated)
    late = tmp_path / "late"
    assert cli_main(["train", *common, f"eval.data_dir={FIXTURES}", "eval.interval=8", "eval.before_training=false",
                     f"trainer.output_dir={late}"]) == 0
    assert [json.loads(line)["step"] for line in (late / "eval.jsonl").read_text().splitlines()] == [1]
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "math500.jsonl").write_text("")
    assert cli_main(["train", *common, f"eval.data_dir={empty}", f"trainer.output_dir={tmp_path / 'run2'}"]) != 0
    assert "math500.jsonl: no rows" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["qwen2.5-32b_lpreg_64gpu.yaml", "qwen3-14b_lpreg_64gpu.yaml",
                                  "qwen3-14b_grpo_64gpu.yaml", "qwen3-14b_forking_80_20_64gpu.yaml",
                                  "qwen3-14b_lpreg_offpolicy_64gpu.yaml"])
def test_paper_configs_use_the_authors_validation_and_save_schedule(name):
    """Every 8 steps, none before training, AIME sampled once at T=0.6 (the rest greedy); saved every 64 steps;
    avg@16 left for the evaluation after training. The configs say so in comments."""
    from pathlib import Path

    from megatron_lpreg.config import RunConfig

    path = Path(__file__).resolve().parents[2] / "configs" / name
    cfg = RunConfig.load(path)
    assert (cfg.eval.interval, cfg.eval.before_training, cfg.eval.training_samples) == (8, False, 1)
    assert (cfg.eval.temperature, cfg.eval.samples, cfg.checkpoint.interval) == (0.6, 16, 64)
    base = path.parent / ("qwen2.5-32b_lpreg_64gpu.yaml" if "32b" in name else "qwen3-14b_lpreg_64gpu.yaml")
    text = base.read_text()
    assert "the authors' validation schedule" in text and "the authors' save interval" in text
