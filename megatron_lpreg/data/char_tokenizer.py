"""A character-level tokenizer for the synthetic task (no files, no training): 26 symbols.

Ids: 0 ``<pad>``, 1 ``<s>``, 2 ``</s>``, then ``0-9``, ``+ * - = %`` and the characters of ``\\boxed{}``.
Enough for ``"37+48="`` -> ``"\\boxed{85}</s>"``; any other character is an error.
"""
from __future__ import annotations

from collections.abc import Sequence

SPECIALS = ("<pad>", "<s>", "</s>")
CHARS = "0123456789+*-=%\\boxed{}"


class CharTokenizer:
    """Minimal tokenizer with the methods the data, reward and eval code use (encode, decode, ids)."""

    def __init__(self) -> None:
        symbols = list(SPECIALS) + sorted(set(CHARS), key=CHARS.index)
        self._to_id = {s: i for i, s in enumerate(symbols)}
        self._to_str = symbols
        self.pad_token_id, self.bos_token_id, self.eos_token_id = 0, 1, 2
        self.eos_token = "</s>"
        self.chat_template = None

    @property
    def vocab_size(self) -> int:
        return len(self._to_str)

    def get_vocab(self) -> dict[str, int]:
        return dict(self._to_id)

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Ids of ``text`` (with a leading ``<s>`` when ``add_special_tokens``).

        Raises:
            ValueError: a character outside the vocabulary.
        """
        unknown = sorted({c for c in text if c not in self._to_id})
        if unknown:
            raise ValueError(f"CharTokenizer cannot encode characters {unknown}; vocabulary is {CHARS!r}")
        ids = [self._to_id[c] for c in text]
        return [self.bos_token_id, *ids] if add_special_tokens else ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        """Text of ``ids``; specials are dropped when ``skip_special_tokens``."""
        specials = len(SPECIALS)
        return "".join(self._to_str[i] for i in ids if not (skip_special_tokens and i < specials))
