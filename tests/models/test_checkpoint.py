"""Atomic dist checkpoints: save at one layout, load at others (TP2 -> TP1, TP2 -> PP2, vocab padding that
changes with TP), `extra` round trip, and refusals that leave the model and the disk untouched: missing,
truncated or corrupt files, no manifest, an architecture mismatch (with a diff), a failing save.
"""
from __future__ import annotations

import errno
import json
import random
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from megatron_lpreg.config.model import ParallelConfig
from megatron_lpreg.models.bridge import export_hf_weights, load_hf_weights
from megatron_lpreg.models.checkpoint import (
    MANIFEST,
    CheckpointError,
    atomic_output_dir,
    config_diff,
    load_checkpoint,
    load_rank_file,
    read_manifest,
    save_checkpoint,
    write_failure,
)
from megatron_lpreg.models.qwen import build_model_chunks, model_config_from_hf
from megatron_lpreg.parallel.bootstrap import destroy_parallel, init_parallel
from megatron_lpreg.parallel.spawn import run_ranks
from tests.support.tiny import tiny_model_dir

VOCAB = 1100
"""Padded to 1152 at TP1 and 1280 at TP2 (divisible by 128 * tp): the stored embedding changes shape."""
EXTRA = {"run_state": {"step": 7, "consumed": [1, 2, 3]}, "note": "hello"}


def _layout(hf_dir: str, tp: int, pp: int):
    parallel_cfg = ParallelConfig(tp=tp, pp=pp)
    ctx = init_parallel(parallel_cfg, seed=tp * 10 + pp)
    model_cfg = model_config_from_hf(hf_dir)
    return ctx, model_cfg, build_model_chunks(model_cfg, parallel_cfg)


def _reshard_rank(rank: int, world: int, hf_dir: str, ckpt: str):
    ctx, model_cfg, chunks = _layout(hf_dir, tp=2, pp=1)
    load_hf_weights(chunks, hf_dir, model_cfg, ctx)
    save_checkpoint(ckpt, chunks, model_cfg, ctx, extra=EXTRA, hf_assets_dir=hf_dir)
    destroy_parallel(destroy_process_group=False)
    out = {}
    for tp, pp in [(1, 1), (1, 2)]:
        ctx, model_cfg, chunks = _layout(hf_dir, tp, pp)
        extra = load_checkpoint(ckpt, chunks, model_cfg, ctx)
        out[tp, pp] = (ctx.pp_rank, extra, dict(export_hf_weights(chunks, model_cfg, ctx)))
        destroy_parallel(destroy_process_group=False)
    return out


def test_save_tp2_load_tp1_and_pp2_bit_exact(tmp_path):
    hf_dir = tiny_model_dir("qwen2", vocab_size=VOCAB)
    ckpt = tmp_path / "ckpt"
    results = run_ranks(_reshard_rank, 2, str(hf_dir), str(ckpt), timeout_s=300, threads_per_rank=1)
    (original_file,) = hf_dir.glob("*.safetensors")
    original = load_file(str(original_file))
    manifest = read_manifest(ckpt)
    assert manifest["parallel"] == {"tp": 2, "pp": 1, "vpp": 1} and manifest["model"]["vocab_size"] == VOCAB
    assert (ckpt / "hf_assets" / "config.json").is_file()
    assert not list(tmp_path.glob(".ckpt.tmp-*"))
    for layout in [(1, 1), (1, 2)]:
        merged: dict[str, torch.Tensor] = {}
        for rank_result in results:
            pp_rank, extra, exported = rank_result[layout]
            assert extra == EXTRA
            merged.update(exported)
        assert set(merged) == set(original), layout
        for name, tensor in original.items():
            assert torch.equal(merged[name], tensor), (layout, name)


def _damage_rank(rank: int, world: int, hf_dir: str, ckpt: str, other_hf: str, work: str):
    ctx, model_cfg, chunks = _layout(hf_dir, tp=1, pp=1)
    load_hf_weights(chunks, hf_dir, model_cfg, ctx)
    rng = {"torch": torch.get_rng_state(), "python": random.getstate()}
    points: list[str] = []
    save_checkpoint(ckpt, chunks, model_cfg, ctx, extra=EXTRA, rank_files={"rng_rank0.pt": rng},
                    on_progress=points.append)
    reference = {n: p.detach().clone() for n, p in chunks[0].named_parameters()}
    with torch.no_grad():
        for p in chunks[0].parameters():
            p.add_(1.0)  # any successful load would undo this
    touched = {n: p.detach().clone() for n, p in chunks[0].named_parameters()}
    errors: dict[str, str] = {}

    def attempt(label: str, path: Path, cfg=model_cfg) -> None:
        try:
            load_checkpoint(str(path), chunks, cfg, ctx)
            errors[label] = "loaded"
        except CheckpointError as exc:
            errors[label] = str(exc)

    ckpt, work = Path(ckpt), Path(work)
    distcp = sorted((ckpt / "dist").glob("*.distcp"))[0].relative_to(ckpt)
    for label, damage in [
        ("missing", lambda d: (d / distcp).unlink()),
        ("truncated", lambda d: (d / distcp).write_bytes((d / distcp).read_bytes()[:-10])),
        ("corrupt", lambda d: (d / distcp).write_bytes(b"\x00" * (d / distcp).stat().st_size)),
        ("no_manifest", lambda d: (d / MANIFEST).unlink()),
        ("rank_file_truncated", lambda d: (d / "rng_rank0.pt").write_bytes((d / "rng_rank0.pt").read_bytes()[:50])),
    ]:
        damaged = work / label
        shutil.copytree(ckpt, damaged)
        damage(damaged)
        attempt(label, damaged)
    attempt("other_model", ckpt, model_config_from_hf(other_hf))
    unchanged = all(torch.equal(p, touched[n]) for n, p in chunks[0].named_parameters())
    # a save that fails half-way (unpicklable extra) leaves neither the target nor a temp dir
    try:
        save_checkpoint(str(work / "failed"), chunks, model_cfg, ctx, extra={"fn": lambda: 0})
        errors["failed_save"] = "saved"
    except Exception as exc:  # noqa: BLE001 - the pickling error type is torch's business
        errors["failed_save"] = type(exc).__name__
    try:
        save_checkpoint(ckpt, chunks, model_cfg, ctx)
    except CheckpointError as exc:
        errors["exists"] = str(exc)
    extra = load_checkpoint(ckpt, chunks, model_cfg, ctx)
    restored = all(torch.equal(p, reference[n]) for n, p in chunks[0].named_parameters())
    loaded_rng = load_rank_file(ckpt, "rng_rank0.pt")
    rng_ok = torch.equal(loaded_rng["torch"], rng["torch"]) and loaded_rng["python"] == rng["python"]
    errors["points"] = ",".join(points)
    destroy_parallel(destroy_process_group=False)
    return errors, unchanged, restored and rng_ok, extra


def test_refusals_leave_model_and_disk_untouched(tmp_path):
    hf_dir = tiny_model_dir("qwen2")
    other = tiny_model_dir("qwen2", hidden_size=32, num_attention_heads=2, num_kv_heads=1, ffn_hidden_size=64)
    work = tmp_path / "work"
    work.mkdir()
    (errors, unchanged, restored, extra), = run_ranks(
        _damage_rank, 1, str(hf_dir), str(tmp_path / "ckpt"), str(other), str(work), timeout_s=300,
        threads_per_rank=1)
    distcp = "dist/__0_0.distcp"
    assert f"{distcp}: missing" in errors["missing"]
    assert f"{distcp}: truncated (" in errors["truncated"]
    assert "rng_rank0.pt: truncated (50 bytes" in errors["rank_file_truncated"], "rank files are in the manifest"
    assert errors["points"] == "temp_written,rng_written,manifest_written,renamed"
    assert f"{distcp}: sha256 mismatch (corrupt)" in errors["corrupt"]
    assert "manifest.json is missing" in errors["no_manifest"]
    assert "model.hidden_size: checkpoint=64 model=32" in errors["other_model"]
    assert "model.num_query_groups: checkpoint=2 model=1" in errors["other_model"]
    assert errors["failed_save"] != "saved"
    assert not (work / "failed").exists() and not list(work.glob(".failed.tmp-*"))
    assert "already exists" in errors["exists"]
    assert unchanged, "a refused load modified parameters"
    assert restored and extra == EXTRA


def test_config_diff_names_fields():
    cfg = model_config_from_hf(tiny_model_dir("qwen3"))
    saved = json.loads(json.dumps(cfg.__dict__))
    assert config_diff(saved, cfg) == []
    saved["tie_word_embeddings"] = False
    saved["make_vocab_size_divisible_by"] = 64  # padding may differ: resharding handles it
    assert config_diff(saved, cfg) == ["model.tie_word_embeddings: checkpoint=False model=True"]


def _trainable(hf_dir: str, parallel_cfg: ParallelConfig):
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.distributed.finalize_model_grads import finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    ctx = init_parallel(parallel_cfg, seed=1)
    model_cfg = model_config_from_hf(hf_dir)
    raw = build_model_chunks(model_cfg, parallel_cfg)
    load_hf_weights(raw, hf_dir, model_cfg, ctx)
    raw[0].config.finalize_model_grads_func = finalize_model_grads
    ddp_cfg = DistributedDataParallelConfig(grad_reduce_in_fp32=True,
                                            use_distributed_optimizer=parallel_cfg.use_distributed_optimizer)
    ddp = [DistributedDataParallel(config=raw[0].config, ddp_config=ddp_cfg, module=raw[0])]
    opt = get_megatron_optimizer(OptimizerConfig(optimizer="adam", lr=1e-2, params_dtype=torch.float32,
                                                 use_distributed_optimizer=parallel_cfg.use_distributed_optimizer),
                                 ddp)
    return ctx, model_cfg, raw, ddp, opt


def _train_step(ddp, opt, ctx, seed: int) -> None:
    from megatron_lpreg.parallel import cpu

    tokens = torch.randint(0, 1000, (2, 8), generator=torch.Generator().manual_seed(seed * 10 + ctx.dp_rank))
    positions = torch.arange(8).unsqueeze(0).expand(2, 8)
    ddp[0].zero_grad_buffer()
    opt.zero_grad()
    with cpu.cpu_mode():
        ddp[0](tokens, positions, None).float().pow(2).mean().backward()
        ddp[0].finish_grad_sync()
        opt.step()


def _resume_rank(rank: int, world: int, hf_dir: str, root: str):
    results = {}
    for dist_opt in (False, True):
        parallel_cfg = ParallelConfig(tp=1, pp=1, use_distributed_optimizer=dist_opt)
        ckpt = f"{root}/opt{int(dist_opt)}"
        ctx, model_cfg, raw, ddp, opt = _trainable(hf_dir, parallel_cfg)
        _train_step(ddp, opt, ctx, seed=0)
        save_checkpoint(ckpt, raw, model_cfg, ctx, optimizer=opt)
        _train_step(ddp, opt, ctx, seed=1)
        uninterrupted = {n: p.detach().clone() for n, p in raw[0].named_parameters()}
        destroy_parallel(destroy_process_group=False)
        outcome = []
        for with_optimizer in (True, False):
            ctx, model_cfg, raw, ddp, opt = _trainable(hf_dir, parallel_cfg)
            load_checkpoint(ckpt, raw, model_cfg, ctx, optimizer=opt if with_optimizer else None)
            _train_step(ddp, opt, ctx, seed=1)
            outcome.append(all(torch.equal(p, uninterrupted[n]) for n, p in raw[0].named_parameters()))
            steps = [st["step"] for o in getattr(opt, "chained_optimizers", [opt]) for st in o.optimizer.state.values()]
            if with_optimizer:
                outcome.append(sorted({float(s) for s in steps}))
                outcome.append(len({id(s) for s in steps}) == len(steps))
            destroy_parallel(destroy_process_group=False)
        results[dist_opt] = outcome
    return results


def test_optimizer_resume_is_bit_exact(tmp_path):
    """DP2, with and without the distributed optimizer: save after step 1, resume, step 2 == uninterrupted step 2.
    The control (resume without optimizer state) must differ, or the test could not fail."""
    results = run_ranks(_resume_rank, 2, str(tiny_model_dir("qwen2")), str(tmp_path), timeout_s=300,
                        threads_per_rank=1)
    for per_rank in results:
        for dist_opt, (resumed_equal, steps, unshared, control_equal) in per_rank.items():
            assert resumed_equal, f"use_distributed_optimizer={dist_opt}: resume diverged"
            assert steps == [2.0] and unshared, f"use_distributed_optimizer={dist_opt}: step state {steps}"
            assert not control_equal


def _absent_rank(rank: int, world: int, qwen3_dir: str, qwen2_dir: str, ckpt: str):
    ctx, model_cfg, chunks = _layout(qwen3_dir, tp=1, pp=1)
    save_checkpoint(ckpt, chunks, model_cfg, ctx)
    destroy_parallel(destroy_process_group=False)
    # a manifest edited to claim qwen2 gets past the config check; the missing QKV biases must still be caught
    manifest = json.loads((Path(ckpt) / MANIFEST).read_text())
    manifest["model"]["arch"] = "qwen2"
    (Path(ckpt) / MANIFEST).write_text(json.dumps(manifest))
    ctx, model_cfg, chunks = _layout(qwen2_dir, tp=1, pp=1)
    try:
        load_checkpoint(ckpt, chunks, model_cfg, ctx)
        return "loaded"
    except CheckpointError as exc:
        return str(exc)
    finally:
        destroy_parallel(destroy_process_group=False)


def test_tensors_absent_from_checkpoint_are_refused(tmp_path):
    shape = dict(head_dim=16, tie_word_embeddings=False)
    (message,) = run_ranks(_absent_rank, 1, str(tiny_model_dir("qwen3", **shape)),
                           str(tiny_model_dir("qwen2", **shape)), str(tmp_path / "ckpt"), timeout_s=120,
                           threads_per_rank=1)
    assert "does not fit the model" in message and "linear_qkv.bias" in message


class _Payload:
    """An arbitrary class: torch.load(weights_only=True) must refuse to build it."""


def test_rank_files_load_weights_only_and_unreadable_ones_name_the_file(tmp_path):
    good = tmp_path / "rng_rank0.pt"
    torch.save({"torch": torch.get_rng_state(), "python": random.getstate()}, good)
    assert load_rank_file(tmp_path, "rng_rank0.pt")["python"] == random.getstate()
    assert load_rank_file(tmp_path, "rng_rank5.pt") is None  # a rank that did not exist at save time
    truncated = tmp_path / "rng_rank1.pt"
    truncated.write_bytes(good.read_bytes()[:200])
    with pytest.raises(CheckpointError, match=f"{truncated} cannot be read: .*truncated or corrupt; 200 bytes"):
        load_rank_file(tmp_path, "rng_rank1.pt")
    torch.save({"code": _Payload()}, tmp_path / "rng_rank2.pt")  # arbitrary objects are never unpickled
    with pytest.raises(CheckpointError, match="rng_rank2.pt cannot be read: UnpicklingError"):
        load_rank_file(tmp_path, "rng_rank2.pt")


def test_disk_full_inside_a_distributed_save_is_named_with_the_path():
    from torch.distributed.checkpoint.api import CheckpointException

    full = OSError(errno.ENOSPC, "No space left on device")
    gathered = CheckpointException("CheckpointException ranks:dict_keys([0, 1])", {0: (full, None), 1: (full, None)})
    error = write_failure(gathered, Path("/runs/a/checkpoints/step_0000002"),
                          where=Path("/runs/a/checkpoints/.step_0000002.tmp-1234abcd"))
    assert str(error) == ("saving checkpoint /runs/a/checkpoints/step_0000002 failed: No space left on device "
                          "[ENOSPC] writing /runs/a/checkpoints/.step_0000002.tmp-1234abcd; nothing was renamed "
                          "into place and earlier checkpoints are untouched")
    assert write_failure(ValueError("not a disk problem"), Path("x")) is None


def test_existing_output_is_refused_without_naming_a_cli_option(tmp_path):
    (tmp_path / "out").mkdir()
    with pytest.raises(CheckpointError) as err:
        with atomic_output_dir(tmp_path / "out"):
            pass
    assert "already exists" in str(err.value) and "pass overwrite=True" not in str(err.value)


def test_layout_module_and_checkpoint_agree_on_the_manifest_name():
    from megatron_lpreg.rundir import MANIFEST_FILE

    assert MANIFEST_FILE == MANIFEST


def test_short_write_without_errno_on_a_full_filesystem_is_called_a_full_disk(monkeypatch):
    """torch's zip writer reports a short write as 'unexpected pos' (no errno): the free space decides."""
    from torch.distributed.checkpoint.api import CheckpointException

    from megatron_lpreg.models import manifest

    try:
        raise RuntimeError("Worker failure") from RuntimeError("[enforce fail at inline_container.cc:672] . "
                                                               "unexpected pos 704 vs 598")
    except RuntimeError as exc:
        gathered = CheckpointException("write", {0: (exc, None)})
    target = Path("/runs/a/checkpoints/step_0000002")
    assert write_failure(gathered, target, where=Path("/")) is None, "a disk with room: not a full disk"
    monkeypatch.setattr(manifest, "_free_bytes", lambda path: 0)
    message = str(write_failure(gathered, target, where=Path("/runs/a/checkpoints/.step_0000002.tmp-1")))
    assert message.startswith(f"saving checkpoint {target} failed: No space left on device [ENOSPC] writing "
                              "/runs/a/checkpoints/.step_0000002.tmp-1 (0 bytes left on its filesystem; the write "
                              "error was: RuntimeError: [enforce fail at inline_container.cc:672]")


def _format_round_trip_rank(rank: int, world: int, hf_dir: str, root: str):
    from megatron_lpreg.models.checkpoint import _saved_optimizer_format

    parallel_cfg = ParallelConfig(tp=1, pp=1, use_distributed_optimizer=True)
    results = {}
    for fmt in ("dp_reshardable", "fully_reshardable"):
        ckpt = Path(root) / fmt
        ctx, model_cfg, raw, ddp, opt = _trainable(hf_dir, parallel_cfg)
        _train_step(ddp, opt, ctx, seed=0)
        saved_state = [t.clone() for o in opt.chained_optimizers for st in o.optimizer.state.values()
                       for t in (st["exp_avg"], st["exp_avg_sq"])]
        save_checkpoint(ckpt, raw, model_cfg, ctx, optimizer=opt, optimizer_format=fmt)
        _train_step(ddp, opt, ctx, seed=1)
        uninterrupted = {n: p.detach().clone() for n, p in raw[0].named_parameters()}
        destroy_parallel(destroy_process_group=False)
        ctx, model_cfg, raw, ddp, opt = _trainable(hf_dir, parallel_cfg)
        load_checkpoint(ckpt, raw, model_cfg, ctx, optimizer=opt)
        loaded_state = [t.clone() for o in opt.chained_optimizers for st in o.optimizer.state.values()
                        for t in (st["exp_avg"], st["exp_avg_sq"])]
        _train_step(ddp, opt, ctx, seed=1)
        resumed = all(torch.equal(p, uninterrupted[n]) for n, p in raw[0].named_parameters())
        exact = len(saved_state) == len(loaded_state) and all(map(torch.equal, saved_state, loaded_state))
        destroy_parallel(destroy_process_group=False)
        results[fmt] = (_saved_optimizer_format(ckpt), exact, resumed)
    return results


def test_dp_reshardable_optimizer_checkpoint_round_trips_exactly_at_dp2(tmp_path):
    """checkpoint.optimizer_format=dp_reshardable (each rank writes its own flat shard, nothing gathered): Adam
    moments after the load equal those saved, bit for bit, and the resumed step equals the uninterrupted one;
    fully_reshardable alongside, and the format megatron recorded is the one asked for."""
    results = run_ranks(_format_round_trip_rank, 2, str(tiny_model_dir("qwen2")), str(tmp_path), timeout_s=300,
                        threads_per_rank=1)
    for per_rank in results:
        for fmt, (recorded, exact, resumed) in per_rank.items():
            assert recorded == fmt and exact and resumed, (fmt, recorded, exact, resumed)


def _dp_reshardable_at_tp2_rank(rank: int, world: int, hf_dir: str, ckpt: str):
    ctx, model_cfg, raw, ddp, opt = _trainable(hf_dir, ParallelConfig(tp=2, use_distributed_optimizer=True))
    try:
        load_checkpoint(ckpt, raw, model_cfg, ctx, optimizer=opt)
    except CheckpointError as exc:
        refused = str(exc)
    else:
        refused = ""
    load_checkpoint(ckpt, raw, model_cfg, ctx)  # the weights alone still reshard
    return refused


def _save_dp_reshardable_rank(rank: int, world: int, hf_dir: str, ckpt: str):
    ctx, model_cfg, raw, ddp, opt = _trainable(hf_dir, ParallelConfig(tp=1, use_distributed_optimizer=True))
    _train_step(ddp, opt, ctx, seed=0)
    save_checkpoint(ckpt, raw, model_cfg, ctx, optimizer=opt, optimizer_format="dp_reshardable")


def test_dp_reshardable_optimizer_state_is_refused_at_another_tp(tmp_path):
    hf, ckpt = str(tiny_model_dir("qwen2")), str(tmp_path / "ckpt")
    run_ranks(_save_dp_reshardable_rank, 2, hf, ckpt, timeout_s=300, threads_per_rank=1)
    for message in run_ranks(_dp_reshardable_at_tp2_rank, 2, hf, ckpt, timeout_s=300, threads_per_rank=1):
        assert "optimizer_format=dp_reshardable" in message and "tp=1 pp=1" in message and "to tp=2" in message
