"""``megatron-lpreg sweep``: validation before submission, --dry-run output, missing Slurm (no Slurm needed)."""
from __future__ import annotations

import re
import shlex
import sys
from pathlib import Path

import pytest

from megatron_lpreg import cli
from megatron_lpreg.config import RunConfig
from megatron_lpreg.launch.manifest import ArrayManifest, load_sweep_file

REPO = Path(__file__).resolve().parents[2]
TINY = str(REPO / "configs" / "tiny_cpu.yaml")


@pytest.fixture
def no_slurm(monkeypatch, tmp_path):
    """A PATH without Slurm commands (bash and python stay reachable)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("bash", "env"):
        (bin_dir / tool).symlink_to(f"/bin/{tool}" if Path(f"/bin/{tool}").exists() else f"/usr/bin/{tool}")
    monkeypatch.setenv("PATH", str(bin_dir))
    monkeypatch.delenv("MLPREG_SITE_ENV", raising=False)


def test_dry_run_prints_one_array_and_writes_the_manifest(tmp_path, capsys, no_slurm):
    out = tmp_path / "sweep"
    code = cli.main(["sweep", TINY, "--grid", "algo.rho=0.005,0.01", "trainer.max_steps=2", "--grid", "seed=1,2,3",
                     "--max-parallel", "2", "--out", str(out), "--dry-run"])
    assert code == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-1] == str(out)
    argv = shlex.split(lines[0])
    assert argv[:2] == ["sbatch", "--parsable"] and "--array=0-5%2" in argv
    assert f"--output={out}/logs/%x-%A_%a.out" in argv
    assert argv[-2:] == [str(REPO / "slurm" / "sweep_array.sbatch"), str(out)]
    export = next(a for a in argv if a.startswith("--export="))
    assert f"MLPREG_ROOT={REPO}" in export and f"MLPREG_PYTHON={sys.executable}" in export
    assert (out / "manifest.txt").read_text().splitlines() == [
        "algo.rho=0.005 seed=1", "algo.rho=0.005 seed=2", "algo.rho=0.005 seed=3",
        "algo.rho=0.01 seed=1", "algo.rho=0.01 seed=2", "algo.rho=0.01 seed=3"]
    manifest = ArrayManifest.read(out)
    assert manifest.task_argv(out, 4) == [sys.executable, "-m", "megatron_lpreg", "train", TINY,
                                          "trainer.max_steps=2", "algo.rho=0.01", "seed=2",
                                          f"trainer.output_dir={out}/task_4"]
    assert manifest.sbatch == argv


@pytest.mark.parametrize("args, message", [
    (["--grid", "algo.rhoo=0.1,0.2"], r"sweep task 0 \(algo.rhoo=0.1\): unknown config key 'algo.rhoo'"),
    (["--grid", "algo.rho=0.1,2.0"], r"sweep task 1 \(algo.rho=2.0\): algo.rho=2.0 must be in \[0, 1\]"),
    (["--grid", "parallel.tp=1,3"], r"sweep task 1 .*parallel.tp=3 must divide"),
    (["--grid", "algo.rho"], "must look like dotted.key=v1,v2"),
    (["--grid", "algo.rho="], "empty value"),
    ([], "empty sweep"),
    (["--grid", "seed=1,2", "trainer.output_dir=/x"], "trainer.output_dir is set by the sweep"),
    (["--grid", "seed=1,2", "seed=3"], "both swept and given as a common override"),
    (["--grid", "seed=1,2", "algo.rho"], "must look like dotted.key=value"),
])
def test_bad_sweeps_fail_before_anything_is_written(tmp_path, capsys, no_slurm, args, message):
    out = tmp_path / "sweep"
    assert cli.main(["sweep", TINY, *args, "--out", str(out), "--dry-run"]) == 2
    assert re.search(message, capsys.readouterr().err)
    assert not out.exists()


def test_missing_slurm_is_a_clear_error(tmp_path, capsys, no_slurm):
    code = cli.main(["sweep", TINY, "--grid", "seed=1,2", "--out", str(tmp_path / "s")])
    assert code == 2
    err = capsys.readouterr().err
    assert "'sbatch' not found on PATH" in err and "local-cluster.sh up" in err


def test_bad_max_parallel_and_dependency(tmp_path, capsys, no_slurm):
    assert cli.main(["sweep", TINY, "--grid", "seed=1,2", "--max-parallel", "0", "--out", str(tmp_path / "a"),
                     "--dry-run"]) == 2
    assert "--max-parallel=0 must be >= 1" in capsys.readouterr().err
    assert cli.main(["sweep", TINY, "--grid", "seed=1,2", "--dependency", "after", "--out", str(tmp_path / "b"),
                     "--dry-run"]) == 2
    assert "not a Slurm dependency" in capsys.readouterr().err


def test_existing_sweep_dir_is_not_reused(tmp_path, capsys, no_slurm):
    args = ["sweep", TINY, "--grid", "seed=1,2", "--out", str(tmp_path / "s"), "--dry-run"]
    assert cli.main(args) == 0
    assert cli.main(args) == 2
    assert "already holds a job array" in capsys.readouterr().err


def test_sweep_file_and_grid_combine(tmp_path, capsys, no_slurm):
    sweep_file = tmp_path / "s.yaml"
    sweep_file.write_text("overrides: {trainer.max_steps: 3}\nrows:\n  - {algo.name: grpo}\n  - {algo.name: lpreg}\n")
    out = tmp_path / "sw"
    assert cli.main(["sweep", TINY, "--sweep", str(sweep_file), "--grid", "seed=1,2", "--out", str(out),
                     "--dry-run"]) == 0
    manifest = ArrayManifest.read(out)
    assert manifest.tasks == [["algo.name=grpo", "seed=1"], ["algo.name=grpo", "seed=2"],
                              ["algo.name=lpreg", "seed=1"], ["algo.name=lpreg", "seed=2"]]
    assert manifest.command[-1] == "trainer.max_steps=3"


SWEEP_FILES = sorted((REPO / "configs" / "sweeps").glob("*.yaml"))
SWEEP_TARGETS = {"tiny_cpu_rho.yaml": "tiny_cpu.yaml", "paper_baselines.yaml": "qwen3-14b_lpreg_64gpu.yaml",
                 "paper_baselines_offpolicy.yaml": "qwen3-14b_lpreg_64gpu.yaml",
                 **{f"study_task_a{s}.yaml": "study_task_a.yaml"
                    for s in ("", "_controls", "_offpolicy", "_exploratory", "_exploratory_mechanism")}}


@pytest.mark.parametrize("path", SWEEP_FILES, ids=lambda p: p.name)
def test_shipped_sweep_files_validate(path):
    spec = load_sweep_file(path)
    config = REPO / "configs" / SWEEP_TARGETS[path.name]
    for task in spec.tasks():
        RunConfig.load(config, [*spec.overrides, *task])


def test_dry_run_refuses_missing_model_and_data_paths(tmp_path, capsys, no_slurm, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "sweep"
    assert cli.main(["sweep", TINY, "--grid", "model.hf_path=tiny:0,models/missing", "data.source=data/x.jsonl",
                     "--out", str(out), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert f"error: sweep task 0 (model.hf_path=tiny:0): not found: data.source=data/x.jsonl " \
           f"({tmp_path}/data/x.jsonl)" in err and "model.hf_path" not in err.split("not found:")[1]
    assert not out.exists()
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "x.jsonl").write_text('{"problem": "1+1", "answer": "2"}\n')
    assert cli.main(["sweep", TINY, "--grid", "model.hf_path=tiny:0,models/missing", "data.source=data/x.jsonl",
                     "--out", str(out), "--dry-run"]) == 2
    assert f"sweep task 1 (model.hf_path=models/missing): not found: model.hf_path=models/missing " \
           f"({tmp_path}/models/missing)" in capsys.readouterr().err
    (tmp_path / "models" / "missing").mkdir(parents=True)
    assert cli.main(["sweep", TINY, "--grid", "model.hf_path=tiny:0,models/missing", "data.source=data/x.jsonl",
                     "--out", str(out), "--dry-run"]) == 0


def test_paper_config_paths_are_named_with_their_keys(tmp_path, capsys, no_slurm, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert cli.main(["sweep", str(REPO / "configs" / "qwen3-14b_lpreg_64gpu.yaml"), "--grid", "seed=1,2",
                     "--out", str(tmp_path / "s"), "--dry-run"]) == 2
    err = capsys.readouterr().err
    for key in ("model.hf_path=checkpoints/hf/Qwen3-14B-Base", "model.mcore_path=", "data.source=", "eval.data_dir="):
        assert key in err
