"""``megatron-lpreg eval-array`` on a real local Slurm whose one node declares 4 GPUs (``MLPREG_SLURM_GPUS``: gres
backed by device files, so jobs get ``CUDA_VISIBLE_DEVICES`` as on a GPU node; no GPU is used).

The run's own config has the training layout of a 64-GPU run (16 rollout engines), which on one node used to start
16 servers with ``--base-gpu-id`` up to 15 x TP. Its eval layout (``eval.engine_tp=1``, ``eval.num_engines=0`` =
fill the node) is checked at submission against ``--gpus-per-node 2``; each of the two (checkpoint x benchmark)
tasks gets 2 of the node's 4 GPUs and runs 2 SGLang servers (the CPU stand-in, launched as ``sglang.launch_server``
would be) on them, and both tasks share one HF export of the checkpoint.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from megatron_lpreg.config import RunConfig
from megatron_lpreg.eval.hf_cache import HF_EXPORT_DIR, is_hf_dir
from megatron_lpreg.models.convert import convert_hf_to_mcore
from megatron_lpreg.rundir import step_dir_name

pytestmark = pytest.mark.slurm

REPO = Path(__file__).resolve().parents[2]
CLUSTER = REPO / "slurm" / "dev" / "local-cluster.sh"
FIXTURES = REPO / "tests" / "fixtures" / "benchmarks"
# a cluster of its own (state dir, ports), so it can run beside the default one of test_local_cluster.py
CLUSTER_ENV = {"MLPREG_SLURM_DIR": "/tmp/mlpreg-slurm-ev", "MLPREG_SLURM_CTLD_PORT": "6877",
               "MLPREG_SLURM_SLURMD_PORT": "6878", "MLPREG_SLURM_GPUS": "4", "MLPREG_SLURM_CPUS": "8"}


def _cluster(command: str, timeout: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(CLUSTER), command], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **CLUSTER_ENV})


@pytest.fixture(scope="module")
def gpu_node_env():
    """Environment (SLURM_CONF, ...) of a running one-node local cluster with 4 declared GPUs, stopped afterwards."""
    if os.geteuid() != 0 and shutil.which("slurmctld") is None:
        pytest.skip("the local Slurm cluster needs root (to install and run munged/slurmctld/slurmd)")
    was_up = _cluster("status").returncode == 0
    proc = _cluster("up")
    if proc.returncode != 0:
        pytest.fail(f"local-cluster.sh up failed:\n{proc.stdout}\n{proc.stderr}")
    match = re.search(r"^export SLURM_CONF=(\S+)$", proc.stdout, re.M)
    assert match, proc.stdout
    env = {**os.environ, "SLURM_CONF": match.group(1), "MLPREG_ROOT": str(REPO), "MLPREG_PYTHON": sys.executable,
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    env.pop("MLPREG_SITE_ENV", None)
    yield env
    if not was_up:
        _cluster("down", timeout=120)


def _training_run(root: Path, model: Path) -> Path:
    """A run directory as training leaves it: config.yaml (sglang, 16 engines) and one dist checkpoint."""
    run = root / "run"
    cfg = RunConfig.load(REPO / "configs" / "tiny_cpu.yaml", [
        f"model.hf_path={model}", "parallel.tp=1", "trainer.world_size=1", "rollout.engine=sglang",
        "rollout.num_engines=16", "rollout.sglang_launch_module=tests.support.sglang_standin",
        "rollout.launch_timeout_s=240", "eval.engine_tp=1", "eval.num_engines=0", "eval.max_new_tokens=3",
        "data.heldout_size=2", "data.dev_size=0", "reward.num_workers=1", f"trainer.output_dir={run}"])
    cfg.save(run / "config.yaml")
    convert_hf_to_mcore(model, run / "checkpoints" / step_dir_name(2))
    (run / "checkpoints" / "latest").write_text(step_dir_name(2) + "\n")
    return run


def test_eval_array_fits_one_node_and_exports_once(gpu_node_env, tiny_qwen2, tmp_path):
    run = _training_run(tmp_path, tiny_qwen2)
    out = tmp_path / "ev"
    start = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "megatron_lpreg", "eval-array", str(run), "--benchmarks", "synthetic,aime24",
         "--gpus-per-node", "2", f"--eval-arg=--data-dir={FIXTURES}", "--eval-arg=--samples=1", "--wait",
         "--poll", "1", "--timeout", "400", "--out", str(out)],
        env=gpu_node_env, capture_output=True, text=True, timeout=480, cwd=REPO)
    elapsed = time.monotonic() - start
    logs = {p.name: p.read_text() for p in sorted((out / "logs").glob("*.out"))}
    everything = proc.stdout + proc.stderr + "".join(f"\n--- {k}\n{v[-6000:]}" for k, v in logs.items())
    assert proc.returncode == 0, everything
    assert "run: eval: 1 node, 2 sglang engine(s) x TP1 = 2 of 2 GPUs" in proc.stderr  # checked at submission
    assert len(logs) == 2, everything
    for index, bench in enumerate(("synthetic", "aime24")):
        results = json.loads((out / f"task_{index}" / "results.json").read_text())
        assert results["benchmarks"][bench]["num_problems"] > 0
        assert not (out / f"task_{index}" / "hf_model").exists()
    text = "\n".join(logs.values())
    # each task launched exactly the eval layout: servers 0 and 1 on its own 2 GPUs, never the run's 16 engines
    launches = re.findall(r"launching sglang engine (\d+): .*", text)
    assert sorted(launches) == ["0", "0", "1", "1"], everything
    assert re.findall(r"--base-gpu-id (\d+)", text) == ["1", "1"], everything  # engine 1 of each task; 0 is the default
    visible = re.findall(r"CUDA_VISIBLE_DEVICES=(\S+)", text)
    assert len(visible) == 2 and all(len(v.split(",")) == 2 for v in visible), everything
    # one export, reused by the other task (whichever ran second, or waited on the lock)
    assert len(re.findall(r"exporting .* \(once; later evaluations reuse it\)", text)) == 1, everything
    assert len(re.findall(r"reusing the HF export", text)) == 1, everything
    assert is_hf_dir(run / "checkpoints" / step_dir_name(2) / HF_EXPORT_DIR)
    sys.stderr.write(f"\neval array (2 tasks x 2 stand-in servers, one export) on one node: {elapsed:.1f}s\n")
