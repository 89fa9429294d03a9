"""``megatron-lpreg eval-array``: (checkpoint x benchmark) tasks, checkpoint selection, dependency handling."""
from __future__ import annotations

import shlex
import sys
from pathlib import Path

import pytest

from megatron_lpreg import cli
from megatron_lpreg.launch.cli_eval_array import build_tasks, checkpoint_specs, expand_run_dirs
from megatron_lpreg.launch.manifest import ArrayManifest

REPO = Path(__file__).resolve().parents[2]


def _run_with_checkpoints(root: Path, steps: list[int], latest: int | None = None) -> Path:
    for step in steps:
        (root / "checkpoints" / f"step_{step:07d}").mkdir(parents=True)
    if latest is not None:
        (root / "checkpoints" / "latest").write_text(f"step_{latest:07d}\n")
    return root


def test_checkpoint_specs(tmp_path):
    run = _run_with_checkpoints(tmp_path / "run", [2, 10, 4], latest=10)
    ckpt = run / "checkpoints"
    assert checkpoint_specs(run, "latest") == [f"{run}@latest"]
    assert checkpoint_specs(run, "all") == [str(ckpt / "step_0000002"), str(ckpt / "step_0000004"),
                                            str(ckpt / "step_0000010")]
    assert checkpoint_specs(run, "10,2") == [str(ckpt / "step_0000010"), str(ckpt / "step_0000002")]
    with pytest.raises(ValueError, match=r"step\(s\) \[6\] not in .*have \[2, 4, 10\]"):
        checkpoint_specs(run, "6")
    with pytest.raises(ValueError, match="expected latest, all or comma-separated steps"):
        checkpoint_specs(run, "newest")
    with pytest.raises(ValueError, match="no checkpoint under .* yet"):
        checkpoint_specs(tmp_path / "empty", "all")


def test_tasks_are_checkpoint_major(tmp_path):
    runs = [tmp_path / "a", tmp_path / "b"]
    assert build_tasks(runs, ["aime24", "math500"], "latest") == [
        ["--checkpoint", f"{runs[0]}@latest", "--benchmarks", "aime24"],
        ["--checkpoint", f"{runs[0]}@latest", "--benchmarks", "math500"],
        ["--checkpoint", f"{runs[1]}@latest", "--benchmarks", "aime24"],
        ["--checkpoint", f"{runs[1]}@latest", "--benchmarks", "math500"]]
    with pytest.raises(ValueError, match="--benchmarks must list benchmark names"):
        build_tasks(runs, ["aime24", ""], "latest")


def test_sweep_dir_expands_to_its_tasks_and_missing_dirs_need_a_dependency(tmp_path):
    ArrayManifest(kind="train", command=["x"], tasks=[["seed=1"], ["seed=2"]]).write(tmp_path / "sw")
    assert expand_run_dirs([str(tmp_path / "sw")]) == [tmp_path / "sw" / "task_0", tmp_path / "sw" / "task_1"]
    with pytest.raises(ValueError, match="run directory not found.*--dependency afterok"):
        expand_run_dirs([str(tmp_path / "later")])
    assert expand_run_dirs([str(tmp_path / "later")], may_not_exist_yet=True) == [tmp_path / "later"]


def test_dry_run(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("MLPREG_SITE_ENV", raising=False)
    run = _run_with_checkpoints(tmp_path / "run", [4])
    out = tmp_path / "ev"
    assert cli.main(["eval-array", str(tmp_path / "not_yet"), "--benchmarks", "aime24,math500", "--dependency",
                     "afterok:77", "--max-parallel", "1", "--eval-arg=--samples=4", "--out", str(out),
                     "--dry-run"]) == 0
    argv = shlex.split(capsys.readouterr().out.splitlines()[0])
    assert "--array=0-1%1" in argv and "--dependency=afterok:77" in argv
    assert argv[-2:] == [str(REPO / "slurm" / "eval_array.sbatch"), str(out)]
    manifest = ArrayManifest.read(out)
    assert manifest.kind == "eval"
    assert manifest.task_argv(out, 1) == [sys.executable, "-m", "megatron_lpreg", "eval", "--samples=4",
                                          "--checkpoint", f"{tmp_path}/not_yet@latest", "--benchmarks", "math500",
                                          "--out", f"{out}/task_1"]
    assert cli.main(["eval-array", str(run), "--benchmarks", "x", "--checkpoints", "all", "--out",
                     str(tmp_path / "ev2"), "--dry-run"]) == 0
    assert cli.main(["eval-array", str(tmp_path / "nope"), "--benchmarks", "x", "--out", str(tmp_path / "ev3"),
                     "--dry-run"]) == 2
    assert "run directory not found" in capsys.readouterr().err


def test_gpus_per_node_checks_each_runs_eval_layout_before_submitting(tmp_path, capsys, monkeypatch):
    """The 32B run trains 16 TP4 engines on 8 nodes; its eval tasks get 2 TP4 engines on one 8-GPU node."""
    from megatron_lpreg.config import RunConfig

    monkeypatch.delenv("MLPREG_SITE_ENV", raising=False)
    run = _run_with_checkpoints(tmp_path / "run32b", [64])
    RunConfig.load(REPO / "configs" / "qwen2.5-32b_lpreg_64gpu.yaml").save(run / "config.yaml")
    base = ["eval-array", str(run), "--benchmarks", "aime24,math500", "--checkpoints", "all", "--dry-run"]
    assert cli.main([*base, "--gpus-per-node", "8", "--out", str(tmp_path / "ok")]) == 0
    out = capsys.readouterr()
    assert "--gpus-per-node=8" in shlex.split(out.out.splitlines()[0])
    assert "run32b: eval: 1 node, 2 sglang engine(s) x TP4 = 8 of 8 GPUs" in out.err
    assert cli.main([*base, "--gpus-per-node", "4", "--out", str(tmp_path / "no")]) == 2
    err = capsys.readouterr().err
    assert "run32b" in err and "eval.num_engines=2 x eval.engine_tp=4 needs 8 GPUs" in err
    assert not (tmp_path / "no" / "array.json").exists()
    assert cli.main([*base, "--gpus-per-node", "4", "--eval-arg=eval.num_engines=1", "--out",
                     str(tmp_path / "one")]) == 0
    assert "1 sglang engine(s) x TP4 = 4 of 4 GPUs" in capsys.readouterr().err
