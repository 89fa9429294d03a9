"""tools/gpu_check.py end to end: the CPU rehearsal runs every section for real and each must pass; the checks
themselves fail on a wrong op, and the runner reports crashes, timeouts and bad input.

The rehearsal's sizes are small (see megatron_lpreg/gpucheck/*.py); on CUDA the same command runs larger ones. Not
covered here: CUDA itself (the ``gpu``-marked test runs the real thing where a GPU is present).
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megatron_lpreg.gpucheck import ops, runner
from megatron_lpreg.gpucheck.report import SECTION_NAMES
from megatron_lpreg.ops.vocab_parallel import LogprobStats

REPO = Path(__file__).resolve().parents[2]
TOOL = REPO / "tools" / "gpu_check.py"
CONFIG = REPO / "configs" / "tiny_cpu.yaml"


def _run_tool(*args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    # Run from outside the checkout (as on a node where the project is an installed wheel): the sections must
    # still find the same package and the config.
    return subprocess.run([sys.executable, str(TOOL), *args], capture_output=True, text=True, timeout=timeout,
                          cwd="/")


@pytest.mark.slow
def test_cpu_rehearsal_runs_every_section_and_all_pass(tmp_path):
    proc = _run_tool("--device", "cpu", "--out", str(tmp_path))
    report = json.loads((tmp_path / "report.json").read_text())
    assert proc.returncode == 0, (proc.stdout[-3000:], proc.stderr[-3000:], report)
    assert report["ok"] is True and report["environment"]["device"] == "cpu"
    for name in SECTION_NAMES:
        assert report[name]["status"] == "ok", (name, report[name])
        assert (tmp_path / "logs" / f"{name}.log").exists()
    parity = report["op_parity"]
    for case in ("fp32", "fp32_t0.7_chunked", "bf16"):
        assert parity[case]["logprobs_max_abs_err"] <= ops.VALUE_ATOL
        assert 0 < parity[case]["grad_scale"]
    speed = report["op_speed"]["fp32"]
    assert speed["fused_s"] > 0 and speed["megatron_ce_plus_entropy_s"] > 0 and speed["bandwidth_bound_s"] > 0
    assert report["op_speed"]["copy_bandwidth_gb_s"] > 0
    model = report["model_parity"]
    assert model["qwen3_local_float32"]["max_abs_logit_diff"] <= 1e-4 and model["te_spec"].startswith("skipped")
    assert model["qwen2_local_engine_uneven_prompts"]["same_tokens"]
    train = report["train_steps"]
    assert train["steps"] == [0, 1, 2] and train["exit_code"] == 0
    assert "Overall: **ok**" in (tmp_path / "report.md").read_text()


@pytest.mark.gpu
def test_gpu_check_on_cuda(tmp_path):
    proc = _run_tool("--device", "cuda", "--out", str(tmp_path), timeout=3600)
    report = json.loads((tmp_path / "report.json").read_text())
    assert proc.returncode == 0, report
    assert report["train_steps"]["peak_cuda_mib"] > 0


def test_op_parity_check_fails_on_a_wrong_op(monkeypatch):
    real = ops.vocab_parallel_logprob_stats

    def off_by_a_bit(*args, **kwargs):
        stats = real(*args, **kwargs)
        return LogprobStats(stats.logprobs + 1e-3, stats.entropy, stats.proxy_logprobs, stats.proxy_kl)

    case = ops.PARITY_CASES[0]
    assert ops.parity_case(case, 8, 64, torch.device("cpu"))["logprobs_max_abs_err"] < ops.VALUE_ATOL
    monkeypatch.setattr(ops, "vocab_parallel_logprob_stats", off_by_a_bit)
    with pytest.raises(ops.CheckFailed, match="fp32: logprobs off by 0.001") as info:
        ops.parity_case(case, 8, 64, torch.device("cpu"))
    assert info.value.numbers["logprobs_max_abs_err"] == pytest.approx(1e-3, rel=1e-3)


def test_a_section_that_crashes_or_hangs_is_reported_failed(tmp_path, monkeypatch):
    monkeypatch.setattr(runner, "_section_env", lambda device: {"PATH": "/usr/bin", "PYTHONPATH": "/nonexistent"})
    monkeypatch.setattr(runner.sys, "executable", "/bin/false")
    crashed = runner._run_in_subprocess("op_parity", "cpu", tmp_path, CONFIG, timeout_s=60)
    assert crashed["status"] == "failed" and "exited with code 1 and wrote no result" in crashed["error"]
    hang = tmp_path / "hang.sh"
    hang.write_text("#!/bin/sh\nexec sleep 30\n")  # stands in for a section that never returns
    hang.chmod(0o755)
    monkeypatch.setattr(runner.sys, "executable", str(hang))
    timed_out = runner._run_in_subprocess("op_parity", "cpu", tmp_path, CONFIG, timeout_s=1)
    assert timed_out["status"] == "failed" and timed_out["error"].startswith("timed out after 1 s")


def test_bad_input_is_refused_with_exit_code_2(tmp_path):
    with pytest.raises(ValueError, match="unknown sections"):
        runner.run_checks(tmp_path, device="cpu", config=CONFIG, sections=["op_parity", "nope"])
    with pytest.raises(ValueError, match="is not a file"):
        runner.run_checks(tmp_path, device="cpu", config=tmp_path / "missing.yaml")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="torch.cuda.is_available"):
            runner.resolve_device("cuda")
        proc = _run_tool("--device", "cuda", "--out", str(tmp_path))
        assert proc.returncode == 2 and "use --device cpu" in proc.stderr
    assert runner.resolve_device("cpu") == "cpu"


def test_section_processes_get_a_one_rank_launch_env_and_this_package(monkeypatch):
    import megatron_lpreg

    monkeypatch.setenv("PYTHONPATH", "/elsewhere")
    env = runner._section_env("cpu")
    assert (env["RANK"], env["WORLD_SIZE"], env["LOCAL_RANK"], env["MASTER_ADDR"]) == ("0", "1", "0", "127.0.0.1")
    assert 0 < int(env["MASTER_PORT"]) < 65536
    assert env["CUDA_VISIBLE_DEVICES"] == ""  # --device cpu hides every GPU from the sections
    root = str(Path(megatron_lpreg.__file__).resolve().parents[1])
    assert env["PYTHONPATH"].split(":") == [root, "/elsewhere"]
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert "CUDA_VISIBLE_DEVICES" not in runner._section_env("cuda")
