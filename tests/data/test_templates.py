"""Chat templates and tokenizer glue (HF tokenizer with and without a chat template, char-level tokenizer)."""
from __future__ import annotations

import pytest

from megatron_lpreg.data.char_tokenizer import CharTokenizer
from megatron_lpreg.data.templates import ZERO_TEMPLATE, decode, encode, render, stop_token_ids
from tests.data.byte_tokenizer import byte_tokenizer


def test_qwen_chat_uses_the_tokenizers_template():
    tok = byte_tokenizer()
    text = render("qwen_chat", "What is 2+3?", tokenizer=tok, instruction="Box it.")
    assert text == "<|im_start|>user\nWhat is 2+3?\n\nBox it.<|im_end|>\n<|im_start|>assistant\n"
    ids = encode(tok, text)
    assert ids[0] == tok.convert_tokens_to_ids("<|im_start|>") and decode(tok, ids).startswith("user\nWhat")


def test_qwen_chat_fallback_and_messages():
    tok = byte_tokenizer(chat_template=False)
    messages = (("system", "S"), ("user", "U"))
    assert render("qwen_chat", "ignored", messages, tokenizer=tok) == (
        "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nU<|im_end|>\n<|im_start|>assistant\n"
    )


def test_zero_and_plain():
    zero = render("zero", "1+1?")
    assert zero == ZERO_TEMPLATE.format(problem="1+1?")
    assert zero.endswith("User: 1+1?\nAssistant: <think>") and "\\boxed{}" in zero
    assert render("plain", "37+48=") == "37+48="
    with pytest.raises(ValueError, match="data.template='chatml'"):
        render("chatml", "x")


def test_char_tokenizer_round_trip_and_stops():
    tok = CharTokenizer()
    ids = tok.encode("37+48=\\boxed{85}")
    assert tok.vocab_size == 26 and len(ids) == 16
    assert tok.decode(ids + [tok.eos_token_id], skip_special_tokens=True) == "37+48=\\boxed{85}"
    assert encode(tok, "12") == [4, 5]
    assert stop_token_ids(tok) == [2]
    with pytest.raises(ValueError, match="cannot encode characters \\['a'\\]"):
        tok.encode("a")
    hf = byte_tokenizer()
    assert stop_token_ids(hf) == [hf.convert_tokens_to_ids("<|im_end|>"), hf.convert_tokens_to_ids("<|endoftext|>")]


# The Lp-Reg authors' zero_temp (CarlanLark/Lp-Reg-dev @33b27e2, verl/utils/dataset/rl_dataset.py line 79), written
# out here independently of the module so a drift in either copy fails.
AUTHORS_ZERO_TEMP = "A conversation between User and Assistant. The user asks a question, and the Assistant solves it. The assistant first thinks about the reasoning process in the mind and then provides the user with the answer. The reasoning process and answer are enclosed within <think> </think> and <answer> </answer> tags, respectively, i.e., <think> reasoning process here </think> <answer> answer here </answer>. User: {prompt}.\nAssistant: Let me solve this step by step.\n<think>"  # noqa: E501


def test_lpreg_zero_is_the_authors_template_verbatim():
    from megatron_lpreg.data.templates import LPREG_ZERO_TEMPLATE

    assert LPREG_ZERO_TEMPLATE == AUTHORS_ZERO_TEMP
    problem = "Find $x$ if $2x = 6$"
    assert render("lpreg_zero", problem) == AUTHORS_ZERO_TEMP.format(prompt=problem)
    # verl rows: the authors take the last message's content (not the system message, not our instruction)
    messages = (("system", "S"), ("user", problem))
    assert render("lpreg_zero", "ignored", messages, instruction="Box it.") == AUTHORS_ZERO_TEMP.format(prompt=problem)
    assert render("lpreg_zero", "1+1").endswith("User: 1+1.\nAssistant: Let me solve this step by step.\n<think>")
    # the older project template differs (kept for existing runs)
    assert render("zero", problem) != render("lpreg_zero", problem)



def test_prompt_cli_prints_exactly_the_trainer_prompt(tmp_path, capsys):
    from megatron_lpreg.cli import main
    from megatron_lpreg.config import RunConfig
    from megatron_lpreg.data.cli_prompt import prompt_text

    problem = "What is $3 \\times 4$?"
    assert main(["prompt", "configs/qwen3-14b_lpreg_64gpu.yaml", "--problem", problem]) == 0
    out = capsys.readouterr().out
    assert out == AUTHORS_ZERO_TEMP.format(prompt=problem)
    assert main(["prompt", "configs/tiny_cpu.yaml", "data.template=plain", "--problem", problem]) == 0
    assert capsys.readouterr().out == problem
    cfg = RunConfig.load("configs/tiny_cpu.yaml",
                         ["data.template=qwen_chat", "data.instruction=Box it.", "model.hf_path="])
    # a verl row carries its own messages, so the plain-problem instruction is not appended (as in training)
    assert prompt_text(cfg, "U") == "<|im_start|>user\nU<|im_end|>\n<|im_start|>assistant\n"
    assert main(["prompt", "configs/tiny_cpu.yaml", "data.template=bogus", "--problem", "x"]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and "data.template" in captured.err


def test_paper_configs_train_and_evaluate_with_the_authors_prompt():
    from megatron_lpreg.config import RunConfig

    for path in ("configs/qwen2.5-32b_lpreg_64gpu.yaml", "configs/qwen3-14b_lpreg_64gpu.yaml"):
        cfg = RunConfig.load(path)
        assert cfg.data.template == "lpreg_zero" and cfg.eval.template in ("data", "lpreg_zero")
