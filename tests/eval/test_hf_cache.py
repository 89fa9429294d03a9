"""One HF export per checkpoint: `megatron-lpreg eval` of two benchmarks exports a real (tiny) training checkpoint
once into ``<step dir>/hf_export`` and reuses it; concurrent tasks wait on the lock instead of exporting twice; a
killed export's temp dir is cleaned up; checkpoint retention deletes the export with its step directory."""
from __future__ import annotations

import json
import multiprocessing
import os
import time
from pathlib import Path

import pytest

from megatron_lpreg.cli import main
from megatron_lpreg.eval import hf_cache
from megatron_lpreg.eval.hf_cache import HF_EXPORT_DIR, cached_hf_export, is_hf_dir
from megatron_lpreg.models.convert import convert_hf_to_mcore
from megatron_lpreg.rundir import prune_checkpoints, step_dir_name


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, tiny_qwen2) -> Path:
    """A run directory holding one real dist checkpoint of the tiny Qwen2 (``checkpoints/step_0000002``)."""
    run = tmp_path_factory.mktemp("run")
    convert_hf_to_mcore(tiny_qwen2, run / "checkpoints" / step_dir_name(2))
    (run / "checkpoints" / "latest").write_text(step_dir_name(2) + "\n")
    return run


def _counting(calls: list[Path]):
    real = hf_cache.default_exporter  # the real export, counted

    def export(checkpoint: Path, out_dir: Path, hf_config_dir: str | None) -> Path:
        calls.append(out_dir)
        return real(checkpoint, out_dir, hf_config_dir)
    return export


def test_eval_of_two_benchmarks_exports_the_checkpoint_once(tiny_run, tiny_qwen2, tmp_path, monkeypatch):
    calls: list[Path] = []
    monkeypatch.setattr(hf_cache, "default_exporter", _counting(calls))
    checkpoint = tiny_run / "checkpoints" / step_dir_name(2)
    common = ["--checkpoint", f"{tiny_run}@latest", "eval.max_new_tokens=3", "data.heldout_size=2", "data.dev_size=0",
              "reward.num_workers=1", f"model.hf_path={tiny_qwen2}"]
    for bench in ("synthetic", "aime24"):  # two eval-array tasks of the same checkpoint
        data = ["--data-dir", str(Path(__file__).resolve().parents[1] / "fixtures" / "benchmarks")]
        assert main(["eval", *common, "--benchmarks", bench, *data, "--samples", "1",
                     "--out", str(tmp_path / bench)]) == 0
        assert json.loads((tmp_path / bench / "results.json").read_text())["benchmarks"][bench]["num_problems"] > 0
        assert not (tmp_path / bench / "hf_model").exists()  # no private copy per task
    assert calls == [checkpoint / HF_EXPORT_DIR]
    assert is_hf_dir(checkpoint / HF_EXPORT_DIR) and list((checkpoint / HF_EXPORT_DIR).glob("*.safetensors"))
    assert not list(checkpoint.glob(f".{HF_EXPORT_DIR}.tmp-*"))


def _fake_export(checkpoint: Path, out_dir: Path, hf_config_dir: str | None, delay_s: float = 0.0) -> Path:
    """Stand-in for the export in the tests of the cache's own logic (the real export is tested above): atomic
    like it, and (lock test) slow enough that the other processes arrive while one holds the lock."""
    with open(checkpoint / "exports.log", "a") as log:
        log.write(f"{os.getpid()}\n")
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}"
    tmp.mkdir(parents=True)
    time.sleep(delay_s)
    (tmp / "config.json").write_text("{}")
    os.replace(tmp, out_dir)
    return out_dir


def _task(checkpoint: str, results: multiprocessing.Queue) -> None:
    path, exported = cached_hf_export(Path(checkpoint), exporter=lambda c, o, h: _fake_export(c, o, h, delay_s=1.0))
    results.put((str(path), exported))


def test_concurrent_tasks_export_once_and_leftovers_go(tmp_path):
    checkpoint = tmp_path / "checkpoints" / step_dir_name(4)
    checkpoint.mkdir(parents=True)
    (checkpoint / f".{HF_EXPORT_DIR}.tmp-dead").mkdir()  # a killed export's temp dir
    ctx = multiprocessing.get_context("fork")  # the children only take the lock and write files (no torch)
    results = ctx.Queue()
    procs = [ctx.Process(target=_task, args=(str(checkpoint), results)) for _ in range(3)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(timeout=120)
        assert proc.exitcode == 0
    got = sorted(results.get(timeout=5) for _ in procs)
    assert [exported for _, exported in got] == [False, False, True]
    assert {path for path, _ in got} == {str(checkpoint / HF_EXPORT_DIR)}
    assert len((checkpoint / "exports.log").read_text().split()) == 1
    assert not (checkpoint / f".{HF_EXPORT_DIR}.tmp-dead").exists()


def test_retention_deletes_the_export_with_its_checkpoint(tmp_path):
    for step in (2, 4, 6):
        checkpoint = tmp_path / "checkpoints" / step_dir_name(step)
        checkpoint.mkdir(parents=True)
        cached_hf_export(checkpoint, exporter=_fake_export)
    assert prune_checkpoints(tmp_path, 1, keep=step_dir_name(6)) == [step_dir_name(2), step_dir_name(4)]
    assert [p.relative_to(tmp_path).as_posix() for p in sorted(tmp_path.rglob(HF_EXPORT_DIR))] == [
        f"checkpoints/{step_dir_name(6)}/{HF_EXPORT_DIR}"]


def test_unwritable_checkpoint_exports_into_the_task_dir(tmp_path, monkeypatch):
    checkpoint = tmp_path / "ckpt"
    checkpoint.mkdir()
    monkeypatch.setattr(hf_cache.os, "access", lambda path, mode: Path(path) != checkpoint)  # root can write all
    path, exported = cached_hf_export(checkpoint, fallback_dir=tmp_path / "task", exporter=_fake_export)
    assert (path, exported) == (tmp_path / "task" / "hf_model", True) and not (checkpoint / HF_EXPORT_DIR).exists()
    with pytest.raises(PermissionError, match="not writable"):
        cached_hf_export(checkpoint, exporter=_fake_export)
