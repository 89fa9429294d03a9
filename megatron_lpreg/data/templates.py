"""Prompt templates (``data.template``) and tokenizer glue that works with any tokenizer.

- ``qwen_chat``: the tokenizer's own chat template (``apply_chat_template``, generation prompt added) when it has
  one, otherwise the Qwen2.5 ChatML layout written out here (no default system message is injected).
- ``lpreg_zero``: the Lp-Reg authors' plain-text "zero" prompt, verbatim (their ``RLHFDataset.zero_temp``, on by
  default in their code, used for training and validation): the problem is the *last* chat message's content (verl
  rows) or the problem text, followed by a period, and the prompt ends with
  ``Assistant: Let me solve this step by step.\n<think>``. It asks for ``<answer> </answer>`` tags, not
  ``\\boxed{}``; the authors' grader and ours both read the last ``\\boxed{}`` all the same.
- ``zero``: this project's own R1-Zero style prompt (kept for existing runs; not the authors' text): different
  wording, no period after the problem, asks for the final answer in ``\\boxed{}`` and ends with
  ``Assistant: <think>``.
- ``plain``: the problem text as is.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

TEMPLATES = ("qwen_chat", "lpreg_zero", "zero", "plain")

LPREG_ZERO_TEMPLATE = (
    "A conversation between User and Assistant. The user asks a question, and the Assistant solves it. The "
    "assistant first thinks about the reasoning process in the mind and then provides the user with the answer. "
    "The reasoning process and answer are enclosed within <think> </think> and <answer> </answer> tags, "
    "respectively, i.e., <think> reasoning process here </think> <answer> answer here </answer>. "
    "User: {prompt}.\nAssistant: Let me solve this step by step.\n<think>"
)
"""The authors' ``zero_temp`` (CarlanLark/Lp-Reg-dev @33b27e2, verl/utils/dataset/rl_dataset.py), character for
character."""

ZERO_TEMPLATE = (
    "A conversation between a User and an Assistant. The User poses a math problem. The Assistant first thinks "
    "it through step by step inside <think> </think> tags, then states the final answer inside \\boxed{{}}.\n"
    "User: {problem}\nAssistant: <think>"
)


def encode(tokenizer: Any, text: str) -> list[int]:
    """Token ids of ``text`` without added special tokens, for HF tokenizers and simple ``encode(text)`` ones.

    Raises:
        TypeError: the tokenizer has neither ``encode`` nor ``__call__``.
    """
    if hasattr(tokenizer, "encode"):
        try:
            ids = tokenizer.encode(text, add_special_tokens=False)
        except TypeError:  # a minimal tokenizer whose encode takes only the text
            ids = tokenizer.encode(text)
    elif callable(tokenizer):
        ids = tokenizer(text)
    else:
        raise TypeError(f"tokenizer {type(tokenizer).__name__} has no encode(text) method")
    if not isinstance(ids, (list, tuple)) and hasattr(ids, "__getitem__"):  # BatchEncoding / dict
        ids = ids["input_ids"]
    return [int(i) for i in ids]


def _chatml(messages: Sequence[tuple[str, str]]) -> str:
    body = "".join(f"<|im_start|>{role}\n{content}<|im_end|>\n" for role, content in messages)
    return body + "<|im_start|>assistant\n"


def render(template: str, problem: str, messages: Sequence[tuple[str, str]] = (), *, tokenizer: Any = None,
           instruction: str = "") -> str:
    """The prompt text for one problem.

    Args:
        template: one of :data:`TEMPLATES`.
        problem: the problem text (used by ``zero`` and ``plain``, and by ``qwen_chat`` / ``lpreg_zero`` when
            ``messages`` is empty).
        messages: a full chat (verl layout) as (role, content) pairs; used as is by ``qwen_chat``; ``lpreg_zero``
            takes the last message's content, as the authors do.
        tokenizer: its ``apply_chat_template`` is used for ``qwen_chat`` when it has a chat template.
        instruction: appended to a plain problem (after a blank line) for ``qwen_chat``; '' = none.

    Raises:
        ValueError: unknown template.
    """
    if template == "plain":
        return problem
    if template == "zero":
        return ZERO_TEMPLATE.format(problem=problem)
    if template == "lpreg_zero":
        return LPREG_ZERO_TEMPLATE.format(prompt=messages[-1][1] if messages else problem)
    if template != "qwen_chat":
        raise ValueError(f"data.template={template!r} is not known; choose one of {list(TEMPLATES)}")
    if not messages:
        messages = (("user", f"{problem}\n\n{instruction}" if instruction else problem),)
    if getattr(tokenizer, "chat_template", None) and hasattr(tokenizer, "apply_chat_template"):
        text = tokenizer.apply_chat_template(
            [{"role": role, "content": content} for role, content in messages],
            tokenize=False, add_generation_prompt=True,
        )
        if isinstance(text, str):
            return text
        # some versions return a BatchEncoding/list even for tokenize=False; fall back to our rendering
    return _chatml(messages)


def stop_token_ids(tokenizer: Any) -> list[int]:
    """End-of-response ids: the tokenizer's EOS plus ``<|im_end|>`` / ``<|endoftext|>`` when it knows them."""
    ids: list[int] = []
    eos = getattr(tokenizer, "eos_token_id", None)
    if isinstance(eos, int):
        ids.append(eos)
    vocab = tokenizer.get_vocab() if hasattr(tokenizer, "get_vocab") else {}
    for token in ("<|im_end|>", "<|endoftext|>"):
        if token in vocab and vocab[token] not in ids:
            ids.append(int(vocab[token]))
    return ids


def decode(tokenizer: Any, ids: Sequence[int]) -> str:
    """Text of ``ids`` without special tokens (for any tokenizer with ``decode``)."""
    try:
        return tokenizer.decode(list(ids), skip_special_tokens=True)
    except TypeError:
        return tokenizer.decode(list(ids))
