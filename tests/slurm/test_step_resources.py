"""Resources of each job step and the site template, on a real local Slurm that enforces allocations with cgroups
(``MLPREG_SLURM_CGROUP=1``: task/cgroup and proctrack/cgroup on this machine's cgroup v1 hierarchies; cores, memory
and devices constrained) and declares two GPUs (gres backed by device nodes without a device).

- slurm/site.example.env, loaded the way the launcher loads it, passes sbatch's own parsing (``sbatch --test-only``)
  and asks for whole nodes; the value it used to have (``SBATCH_EXCLUSIVE=1``) is refused by that same check.
- A step built by slurm/common.sh gets the job's CPUs, memory and GPUs inside its cgroups and the raised open-file
  limit, also where steps hold only what they request (``SLURM_EXACT=1``, Slurm 20.11's default), which confines a
  bare ``srun`` in the same job to one CPU. (Slurm 22.05 without it gives a bare step all of the job's CPUs and
  GPUs on the node: measured here.)
- The CPU conversion path (``env -u SBATCH_GPUS_PER_NODE -u SBATCH_EXCLUSIVE sbatch slurm/python.sbatch ...``) runs
  without a GPU although the site env asks every job for GPUs and whole nodes.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from megatron_lpreg.launch.slurm import queued_tasks, site_environment

pytestmark = pytest.mark.slurm

REPO = Path(__file__).resolve().parents[2]
CLUSTER = REPO / "slurm" / "dev" / "local-cluster.sh"
CLUSTER_ENV = {"MLPREG_SLURM_DIR": "/tmp/mlpreg-slurm-cg", "MLPREG_SLURM_CTLD_PORT": "6857",
               "MLPREG_SLURM_SLURMD_PORT": "6858", "MLPREG_SLURM_CGROUP": "1", "MLPREG_SLURM_GPUS": "2",
               "MLPREG_SLURM_NODES": "1"}
# What a step sees of its allocation: CPUs it may run on, its memory cgroup's limit, GPUs, open files.
REPORT = ("cg=$(grep -E '^[0-9]+:memory:' /proc/self/cgroup | cut -d: -f3); "
          "echo \"cpus=$(grep Cpus_allowed_list /proc/self/status | cut -f2) "
          "mem=$(cat /sys/fs/cgroup/memory${cg%/task_*}/memory.limit_in_bytes) "
          "gpus=${CUDA_VISIBLE_DEVICES:-none} nofile=$(ulimit -n)\"")


def _cluster(command: str, timeout: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(CLUSTER), command], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **CLUSTER_ENV})


@pytest.fixture(scope="module")
def cgroup_env():
    """Environment with SLURM_CONF of a running 1-node local cluster under task/cgroup, stopped afterwards."""
    if os.geteuid() != 0:
        pytest.skip("the local Slurm cluster needs root")
    if not Path("/sys/fs/cgroup/memory").is_dir() or not Path("/sys/fs/cgroup/cpuset").is_dir():
        pytest.skip("task/cgroup here needs the cgroup v1 memory and cpuset hierarchies under /sys/fs/cgroup")
    was_up = _cluster("status").returncode == 0
    proc = _cluster("up")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    conf = re.search(r"^export SLURM_CONF=(\S+)$", proc.stdout, re.M).group(1)
    assert "TaskPlugin=task/cgroup" in Path(conf).read_text()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SBATCH_", "MLPREG_SITE_ENV"))}
    yield {**env, "SLURM_CONF": conf, "MLPREG_ROOT": str(REPO), "MLPREG_PYTHON": sys.executable,
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    if not was_up:
        assert _cluster("down", timeout=120).returncode == 0


def _template_env(env: dict, **overrides: str) -> dict:
    """The site template as sbatch sees it (sourced with set -a, as the launcher does), with local overrides."""
    return {**env, **site_environment(REPO / "slurm" / "site.example.env", env), **overrides}


# The template's cluster facts this machine cannot have: its partition is "debug" and a node has 2 GPUs, not 8.
LOCAL = {"SBATCH_PARTITION": "debug", "SBATCH_GPUS_PER_NODE": "2"}


def test_site_template_passes_sbatchs_own_parsing(cgroup_env):
    env = _template_env(cgroup_env, **LOCAL)
    assert env["SBATCH_EXCLUSIVE"] == "exclusive" and env["SBATCH_ACCOUNT"] == "my_project"
    cpus = subprocess.run(["nproc"], capture_output=True, text=True).stdout.strip()
    argv = ["sbatch", "--test-only", str(REPO / "slurm" / "train.sbatch"), str(REPO / "configs" / "tiny_cpu.yaml")]
    proc = subprocess.run(argv, env=env, capture_output=True, text=True, cwd="/tmp")
    assert proc.returncode == 0, proc.stderr
    assert re.search(rf"to start at .* using {cpus} processors", proc.stderr), proc.stderr  # the whole node
    # The value the template had before: sbatch refuses it before anything is queued.
    proc = subprocess.run(argv, env={**env, "SBATCH_EXCLUSIVE": "1"}, capture_output=True, text=True, cwd="/tmp")
    assert proc.returncode != 0 and "Invalid --exclusive specification" in proc.stderr, proc.stderr


def _sbatch_wait(env: dict, argv: list[str], out: Path, timeout: float = 180) -> str:
    proc = subprocess.run(["sbatch", "--parsable", f"--output={out}", *argv], env=env, capture_output=True,
                          text=True, cwd="/tmp")
    assert proc.returncode == 0, proc.stderr
    job_id = proc.stdout.strip().split(";")[0]
    deadline = time.monotonic() + timeout
    while queued_tasks(job_id, env):
        assert time.monotonic() < deadline, f"job {job_id} still queued after {timeout}s"
        time.sleep(0.5)
    state = subprocess.run(["scontrol", "-o", "show", "job", job_id], env=env, capture_output=True, text=True).stdout
    assert "JobState=COMPLETED" in state, f"{state}\n{out.read_text() if out.exists() else ''}"
    return out.read_text()


def test_steps_get_the_allocation_inside_their_cgroups(cgroup_env, tmp_path):
    script = tmp_path / "steps.sbatch"
    script.write_text(f"""#!/bin/bash
set -euo pipefail
source "$MLPREG_ROOT/slurm/common.sh"
mlpreg_init
mlpreg_srun_argv
export SLURM_EXACT=1   # steps hold only what they ask for (Slurm 20.11's default; some sites set it)
"${{MLPREG_SRUN_CMD[@]}}" bash -c 'echo "mlpreg $({REPORT})"'
srun --overlap bash -c 'echo "bare $({REPORT})"'
""")
    hard = subprocess.run(["bash", "-c", "ulimit -Hn"], capture_output=True, text=True).stdout.strip()
    # Whole node, as the site template asks (SBATCH_EXCLUSIVE): the job has both CPUs, a step only what it asks for.
    out = _sbatch_wait(cgroup_env, ["--exclusive", "--mem=1500", "--gpus-per-node=2", str(script)],
                       tmp_path / "job.out")
    seen = dict(re.findall(r"^(mlpreg|bare) (.*)$", out, re.M))
    assert seen.keys() == {"mlpreg", "bare"}, out
    mlpreg, bare = (dict(kv.split("=", 1) for kv in seen[k].split()) for k in ("mlpreg", "bare"))
    assert mlpreg == {"cpus": "0-1", "mem": str(1500 * 2**20), "gpus": "0,1", "nofile": hard}, out
    assert "--cpus-per-task=2" in out and "--gres=gpu:2" in out  # mlpreg_init's log line names the step options
    assert bare["cpus"] in ("0", "1"), out  # a step that asks for nothing is held to one CPU by its cgroup


def test_cpu_conversion_runs_without_the_site_gpu_request(cgroup_env, tmp_path):
    env = _template_env(cgroup_env, **LOCAL)
    # What `env -u SBATCH_GPUS_PER_NODE -u SBATCH_EXCLUSIVE sbatch ...` does (docs/slurm.md). Both must go: an
    # exclusive job is given every GPU of its node as well (measured: CUDA_VISIBLE_DEVICES=0,1 with only the first).
    del env["SBATCH_GPUS_PER_NODE"], env["SBATCH_EXCLUSIVE"]
    code = "import os; print('visible GPUs:', os.environ.get('CUDA_VISIBLE_DEVICES', 'none'))"
    out = _sbatch_wait(env, ["--nodes=1", str(REPO / "slurm" / "python.sbatch"), "-c", code], tmp_path / "conv.out")
    assert "visible GPUs: none" in out and "finished with exit code 0" in out, out
