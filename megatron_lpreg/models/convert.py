"""HF <-> Megatron conversion jobs: streaming, layer by layer, on any TP/PP layout (see docs/conversion.md).

Both directions avoid building the model: HF -> mcore reads each rank's slices of one layer at a time into a
meta-device chunk's layout and saves it as a part of the dist checkpoint; mcore -> HF asks megatron's loader for
one full tensor at a time and writes safetensors shards. Jobs fork their own ranks (or are one rank under
torchrun/srun).
"""
from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path
from typing import Any

import torch

from megatron_lpreg.models import hf_dir as hf_files
from megatron_lpreg.models.checkpoint import (
    DIST_DIR,
    HF_ASSETS_DIR,
    CheckpointError,
    _verify_files,
    atomic_output_dir,
    read_manifest,
    save_checkpoint_from_parts,
)
from megatron_lpreg.parallel import collectives

logger = logging.getLogger(__name__)


def run_job(fn: Any, world_size: int, *args: Any, timeout_s: float = 3600.0) -> list[Any]:
    """``[fn(rank, world_size, *args)]`` for this rank under torchrun/srun, or for all forked ranks otherwise.

    Raises:
        ValueError: the launcher's world size differs from ``world_size``.
    """
    from megatron_lpreg.parallel.bootstrap import launch_env
    from megatron_lpreg.parallel.spawn import run_ranks

    env = launch_env()
    if env.source != "single":
        if env.world_size != world_size:
            raise ValueError(f"launched with world size {env.world_size} but this job needs {world_size} ranks")
        return [fn(env.rank, env.world_size, *args)]
    # One intra-op thread per forked rank: a child whose parent already ran an OpenMP region can deadlock in
    # its own first parallel region (seen in tests that build a tiny model in the parent), and conversion is
    # bound by copying, not arithmetic.
    return run_ranks(fn, world_size, *args, timeout_s=timeout_s, threads_per_rank=1)


def _build_meta_chunks(model_cfg: Any, parallel_cfg: Any, ctx: Any) -> list[torch.nn.Module]:
    """This rank's model chunk on the meta device: parameter names, shapes and the sharded-state-dict layout for
    a conversion job, no memory.

    The same modules as ``qwen.build_gpt_model(initialize=False)`` (no virtual pipeline here), but never moved:
    that function moves the model to CUDA when a GPU is present, which a meta model cannot do.
    """
    from megatron.core.models.gpt import GPTModel

    from megatron_lpreg.models import qwen
    from megatron_lpreg.parallel import cpu

    config = qwen.transformer_config(model_cfg, parallel_cfg)
    config.perform_initialization = False
    with cpu.cpu_mode(), torch.device("meta"):
        model = GPTModel(
            config=config, transformer_layer_spec=qwen.layer_spec(model_cfg),
            vocab_size=model_cfg.padded_vocab_size(parallel_cfg.tp),
            max_sequence_length=model_cfg.max_position_embeddings,
            pre_process=ctx.is_first_pp_stage, post_process=ctx.is_last_pp_stage, parallel_output=True,
            share_embeddings_and_output_weights=model_cfg.tie_word_embeddings,
            position_embedding_type="rope", rotary_percent=1.0, rotary_base=model_cfg.rope_theta,
        )
    return [model]


def check_conversion_layout(model_cfg: Any, tp: int, pp: int, first: int = 0, last: int = 0) -> None:
    """Reject a TP/PP the model cannot be split into, before any rank starts.

    Raises:
        ConfigError: naming the value, the rule and the valid choices.
    """
    from megatron_lpreg.config.model import ParallelConfig

    model_cfg.validate(ParallelConfig(tp=tp, pp=pp, num_layers_in_first_pipeline_stage=first,
                                      num_layers_in_last_pipeline_stage=last))


def _conversion_model_config(hf_dir: str) -> Any:
    """The HF model's config, with parameters kept in the checkpoint's own dtype (so conversion is bit-exact)."""
    from megatron_lpreg.config.model import ModelConfig
    from megatron_lpreg.models.qwen import model_config_from_hf

    dtype = hf_files.torch_dtype(hf_files.read_config(hf_dir))
    names = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
    base = ModelConfig(params_dtype=names.get(dtype, "float32"), transformer_impl="local")
    return model_config_from_hf(hf_dir, base=base)


def _hf_to_mcore_rank(rank: int, world: int, hf_dir: str, out_dir: str, tp: int, pp: int, overwrite: bool,
                      first: int = 0, last: int = 0) -> None:
    from megatron_lpreg.config.model import ParallelConfig
    from megatron_lpreg.models.bridge import read_hf_shards_by_layer
    from megatron_lpreg.parallel.bootstrap import destroy_parallel, init_parallel

    parallel_cfg = ParallelConfig(tp=tp, pp=pp, backend="gloo",  # CPU tensors, also on a GPU host
                                  num_layers_in_first_pipeline_stage=first, num_layers_in_last_pipeline_stage=last)
    ctx = init_parallel(parallel_cfg, seed=0)
    try:
        model_cfg = _conversion_model_config(hf_dir)
        meta_chunks = _build_meta_chunks(model_cfg, parallel_cfg, ctx)
        parts = read_hf_shards_by_layer(meta_chunks, hf_dir, model_cfg, ctx, read=ctx.dp_rank == 0)
        save_checkpoint_from_parts(out_dir, meta_chunks, parts, model_cfg, ctx, hf_assets_dir=hf_dir,
                                   overwrite=overwrite)
    finally:
        destroy_parallel(destroy_process_group=False)


def convert_hf_to_mcore(hf_dir: str | os.PathLike, out_dir: str | os.PathLike, *, tp: int = 1, pp: int = 1,
                        overwrite: bool = False, first_stage_layers: int = 0, last_stage_layers: int = 0) -> Path:
    """Convert an HF Qwen2/Qwen3 directory into a dist checkpoint written at TP=``tp``, PP=``pp`` (atomic).

    Streams: no model is built (a meta-device GPTModel gives names, shapes and sharding), each rank reads only
    its slices of the HF tensors, and the checkpoint is written one stage-local layer at a time
    (:func:`save_checkpoint_from_parts`), so memory per rank stays near one layer's shard (or the embedding's).
    Runs ``tp*pp`` ranks (two for TP1 PP1, the second an idle data-parallel replica); under torchrun/srun, the
    launched ranks (a multiple of ``tp*pp``). A layer count ``pp`` does not divide gets the even-as-possible
    split of ``config.model.pipeline_layers`` (uneven stages), unless ``first_stage_layers`` / ``last_stage_layers``
    (parallel.num_layers_in_first/last_pipeline_stage) are given. The checkpoint loads at any layout.

    Raises:
        ValueError: bad layout, unsupported architecture, or HF tensors that do not match the table.
    """
    out_dir = Path(out_dir).absolute()
    if out_dir.exists() and not overwrite:
        raise CheckpointError(f"--out {out_dir} already exists; remove it or pass overwrite")
    from megatron_lpreg.models.bridge import check_hf_checkpoint

    model_cfg = _conversion_model_config(str(hf_dir))
    check_conversion_layout(model_cfg, tp, pp, first_stage_layers, last_stage_layers)
    check_hf_checkpoint(hf_dir, model_cfg)
    # >= 2 ranks: megatron's torch_dist writer cannot describe a partial (one-layer) save from a 1-rank job (it
    # marks "other ranks'" shards as rank (r+1) % world); TP1 PP1 runs as two data-parallel replicas, of which
    # only the first reads and writes.
    from megatron_lpreg.parallel.bootstrap import launch_env

    env = launch_env()
    world = env.world_size if env.source != "single" else max(2, tp * pp)
    if world % (tp * pp) or world < 2:
        raise ValueError(f"launched with {world} ranks; the conversion needs a multiple of tp*pp={tp * pp}, "
                         f"at least 2")
    run_job(_hf_to_mcore_rank, world, str(Path(hf_dir).absolute()), str(out_dir), tp, pp, overwrite,
            first_stage_layers, last_stage_layers)
    return out_dir


def _mcore_to_hf_rank(rank: int, world: int, mcore_dir: str, out_dir: str, assets: str | None, overwrite: bool,
                      max_shard_bytes: int) -> None:
    from megatron_lpreg.config.base import from_dict
    from megatron_lpreg.config.model import ModelConfig, ParallelConfig
    from megatron_lpreg.models.bridge import export_hf_weights_from_checkpoint
    from megatron_lpreg.models.families import hf_config_json
    from megatron_lpreg.parallel.bootstrap import destroy_parallel, init_parallel
    from megatron_lpreg.telemetry import progress

    parallel_cfg = ParallelConfig(tp=1, pp=1, backend="gloo")  # CPU tensors, also on a GPU host
    ctx = init_parallel(parallel_cfg, seed=0)
    try:
        model_cfg = dataclasses.replace(from_dict(ModelConfig, read_manifest(mcore_dir)["model"]),
                                        transformer_impl="local")
        meta_chunks = _build_meta_chunks(model_cfg, parallel_cfg, ctx)
        config = hf_files.read_config(assets) if assets else hf_config_json(model_cfg)
        with atomic_output_dir(out_dir, overwrite=overwrite) as tmp:
            stream = export_hf_weights_from_checkpoint(Path(mcore_dir) / DIST_DIR, meta_chunks, model_cfg, ctx,
                                                       dtype=hf_files.torch_dtype(config))
            shards = hf_files.write_safetensors(progress(stream, desc="export hf", rank=rank), tmp,
                                                prefix=f"part{rank:03d}", max_shard_bytes=max_shard_bytes)
            gathered: list[Any] = collectives.all_gather_object(shards)
            if rank == 0:
                hf_files.finish_hf_dir(tmp, gathered, Path(assets) if assets else None, config)
    finally:
        destroy_parallel(destroy_process_group=False)


def convert_mcore_to_hf(mcore_dir: str | os.PathLike, out_dir: str | os.PathLike, *,
                        hf_config_dir: str | os.PathLike | None = None, overwrite: bool = False,
                        max_shard_bytes: int = 2**30, readers: int = 2) -> Path:
    """Export a dist checkpoint (any layout) as an HF safetensors directory readable by transformers (atomic).

    Streams: no model is built; ``readers`` ranks each read one full tensor at a time from the checkpoint and
    write their share of safetensors files, so memory per rank stays near one tensor plus ``max_shard_bytes``.
    Under torchrun/srun every launched rank is a reader.

    Args:
        hf_config_dir: take config.json and tokenizer files from here (default: the checkpoint's ``hf_assets/``,
            else a config.json generated from the manifest's model config).
        max_shard_bytes: safetensors file size (each reader buffers at most this much).
        readers: ranks to fork when not launched distributed (>= 2, see ``export_hf_weights_from_checkpoint``).

    Raises:
        CheckpointError: missing/corrupt checkpoint, or ``out_dir`` exists without ``overwrite``.
    """
    from megatron_lpreg.parallel.bootstrap import launch_env

    manifest = read_manifest(mcore_dir)
    out_dir = Path(out_dir).absolute()
    if out_dir.exists() and not overwrite:
        raise CheckpointError(f"--out {out_dir} already exists; remove it or pass overwrite")
    _verify_files(Path(mcore_dir), manifest, checksums=True)
    assets = Path(hf_config_dir) if hf_config_dir else Path(mcore_dir) / HF_ASSETS_DIR
    assets_arg = str(assets.absolute()) if (assets / hf_files.CONFIG_FILE).is_file() else None
    if hf_config_dir and assets_arg is None:
        raise CheckpointError(f"--hf-config {hf_config_dir} has no config.json")
    env = launch_env()
    world = env.world_size if env.source != "single" else readers
    if world < 2:
        raise ValueError(f"convert_mcore_to_hf needs >= 2 ranks (got {world}); launch 2 or more")
    run_job(_mcore_to_hf_rank, world, str(Path(mcore_dir).absolute()), str(out_dir), assets_arg, overwrite,
            max_shard_bytes)
    return out_dir
