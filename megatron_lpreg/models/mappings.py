"""Declarative Hugging Face <-> megatron-core weight mappings for the Qwen family.

A mapping table is data: a tuple of :class:`Mapping` rows, each pairing one megatron-core parameter name
pattern with the HF name pattern(s) it is made of, plus a typed :class:`Fuse` transform and the tensor-parallel
split dim. ``*`` in a pattern is the *global* (0-based) transformer layer index. One base table serves every Qwen
model; Qwen2/2.5 and Qwen3 are :class:`Delta` rows added to / removed from it (never code), and so are the two
model-level options (tied embeddings, Transformer Engine's fused pre-norms).

This module also owns the pure per-shard tensor transforms, one tensor-parallel rank at a time:

* ``Fuse.QKV``: megatron stores q, k, v as one column-parallel ``linear_qkv`` whose rows are grouped per KV group:
  ``[q heads of group 0 (nq/ng heads), k of group 0, v of group 0, q heads of group 1, ...]``, each head
  ``head_dim`` rows. A TP rank holds ``ng/tp`` whole groups, so the HF q, k and v are each split by rows into
  ``tp`` contiguous chunks first and then interleaved per group.
* ``Fuse.GATE_UP``: SwiGLU ``linear_fc1`` is ``[gate; up]`` *per TP rank* (rank r holds ``[gate_r; up_r]``), so
  gate and up are each split over TP before concatenation (the full fc1 is not ``cat(gate, up)`` chunked).
* Vocab rows (embedding, output layer) are zero-padded to Megatron's padded vocab before the TP split and
  trimmed after the gather.

TP split dims: column-parallel weights (qkv, fc1, embedding, output layer) split dim 0 (rows), row-parallel
weights (attention proj, fc2) split dim 1; norms are replicated (``tp_dim=None``).

Shape legend: H hidden, F ffn hidden, nq query heads, ng KV groups, d head_dim, V vocab, Vp padded vocab,
tp tensor-parallel size.
"""
from __future__ import annotations

import enum
import fnmatch
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import NamedTuple

import torch

from megatron_lpreg.models.families import FAMILIES

LAYER = "*"


class Fuse(enum.Enum):
    """How the HF tensors of one row combine into one megatron tensor (per TP rank)."""

    NONE = "none"
    """One HF tensor is one megatron tensor."""
    QKV = "qkv"
    """HF (q, k, v) interleaved per KV group (weights and biases)."""
    GATE_UP = "gate_up"
    """HF (gate, up) concatenated per TP rank into SwiGLU ``linear_fc1``."""


@dataclass(frozen=True)
class Mapping:
    """One row: a megatron parameter and the HF tensors it is made of."""

    mcore: str
    """megatron-core parameter name (unwrapped GPTModel, ``*`` = global layer index)."""
    hf: tuple[str, ...]
    """HF tensor names in Fuse order (``*`` = global layer index)."""
    tp_dim: int | None
    """Dim of every HF tensor (and of the megatron parameter) split over TP ranks; None = replicated."""
    fuse: Fuse = Fuse.NONE
    """How the HF tensors combine."""
    vocab: bool = False
    """Dim 0 is the vocabulary: zero-pad to the padded vocab on import, trim on export."""
    tied: bool = False
    """A copy of a tensor another row owns (tied output layer on the last PP stage): loaded, never exported."""

    @property
    def per_layer(self) -> bool:
        return LAYER in self.mcore

    def hf_names(self, layer: int | None) -> tuple[str, ...]:
        """HF names of this row for global ``layer`` (ignored for non-layer rows)."""
        return tuple(n.replace(LAYER, str(layer)) if self.per_layer else n for n in self.hf)


@dataclass(frozen=True)
class Delta:
    """Rows added to / removed from a table (removal by megatron name pattern, applied first)."""

    add: tuple[Mapping, ...] = ()
    remove: tuple[str, ...] = ()


def _row(mcore: str, hf: str | tuple[str, ...], tp_dim: int | None, **kw) -> Mapping:
    return Mapping(mcore=mcore, hf=(hf,) if isinstance(hf, str) else hf, tp_dim=tp_dim, **kw)


_L = "decoder.layers.*."
_H = "model.layers.*."

QWEN_BASE: tuple[Mapping, ...] = (
    _row("embedding.word_embeddings.weight", "model.embed_tokens.weight", 0, vocab=True),
    _row(_L + "input_layernorm.weight", _H + "input_layernorm.weight", None),
    _row(_L + "self_attention.linear_qkv.weight",
         (_H + "self_attn.q_proj.weight", _H + "self_attn.k_proj.weight", _H + "self_attn.v_proj.weight"),
         0, fuse=Fuse.QKV),
    _row(_L + "self_attention.linear_proj.weight", _H + "self_attn.o_proj.weight", 1),
    _row(_L + "pre_mlp_layernorm.weight", _H + "post_attention_layernorm.weight", None),
    _row(_L + "mlp.linear_fc1.weight", (_H + "mlp.gate_proj.weight", _H + "mlp.up_proj.weight"), 0,
         fuse=Fuse.GATE_UP),
    _row(_L + "mlp.linear_fc2.weight", _H + "mlp.down_proj.weight", 1),
    _row("decoder.final_layernorm.weight", "model.norm.weight", None),
    _row("output_layer.weight", "lm_head.weight", 0, vocab=True),
)
"""Shared by every Qwen decoder: embeddings, pre-norms, GQA attention, SwiGLU MLP, final norm, untied head."""

QKV_BIAS = Delta(add=(
    _row(_L + "self_attention.linear_qkv.bias",
         (_H + "self_attn.q_proj.bias", _H + "self_attn.k_proj.bias", _H + "self_attn.v_proj.bias"),
         0, fuse=Fuse.QKV),
))
"""Biases on q/k/v (``QwenFamily.qkv_bias``: Qwen2/2.5)."""

QK_LAYERNORM = Delta(add=(
    _row(_L + "self_attention.q_layernorm.weight", _H + "self_attn.q_norm.weight", None),
    _row(_L + "self_attention.k_layernorm.weight", _H + "self_attn.k_norm.weight", None),
))
"""Per-head q/k RMSNorm (``QwenFamily.qk_layernorm``: Qwen3)."""

FAMILY_DELTAS: dict[str, Delta] = {
    arch: Delta(add=(QKV_BIAS.add if fam.qkv_bias else ()) + (QK_LAYERNORM.add if fam.qk_layernorm else ()))
    for arch, fam in FAMILIES.items()
}
"""Per-family differences, selected by the family facts (``models/families.py``): Qwen2/2.5 add the QKV bias,
Qwen3 adds per-head q/k RMSNorm."""

TIED_EMBEDDINGS = Delta(
    remove=("output_layer.weight",),
    add=(_row("output_layer.weight", "model.embed_tokens.weight", 0, vocab=True, tied=True),),
)
"""Tied embeddings: HF has no lm_head; megatron's last PP stage (when PP > 1) keeps a copy of the embedding."""

TE_FUSED_NORMS = Delta(
    remove=(_L + "input_layernorm.weight", _L + "pre_mlp_layernorm.weight"),
    add=(
        _row(_L + "self_attention.linear_qkv.layer_norm_weight", _H + "input_layernorm.weight", None),
        _row(_L + "mlp.linear_fc1.layer_norm_weight", _H + "post_attention_layernorm.weight", None),
    ),
)
"""Transformer Engine spec: the pre-attention/pre-MLP RMSNorms live inside the fused LayerNorm-Linear modules."""

IGNORED_HF: tuple[str, ...] = ("model.layers.*.self_attn.rotary_emb.inv_freq", "model.rotary_emb.inv_freq")
"""HF names that may appear in checkpoints but carry no weights (recomputed buffers)."""

TIED_IGNORED_HF: tuple[str, ...] = ("lm_head.weight",)
"""Some tied checkpoints still store lm_head; with tied embeddings it is a copy and is skipped."""


def _apply(rows: tuple[Mapping, ...], delta: Delta) -> tuple[Mapping, ...]:
    unknown = [r for r in delta.remove if r not in {m.mcore for m in rows}]
    if unknown:
        raise ValueError(f"mapping delta removes rows that are not in the table: {unknown}")
    kept = tuple(m for m in rows if m.mcore not in delta.remove)
    clash = {m.mcore for m in kept} & {m.mcore for m in delta.add}
    if clash:
        raise ValueError(f"mapping delta adds rows already in the table: {sorted(clash)}")
    return kept + delta.add


def _pattern_regex(pattern: str) -> re.Pattern[str]:
    return re.compile("^" + re.escape(pattern).replace(re.escape(LAYER), r"(\d+)") + "$")


class Resolved(NamedTuple):
    """A concrete megatron name resolved against a table row."""

    row: Mapping
    layer: int | None


@dataclass(frozen=True)
class MappingTable:
    """The resolved table for one model: family rows plus model options."""

    name: str
    rows: tuple[Mapping, ...]
    ignored_hf: tuple[str, ...] = IGNORED_HF
    _regexes: tuple[re.Pattern[str], ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_regexes", tuple(_pattern_regex(r.mcore) for r in self.rows))

    def resolve(self, mcore_name: str) -> Resolved | None:
        """Row and global layer index for a megatron name with a *global* layer index; None if unmapped."""
        for row, regex in zip(self.rows, self._regexes):
            match = regex.match(mcore_name)
            if match:
                return Resolved(row, int(match.group(1)) if row.per_layer else None)
        return None

    def expected_hf_names(self, num_layers: int) -> set[str]:
        """Every HF tensor name a full checkpoint of this model must hold (tied copies included once)."""
        names: set[str] = set()
        for row in self.rows:
            for layer in range(num_layers) if row.per_layer else [None]:
                names.update(row.hf_names(layer))
        return names

    def is_ignored(self, hf_name: str) -> bool:
        return any(fnmatch.fnmatchcase(hf_name, pat) for pat in self.ignored_hf)

    def describe(self) -> str:
        """Plain-text rendering, one row per line (docs, debugging)."""
        lines = [f"mapping table {self.name}: {len(self.rows)} rows"]
        for row in self.rows:
            split = "replicated" if row.tp_dim is None else f"tp dim {row.tp_dim}"
            flags = "".join([" vocab-padded" if row.vocab else "", " tied-copy" if row.tied else ""])
            lines.append(f"  {row.mcore:<52} <- {row.fuse.value:<7} {', '.join(row.hf)}  [{split}{flags}]")
        if self.ignored_hf:
            lines.append(f"  ignored HF names: {', '.join(self.ignored_hf)}")
        return "\n".join(lines)


def mapping_table(arch: str, *, tie_word_embeddings: bool, fused_norms: bool = False) -> MappingTable:
    """The table for ``arch`` (``qwen2`` or ``qwen3``) with the model options applied.

    Args:
        arch: model family; ``model.arch`` in the config.
        tie_word_embeddings: HF ``tie_word_embeddings``.
        fused_norms: True for Transformer Engine layer specs (norm weights inside ``linear_qkv``/``linear_fc1``).

    Raises:
        ValueError: for an unknown ``arch``.
    """
    if arch not in FAMILY_DELTAS:
        raise ValueError(f"model.arch={arch!r} has no weight mapping; supported: {sorted(FAMILY_DELTAS)}")
    rows = _apply(QWEN_BASE, FAMILY_DELTAS[arch])
    ignored = IGNORED_HF
    if tie_word_embeddings:
        rows = _apply(rows, TIED_EMBEDDINGS)
        ignored = ignored + TIED_IGNORED_HF
    if fused_norms:
        rows = _apply(rows, TE_FUSED_NORMS)
    name = arch + (" tied" if tie_word_embeddings else "") + (" te" if fused_norms else "")
    return MappingTable(name=name, rows=rows, ignored_hf=ignored)


# ---------------------------------------------------------------------------------------------------------------
# Pure per-shard transforms.


class HeadDims(NamedTuple):
    """What the QKV transform needs to know about attention shapes (full model, not per rank)."""

    num_attention_heads: int
    num_query_groups: int
    head_dim: int


def shard_bounds(full_len: int, tp_rank: int, tp_size: int) -> tuple[int, int]:
    """Half-open ``[start, stop)`` of rank ``tp_rank``'s even share of ``full_len`` (which tp_size must divide)."""
    if full_len % tp_size:
        raise ValueError(f"cannot split a dim of size {full_len} evenly over tensor-parallel size {tp_size}")
    step = full_len // tp_size
    return tp_rank * step, (tp_rank + 1) * step


ReadRows = Callable[[str, int, int, int], torch.Tensor]
"""``read(hf_name, dim, start, stop)``: the slice ``[start, stop)`` of an HF tensor along ``dim``."""


def fuse_shard(row: Mapping, parts: list[torch.Tensor], heads: HeadDims, tp_size: int) -> torch.Tensor:
    """Combine one TP rank's slices of the HF tensors (already split along ``row.tp_dim``) into its megatron shard.

    Args:
        parts: slices in ``row.hf`` order; for QKV, q is ``[nq/tp*d, ...]`` and k, v are ``[ng/tp*d, ...]``.
    """
    if row.fuse is Fuse.NONE:
        (only,) = parts
        return only
    if row.fuse is Fuse.GATE_UP:
        return torch.cat(parts, dim=0)
    q, k, v = parts
    groups = heads.num_query_groups // tp_size
    rest = q.shape[1:]
    grouped = [t.reshape(groups, -1, *rest) for t in (q, k, v)]
    return torch.cat(grouped, dim=1).reshape(-1, *rest)


def split_shard(row: Mapping, shard: torch.Tensor, heads: HeadDims, tp_size: int) -> list[torch.Tensor]:
    """Inverse of :func:`fuse_shard`: one rank's megatron shard -> its slices of the HF tensors (views)."""
    if row.fuse is Fuse.NONE:
        return [shard]
    if row.fuse is Fuse.GATE_UP:
        return list(torch.chunk(shard, 2, dim=0))
    groups = heads.num_query_groups // tp_size
    q_rows = heads.num_attention_heads // heads.num_query_groups * heads.head_dim
    rest = shard.shape[1:]
    grouped = shard.reshape(groups, q_rows + 2 * heads.head_dim, *rest)
    q, k, v = torch.split(grouped, [q_rows, heads.head_dim, heads.head_dim], dim=1)
    return [t.reshape(-1, *rest) for t in (q, k, v)]


def hf_shape_along(row: Mapping, part: int, full_lens: list[int], padded_vocab: int | None) -> int:
    """Length of HF part ``part`` along the split dim as megatron sees it (padded vocab for vocab rows)."""
    if row.vocab:
        if padded_vocab is None:
            raise ValueError(f"{row.mcore}: a vocab row needs the padded vocab size")
        return padded_vocab
    return full_lens[part]


def read_shard(
    row: Mapping, layer: int | None, read: ReadRows, full_lens: list[int], heads: HeadDims,
    tp_rank: int, tp_size: int, padded_vocab: int | None = None,
) -> torch.Tensor:
    """Build rank ``tp_rank``'s megatron shard of ``row`` reading only the HF rows/columns it needs.

    Args:
        read: reads a slice of an HF tensor (lazy file access or a dict in tests).
        full_lens: length of each HF part along ``row.tp_dim`` (ignored when replicated).
        padded_vocab: Megatron's padded vocab (vocab rows only); rows past the HF vocab become zeros.

    Returns:
        The shard, e.g. ``[(nq+2ng)/tp*d, H]`` for QKV weights, ``[Vp/tp, H]`` for the embedding.
    """
    names = row.hf_names(layer)
    if row.tp_dim is None:
        return fuse_shard(row, [read(n, 0, 0, full_lens[i]) for i, n in enumerate(names)], heads, tp_size)
    parts = []
    for i, name in enumerate(names):
        start, stop = shard_bounds(hf_shape_along(row, i, full_lens, padded_vocab), tp_rank, tp_size)
        have = min(stop, full_lens[i])
        part = read(name, row.tp_dim, start, have) if have > start else None
        if have < stop:  # vocab padding rows: zeros, as megatron initialises them
            ref = part if part is not None else read(name, row.tp_dim, 0, 1)
            pad_shape = list(ref.shape)
            pad_shape[row.tp_dim] = stop - max(have, start)
            pad = torch.zeros(pad_shape, dtype=ref.dtype)
            part = pad if part is None else torch.cat([part, pad], dim=row.tp_dim)
        parts.append(part)
    return fuse_shard(row, parts, heads, tp_size)


def merge_shards(
    row: Mapping, layer: int | None, shards: list[torch.Tensor], heads: HeadDims, vocab_size: int | None = None,
) -> list[tuple[str, torch.Tensor]]:
    """Inverse of :func:`read_shard` over all TP ranks: ``shards[r]`` is rank r's shard; returns full HF tensors.

    Replicated rows take ``shards[0]``. Vocab rows are trimmed to ``vocab_size`` rows. The results may be views
    of ``shards`` (always for a single shard): copy before handing them to code that outlives the shards.
    """
    names = row.hf_names(layer)
    if row.tp_dim is None:
        return list(zip(names, split_shard(row, shards[0], heads, 1)))
    tp_size = len(shards)
    per_rank = [split_shard(row, s, heads, tp_size) for s in shards]
    out = []
    for i, name in enumerate(names):
        pieces = [parts[i] for parts in per_rank]
        full = pieces[0] if tp_size == 1 else torch.cat(pieces, dim=row.tp_dim)  # TP1: no copy of a big tensor
        if row.vocab:
            if vocab_size is None:
                raise ValueError(f"{row.mcore}: a vocab row needs vocab_size to trim the padding")
            full = full.narrow(row.tp_dim, 0, vocab_size)
        out.append((name, full.contiguous()))
    return out
