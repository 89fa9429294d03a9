"""A real 2-node Slurm allocation on this one machine: ``slurm/dev/local-cluster.sh up --nodes 2`` runs two slurmd
(nodes n1, n2), each in a network namespace of its own joined by a private bridge, and ``sbatch --nodes=2
slurm/train.sbatch`` trains a few steps of configs/tiny_cpu.yaml with two ranks (TP2 over gloo).

slurm/common.sh starts the Ray head on n1 and a Ray worker on n2 (srun steps, each inside its node's namespace);
with one CPU per node the trainer's placement group must put one rank on each node, so the TP group's traffic
crosses the bridge. Checked: the allocation spans both nodes (scontrol, SLURM_JOB_NODELIST in the log), Ray saw 2
nodes, the head's GCS ran in n1's namespace and a raylet in each node's, the trainer's rank actors ran in both
namespaces (which node a process is on is which network namespace it has: sampled from /proc while the job
runs), and the run wrote its metrics rows. Ray's own ``ip=`` log prefixes cannot tell the nodes apart here: both
nodes' log monitors tail the same /tmp/ray session directory, so every actor line is printed twice, once with
each node's address.

A second job declares one GPU per node (gres): Ray's GPU placement then puts a trainer rank and a colocated SGLang
stand-in engine on each node; checked that the engines run in both namespaces, serve on their node's address and
take the distributed weight sync after every step.

This cluster has its own state dir, slurmctld port and subnet, so it can run beside the single-node cluster of
test_local_cluster.py. The fixture stops it (and removes its namespaces and bridge) unless it was already up.
"""
from __future__ import annotations

import os
import re
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
TINY = str(REPO / "configs" / "tiny_cpu.yaml")
STEPS = 2
SUBNET = "10.213.37"
NODE_ADDR = {"n1": f"{SUBNET}.2", "n2": f"{SUBNET}.3"}
CTLD_PORT = "6837"
NETNS = {node: f"mlp{CTLD_PORT}-{node}" for node in NODE_ADDR}  # local-cluster.sh: mlp<slurmctld port>-n<i>
# One declared GPU per node (gres backed by device nodes without a device): jobs that ask for --gres=gpu:1 get
# a Ray node with one GPU on each node; jobs that do not stay on the CPU path.
CLUSTER_ENV = {"MLPREG_SLURM_DIR": "/tmp/mlpreg-slurm-2n", "MLPREG_SLURM_CTLD_PORT": CTLD_PORT,
               "MLPREG_SLURM_SUBNET": SUBNET, "MLPREG_SLURM_GPUS": "1"}
# Two ranks (one TP group of 2), 4 prompts x 4 responses a step, no evaluation.
OVERRIDES = [f"trainer.max_steps={STEPS}", "trainer.world_size=2", "parallel.tp=2", "rollout.prompts_per_step=4",
             "rollout.n=4", "eval.benchmarks=[]"]
# Process kinds worth noticing in a node's namespace, by /proc/<pid>/cmdline (Ray names a busy actor's worker
# "ray::<Class>.<method>", an idle one "ray::<Class>"; the trainer's rank actor class has "Rank" in its name).
KINDS = {"gcs_server": re.compile(r"^\S*/gcs_server\b"), "raylet": re.compile(r"^\S*/raylet\b"),
         "rank actor": re.compile(r"^ray::\w*Rank\w*", re.I),
         "engine": re.compile(r" -m tests\.support\.sglang_standin ")}


def _cluster(command: str, *args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(CLUSTER), command, *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **CLUSTER_ENV})


@pytest.fixture(scope="module")
def two_node_env():
    """Environment (SLURM_CONF, MLPREG_SITE_ENV, ...) of a running 2-node local cluster, stopped afterwards."""
    if os.geteuid() != 0:
        pytest.skip("the 2-node local Slurm cluster needs root (network namespaces, munged/slurmctld/slurmd)")
    if shutil.which("ip") is None or shutil.which("nsenter") is None:
        pytest.skip("the 2-node local Slurm cluster needs `ip` (iproute2) and `nsenter` (util-linux)")
    was_up = _cluster("status").returncode == 0
    start = time.monotonic()
    proc = _cluster("up", "--nodes", "2")
    if proc.returncode != 0:
        pytest.fail(f"local-cluster.sh up --nodes 2 failed:\n{proc.stdout}\n{proc.stderr}")
    exports = dict(re.findall(r"^export (\w+)=(\S+)$", proc.stdout, re.M))
    assert exports.keys() == {"SLURM_CONF", "MLPREG_SITE_ENV"}, proc.stdout
    sys.stderr.write(f"\n2-node local Slurm up in {time.monotonic() - start:.1f}s\n")
    env = {**os.environ, **exports, "MLPREG_ROOT": str(REPO), "MLPREG_PYTHON": sys.executable,
           "RAY_DEDUP_LOGS": "0",  # every actor line with its own prefix (node), none merged across the cluster
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    yield env
    if not was_up:
        start = time.monotonic()
        proc = _cluster("down", timeout=120)
        sys.stderr.write(f"\n2-node local Slurm down in {time.monotonic() - start:.1f}s\n")
        assert proc.returncode == 0, proc.stderr
        netns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
        assert not any(name in netns for name in NETNS.values()), f"down left namespaces behind:\n{netns}"
        links = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True).stdout
        assert f"mlp{CTLD_PORT}" not in links, f"down left the bridge or veths behind:\n{links}"


@pytest.mark.parametrize(("args", "env", "message"), [
    (["--nodes", "0"], {}, "node count must be a positive integer, got '0'"),
    (["--nodes", "2"], {"MLPREG_SLURM_SUBNET": "8.8.8"}, "8.8.8 is not in a private range"),
    (["--nodes", "2"], {"MLPREG_SLURM_SUBNET": "10.1"}, "first three octets of a /24"),
    (["--nodes", "2"], {"MLPREG_SLURM_CTLD_PORT": "x1"}, "MLPREG_SLURM_CTLD_PORT must be a port number"),
])
def test_bad_cluster_settings_are_refused_before_anything_starts(tmp_path, args, env, message):
    state = tmp_path / "s"
    proc = subprocess.run(["bash", str(CLUSTER), "up", *args], capture_output=True, text=True, timeout=60,
                          env={**os.environ, **CLUSTER_ENV, "MLPREG_SLURM_DIR": str(state), **env})
    assert proc.returncode == 1 and message in proc.stderr, proc.stderr
    assert not state.exists()  # no key, config, daemon or namespace was made


def _kinds_on_nodes() -> set[tuple[str, str]]:
    """(node, kind) for every process of a KINDS kind now running in a node's network namespace."""
    found = set()
    for node, netns in NETNS.items():
        pids = subprocess.run(["ip", "netns", "pids", netns], capture_output=True, text=True).stdout.split()
        for pid in pids:
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue  # exited meanwhile
            found.update((node, kind) for kind, pattern in KINDS.items() if pattern.search(cmdline))
    return found


def _scontrol_job(job_id: str, env: dict) -> dict[str, str]:
    out = subprocess.run(["scontrol", "-o", "show", "job", job_id], env=env, capture_output=True, text=True).stdout
    return dict(re.findall(r"\b(JobState|ExitCode|NodeList|NumNodes)=(\S+)", out))


def test_cluster_has_two_nodes_in_their_own_namespaces(two_node_env):
    out = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %T"], env=two_node_env, capture_output=True, text=True,
                         check=True).stdout
    assert sorted(line.split()[0] for line in out.splitlines()) == ["n1", "n2"], out
    # One job step per node: each runs in its node's namespace and sees only that node's address.
    proc = subprocess.run(["srun", "--nodes=2", "--ntasks-per-node=1", "bash", "-c",
                           'echo "$SLURMD_NODENAME $(ip -4 -o addr show dev mlp0 | awk \'{print $4}\')"'],
                          env=two_node_env, capture_output=True, text=True, timeout=120, cwd="/tmp")
    assert proc.returncode == 0, proc.stderr
    seen = dict(line.split() for line in proc.stdout.splitlines())
    assert seen == {name: f"{addr}/24" for name, addr in NODE_ADDR.items()}, proc.stdout


def _run_job(env: dict, tmp_path: Path, overrides: list[str], sbatch_args: list[str]) -> tuple[str, str, set, Path]:
    """Submit train.sbatch on both nodes, sample what runs in each node's namespace until the job has left the
    queue, check it COMPLETED on n[1-2] with Ray head on n1 and a worker on n2; return (job id, job log without
    colour codes, (node, kind) pairs seen, run dir)."""
    run_dir, log_dir = tmp_path / "run", tmp_path / "logs"
    log_dir.mkdir()
    request = SbatchRequest(script=REPO / "slurm" / "train.sbatch", job_name="mlpreg-train2n",
                            output=str(log_dir / "%x-%j.out"),
                            script_args=[TINY, *overrides, f"trainer.output_dir={run_dir}"],
                            extra_args=[f"--chdir={REPO}", "--nodes=2", *sbatch_args])
    start = time.monotonic()
    job_id = submit(request, env)
    deadline = time.monotonic() + 480
    seen: set[tuple[str, str]] = set()
    while queued_tasks(job_id, env):
        assert time.monotonic() < deadline, f"job {job_id} still queued or running after 480 s"
        seen |= _kinds_on_nodes()
        time.sleep(0.5)
    elapsed = time.monotonic() - start
    # The job log, then the Ray head, worker and driver logs slurm/common.sh writes under the run directory.
    paths = [*sorted(log_dir.glob("*.out")), *sorted((run_dir / "logs").glob(f"*-{job_id}*.log"))]
    log = re.sub(r"\x1b\[[0-9;]*m", "", "\n".join(p.read_text() for p in paths))
    job = _scontrol_job(job_id, env)
    assert job.get("JobState") == "COMPLETED" and job.get("ExitCode") == "0:0", f"{job}\n{log[-6000:]}"
    # Both nodes allocated: scontrol and the batch script's SLURM_JOB_NODELIST (logged by mlpreg_init).
    assert job["NodeList"] == "n[1-2]" and job["NumNodes"] == "2", job
    assert re.search(rf"job {job_id} \(mlpreg-train2n\) .* nodes n\[1-2\] ", log), log[-6000:]
    # Ray: head on n1 at its namespace address, a worker on n2; the bootstrap waited until both nodes joined.
    head = NODE_ADDR["n1"]
    assert re.search(rf"Ray head n1 \({re.escape(head)}:\d+\), 2 node\(s\)", log), log[-6000:]
    assert re.search(rf"Ray cluster at {re.escape(head)}:\d+ has 2 node\(s\)", log), log[-6000:]
    assert f"Local node IP: {NODE_ADDR['n2']}" in log, log[-6000:]  # the worker joined with n2's own address
    # What ran where (network namespace = node): the GCS on n1 only, a raylet and a trainer rank on each node.
    assert ("n1", "gcs_server") in seen and ("n2", "gcs_server") not in seen, seen
    expected = {(node, kind) for node in NODE_ADDR for kind in ("raylet", "rank actor")}
    assert expected <= seen, f"processes seen per node: {sorted(seen)}\n{log[-6000:]}"
    assert "[rank 0/2]" in log  # the ranks' own log lines reached the job log through Ray
    # The run finished: one metrics row per step.
    rows = read_jsonl(run_dir / "metrics.jsonl")
    assert [row["step"] for row in rows] == list(range(STEPS)), rows
    assert all(isinstance(row["loss"], (int, float)) for row in rows)
    assert "training finished with exit code 0" in log
    sys.stderr.write(f"\n2-node sbatch train.sbatch {' '.join(sbatch_args)}: {elapsed:.1f}s\n")
    return job_id, log, seen, run_dir


def test_two_node_job_runs_ray_head_worker_and_ranks_on_both_nodes(two_node_env, tmp_path):
    # CPU only: one CPU per node, so the trainer's placement group of one-CPU bundles spans both nodes.
    _run_job(two_node_env, tmp_path, OVERRIDES, [])


def test_colocated_engines_and_ranks_on_both_nodes(two_node_env, tmp_path):
    """One declared GPU per node (gres): the placement plan puts a rank and a colocated SGLang engine (the
    stand-in server, started through rollout.sglang_launch_module) on each node; the engines bind their node's
    address, and every engine takes the distributed weight sync after each step."""
    overrides = [*OVERRIDES, "rollout.engine=sglang", "rollout.mode=colocated", "rollout.engine_tp=1",
                 "rollout.num_engines=2", "rollout.sglang_launch_module=tests.support.sglang_standin",
                 "rollout.weight_sync=distributed",  # explicit: colocated sglang defaults to tensor sync
                 "rollout.weight_sync_backend=gloo", "rollout.launch_timeout_s=300",
                 "reward.name=tests.support.rewards:even_length"]
    _, log, seen, run_dir = _run_job(two_node_env, tmp_path, overrides, ["--gres=gpu:1", "--cpus-per-task=2"])
    assert re.search(r"Ray head n1 .*, 2 node\(s\), 1 GPU\(s\)", log), log[-6000:]
    assert {("n1", "engine"), ("n2", "engine")} <= seen, f"processes seen per node: {sorted(seen)}"
    # Engines serve on their node's address (reachable from the other node), never on loopback.
    engine_hosts = {m.group(1) for line in log.splitlines() if "engine" in line
                    for m in re.finditer(r"http://(\d+\.\d+\.\d+\.\d+):\d+", line)}
    assert engine_hosts == set(NODE_ADDR.values()), f"engine addresses: {engine_hosts}\n{log[-6000:]}"
    logs = sorted((run_dir / "logs" / "engines").glob("engine*.log"))
    assert len(logs) == 2, logs
    events = {path.name: re.findall(r"standin-event (\S+)", path.read_text()) for path in logs}
    for name, got in events.items():
        assert got.count("/begin_weight_update") == STEPS, (name, got)
        assert got.count("/update_weights_from_distributed") >= STEPS, (name, got)
        assert got.count("/release_memory_occupation") == got.count("/resume_memory_occupation") == STEPS
    assert sum(got.count("/generate") for got in events.values()) >= STEPS, events
