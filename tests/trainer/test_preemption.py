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
    proc = subprocess.Popen(_cmd(out, 200), cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
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
    assert 1 <= saved_step < 200
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
