"""Model architecture and parallelism configs."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from megatron_lpreg.config.base import ConfigError


@dataclass(kw_only=True)
class ModelConfig:
    """Architecture of a Qwen2/Qwen2.5/Qwen3 decoder. Filled from an HF ``config.json`` when ``hf_path`` is set."""

    hf_path: str = ""
    """Hugging Face model directory (config.json, safetensors, tokenizer). Empty: use the fields below."""
    mcore_path: str = ""
    """Megatron dist checkpoint to load weights from (made by tools/convert_hf_to_mcore.py). Empty: use hf_path."""
    arch: Literal["qwen2", "qwen3"] = "qwen2"
    """Model family: qwen2 (Qwen2/Qwen2.5) or qwen3 (dense Qwen3); what each implies is in models/families.py."""
    vocab_size: int = 1024
    """Tokenizer/embedding vocabulary before Megatron padding."""
    hidden_size: int = 64
    """Model width."""
    ffn_hidden_size: int = 128
    """SwiGLU intermediate size."""
    num_layers: int = 2
    """Number of transformer blocks."""
    num_attention_heads: int = 4
    """Query heads."""
    num_query_groups: int = 2
    """Key/value heads (GQA groups)."""
    head_dim: int = 16
    """Per-head size (Qwen3 decouples it from hidden/heads)."""
    max_position_embeddings: int = 2048
    """Longest sequence RoPE is set up for (tokens)."""
    rope_theta: float = 1000000.0
    """RoPE base frequency."""
    rms_norm_eps: float = 1e-6
    """RMSNorm epsilon."""
    tie_word_embeddings: bool = False
    """Share the input embedding with the output layer."""
    make_vocab_size_divisible_by: int = 128
    """Megatron pads the vocab to a multiple of this times TP; padded logits are masked downstream."""
    params_dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Parameter/compute dtype (optimizer keeps fp32 master weights for bf16). float16 is for conversion only:
    training refuses it (megatron's fp16 path needs dynamic loss scaling; docs/trainer.md, "Parameter dtype")."""
    transformer_impl: Literal["auto", "local", "transformer_engine"] = "auto"
    """Layer spec: auto = Transformer Engine on GPU when installed, local otherwise (always local on CPU)."""

    def padded_vocab_size(self, tp: int) -> int:
        """Embedding rows megatron allocates: vocab_size rounded up to make_vocab_size_divisible_by * tp."""
        return padded_vocab_size(self.vocab_size, self.make_vocab_size_divisible_by, tp)

    def validate(self, parallel: ParallelConfig | None = None) -> None:
        """Check the architecture (and, given ``parallel``, that it can be split that way).

        Raises:
            ConfigError: naming the field, its value, the rule and a fix.
        """
        for name in ("vocab_size", "hidden_size", "ffn_hidden_size", "num_layers", "num_attention_heads",
                     "num_query_groups", "head_dim", "max_position_embeddings", "make_vocab_size_divisible_by"):
            if getattr(self, name) < 1:
                raise ConfigError(f"model.{name}={getattr(self, name)} must be >= 1")
        if self.num_attention_heads % self.num_query_groups:
            raise ConfigError(f"model.num_query_groups={self.num_query_groups} must divide "
                              f"model.num_attention_heads={self.num_attention_heads}")
        if self.arch == "qwen2" and self.head_dim * self.num_attention_heads != self.hidden_size:
            raise ConfigError(f"model.head_dim={self.head_dim}: qwen2 needs head_dim = hidden_size / "
                              f"num_attention_heads = {self.hidden_size / self.num_attention_heads:g}")
        if self.rope_theta <= 0 or self.rms_norm_eps <= 0:
            raise ConfigError(f"model.rope_theta={self.rope_theta} and model.rms_norm_eps={self.rms_norm_eps} "
                              f"must be > 0")
        if parallel is None:
            return
        parallel.validate()
        for name in ("num_attention_heads", "num_query_groups"):
            value = getattr(self, name)
            if value % parallel.tp:
                raise ConfigError(f"parallel.tp={parallel.tp} must divide model.{name}={value}; "
                                  f"use one of {_divisors(value)}")
        stages = parallel.pp * parallel.vpp
        if stages > self.num_layers:
            raise ConfigError(f"parallel.pp={parallel.pp} x parallel.vpp={parallel.vpp} = {stages} pipeline stages "
                              f"exceed model.num_layers={self.num_layers}; use pp*vpp in {_divisors(self.num_layers)}")
        pipeline_layers(self.num_layers, parallel)  # raises ConfigError when the layers cannot be split


@dataclass(kw_only=True)
class ParallelConfig:
    """Process layout. world = tp * pp * dp; dp is derived from the world size when 0."""

    tp: int = 1
    """Tensor-parallel size (must divide attention heads and KV groups)."""
    pp: int = 1
    """Pipeline-parallel size (must not exceed num_layers)."""
    vpp: int = 1
    """Virtual pipeline stages per PP rank (interleaved 1F1B when > 1)."""
    dp: int = 0
    """Data-parallel size; 0 = world_size / (tp * pp)."""
    sequence_parallel: bool = False
    """Megatron sequence parallelism (Transformer Engine spec only)."""
    use_distributed_optimizer: bool = False
    """Shard optimizer states over DP ranks (megatron distributed optimizer)."""
    recompute: Literal["none", "selective", "full"] = "none"
    """Activation recomputation: selective (attention core) or full (every layer's inputs only are kept; needed by
    the first pipeline stage of Qwen2.5-32B at 30,720-token micro-batches, see docs/slurm.md)."""
    backend: Literal["auto", "nccl", "gloo"] = "auto"
    """torch.distributed backend; auto = nccl with CUDA, gloo otherwise."""
    overlap_grad_reduce: bool = False
    """Start each gradient bucket's DP all-reduce/reduce-scatter during the backward pass, as soon as the bucket's
    gradients are complete (megatron DDP), instead of all of them after the last micro-batch. On for GPU runs."""
    overlap_param_gather: bool = False
    """Distributed optimizer: all-gather updated parameters bucket by bucket during the next forward instead of
    all at once after ``optimizer.step()``; needs use_distributed_optimizer and overlap_grad_reduce. The last update
    of a step is still gathered at once (the weight sync to the engines reads the parameters right after it)."""
    gradient_accumulation_fusion: bool = False
    """Accumulate weight gradients straight into the fp32 ``main_grad`` inside the linear layers' backward (a fused
    CUDA kernel of Transformer Engine or apex), skipping one bf16 gradient tensor and an add per weight. Needs
    CUDA and the Transformer Engine spec."""
    num_layers_in_first_pipeline_stage: int = 0
    """Transformer layers on the first pipeline stage (megatron's uneven pipeline); 0 = automatic: an even split
    when pp*vpp divides model.num_layers, else the even-as-possible split of :func:`pipeline_layers`."""
    num_layers_in_last_pipeline_stage: int = 0
    """Transformer layers on the last pipeline stage (it also holds the final norm and the large output layer, so
    giving it fewer layers balances the stages); 0 = automatic (see num_layers_in_first_pipeline_stage)."""

    def validate(self) -> None:
        """Sizes are positive, virtual pipelining has a pipeline, sequence parallel has TP.

        Raises:
            ConfigError: naming the field and value.
        """
        for name in ("tp", "pp", "vpp"):
            if getattr(self, name) < 1:
                raise ConfigError(f"parallel.{name}={getattr(self, name)} must be >= 1")
        if self.dp < 0:
            raise ConfigError(f"parallel.dp={self.dp} must be >= 0 (0 = derive from the world size)")
        if self.vpp > 1 and self.pp < 2:
            raise ConfigError(f"parallel.vpp={self.vpp} needs parallel.pp >= 2 (got pp={self.pp}); set vpp=1")
        if self.sequence_parallel and self.tp < 2:
            raise ConfigError("parallel.sequence_parallel=true needs parallel.tp >= 2; set it false")
        if self.overlap_param_gather and not (self.use_distributed_optimizer and self.overlap_grad_reduce):
            raise ConfigError("parallel.overlap_param_gather=true needs parallel.use_distributed_optimizer=true and "
                              "parallel.overlap_grad_reduce=true (megatron DDP); set them, or set it false")
        first, last = self.num_layers_in_first_pipeline_stage, self.num_layers_in_last_pipeline_stage
        if first < 0 or last < 0:
            raise ConfigError(f"parallel.num_layers_in_first_pipeline_stage={first} and "
                              f"parallel.num_layers_in_last_pipeline_stage={last} must be >= 0 (0 = automatic)")
        if (first or last) and self.pp < 2:
            raise ConfigError("parallel.num_layers_in_first/last_pipeline_stage need parallel.pp >= 2; set them 0")


def pipeline_layers(num_layers: int, parallel: ParallelConfig) -> list[int]:
    """Transformer layers per pipeline stage (sums to ``num_layers``), as megatron will build them.

    Megatron's uneven pipeline sets the first and/or the last stage's layer count; the stages in between share the
    rest equally. Explicit ``parallel.num_layers_in_{first,last}_pipeline_stage`` are used as given. With both 0:
    an even split when ``pp * vpp`` divides ``num_layers``; otherwise middle stages get ``m`` layers each and the
    first and last share the rest (first >= last), choosing the smallest largest stage (the pipeline's
    bottleneck), then the smallest spread, then the lighter last stage (it also runs the output layer). Every
    stage's count must be a multiple of ``vpp``. Examples: 3 layers at PP2 -> [2, 1]; 28 at PP8 ->
    [2, 4, 4, 4, 4, 4, 4, 2]; 40 at PP3 -> [14, 13, 13].

    Raises:
        ConfigError: the given counts cannot be met, or no split fits ``vpp``.
    """
    pp, vpp = parallel.pp, parallel.vpp
    first, last = parallel.num_layers_in_first_pipeline_stage, parallel.num_layers_in_last_pipeline_stage
    where = (f"model.num_layers={num_layers} at parallel.pp={pp}, vpp={vpp}, num_layers_in_first_pipeline_stage="
             f"{first}, num_layers_in_last_pipeline_stage={last}")
    if pp == 1:
        if num_layers % vpp:
            raise ConfigError(f"{where}: vpp must divide the layers")
        return [num_layers]
    if first or last:
        middle_stages = pp - bool(first) - bool(last)
        middle = num_layers - first - last
        if (first and first % vpp) or (last and last % vpp):
            raise ConfigError(f"{where}: the first/last stage layer counts must be multiples of vpp")
        if middle < 0 or bool(middle) != bool(middle_stages) or (middle_stages and middle % (middle_stages * vpp)):
            raise ConfigError(f"{where}: the other {middle_stages} stage(s) cannot share the remaining {middle} "
                              f"layers equally (in multiples of vpp)")
        share = middle // middle_stages if middle_stages else 0
        return [first or share, *([share] * (pp - 2)), last or share]
    if num_layers % (pp * vpp) == 0:
        return [num_layers // pp] * pp
    best: tuple | None = None
    for m in range(vpp, num_layers + 1, vpp):
        rest = num_layers - m * (pp - 2)
        for lst in range(vpp, rest, vpp):
            fst = rest - lst
            if fst < lst or fst % vpp:
                continue
            sizes = [fst, lst, *([m] if pp > 2 else [])]
            key = (max(sizes), max(sizes) - min(sizes), lst)
            if best is None or key < best[0]:
                best = (key, [fst, *([m] * (pp - 2)), lst])
    if best is None:
        raise ConfigError(f"{where}: no split into {pp} stages with multiples of vpp={vpp} layers each; change pp, "
                          f"vpp or set the first/last stage counts")
    return best[1]


def uneven_pipeline_fields(num_layers: int, parallel: ParallelConfig) -> dict[str, int | None]:
    """megatron ``TransformerConfig`` kwargs for :func:`pipeline_layers`' split (both None for an even split)."""
    split = pipeline_layers(num_layers, parallel)
    explicit = parallel.num_layers_in_first_pipeline_stage or parallel.num_layers_in_last_pipeline_stage
    if len(set(split)) == 1 and not explicit:
        return {"num_layers_in_first_pipeline_stage": None, "num_layers_in_last_pipeline_stage": None}
    if explicit:
        return {"num_layers_in_first_pipeline_stage": parallel.num_layers_in_first_pipeline_stage or None,
                "num_layers_in_last_pipeline_stage": parallel.num_layers_in_last_pipeline_stage or None}
    return {"num_layers_in_first_pipeline_stage": split[0], "num_layers_in_last_pipeline_stage": split[-1]}


def padded_vocab_size(vocab_size: int, divisible_by: int, tp: int) -> int:
    """Megatron's padded vocabulary: ``vocab_size`` rounded up to a multiple of ``divisible_by * tp``.

    Example: 151936 with 128 x TP2 -> 152064; 1000 with 128 x TP1 -> 1024.

    Raises:
        ValueError: if any argument is < 1.
    """
    if vocab_size < 1 or divisible_by < 1 or tp < 1:
        raise ValueError(f"vocab_size={vocab_size}, divisible_by={divisible_by}, tp={tp} must all be >= 1")
    multiple = divisible_by * tp
    return -(-vocab_size // multiple) * multiple


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]
