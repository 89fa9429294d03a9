"""``megatron-lpreg prompt CONFIG [key=value ...] --problem TEXT``: print the exact prompt text the trainer feeds.

The problem goes through the same path as a training row: a verl-layout record whose only (user) message is
TEXT, read by :func:`megatron_lpreg.data.sources.records_from_rows` and rendered by
:func:`megatron_lpreg.data.dataset.to_prompts` with ``data.template`` / ``data.instruction``. Only the prompt text
goes to stdout (no trailing newline added); diagnostics go to stderr.
"""
from __future__ import annotations

import argparse
import logging
import sys
from typing import Any

from megatron_lpreg.config import ConfigError, RunConfig

logger = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="run config YAML")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. data.template=zero")
    parser.add_argument("--problem", required=True, help="the user message of the dataset row")


def prompt_text(cfg: RunConfig, problem: str, tokenizer: Any = None) -> str:
    """The prompt text the trainer builds for a dataset row whose user message is ``problem``.

    Args:
        cfg: the run config (``data.template``, ``data.instruction``).
        problem: the row's user message.
        tokenizer: needed for ``qwen_chat`` (its chat template); None = the ChatML layout written out.
    """
    from megatron_lpreg.data.dataset import to_prompts
    from megatron_lpreg.data.sources import records_from_rows

    row = {"prompt": [{"role": "user", "content": problem}], "reward_model": {"ground_truth": "0"},
           "data_source": "prompt-cli"}
    records = records_from_rows([row], "<--problem>")
    return to_prompts(records, _TextOnly(tokenizer), template=cfg.data.template,
                      instruction=cfg.data.instruction)[0].text


class _TextOnly:
    """Wraps a tokenizer (or None) for :func:`to_prompts`: its chat template is used, tokenization is skipped."""

    def __init__(self, tokenizer: Any) -> None:
        self._tokenizer = tokenizer
        self.chat_template = getattr(tokenizer, "chat_template", None)

    def apply_chat_template(self, *args: Any, **kwargs: Any) -> Any:
        return self._tokenizer.apply_chat_template(*args, **kwargs)

    def encode(self, text: str, **kwargs: Any) -> list[int]:
        return []


def _tokenizer_for(cfg: RunConfig) -> Any:
    """The model's tokenizer when the template depends on it (qwen_chat), else None."""
    if cfg.data.template != "qwen_chat" or not cfg.model.hf_path:
        return None
    from pathlib import Path

    if not Path(cfg.model.hf_path).is_dir():
        raise FileNotFoundError(f"data.template=qwen_chat renders with the tokenizer's chat template, but "
                                f"model.hf_path={cfg.model.hf_path!r} is not a directory")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(cfg.model.hf_path)


def run(args: argparse.Namespace) -> int:
    try:
        cfg = RunConfig.load(args.config, list(args.overrides))
        text = prompt_text(cfg, args.problem, _tokenizer_for(cfg))
    except (ConfigError, FileNotFoundError, ValueError) as exc:
        print(f"megatron-lpreg prompt: {exc}", file=sys.stderr)
        return 2
    sys.stdout.write(text)
    sys.stdout.flush()
    return 0
