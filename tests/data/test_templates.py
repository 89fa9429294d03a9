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
