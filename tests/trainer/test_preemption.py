"""SIGUSR1 to a running `megatron-lpreg train`: it checkpoints, exits with REQUEUE_EXIT_CODE, and a rerun of the
same command resumes and finishes."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from megatron_lpreg.rundir import PREEMPT_FILE, REQUEUE_EXIT_CODE

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]
NEVER_DONE = 100_000
"""trainer.max_steps for runs that a signal or the end time must stop: no machine gets there first."""


def _cmd(out: Path, steps: int) -> list[str]:
    return [sys.executable, "-m", "megatron_lpreg", "train", "configs/tiny_cpu.yaml", f"trainer.max_steps={steps}",
            f"trainer.output_dir={out}", "rollout.prompts_per_step=4", "rollout.n=2", "eval.benchmarks=[]",
            "trainer.world_size=2"]


def _steps_logged(out: Path) -> int:
    path = out / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.exists() else 0


def test_usr1_checkpoints_exits_for_requeue_and_resumes(tmp_path):
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.Popen(_cmd(out, NEVER_DONE), cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 180
        while _steps_logged(out) < 1:
            assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
            assert time.monotonic() < deadline, "training never logged a step"
            time.sleep(0.5)
        proc.send_signal(signal.SIGUSR1)
        code = proc.wait(timeout=180)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert code == REQUEUE_EXIT_CODE, proc.stderr.read().decode()[-3000:]
    latest = (out / "checkpoints" / "latest").read_text().strip()
    saved_step = int(latest.split("_")[1])
    assert 1 <= saved_step < NEVER_DONE
    assert _steps_logged(out) == saved_step
    assert not (out / PREEMPT_FILE).exists()  # the request was consumed
    # A request left over from an earlier attempt (older than the rerun) must not stop the rerun after one step.
    (out / PREEMPT_FILE).touch()
    os.utime(out / PREEMPT_FILE, (time.time() - 600, time.time() - 600))
    finish = saved_step + 2
    done = subprocess.run(_cmd(out, finish), cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(finish))
    assert "stale preemption request" in done.stderr and not (out / PREEMPT_FILE).exists()


def _checkpoint_tensor_bytes(checkpoint: Path) -> dict[str, int]:
    """Bytes of the model and optimizer tensors a dist checkpoint holds (from its metadata)."""
    import math

    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    out = {"model": 0, "optimizer": 0}
    for key, meta in FileSystemReader(str(checkpoint / "dist")).read_metadata().state_dict_metadata.items():
        if isinstance(meta, TensorStorageMetadata):
            size = math.prod(meta.size) * meta.properties.dtype.itemsize
            out["optimizer" if key.startswith("optimizer.") else "model"] += size
    return out


def test_job_end_time_checkpoints_before_it_exits_for_requeue_and_resumes(tmp_path):
    """Issue 19's acceptance check: with SLURM_JOB_END_TIME set, `train` exits 42 with a complete checkpoint named
    by checkpoints/latest before that moment; rerun without it, it resumes from that checkpoint."""
    from megatron_lpreg.config import RunConfig
    from megatron_lpreg.models.checkpoint import checkpoint_problems
    from megatron_lpreg.models.footprint import checkpoint_size

    out = tmp_path / "run"
    # More steps than any machine finishes in a minute: CI's runner ran 500 steps of this config in 37 s (0.075 s a
    # step), and a run that finishes before the end time never meets the guard.
    cmd = [*_cmd(out, NEVER_DONE), "parallel.tp=1", "trainer.world_size=1", "trainer.walltime_margin_s=15"]
    end = time.time() + 60  # start-up 10-30 s on a loaded 2-core machine, steps of 0.075-10 s, exit 3-13 s
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "SLURM_JOB_END_TIME": str(int(end))}
    env.pop("SLURM_JOB_ID", None)
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    exited = time.time()
    assert done.returncode == REQUEUE_EXIT_CODE, done.stderr[-3000:]
    assert exited < end, f"exited {exited - end:.1f} s after the end time:\n{done.stderr[-3000:]}"
    latest = out / "checkpoints" / (out / "checkpoints" / "latest").read_text().strip()
    assert checkpoint_problems(latest) == [] and (latest / "manifest.json").stat().st_mtime < end
    saved_step = int(latest.name.split("_")[1])
    assert 1 <= saved_step < NEVER_DONE and _steps_logged(out) == saved_step
    assert "exceed the" in done.stderr and "before the job's end time: checkpointing now" in done.stderr
    # the checkpoint holds the bytes `megatron-lpreg plan` announces: fp32 weights + two fp32 Adam moments
    cfg = RunConfig.load("configs/tiny_cpu.yaml", cmd[cmd.index("train") + 2:])
    size = checkpoint_size(cfg.model, cfg.parallel, cfg.checkpoint)
    assert _checkpoint_tensor_bytes(latest) == {"model": size.weights, "optimizer": size.main_params
                                               + size.adam_moments}

    env.pop("SLURM_JOB_END_TIME")
    finish = saved_step + 1
    done = subprocess.run([*cmd[:-3], f"trainer.max_steps={finish}", *cmd[-3:]], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"resuming from {latest}" in done.stderr
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(finish))


def test_term_to_every_process_at_the_time_limit_still_checkpoints_and_exits_for_requeue(tmp_path):
    """Slurm's TERM at the time limit reaches every process of the step at once (launcher, fork helper, ranks,
    reward forker): the ranks finish the step and save, the helpers survive to pass the exit code up."""
    import psutil

    out = tmp_path / "run"
    cmd = [*_cmd(out, NEVER_DONE), "parallel.tp=1", "trainer.world_size=1", "reward.name=math"]
    proc = subprocess.Popen(cmd, cwd=REPO, env={**os.environ, "PYTHONWARNINGS": "ignore"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 180
        while _steps_logged(out) < 1:
            assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
            assert time.monotonic() < deadline, "training never logged a step"
            time.sleep(0.5)
        tree = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
        assert len(tree) >= 3  # launcher, fork helper, rank (+ the reward forker once it started)
        for member in tree:
            member.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=180)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert code == REQUEUE_EXIT_CODE, proc.stderr.read().decode()[-3000:]
    latest = (out / "checkpoints" / "latest").read_text().strip()
    assert _steps_logged(out) == int(latest.split("_")[1]) >= 1
