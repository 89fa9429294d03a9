"""A tiny random Qwen2/Qwen3 checkpoint in Hugging Face format, made offline and deterministically in seconds.

Tests, the demo and benchmarks need a real HF model directory (``config.json`` + safetensors + tokenizer with a
chat template) without any hub access. :func:`make_tiny_model` writes one:

- ``config.json`` in the layout of the published Qwen2.5 / Qwen3 configs (``rope_theta`` at the top level, so
  transformers 4.x and 5.x and vLLM all read it), plus ``generation_config.json``;
- weights drawn from a ``torch.Generator`` seeded with ``seed``, one tensor at a time in sorted-name order, so
  the bytes depend only on the seed and shapes (not on the transformers version's init code);
- a byte-level BPE tokenizer trained with ``tokenizers`` on a small built-in corpus, with the special tokens
  ``<|endoftext|>`` (pad), ``<|im_start|>``, ``<|im_end|>`` (eos) appended after the BPE vocabulary (as Qwen
  does) and a Qwen2.5-style ChatML chat template.

The model vocabulary (``vocab_size``) may exceed the tokenizer's length, as in the real Qwen checkpoints.
The output directory is written atomically: a temp dir next to it, then a rename.
"""
from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Literal

import torch

from megatron_lpreg.config.model import ModelConfig
from megatron_lpreg.models import hf_dir
from megatron_lpreg.models.families import FAMILIES, family, hf_config_json
from megatron_lpreg.models.mappings import mapping_table

logger = logging.getLogger(__name__)

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
"""Appended after the BPE vocabulary in this order (ids n, n+1, n+2), as in Qwen2.5."""
PAD_TOKEN, EOS_TOKEN = "<|endoftext|>", "<|im_end|>"
_TIED_BY_DEFAULT = {"qwen2": False, "qwen3": True}
"""Default ``tie_word_embeddings`` per arch: one tied and one untied tiny model cover both code paths."""
DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."

# Qwen2-style ChatML template (system / user / assistant turns, optional generation prompt). Written for this
# project; it accepts messages whose content is a string.
CHAT_TEMPLATE = (
    "{%- if messages and messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>system\\n" + DEFAULT_SYSTEM_PROMPT + "<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if not (loop.first and message['role'] == 'system') %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

# The pre-tokenization split used by Qwen2's tokenizer (contractions, letter runs, single digits, punctuation
# runs, newlines, whitespace); a published regular expression, reproduced as a fact.
_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

_CORPUS = """\
Question: What is 37 + 48? Answer: 37 + 48 = 85, so the answer is \\boxed{85}.
Question: Compute 12 * 7. Answer: 12 * 7 = 84. The final answer is \\boxed{84}.
Let x be a real number such that 2x + 3 = 11. Then 2x = 8 and x = 4, hence \\boxed{4}.
The sum of the first n positive integers is n(n+1)/2; for n = 10 it is 55.
A triangle with sides 3, 4 and 5 is a right triangle because 9 + 16 = 25.
If f(x) = x^2 - 5x + 6, then f(x) = (x - 2)(x - 3) and the roots are 2 and 3.
The probability of rolling two sixes with two fair dice is 1/36.
Please reason step by step, and put your final answer within \\boxed{}.
You are a helpful assistant. The user asks a question and the assistant answers it.
The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs.
Reinforcement learning from verifiable rewards trains a policy with a group of sampled answers per prompt.
The derivative of sin(x) is cos(x), and the integral of 1/x is ln|x| + C.
Prime numbers below thirty: 2, 3, 5, 7, 11, 13, 17, 19, 23, 29.
def add(a, b):\n    return a + b\n\nprint(add(2, 3))\n
Tokens, logits, probabilities and entropy: low-probability tokens keep exploration alive.
"""


def _param_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """HF parameter names -> shapes: the names are the ones the mapping table expects for ``cfg`` (so the family's
    QKV bias / QK-norm and tying decide them), the shapes follow from the last two name components."""
    h, d, f, v = cfg.hidden_size, cfg.head_dim, cfg.ffn_hidden_size, cfg.vocab_size
    q_out, kv_out = cfg.num_attention_heads * d, cfg.num_query_groups * d
    shape_of = {
        "embed_tokens.weight": (v, h), "lm_head.weight": (v, h), "norm.weight": (h,),
        "input_layernorm.weight": (h,), "post_attention_layernorm.weight": (h,),
        "q_proj.weight": (q_out, h), "k_proj.weight": (kv_out, h), "v_proj.weight": (kv_out, h),
        "o_proj.weight": (h, q_out), "q_proj.bias": (q_out,), "k_proj.bias": (kv_out,), "v_proj.bias": (kv_out,),
        "q_norm.weight": (d,), "k_norm.weight": (d,),
        "gate_proj.weight": (f, h), "up_proj.weight": (f, h), "down_proj.weight": (h, f),
    }
    table = mapping_table(cfg.arch, tie_word_embeddings=cfg.tie_word_embeddings)
    return {name: shape_of[".".join(name.split(".")[-2:])] for name in table.expected_hf_names(cfg.num_layers)}


def _random_tensor(name: str, size: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    """Draw one parameter. Scales keep activations O(1) so logits are far from uniform (parity tests bite).

    Norm weights are 1 + N(0, 0.1); biases N(0, 0.1); matrices and embeddings N(0, 1/hidden-or-fan_in), which
    gives logits of std ~1 whether or not the embedding doubles as the output layer.
    """
    if name.endswith("norm.weight"):
        return 1.0 + 0.1 * torch.randn(size, generator=gen, dtype=torch.float32)
    if name.endswith(".bias"):
        return 0.1 * torch.randn(size, generator=gen, dtype=torch.float32)
    return torch.randn(size, generator=gen, dtype=torch.float32) / size[-1] ** 0.5


def _write_weights(out: Path, cfg: ModelConfig, seed: int, num_shards: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    dtype = getattr(torch, cfg.params_dtype)
    tensors = {name: _random_tensor(name, size, gen).to(dtype) for name, size in sorted(_param_shapes(cfg).items())}
    names = list(tensors)
    if num_shards == 1:
        hf_dir.write_safetensors_file(tensors, out / "model.safetensors")
        return
    # Round-robin over sorted names so each shard holds some of every layer, as real multi-shard checkpoints do.
    weight_map, total = {}, 0
    for k in range(num_shards):
        file = f"model-{k + 1:05d}-of-{num_shards:05d}.safetensors"
        part = {n: tensors[n] for n in names[k::num_shards]}
        hf_dir.write_safetensors_file(part, out / file)
        weight_map.update(dict.fromkeys(part, file))
        total += sum(t.numel() * t.element_size() for t in part.values())
    hf_dir.write_index(out, weight_map, total)


def _train_tokenizer(bpe_vocab_size: int):
    """Byte-level BPE trained on the built-in corpus; the special tokens are appended after it."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_SPLIT_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=bpe_vocab_size, min_frequency=1, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=[],
    )
    tok.train_from_iterator([line for line in _CORPUS.splitlines() if line] * 4, trainer=trainer)
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    return tok


def _write_tokenizer(out: Path, vocab_size: int) -> dict[str, int]:
    """Train and save the tokenizer (+ chat template); return the special token ids."""
    from transformers import PreTrainedTokenizerFast

    tok = _train_tokenizer(min(vocab_size - len(SPECIAL_TOKENS), 4096))
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token=EOS_TOKEN, pad_token=PAD_TOKEN,
        additional_special_tokens=[t for t in SPECIAL_TOKENS if t not in (EOS_TOKEN, PAD_TOKEN)],
        model_max_length=131072, clean_up_tokenization_spaces=False,
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(str(out))
    # Some loaders read the template only from tokenizer_config.json, others from chat_template.jinja: write both.
    cfg_path = out / "tokenizer_config.json"
    cfg = hf_dir.read_config(cfg_path)
    cfg.update(chat_template=CHAT_TEMPLATE, tokenizer_class="PreTrainedTokenizerFast", bos_token=None)
    hf_dir.write_config(out, cfg, cfg_path.name)
    (out / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    ids = {t: tok.token_to_id(t) for t in SPECIAL_TOKENS}
    if max(ids.values()) >= vocab_size:
        raise ValueError(f"vocab_size={vocab_size} is smaller than the tokenizer ({max(ids.values()) + 1} tokens)")
    return ids


def make_tiny_model(
    out_dir: str | os.PathLike,
    arch: Literal["qwen2", "qwen3"] = "qwen2",
    *,
    seed: int = 0,
    vocab_size: int = 1000,
    num_layers: int = 2,
    hidden_size: int = 64,
    num_attention_heads: int = 4,
    num_kv_heads: int = 2,
    head_dim: int | None = None,
    ffn_hidden_size: int = 128,
    max_position_embeddings: int = 2048,
    rope_theta: float = 1000000.0,
    rms_norm_eps: float = 1e-6,
    tie_word_embeddings: bool | None = None,
    dtype: Literal["float32", "bfloat16"] = "float32",
    num_shards: int = 1,
    overwrite: bool = False,
) -> Path:
    """Write a tiny random HF Qwen2/Qwen3 checkpoint to ``out_dir`` (atomically) and return its path.

    Args:
        out_dir: target directory; must not exist unless ``overwrite``.
        arch: "qwen2" (QKV bias, head_dim = hidden/heads) or "qwen3" (q/k RMSNorm, no QKV bias).
        seed: weights are a pure function of (seed, shapes, dtype); the tokenizer does not depend on it.
        vocab_size: embedding rows; not required to be a multiple of 128. At least 300 (256 bytes + merges +
            3 special tokens must fit).
        num_layers, hidden_size, num_attention_heads, num_kv_heads, ffn_hidden_size: architecture.
        head_dim: per-head size; default hidden/heads for qwen2 and 2*hidden/heads for qwen3 (so the Qwen3
            path with head_dim != hidden/heads is exercised by default). Qwen2 requires hidden/heads.
        max_position_embeddings, rope_theta, rms_norm_eps: as in ``config.json``.
        tie_word_embeddings: default False for qwen2, True for qwen3 (covers both code paths).
        dtype: stored weight dtype.
        num_shards: > 1 writes ``model-0000k-of-0000n.safetensors`` files plus an index, like real checkpoints.
        overwrite: replace an existing ``out_dir``.

    Returns:
        The resolved output path.

    Raises:
        ValueError: for an unknown arch, inconsistent head counts or too small a vocabulary.
        FileExistsError: if ``out_dir`` exists and ``overwrite`` is false.
    """
    if arch not in FAMILIES:
        raise ValueError(f"arch={arch!r} is not supported; use one of {sorted(FAMILIES)}")
    fam = family(arch)
    if vocab_size < 300:
        raise ValueError(f"vocab_size={vocab_size} must be >= 300 (256 byte tokens + merges + 3 special tokens)")
    if num_attention_heads % num_kv_heads:
        raise ValueError(f"num_kv_heads={num_kv_heads} must divide num_attention_heads={num_attention_heads}")
    if hidden_size % num_attention_heads:
        raise ValueError(f"num_attention_heads={num_attention_heads} must divide hidden_size={hidden_size}")
    if head_dim is None:  # a family with its own head_dim gets one != hidden/heads, so that path is exercised
        head_dim = hidden_size // num_attention_heads * (2 if fam.explicit_head_dim else 1)
    if not fam.explicit_head_dim and head_dim != hidden_size // num_attention_heads:
        raise ValueError(f"head_dim={head_dim}: {arch} needs head_dim = hidden_size / num_attention_heads")
    if num_shards < 1:
        raise ValueError(f"num_shards={num_shards} must be >= 1")
    if tie_word_embeddings is None:
        tie_word_embeddings = _TIED_BY_DEFAULT[arch]
    cfg = ModelConfig(
        arch=arch, vocab_size=vocab_size, hidden_size=hidden_size, num_layers=num_layers,
        num_attention_heads=num_attention_heads, num_query_groups=num_kv_heads, head_dim=head_dim,
        ffn_hidden_size=ffn_hidden_size, max_position_embeddings=max_position_embeddings, rope_theta=rope_theta,
        rms_norm_eps=rms_norm_eps, tie_word_embeddings=tie_word_embeddings, params_dtype=dtype,
    )
    out = Path(out_dir).resolve()
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists; pass overwrite=True (--overwrite) or choose another --out")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        special_ids = _write_tokenizer(tmp, vocab_size)
        token_ids = {"bos_token_id": special_ids[PAD_TOKEN], "eos_token_id": special_ids[EOS_TOKEN],
                     "pad_token_id": special_ids[PAD_TOKEN]}
        hf_dir.write_config(tmp, hf_config_json(cfg, token_ids=token_ids))
        generation = {
            "bos_token_id": special_ids[PAD_TOKEN], "eos_token_id": [special_ids[EOS_TOKEN], special_ids[PAD_TOKEN]],
            "pad_token_id": special_ids[PAD_TOKEN], "do_sample": True, "temperature": 1.0, "top_p": 1.0,
        }
        hf_dir.write_config(tmp, generation, hf_dir.GENERATION_CONFIG_FILE)
        _write_weights(tmp, cfg, seed, num_shards)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("wrote tiny %s model to %s (vocab %d, %d layers)", arch, out, vocab_size, num_layers)
    return out
