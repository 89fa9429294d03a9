"""How many parameters a config's model has and how many bytes one training checkpoint of it takes (pure
arithmetic, no torch), for ``megatron-lpreg plan`` and the disk budget in docs/slurm.md.

Parameters (megatron's GPT layout of a Qwen decoder, vocabulary padded to ``make_vocab_size_divisible_by x tp``):
``V_p h`` (embedding) ``+ V_p h`` (output layer, unless tied) ``+ h`` (final norm) ``+ L x [2h`` (two RMSNorms)
``+ h (a + 2g) d`` (fused QKV) ``+ (a + 2g) d`` (QKV bias, Qwen2) ``+ 2d`` (q/k norms, Qwen3) ``+ a d h`` (output
projection) ``+ 3 h f]`` (SwiGLU), with ``h`` hidden, ``f`` FFN, ``a`` heads, ``g`` KV groups, ``d`` head_dim.

Checkpoint bytes (the dist checkpoint's tensors; the manifest, RNG files and HF tokenizer files are kilobytes):
``N x (w + [optimizer] x (8 + 4 x [fp32 main params]))``: the weights in ``model.params_dtype`` (``w`` = 2 for
bf16/fp16, 4 for fp32), and with ``checkpoint.save_optimizer`` Adam's two fp32 moments (8 bytes) plus an fp32
copy of the parameters (4 bytes) whenever the optimizer keeps one: mixed precision (bf16/fp16 weights), or the
distributed optimizer, whose ``fully_reshardable`` save writes ``param``, ``exp_avg`` and ``exp_avg_sq`` for every
parameter (megatron/core/optimizer/distrib_optimizer.py, ``sharded_param_state_fully_reshardable``). Measured on
the tiny CPU config (fp32, no distributed optimizer): 1,050,752 parameters, 3 x that many fp32 values saved.
"""
from __future__ import annotations

from dataclasses import dataclass

from megatron_lpreg.config.model import ModelConfig, ParallelConfig
from megatron_lpreg.config.trainer import CheckpointConfig
from megatron_lpreg.models.families import family

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
"""Bytes per element of each ``model.params_dtype``."""


def parameter_count(model: ModelConfig, tp: int = 1) -> int:
    """Parameters of the megatron model (all ranks together), with the vocabulary padded for ``tp``."""
    fam = family(model.arch)
    h, f, d = model.hidden_size, model.ffn_hidden_size, model.head_dim
    a, g, vocab = model.num_attention_heads, model.num_query_groups, model.padded_vocab_size(tp)
    qkv = (a + 2 * g) * d
    layer = 2 * h + h * qkv + a * d * h + 3 * h * f
    layer += qkv if fam.qkv_bias else 0
    layer += 2 * d if fam.qk_layernorm else 0
    embeddings = vocab * h * (1 if model.tie_word_embeddings else 2)
    return embeddings + h + model.num_layers * layer


@dataclass(frozen=True)
class CheckpointSize:
    """One checkpoint's bytes, by part."""

    parameters: int
    weights: int
    """``parameters x bytes(params_dtype)``."""
    main_params: int
    """fp32 copy of the parameters (mixed precision or distributed optimizer; 0 without optimizer state)."""
    adam_moments: int
    """Adam's exp_avg and exp_avg_sq in fp32 (0 without optimizer state)."""

    @property
    def total(self) -> int:
        return self.weights + self.main_params + self.adam_moments

    def line(self) -> str:
        """``checkpoint bytes=<total> (<GB> GB: ...)``, as ``megatron-lpreg plan`` prints it."""
        return (f"checkpoint bytes={self.total} ({human_bytes(self.total)}: {self.parameters:,} parameters; weights "
                f"{human_bytes(self.weights)} + fp32 main params {human_bytes(self.main_params)} + Adam moments "
                f"{human_bytes(self.adam_moments)})")


def human_bytes(count: int) -> str:
    """``458.8 GB``, ``12.6 MB`` (decimal units, as disk quotas are usually given)."""
    for unit, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if count >= size:
            return f"{count / size:.1f} {unit}"
    return f"{count} B"


def checkpoint_size(model: ModelConfig, parallel: ParallelConfig, checkpoint: CheckpointConfig) -> CheckpointSize:
    """Bytes of one checkpoint of this model, layout and checkpoint config (formula in the module docstring)."""
    n = parameter_count(model, parallel.tp)
    width = DTYPE_BYTES[model.params_dtype]
    keeps_main = parallel.use_distributed_optimizer or width < 4
    optimizer = checkpoint.save_optimizer
    return CheckpointSize(parameters=n, weights=n * width, main_params=4 * n if optimizer and keeps_main else 0,
                          adam_moments=8 * n if optimizer else 0)
