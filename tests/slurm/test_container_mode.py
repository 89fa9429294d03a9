"""Container mode of the Slurm scripts (MLPREG_CONTAINER=pyxis) on a real 2-node local Slurm: every Python call of a
job runs as an srun step inside the image, the batch shell runs only shell and Slurm commands.

Neither pyxis nor enroot exists here, so ``slurm/dev/pyxis-srun`` stands in for srun with the pyxis plugin: it takes
pyxis's options (--container-image, --container-mounts, --container-workdir), records every call, and runs the step
with podman in the CPU image (``make image`` builds it as localhost/megatron-lpreg:cpu). The job trains 2 steps of
configs/tiny_cpu.yaml with 2 ranks (TP2 over gloo) on nodes n1 and n2 (each slurmd in its own network namespace, see
test_two_nodes.py), through Ray started by slurm/common.sh.

Checked: the job completes on both nodes; no Python ran on the host (``python``/``python3`` on the job's PATH are
tripwires that record a call and fail, and the image's interpreter path does not exist on the host); every step the
batch shell started went through the container options, running the image's Python (shell-env, run-dir, ray-env, the
Ray head on n1 and worker on n2, wait-ray, the trainer); every Python process seen in the nodes' namespaces while the
job ran lived in a container (a mount namespace other than the host's); the steps asked for CPUs and memory and
carried the raised open-file limit; Ray head, worker and driver logs are separate files under the run directory;
no container is left behind.

Runs only when MLPREG_IMAGE names the image (``make image`` sets it right after building, so the image holds the
current tree); a stale image would test old code.
"""
from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from megatron_lpreg.launch.slurm import SbatchRequest, queued_tasks, submit
from megatron_lpreg.telemetry import read_jsonl

pytestmark = pytest.mark.slurm

REPO = Path(__file__).resolve().parents[2]
CLUSTER = REPO / "slurm" / "dev" / "local-cluster.sh"
IMAGE = os.environ.get("MLPREG_IMAGE", "")
IMAGE_PYTHON = "/opt/venv/bin/python"  # the image's interpreter (container/Containerfile.cpu)
TINY = str(REPO / "configs" / "tiny_cpu.yaml")
STEPS = 2
SUBNET = "10.213.47"
CTLD_PORT = "6847"
NODE_ADDR = {"n1": f"{SUBNET}.2", "n2": f"{SUBNET}.3"}
NETNS = {node: f"mlp{CTLD_PORT}-{node}" for node in NODE_ADDR}
CLUSTER_ENV = {"MLPREG_SLURM_DIR": "/tmp/mlpreg-slurm-ct", "MLPREG_SLURM_CTLD_PORT": CTLD_PORT,
               "MLPREG_SLURM_SUBNET": SUBNET}
OVERRIDES = [f"trainer.max_steps={STEPS}", "trainer.world_size=2", "parallel.tp=2", "rollout.prompts_per_step=4",
             "rollout.n=4", "eval.benchmarks=[]"]
TRIPWIRE = '#!/bin/sh\necho "$0 $*" >> {log}\nexit 97\n'


def _cluster(command: str, *args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(CLUSTER), command, *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **CLUSTER_ENV})


@pytest.fixture(scope="module")
def cluster_env():
    """SLURM_CONF and the cluster's own site env of a running 2-node local cluster, stopped afterwards."""
    if not IMAGE:
        pytest.skip("container mode runs through `make image` (MLPREG_IMAGE names the freshly built image)")
    if os.geteuid() != 0 or shutil.which("podman") is None:
        pytest.skip("needs root and podman (make image installs podman, runc and debootstrap)")
    if subprocess.run(["podman", "image", "exists", IMAGE]).returncode != 0:
        pytest.fail(f"MLPREG_IMAGE={IMAGE} does not exist: build it with container/build-cpu.sh")
    assert not Path(IMAGE_PYTHON).exists(), f"{IMAGE_PYTHON} exists on the host: host Python would go unnoticed"
    was_up = _cluster("status").returncode == 0
    proc = _cluster("up", "--nodes", "2")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    exports = dict(re.findall(r"^export (\w+)=(\S+)$", proc.stdout, re.M))
    yield exports
    if not was_up:
        proc = _cluster("down", timeout=120)
        assert proc.returncode == 0, proc.stderr


def _job_env(exports: dict, tmp_path: Path) -> dict:
    """Submission environment: pyxis-srun as `srun`, tripwires as `python`/`python3`, the container site env."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").symlink_to(REPO / "slurm" / "dev" / "pyxis-srun")
    for name in ("python", "python3"):
        (bin_dir / name).write_text(TRIPWIRE.format(log=tmp_path / "host-python.log"))
        (bin_dir / name).chmod(0o755)
    site = tmp_path / "site.env"
    site.write_text(f"source {exports['MLPREG_SITE_ENV']}\n"  # Ray head address and gloo interface of the nodes
                    "MLPREG_CONTAINER=pyxis\n"
                    f"MLPREG_CONTAINER_IMAGE={IMAGE}\n"
                    f"MLPREG_CONTAINER_MOUNTS=/tmp:/tmp,{REPO}:{REPO}:ro,{Path.home()}:{Path.home()}\n"
                    f"MLPREG_PYTHON={IMAGE_PYTHON}\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV", "MLPREG_"))}
    return {**env, "SLURM_CONF": exports["SLURM_CONF"], "MLPREG_SITE_ENV": str(site), "MLPREG_ROOT": str(REPO),
            "PATH": f"{bin_dir}:{os.environ['PATH']}", "MLPREG_PYXIS_LOG": str(tmp_path / "pyxis.log"),
            "RAY_DEDUP_LOGS": "0"}


def _namespace(pid: str, kind: str) -> str:
    return os.readlink(f"/proc/{pid}/ns/{kind}")


def _python_on_nodes(host_mnt: str) -> set[tuple[str, str, bool]]:
    """(node, program, in a container) for every Python process now in a node's network namespace."""
    found = set()
    for node, netns in NETNS.items():
        pids = subprocess.run(["ip", "netns", "pids", netns], capture_output=True, text=True).stdout.split()
        for pid in pids:
            try:
                argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
                exe, mnt = os.readlink(f"/proc/{pid}/exe"), _namespace(pid, "mnt")
            except OSError:
                continue  # exited meanwhile
            if "python" in Path(exe).name:
                found.add((node, argv[0].decode(errors="replace")[:60], mnt != host_mnt))
    return found


def _plain(path: Path) -> str:
    """A log without colour codes (Ray colours its lines)."""
    return re.sub(r"\x1b\[[0-9;]*m", "", path.read_text())


def _records(path: Path) -> list[tuple[str, list[str], list[str]]]:
    """pyxis-srun's log: (kind, words before --, command)."""
    out = []
    for line in path.read_text().splitlines():
        words = shlex.split(line)
        cut = words.index("--")
        out.append((words[0], words[1:cut], words[cut + 1:]))
    return out


def test_two_node_job_runs_every_python_call_inside_the_container(cluster_env, tmp_path):
    env = _job_env(cluster_env, tmp_path)
    run_dir, log_dir, work = tmp_path / "run", tmp_path / "logs", tmp_path / "work"
    log_dir.mkdir()
    work.mkdir()
    request = SbatchRequest(script=REPO / "slurm" / "train.sbatch", job_name="mlpreg-ct",
                            output=str(log_dir / "%x-%j.out"),
                            script_args=[TINY, *OVERRIDES, f"trainer.output_dir={run_dir}"],
                            extra_args=[f"--chdir={work}", "--nodes=2"])
    host_mnt = _namespace("self", "mnt")
    start = time.monotonic()
    job_id = submit(request, env)
    seen: set[tuple[str, str, bool]] = set()
    deadline = time.monotonic() + 480
    while queued_tasks(job_id, env):
        assert time.monotonic() < deadline, f"job {job_id} still queued or running after 480 s"
        seen |= _python_on_nodes(host_mnt)
        time.sleep(0.5)
    elapsed = time.monotonic() - start
    log = "\n".join(p.read_text() for p in sorted(log_dir.glob("*.out")))
    state = subprocess.run(["scontrol", "-o", "show", "job", job_id], env=env, capture_output=True, text=True).stdout
    assert "JobState=COMPLETED" in state and "ExitCode=0:0" in state and "NodeList=n[1-2]" in state, \
        f"{state}\n{log[-6000:]}"
    assert [row["step"] for row in read_jsonl(run_dir / "metrics.jsonl")] == list(range(STEPS))

    # Nothing ran Python on the host: no tripwire fired; every step went into the image.
    assert not (tmp_path / "host-python.log").exists(), (tmp_path / "host-python.log").read_text()
    records = _records(tmp_path / "pyxis.log")
    assert not [r for r in records if r[0] == "srun-host"], "a step ran outside the container"
    submitted = [(opts, cmd) for kind, opts, cmd in records if kind == "srun"]
    assert all(f"--container-image={IMAGE}" in opts and f"--container-workdir={work}" in opts and
               cmd[0] == IMAGE_PYTHON for opts, cmd in submitted), submitted
    started = {(opts[0], " ".join(cmd[1:4])) for kind, opts, cmd in records if kind == "step"}
    for node, what in [("n1", "-m megatron_lpreg.launch.job shell-env"), ("n1", "-m megatron_lpreg.launch.job run-dir"),
                       ("n1", "-m megatron_lpreg.launch.job ray-env"), ("n1", "-m ray.scripts.scripts start"),
                       ("n2", "-m ray.scripts.scripts start"), ("n1", "-m megatron_lpreg.launch.job wait-ray"),
                       ("n1", "-m megatron_lpreg train")]:
        assert (f"node={node}", what) in started, f"{what} on {node} missing from {sorted(started)}"
    # Python seen in the nodes' namespaces (Ray, its workers, the rank actors on both nodes) was all containerised.
    assert {node for node, _, _ in seen} == set(NODE_ADDR), seen
    assert all(contained for _, _, contained in seen), [s for s in seen if not s[2]]

    # Step resources and the open-file limit (the host's hard limit, passed from the batch shell to every step).
    hard = subprocess.run(["bash", "-c", "ulimit -Hn"], capture_output=True, text=True).stdout.strip()
    node_steps = [opts for opts, cmd in submitted if "ray.scripts.scripts" in cmd or "train" in cmd]
    assert len(node_steps) == 3 and all("--mem=0" in o and "--cpus-per-task=1" in o for o in node_steps), node_steps
    assert {opts[1] for kind, opts, _ in records if kind == "step"} == {f"nofile={hard}:{hard}"}
    assert f"open files: {hard}" in log

    # Separate logs under the run directory; the job log keeps only the batch shell's lines.
    logs = run_dir / "logs"
    assert "Ray runtime started" in _plain(logs / f"ray-head-{job_id}.log")
    workers = "".join(_plain(p) for p in logs.glob(f"ray-worker-{job_id}-*.log"))
    assert f"Local node IP: {NODE_ADDR['n2']}" in workers, workers[-3000:]
    assert "[rank 0/2]" in _plain(logs / f"driver-{job_id}.log")
    assert "[rank 0/2]" not in log and f"driver (trainer) log: {logs}/driver-{job_id}.log" in log

    # No container outlives the job (pyxis-srun's watchdog removes those Slurm could not stop).
    deadline = time.monotonic() + 30
    while left := subprocess.run(["podman", "ps", "-a", "-q", "--filter", f"name=mlpreg-pyxis-{job_id}-"],
                                 capture_output=True, text=True).stdout.split():
        assert time.monotonic() < deadline, f"containers left behind: {left}"
        time.sleep(1)
    sys.stderr.write(f"\n2-node container-mode train.sbatch: {elapsed:.1f}s\n")
