"""Task A (docs/study.md): carries, the disjoint split, the token layout of each strategy and the reward."""
from __future__ import annotations

import random

import pytest
import torch

from megatron_lpreg.study.task_a import (
    EASY,
    HARD,
    MEDIUM,
    N_NOISE,
    Problem,
    TaskATokens,
    carries,
    difficulty,
    split_task_a,
)


def test_carries_and_levels():
    assert carries(123, 456) == 0 and difficulty(123, 456) == EASY
    assert carries(158, 237) == 1 and difficulty(158, 237) == MEDIUM
    assert carries(199, 101) == 2 and difficulty(199, 101) == HARD
    assert carries(999, 999) == 3


def test_split_is_disjoint_sized_and_stable():
    split = split_task_a(0)
    assert len(split.heldout[EASY]) == len(split.heldout[HARD]) == 200
    assert all(p.level == level for level in (EASY, HARD) for p in split.heldout[level])
    held = {p for v in split.heldout.values() for p in v}
    dev = {p for v in split.dev.values() for p in v}
    train = {p for v in split.train.values() for p in v}
    assert not held & train and not dev & train and not held & dev
    assert len(held) + len(dev) + len(train) == 900 * 900
    assert split_task_a(0).heldout[HARD][:5] == split.heldout[HARD][:5] != split_task_a(1).heldout[HARD][:5]
    drawn = split.sample_train(random.Random(0), 4000)
    share = {level: sum(p.level == level for p in drawn) / len(drawn) for level in (EASY, MEDIUM, HARD)}
    assert share[EASY] == pytest.approx(0.5, abs=0.03) and share[HARD] == pytest.approx(0.3, abs=0.03)


@pytest.fixture(scope="module")
def task_tokens(tiny_qwen2):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_qwen2)
    return TaskATokens(tokenizer, tokenizer.convert_tokens_to_ids("<|im_end|>"))


def test_strategies_decode_and_score(task_tokens):
    tokens, problem, rng = task_tokens, Problem(478, 365), random.Random(0)
    decode = tokens.tokenizer.decode
    assert decode(tokens.prompt(problem)) == "478+365="
    direct = tokens.target(problem, "direct", rng)
    assert len(direct) == 8 and decode(direct, skip_special_tokens=True) == "\\boxed{843}"
    pad = tokens.scratchpad(problem)
    assert decode(pad, skip_special_tokens=True) == "#8+5=13;7+6+1=14;4+3+1=8;\\boxed{843}"
    assert tokens.strategy_of(pad[0]) == "spark" and tokens.reward(pad, problem) == 1.0
    assert len(set(tokens.noise)) == N_NOISE and tokens.spark not in tokens.noise
    assert not set(tokens.noise) & set(tokens.prompt(problem) + pad)
    harmless, harmful = (tokens.target(problem, s, rng) for s in ("harmless", "harmful"))
    assert tokens.strategy_of(harmless[0]) == "harmless" and tokens.reward(harmless, problem) == 1.0
    assert tokens.strategy_of(harmful[0]) == "harmful" and tokens.reward(harmful, problem) == 0.0


def test_injected_column_errors_propagate_to_the_answer(task_tokens):
    rng = random.Random(3)
    problems = [Problem(a, b) for a, b in zip(range(100, 900, 7), range(150, 950, 7))]
    scores = [task_tokens.reward(task_tokens.scratchpad(p, rng, 0.15), p) for p in problems]
    accuracy = sum(scores) / len(scores)
    assert 0.85 ** 3 - 0.12 < accuracy < 0.85 ** 3 + 0.12  # three columns, each wrong with p = 0.15


def test_prompt_files_are_readable_by_the_trainer(tmp_path):
    from megatron_lpreg.data.sources import read_rows, records_from_rows
    from megatron_lpreg.study.task_a import TRAIN_FILE_SIZE, write_prompt_files

    split = split_task_a(0)
    paths = write_prompt_files(tmp_path, split)
    train = records_from_rows(read_rows(paths["train"]), paths["train"])
    hard = records_from_rows(read_rows(paths["heldout_hard"]), paths["heldout_hard"])
    assert len(train) == TRAIN_FILE_SIZE and len(hard) == 200
    assert hard[0].problem == f"{split.heldout[HARD][0].a}+{split.heldout[HARD][0].b}="
    assert hard[0].ground_truth == split.heldout[HARD][0].answer
    held = {r.problem for r in hard}
    assert not held & {r.problem for r in train}


def test_warm_start_batches_keep_the_mix_and_mask_the_spark_on_continuation_rows(task_tokens):
    from megatron_lpreg.study.task_a import warm_start_mix
    from megatron_lpreg.study.warmstart import _batch

    problems = split_task_a(0).sample_train(random.Random(1), 400)
    ids, mask = _batch(task_tokens, problems, random.Random(2), warm_start_mix(0.2))
    first = ids[:, 8]  # prompts are 8 tokens
    assert bool((mask[:, 8] == 1).all())
    assert float((first == task_tokens.spark).float().mean()) == pytest.approx(0.05, abs=0.03)
    ids, mask = _batch(task_tokens, problems, random.Random(2), warm_start_mix(0.2), continuation_share=0.5)
    spark_rows = ids[:, 8] == task_tokens.spark
    assert 0.4 < float(spark_rows.float().mean()) < 0.65
    trained_first = spark_rows & (mask[:, 8] == 1)  # first-token targets still follow the 0.05 mix
    assert float(trained_first.sum() / (mask[:, 8] == 1).sum()) == pytest.approx(0.05, abs=0.04)
    assert bool((mask[spark_rows, 9] == 1).all())  # the scratchpad after the spark is trained


def test_direct_answers_shown_only_on_problems_within_the_carry_limit(task_tokens):
    """Warm-start attempts 2-4: direct (and harmless-noise) answers only on carry-free sums; the first-token mix and
    the scratchpad rows are unchanged. Attempt 4's rows keep their problem and train only the first token (the
    strategy stays independent of the problem); attempt 2's took a carry-free problem instead."""
    from megatron_lpreg.study.task_a import carries, warm_start_mix
    from megatron_lpreg.study.warmstart import _batch

    split = split_task_a(0)
    problems = split.sample_train(random.Random(1), 400)
    pool = [p for level in split.train.values() for p in level[:2000] if carries(p.a, p.b) == 0]
    free, free_mask = _batch(task_tokens, problems, random.Random(2), warm_start_mix(0.2))

    def sums(ids):
        return [carries(int(task_tokens.tokenizer.decode(r[:3])), int(task_tokens.tokenizer.decode(r[4:7])))
                for r in ids]

    for resample in (True, False):
        ids, mask = _batch(task_tokens, problems, random.Random(2), warm_start_mix(0.2), 0.0, 0,
                           pool if resample else [])
        assert [task_tokens.strategy_of(t) for t in ids[:, 8].tolist()] == [task_tokens.strategy_of(t) for t in
                                                                            free[:, 8].tolist()]  # row by row
        assert bool((mask[:, 8] == 1).all())  # every row trains its strategy token
        direct = (ids[:, 8] == task_tokens.ids["\\"]) | torch.isin(ids[:, 8], torch.tensor(task_tokens.harmless))
        answered = direct & (mask[:, 9:].sum(1) > 0)  # direct rows whose answer is trained
        assert all(c == 0 for c, a in zip(sums(ids), answered.tolist()) if a)
        assert any(c >= 2 for c, d in zip(sums(ids), direct.tolist()) if not d)  # scratchpads keep them
        moved = [c >= 2 for c, d in zip(sums(free), direct.tolist()) if d]
        assert any(moved)  # rows that the limit really changed
        if resample:
            assert bool(answered.eq(direct).all())
        else:
            assert torch.equal(ids, free)  # the same problems and tokens; only the loss mask differs
            assert int((direct & ~answered).sum()) == sum(moved) + sum(  # medium rows too (1 carry > 0)
                c == 1 for c, d in zip(sums(free), direct.tolist()) if d)


def test_study_config_diagnostics_name_task_a_s_tokens(task_tokens):
    """configs/study_task_a.yaml lists the spark, main and noise ids by number; they must be TaskATokens' own."""
    from megatron_lpreg.config import RunConfig
    from megatron_lpreg.study.warmstart import STUDY_CONFIG

    diag = RunConfig.load(str(STUDY_CONFIG)).diagnostics
    assert diag.spark_ids == [task_tokens.spark] and diag.main_ids == [task_tokens.ids["\\"]]
    assert sorted(diag.noise_ids) == sorted(task_tokens.noise)
