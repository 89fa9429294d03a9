"""The Slurm path end to end on a real local Slurm (slurm/dev/local-cluster.sh: munged + slurmctld + slurmd on this
machine): a 3-task sweep array of configs/tiny_cpu.yaml, an eval array that waits on a training job, and USR1
preemption -> checkpoint -> ``scontrol requeue`` -> resume with the same final parameters as an uninterrupted run.

The session fixture starts the cluster (installing the Debian packages if missing, as root) and stops it again
if it was not already running. Every job here is a few tiny CPU training steps.
"""
from __future__ import annotations

import csv
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from megatron_lpreg.launch.slurm import SbatchRequest, array_task_states, queued_tasks, submit
from megatron_lpreg.rundir import latest_checkpoint
from megatron_lpreg.telemetry import read_jsonl

pytestmark = pytest.mark.slurm

REPO = Path(__file__).resolve().parents[2]
CLUSTER = REPO / "slurm" / "dev" / "local-cluster.sh"
TINY = str(REPO / "configs" / "tiny_cpu.yaml")
STEPS = 3
# A few small steps of the tiny CPU config: one rank, 4 prompts x 4 responses, short answers.
FAST = [f"trainer.max_steps={STEPS}", "parallel.tp=1", "trainer.world_size=1", "rollout.prompts_per_step=4",
        "rollout.n=4", "eval.benchmarks=[]"]
METRIC_KEYS = ("step", "loss", "reward_mean", "entropy")


@pytest.fixture(scope="session")
def slurm_env():
    """Environment with SLURM_CONF of the running local cluster (started here and stopped after the session)."""
    if os.geteuid() != 0 and shutil.which("slurmctld") is None:
        pytest.skip("the local Slurm cluster needs root (to install and run munged/slurmctld/slurmd)")
    was_up = subprocess.run(["bash", str(CLUSTER), "status"], capture_output=True).returncode == 0
    start = time.monotonic()
    proc = subprocess.run(["bash", str(CLUSTER), "up"], capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        pytest.fail(f"local-cluster.sh up failed:\n{proc.stdout}\n{proc.stderr}")
    match = re.search(r"^export SLURM_CONF=(\S+)$", proc.stdout, re.M)
    assert match, proc.stdout
    sys.stderr.write(f"\nlocal Slurm up in {time.monotonic() - start:.1f}s\n")
    env = {**os.environ, "SLURM_CONF": match.group(1), "MLPREG_ROOT": str(REPO), "MLPREG_PYTHON": sys.executable,
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    env.pop("MLPREG_SITE_ENV", None)
    yield env
    if not was_up:
        start = time.monotonic()
        subprocess.run(["bash", str(CLUSTER), "down"], capture_output=True, timeout=120)
        sys.stderr.write(f"\nlocal Slurm down in {time.monotonic() - start:.1f}s\n")


def _cli(env: dict, *args: str, timeout: float = 360) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "megatron_lpreg", *args], env=env, capture_output=True, text=True,
                          timeout=timeout, cwd=REPO)


def _logs(directory: Path) -> str:
    return "\n".join(f"--- {p}\n{p.read_text()[-4000:]}" for p in sorted(directory.rglob("*.out")))


def _submit_train(env: dict, run_dir: Path, log_dir: Path, overrides: list[str]) -> str:
    log_dir.mkdir(parents=True, exist_ok=True)
    request = SbatchRequest(script=REPO / "slurm" / "train.sbatch", job_name="mlpreg-train",
                            output=str(log_dir / "%x-%j.out"),
                            script_args=[TINY, *overrides, f"trainer.output_dir={run_dir}"],
                            extra_args=[f"--chdir={REPO}"])
    return submit(request, env)


def _wait(job_id: str, env: dict, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while queued_tasks(job_id, env):
        assert time.monotonic() < deadline, f"job {job_id} still queued or running after {timeout}s"
        time.sleep(1)


def _scontrol_field(job_id: str, env: dict, field: str) -> str:
    out = subprocess.run(["scontrol", "-o", "show", "job", job_id], env=env, capture_output=True, text=True).stdout
    match = re.search(rf"\b{field}=(\S+)", out)
    return match.group(1) if match else ""


def _checkpoint_tensors(checkpoint: Path, scratch: Path) -> dict:
    """Every tensor of a dist checkpoint (model parameters and optimizer state), read without a process group."""
    import torch
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    target = scratch / f"{checkpoint.parent.parent.name}-{checkpoint.name}.pt"
    dcp_to_torch_save(str(checkpoint / "dist"), str(target))
    state = torch.load(target, weights_only=False)
    return {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}


def test_sweep_array_of_tiny_cpu_and_collect(slurm_env, tmp_path):
    out = tmp_path / "sweep"
    start = time.monotonic()
    proc = _cli(slurm_env, "sweep", TINY, "--grid", "algo.rho=0.005,0.01,0.02", *FAST, "--wait", "--poll", "1",
                "--timeout", "300", "--out", str(out))
    elapsed = time.monotonic() - start
    assert proc.returncode == 0, proc.stdout + proc.stderr + _logs(out)
    assert proc.stdout.strip().splitlines()[-1] == str(out)
    for index, rho in enumerate((0.005, 0.01, 0.02)):
        rows = read_jsonl(out / f"task_{index}" / "metrics.jsonl")
        steps = [row["step"] for row in rows]
        assert len(steps) == STEPS and steps == list(range(steps[0], steps[0] + STEPS)), steps
        assert all(isinstance(row[key], (int, float)) for row in rows for key in METRIC_KEYS)
        assert f"rho: {rho}" in (out / f"task_{index}" / "config.yaml").read_text()
    proc = _cli(slurm_env, "collect", str(out))
    assert proc.returncode == 0, proc.stderr
    with open(out / "summary.csv") as handle:
        table = list(csv.DictReader(handle))
    assert [(row["run"], row["algo.rho"], row["status"], row["steps"]) for row in table] == [
        (f"task_{i}", rho, "ok", str(STEPS)) for i, rho in enumerate(("0.005", "0.01", "0.02"))]
    assert all(row["reward_mean"] != "" and row["loss"] != "" for row in table)
    assert (out / "curves.png").stat().st_size > 0
    sys.stderr.write(f"\n3-task sweep array: {elapsed:.1f}s\n")


def test_failed_task_makes_the_sweep_fail(slurm_env, tmp_path):
    out = tmp_path / "sweep"
    # model.hf_path names a directory that is no model (a missing one is refused before submission): the config is
    # valid, the task fails at startup.
    (tmp_path / "not_a_model").mkdir()
    proc = _cli(slurm_env, "sweep", TINY, "--grid", f"model.hf_path=tiny:0,{tmp_path / 'not_a_model'}", *FAST,
                "trainer.max_steps=1", "--wait", "--poll", "1", "--timeout", "300", "--out", str(out))
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "task 0: COMPLETED (exit 0)" in proc.stdout and re.search(r"task 1: \w+ \(exit [1-9]", proc.stdout)
    assert f"task 1 failed; log: {out}/logs/" in proc.stderr


def test_eval_array_waits_for_the_training_job(slurm_env, tmp_path):
    run_dir = tmp_path / "run"
    start = time.monotonic()
    train_id = _submit_train(slurm_env, run_dir, tmp_path / "logs", FAST)
    proc = _cli(slurm_env, "eval-array", str(run_dir), "--benchmarks", "synthetic", "--dependency",
                f"afterok:{train_id}", "--wait", "--poll", "1", "--timeout", "300", "--out", str(tmp_path / "ev"))
    elapsed = time.monotonic() - start
    assert proc.returncode == 0, proc.stdout + proc.stderr + _logs(tmp_path)
    assert _scontrol_field(train_id, slurm_env, "JobState") == "COMPLETED"
    final = latest_checkpoint(run_dir)
    status = json.loads((tmp_path / "ev" / "status" / "task_0.json").read_text())
    assert status["argv"][status["argv"].index("--checkpoint") + 1] == str(final)  # resolved after training
    assert status["started"] >= (final.parent / "latest").stat().st_mtime
    assert (tmp_path / "ev" / "task_0" / "results.json").is_file()
    sys.stderr.write(f"\ntrain + dependent eval array: {elapsed:.1f}s\n")


def test_usr1_checkpoints_requeues_and_resumes_bit_exact(slurm_env, tmp_path):
    # Six paced steps: the request must land (it is sent after step 1) before the last step ends; CI once
    # finished a 4-step run of 0.2 s steps first, when the trap still started Python to write the flag.
    steps = ["trainer.max_steps=6", "checkpoint.interval=100", "reward.name=tests.slurm.rewards:digit_share_paced",
             *(o for o in FAST if "max_steps" not in o)]
    reference = tmp_path / "reference"
    proc = _cli(slurm_env, "train", TINY, *steps, f"trainer.output_dir={reference}")
    assert proc.returncode == 0, proc.stderr[-4000:]

    run_dir = tmp_path / "preempted"
    start = time.monotonic()
    job_id = _submit_train(slurm_env, run_dir, tmp_path / "logs", steps)
    deadline = time.monotonic() + 240
    while not read_jsonl(run_dir / "metrics.jsonl"):  # the trainer is past start-up: its handler is installed
        assert time.monotonic() < deadline and queued_tasks(job_id, slurm_env), _logs(tmp_path / "logs")
        time.sleep(0.2)
    subprocess.run(["scancel", "--batch", "--signal=USR1", job_id], env=slurm_env, check=True)
    _wait(job_id, slurm_env, timeout=300)
    elapsed = time.monotonic() - start
    log = _logs(tmp_path / "logs")
    assert array_task_states(job_id, slurm_env)[0].state == "COMPLETED", log
    assert _scontrol_field(job_id, slurm_env, "Restarts") == "1", log
    assert f"scontrol requeue {job_id}" in log and "restart 1" in log
    ref_rows, run_rows = read_jsonl(reference / "metrics.jsonl"), read_jsonl(run_dir / "metrics.jsonl")
    assert [r["step"] for r in run_rows] == [r["step"] for r in ref_rows] and len(ref_rows) == 6
    assert [r["loss"] for r in run_rows] == [r["loss"] for r in ref_rows]
    assert any(r["loss"] != 0 for r in ref_rows)  # the parameters really moved, so the comparison can fail
    ref, got = latest_checkpoint(reference), latest_checkpoint(run_dir)
    assert got.name == ref.name
    ref_tensors, got_tensors = _checkpoint_tensors(ref, tmp_path), _checkpoint_tensors(got, tmp_path)
    assert "embedding.word_embeddings.weight" in ref_tensors and any(k.startswith("optimizer.") for k in ref_tensors)
    assert ref_tensors.keys() == got_tensors.keys()
    for name, tensor in ref_tensors.items():
        assert tensor.equal(got_tensors[name]), name
    sys.stderr.write(f"\nUSR1 -> requeue -> resume: {elapsed:.1f}s\n")
