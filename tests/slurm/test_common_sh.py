"""slurm/common.sh signal forwarding and requeue decision, run by real bash outside Slurm: a stand-in
``scontrol`` on PATH records what the script asks of Slurm (tests/slurm/test_local_cluster.py does it for real)."""
from __future__ import annotations

import os
import re
import signal
import stat
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

# A trainer stand-in: USR1 or TERM -> "checkpoint" and exit with the requeue code, as trainer/signals.py does.
TRAINER = ("import signal, sys, time\n"
           "for s in (signal.SIGUSR1, signal.SIGTERM): signal.signal(s, lambda n, f: sys.exit(42))\n"
           "open(sys.argv[1], 'w').close()\n"
           "time.sleep(float(sys.argv[2]))\n"
           "sys.exit(int(sys.argv[3]))\n")

SCRIPT = """set -euo pipefail
source "$MLPREG_ROOT/slurm/common.sh"
mlpreg_init
mlpreg_run "$MLPREG_PYTHON" -c "$TRAINER" "$READY" "$SLEEP" "$CODE"
mlpreg_finish
"""


def _start(tmp_path: Path, sleep: float = 0, code: int = 0, script: str = SCRIPT,
           **extra_env: str) -> tuple[subprocess.Popen, Path, Path]:
    bin_dir, ready, calls = tmp_path / "bin", tmp_path / "ready", tmp_path / "scontrol.calls"
    bin_dir.mkdir()
    scontrol = bin_dir / "scontrol"
    scontrol.write_text(f'#!/bin/bash\necho "$@" >> {calls}\n')
    scontrol.chmod(scontrol.stat().st_mode | stat.S_IXUSR)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "MLPREG_ROOT": str(REPO), "SLURM_JOB_ID": "77",
           "MLPREG_PYTHON": sys.executable, "TRAINER": TRAINER, "READY": str(ready), "SLEEP": str(sleep),
           "CODE": str(code), **extra_env}
    env.pop("MLPREG_SITE_ENV", None)
    proc = subprocess.Popen(["bash", "-c", script], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    return proc, ready, calls


def _wait_ready(ready: Path) -> None:
    deadline = time.monotonic() + 30
    while not ready.exists():
        assert time.monotonic() < deadline, "the trainer stand-in never started"
        time.sleep(0.05)


def test_usr1_is_forwarded_and_turns_into_a_requeue(tmp_path):
    proc, ready, calls = _start(tmp_path, sleep=30, code=0)
    _wait_ready(ready)
    proc.send_signal(signal.SIGUSR1)
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, out
    assert calls.read_text() == "requeue 77\n"
    assert "got SIGUSR1; forwarding" in out and "scontrol requeue 77" in out


def test_cancellation_forwards_term_but_never_requeues(tmp_path):
    proc, ready, calls = _start(tmp_path, sleep=30, code=0)
    _wait_ready(ready)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 42, out  # the trainer checkpointed, but a cancelled job must stay cancelled
    assert not calls.exists()



def test_term_at_the_time_limit_requeues_when_the_trainer_checkpointed(tmp_path):
    # SLURM_JOB_END_TIME already reached: Slurm's TERM at the limit, not a cancellation (Slurm 22.05 accepts
    # `scontrol requeue` from the job then; measured on the local cluster, docs/slurm.md)
    proc, ready, calls = _start(tmp_path, sleep=30, code=0, SLURM_JOB_END_TIME=str(int(time.time()) - 1))
    _wait_ready(ready)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, out
    assert calls.read_text() == "requeue 77\n" and "TERM at the time limit" in out
    # an hour before the end the same TERM is a cancellation
    (tmp_path / "early").mkdir()
    proc, ready, calls = _start(tmp_path / "early", sleep=30, code=0, SLURM_JOB_END_TIME=str(int(time.time()) + 3600))
    _wait_ready(ready)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 42 and not calls.exists(), out

@pytest.mark.parametrize("code", [0, 3])
def test_exit_code_passes_through(tmp_path, code):
    proc, _, calls = _start(tmp_path, sleep=0, code=code)
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == code, out
    assert not calls.exists()


def test_scripts_parse_and_need_their_variables(tmp_path):
    for script in [*sorted((REPO / "slurm").glob("*.sbatch")), REPO / "slurm" / "common.sh",
                   REPO / "slurm" / "dev" / "local-cluster.sh"]:
        subprocess.run(["bash", "-n", str(script)], check=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "MLPREG_"))}
    proc = subprocess.run(["bash", str(REPO / "slurm" / "train.sbatch"), "cfg.yaml"], env=env, capture_output=True,
                          text=True)
    assert proc.returncode != 0 and "export MLPREG_ROOT" in proc.stderr
    proc = subprocess.run(["bash", str(REPO / "slurm" / "sweep_array.sbatch"), str(tmp_path)],
                          env={**env, "MLPREG_ROOT": str(REPO)}, capture_output=True, text=True)
    assert proc.returncode != 0 and "not inside a Slurm job" in proc.stderr


# A trainer stand-in that, like megatron_lpreg/trainer/loop.py, polls its run directory's preemption flag; it dies
# on a signal (default action), so the test fails if the request arrives as a signal instead.
POLLING_TRAINER = ("import os, pathlib, sys, time\n"
                   "flag = pathlib.Path(sys.argv[1]) / '.preempt_requested'\n"
                   "open(sys.argv[2], 'w').write(os.environ['MLPREG_LAUNCH_TIME'])\n"
                   "for _ in range(600):\n"
                   "    if flag.exists(): flag.unlink(); sys.exit(42)\n"
                   "    time.sleep(0.05)\n"
                   "sys.exit(0)\n")


def test_usr1_with_a_run_dir_goes_through_the_trainers_flag_file(tmp_path):
    from megatron_lpreg.rundir import PREEMPT_FILE

    assert PREEMPT_FILE == ".preempt_requested"
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / PREEMPT_FILE).touch()  # a stale request from an earlier attempt must not stop this one
    polling = 'MLPREG_PREEMPT_DIR=$RUN_DIR\nmlpreg_run "$MLPREG_PYTHON" -c "$POLLING" "$RUN_DIR" "$READY"'
    script = SCRIPT.replace('mlpreg_run "$MLPREG_PYTHON" -c "$TRAINER" "$READY" "$SLEEP" "$CODE"', polling)
    proc, ready, calls = _start(tmp_path, script=script, POLLING=POLLING_TRAINER, RUN_DIR=str(run_dir))
    _wait_ready(ready)
    time.sleep(0.3)
    assert proc.poll() is None  # the stale flag was cleared before the trainer started
    assert time.time() - 30 < float(ready.read_text()) <= time.time()  # MLPREG_LAUNCH_TIME: when it was started
    proc.send_signal(signal.SIGUSR1)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out
    assert calls.read_text() == "requeue 77\n"
    assert "asking the trainer in" in out


# Container mode outside Slurm: stand-ins for srun and apptainer on PATH record their arguments and run the command
# behind them, so the same Python runs as the real steps would run it.
FAKE_SRUN = '#!/bin/bash\necho "srun $*" >> "$CALLS"\nwhile [[ $1 == -* ]]; do shift; done\nexec "$@"\n'
FAKE_APPTAINER = ('#!/bin/bash\necho "apptainer $*" >> "$CALLS"\n'
                  'while [[ $1 != "$MLPREG_CONTAINER_IMAGE" ]]; do shift; done\nshift\nexec "$@"\n')
FAKE_SQUEUE = '#!/bin/bash\necho 2026-12-07T06:30:00\n'
CONTAINER_SCRIPT = """set -euo pipefail
source "$MLPREG_ROOT/slurm/common.sh"
mlpreg_init
MLPREG_PREEMPT_DIR=$RUN_DIR
mlpreg_setup_launcher
printf 'cmd %s\\n' "${MLPREG_SRUN_CMD[@]}"
echo "requeue=$MLPREG_REQUEUE_CODE end=$SLURM_JOB_END_TIME log=$MLPREG_DRIVER_LOG"
"""


def _container_env(tmp_path: Path, **extra: str) -> dict:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for name, text in (("srun", FAKE_SRUN), ("apptainer", FAKE_APPTAINER), ("squeue", FAKE_SQUEUE)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "MLPREG_", "SBATCH_"))}
    return {**env, "PATH": f"{bin_dir}:{os.environ['PATH']}", "MLPREG_ROOT": str(REPO), "SLURM_JOB_ID": "77",
            "SLURMD_NODENAME": "n1", "SLURM_CPUS_ON_NODE": "4", "SLURM_GPUS_ON_NODE": "2",
            "MLPREG_PYTHON": sys.executable, "CALLS": str(tmp_path / "calls"), "RUN_DIR": str(tmp_path / "run"),
            "MLPREG_CONTAINER": "apptainer", "MLPREG_CONTAINER_IMAGE": "/images/mlpreg.sif",
            "MLPREG_CONTAINER_MOUNTS": "/shared:/shared,/tmp:/tmp", **extra}


def test_container_mode_runs_python_in_steps_and_builds_container_steps(tmp_path):
    proc = subprocess.run(["bash", "-c", CONTAINER_SCRIPT], env=_container_env(tmp_path), capture_output=True,
                          text=True, cwd=tmp_path, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    prefix = ["apptainer", "exec", "--nv", "--pwd", str(tmp_path), "--bind", "/shared:/shared,/tmp:/tmp",
              "/images/mlpreg.sif"]
    # The batch shell's own Python (the requeue code and flag file) ran as a small step on this node, in the image.
    calls = (tmp_path / "calls").read_text().splitlines()
    assert calls == [f"srun --nodes=1 --ntasks=1 --overlap --quiet --nodelist=n1 --cpus-per-task=1 --mem=0 "
                     f"{' '.join(prefix)} {sys.executable} -m megatron_lpreg.launch.job shell-env",
                     f"{' '.join(prefix)} {sys.executable} -m megatron_lpreg.launch.job shell-env"], calls
    # The trainer's step: the node's CPUs, memory and GPUs, its own log under the run directory, the image.
    log = tmp_path / "run" / "logs" / "driver-77.log"
    assert re.findall(r"^cmd (.*)$", proc.stdout, re.M) == [
        "srun", "--nodes=1", "--ntasks=1", "--overlap", "--kill-on-bad-exit=1", "--mem=0", "--cpus-per-task=4",
        "--gres=gpu:2", f"--output={log}", "--open-mode=append", *prefix]
    end = int(datetime.fromisoformat("2026-12-07T06:30:00").timestamp())  # squeue's %e, local time
    assert f"requeue=42 end={end} log={log}" in proc.stdout
    assert log.parent.is_dir()  # the log folder exists before srun opens the file


@pytest.mark.parametrize(("extra", "message"), [
    ({"MLPREG_CONTAINER": "docker"}, "MLPREG_CONTAINER=docker: use pyxis or apptainer"),
    ({"MLPREG_CONTAINER": "pyxis", "MLPREG_CONTAINER_IMAGE": ""}, "needs MLPREG_CONTAINER_IMAGE"),
    ({"MLPREG_NOFILE": "999999999"}, "MLPREG_NOFILE=999999999 is above this node's hard limit"),
    ({"MLPREG_STEP_GPUS": "all"}, "MLPREG_STEP_GPUS=all must be a GPU count per node"),
])
def test_bad_container_or_resource_settings_stop_the_job_with_the_fix(tmp_path, extra, message):
    proc = subprocess.run(["bash", "-c", CONTAINER_SCRIPT], env=_container_env(tmp_path, **extra),
                          capture_output=True, text=True, cwd=tmp_path, timeout=60)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr
    assert not (tmp_path / "calls").exists()  # stopped before any step


def test_a_failing_ray_layout_stops_at_once_with_pythons_error(tmp_path):
    env = _container_env(tmp_path, MLPREG_CONTAINER="", SLURM_JOB_NUM_NODES="2", SLURM_JOB_NODELIST="n[1-")
    proc = subprocess.run(["bash", "-c", CONTAINER_SCRIPT], env=env, capture_output=True, text=True, cwd=tmp_path,
                          timeout=60)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "bad Slurm environment" in proc.stderr  # Python's own message, not swallowed by eval "$(...)"
    assert "could not compute the Ray layout of this allocation" in proc.stderr
    assert "unbound variable" not in proc.stderr and "cmd srun" not in proc.stdout
