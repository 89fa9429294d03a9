"""Stop before the time limit on a real local Slurm (22.05 exports no SLURM_JOB_END_TIME: slurm/common.sh reads it
with squeue and exports it, and the trainer's own squeue query is checked against scontrol here): a training job
with ``--time=1`` checkpoints and exits with the requeue code before its end, ``train.sbatch`` requeues it, and
the requeued attempt resumes from that checkpoint. The run is long (1000 steps), so the test
cancels the job once the second attempt has resumed; it never reaches Slurm's own time limit."""
from __future__ import annotations

import re
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import pytest

from megatron_lpreg.launch.slurm import SbatchRequest, queued_tasks, submit
from megatron_lpreg.models.checkpoint import checkpoint_problems
from megatron_lpreg.telemetry import read_jsonl
from megatron_lpreg.trainer.walltime import job_end_time
from tests.slurm.test_local_cluster import FAST, REPO, TINY, _logs, _scontrol_field, slurm_env  # noqa: F401

pytestmark = pytest.mark.slurm

MARGIN_S = 40
"""trainer.walltime_margin_s. Slurm checks time limits and ``--signal`` warnings about every 30 s, so the USR1 asked
for 1 s before the end can arrive ~30 s early (measured: 28 s before the end of a 60 s job); the guard must stop
the trainer before that, or the test sees a preemption instead of the walltime stop (it did, 1 run in 3)."""


def _all_logs(log_dir: Path, run_dir: Path) -> str:
    """The job's output and the trainer's own logs (``<run>/logs/*.log``, where the batch script sends them)."""
    return _logs(log_dir) + "".join(f"\n--- {p}\n{p.read_text()}" for p in sorted((run_dir / "logs").glob("*.log")))


def _wait_for(predicate, timeout: float, what: str, logs) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"{what} not seen within {timeout}s\n{logs()}"
        time.sleep(1)


def test_time_limit_checkpoints_before_the_end_requeues_and_resumes(slurm_env, tmp_path, monkeypatch):  # noqa: F811
    run_dir, log_dir = tmp_path / "run", tmp_path / "logs"
    log_dir.mkdir()
    overrides = [*(o for o in FAST if "max_steps" not in o), "trainer.max_steps=100000", "checkpoint.interval=0",
                 f"trainer.walltime_margin_s={MARGIN_S}"]
    # --time=1: a one-minute limit; USR1 moved to 1 s before the end, so that only the walltime guard can stop
    # the trainer in time (the script's default asks 600 s before the end, i.e. at once).
    request = SbatchRequest(script=REPO / "slurm" / "train.sbatch", job_name="mlpreg-walltime",
                            output=str(log_dir / "%x-%j.out"),
                            script_args=[TINY, *overrides, f"trainer.output_dir={run_dir}"],
                            extra_args=[f"--chdir={REPO}", "--time=1", "--signal=B:USR1@1"])
    start = time.monotonic()
    job_id = submit(request, slurm_env)
    logs = lambda: _all_logs(log_dir, run_dir)  # noqa: E731
    try:
        _wait_for(lambda: _scontrol_field(job_id, slurm_env, "JobState") == "RUNNING", 60, "the start", logs)
        first_end = _scontrol_end_time(job_id, slurm_env)  # the first attempt's end: start + 60 s
        monkeypatch.setenv("SLURM_CONF", slurm_env["SLURM_CONF"])  # the trainer's query, as a rank makes it
        assert job_end_time({"SLURM_JOB_ID": job_id}) == first_end
        _wait_for(lambda: "restart 1" in logs(), 180, "the requeued attempt", logs)
        log = logs()
        assert "before the job's end time: checkpointing now" in log, log
        assert f"scontrol requeue {job_id}" in log and "DUE TO TIME LIMIT" not in log, log
        latest = run_dir / "checkpoints" / (run_dir / "checkpoints" / "latest").read_text().strip()
        saved = int(latest.name.split("_")[1])
        assert saved >= 1 and checkpoint_problems(latest) == []
        assert (latest / "manifest.json").stat().st_mtime < first_end
        _wait_for(lambda: f"resuming from {latest}" in logs(), 120, "the resume", logs)
        elapsed = time.monotonic() - start
    finally:
        subprocess.run(["scancel", job_id], env=slurm_env, capture_output=True)
    deadline = time.monotonic() + 60
    while queued_tasks(job_id, slurm_env) and time.monotonic() < deadline:
        time.sleep(1)
    steps = [row["step"] for row in read_jsonl(run_dir / "metrics.jsonl")]
    assert steps[:saved] == list(range(saved))
    sys.stderr.write(f"\n--time=1: checkpoint at step {saved} before the limit, requeue, resume: {elapsed:.1f}s\n")


def _scontrol_end_time(job_id: str, env: dict) -> float:
    text = _scontrol_field(job_id, env, "EndTime")
    assert re.match(r"\d{4}-\d\d-\d\dT", text), text
    return datetime.fromisoformat(text).timestamp()
