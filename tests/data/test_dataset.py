"""The prompt dataset: synthetic split, length filtering with counts, epochs, and cursor resume."""
from __future__ import annotations

import json

import pytest

from megatron_lpreg.config.data import DataConfig
from megatron_lpreg.data import CharTokenizer, PromptDataset, build_dataset
from megatron_lpreg.data.records import Prompt
from tests.data.byte_tokenizer import byte_tokenizer


def _prompts(n: int) -> list[Prompt]:
    return [Prompt(id=str(i), token_ids=[i], text=str(i), ground_truth="0", data_source="t") for i in range(n)]


def test_synthetic_split_is_fixed_and_disjoint():
    cfg = DataConfig(heldout_size=400, dev_size=200)
    a = build_dataset(cfg, CharTokenizer(), seed=1)
    b = build_dataset(cfg, byte_tokenizer(), seed=2)  # another tokenizer and run seed: same problems held out
    held = {p.id for p in a.heldout()}
    assert held == {p.id for p in b.heldout()} and len(held) == 400 and len(a.dev()) == 200
    train_ids = {p.id for p in a.next_batch(len(a))}
    assert len(train_ids) == len(a) == 10_000 - 600
    assert not train_ids & held and not train_ids & {p.id for p in a.dev()}
    p = a.heldout()[0]
    x, y = p.problem[:-1].split("+")
    assert len(x) == len(y) == 2 and p.ground_truth == str(int(x) + int(y)) and p.text == p.problem
    assert CharTokenizer().decode(p.token_ids) == p.problem
    assert a.stats.kept == 9400 and a.stats.heldout == 400


def test_length_filter_counts(tmp_path):
    path = tmp_path / "p.jsonl"
    rows = [{"problem": "x" * n, "answer": "1"} for n in (3, 10, 4, 50)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    ds = build_dataset(DataConfig(source=str(path), max_prompt_tokens=5, shuffle=False), byte_tokenizer(), seed=0)
    assert (ds.stats.loaded, ds.stats.kept, ds.stats.too_long) == (4, 2, 2)
    assert [p.problem for p in ds.next_batch(2)] == ["xxx", "xxxx"]
    with pytest.raises(ValueError, match="empty"):
        build_dataset(DataConfig(source=str(path), max_prompt_tokens=2), byte_tokenizer(), seed=0)


def test_verl_parquet_with_chat_template(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"data_source": "d", "prompt": [{"role": "user", "content": f"q{i}"}],
             "reward_model": {"ground_truth": str(i)}} for i in range(3)]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "t.parquet")
    tok = byte_tokenizer()
    ds = build_dataset(DataConfig(source=str(tmp_path / "t.parquet"), template="qwen_chat", shuffle=False), tok, seed=0)
    first = ds.next_batch(1)[0]
    assert first.text == "<|im_start|>user\nq0<|im_end|>\n<|im_start|>assistant\n"
    assert first.token_ids == tok.encode(first.text, add_special_tokens=False)
    assert (first.ground_truth, first.data_source, first.id) == ("0", "d", "t:0")


def test_epochs_reshuffle_and_cover_everything():
    ds = PromptDataset(_prompts(5), seed=3)
    epoch0 = [p.id for p in ds.next_batch(5)]
    epoch1 = [p.id for p in ds.next_batch(5)]
    assert sorted(epoch0) == sorted(epoch1) == [str(i) for i in range(5)]
    assert epoch0 != epoch1 and ds.epoch == 1
    wrap = PromptDataset(_prompts(5), seed=3)
    assert [p.id for p in wrap.next_batch(7)] == epoch0 + epoch1[:2]
    in_order = PromptDataset(_prompts(5), seed=3, shuffle=False).next_batch(6)
    assert [p.id for p in in_order] == ["0", "1", "2", "3", "4", "0"]


def test_cursor_resume_equals_uninterrupted_order():
    full = PromptDataset(_prompts(7), seed=11)
    reference = [p.id for p in full.next_batch(3 * 4 + 5)]
    first = PromptDataset(_prompts(7), seed=11)
    drawn = [p.id for _ in range(4) for p in first.next_batch(3)]
    state = json.loads(json.dumps(first.state_dict()))  # survives a JSON checkpoint
    resumed = PromptDataset(_prompts(7), seed=11)
    resumed.load_state_dict(state)
    drawn += [p.id for p in resumed.next_batch(5)]
    assert drawn == reference


def test_cursor_refuses_other_data():
    state = PromptDataset(_prompts(7), seed=11).state_dict()
    with pytest.raises(ValueError, match="saved size=7"):
        PromptDataset(_prompts(6), seed=11).load_state_dict(state)
    with pytest.raises(ValueError, match="saved seed=11"):
        PromptDataset(_prompts(7), seed=12).load_state_dict(state)


def test_bad_config_and_source():
    with pytest.raises(ValueError, match="synthetic:subtraction"):
        build_dataset(DataConfig(source="synthetic:subtraction"), CharTokenizer(), seed=0)
    with pytest.raises(FileNotFoundError, match="nope.parquet"):
        build_dataset(DataConfig(source="/nope.parquet"), CharTokenizer(), seed=0)
    with pytest.raises(ValueError, match="data.max_prompt_tokens=0"):
        build_dataset(DataConfig(max_prompt_tokens=0), CharTokenizer(), seed=0)
