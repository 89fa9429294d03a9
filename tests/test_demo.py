"""The demo's own housekeeping and its CPU-independent warm start (the demo itself is `make demo`, about 8 minutes,
and not run here)."""
from __future__ import annotations

import pytest
import torch

from megatron_lpreg.demo import _replace_previous_demo_run


def test_a_rerun_replaces_the_previous_demo_run_but_nothing_else(tmp_path):
    run_dir = tmp_path / "lpreg"
    (run_dir / "checkpoints" / "step_0000200").mkdir(parents=True)
    (run_dir / "config.yaml").write_text("trainer: {}\n")
    (run_dir / ".preempt_requested").touch()
    _replace_previous_demo_run(run_dir)
    assert not run_dir.exists()
    _replace_previous_demo_run(run_dir)  # nothing there: nothing to do

    other = tmp_path / "mine"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not a demo run directory"):
        _replace_previous_demo_run(other)
    assert (other / "notes.txt").read_text() == "keep me"


_WARM_START_SCRIPT = """
import sys
from pathlib import Path
import torch
from megatron_lpreg.config import RunConfig
from megatron_lpreg.demo import warm_start
from megatron_lpreg.trainer.cli import materialize_tiny

cfg = RunConfig.load(sys.argv[1])
torch.set_num_threads(int(sys.argv[3]))  # the caller's setting must not matter
warm_start(materialize_tiny(cfg.model), Path(sys.argv[2]), cfg, target_acc=2.0, max_steps=6)
"""


def test_warm_start_is_the_same_on_every_cpu_kind(tmp_path):
    """Deliverable 4: the warm start must not depend on the CPU. Two runs emulate two CPUs: AVX-512 kernels with
    two threads, and ATen's scalar kernels with MKL limited to AVX2 on one thread. In float32 their weights
    differed by up to 6e-5 after six steps (71% of them differed at all), enough for training to drift to another
    stopping point; the float64 warm start (no float32 RMSNorm/RoPE islands) agrees to float64 rounding, so after
    rounding to float32 for saving at most a rare element lands on the neighbouring float32 value."""
    import os
    import subprocess
    import sys

    from safetensors.torch import load_file

    from megatron_lpreg.demo import REPO_CONFIGS

    runs = {"avx512": ({}, "2"),
            "scalar": ({"ATEN_CPU_CAPABILITY": "default", "MKL_ENABLE_INSTRUCTIONS": "AVX2"}, "1")}
    weights = {}
    for name, (env, threads) in runs.items():
        out = tmp_path / name
        subprocess.run([sys.executable, "-c", _WARM_START_SCRIPT, str(REPO_CONFIGS / "tiny_cpu.yaml"), str(out),
                        threads], env={**os.environ, **env}, check=True, timeout=600)
        weights[name] = load_file(out / "model.safetensors")
    assert weights["avx512"].keys() == weights["scalar"].keys()
    # saved in float32: a float64 difference of ~1e-15 can still round a rare element to the neighbouring float32
    mismatched = 0
    for key, tensor in weights["avx512"].items():
        other = weights["scalar"][key]
        assert tensor.dtype == other.dtype == torch.float32
        assert torch.allclose(tensor, other, rtol=2.0**-23, atol=0.0), key  # at most one float32 ulp apart
        mismatched += int((tensor != other).sum())
    assert mismatched <= 10, f"{mismatched} weights differ between the two CPU kinds"
