"""The GPU check's ``rollout`` section: its verdict from measured numbers, its skip without SGLang (both on CPU in
the main suite), and the whole section as a CPU rehearsal against a real SGLang server (marker ``sglang``, run by
``make test-sglang`` in .venv-sglang). Not covered: CUDA (memory really freed by the memory saver, CUDA IPC)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_lpreg.gpucheck import rollout, runner
from tests.support.sglang_real import require_sglang

REPO = Path(__file__).resolve().parents[2]
CONFIG = REPO / "configs" / "tiny_cpu.yaml"


def _good(device_type: str) -> dict:
    numbers = {"dtype": rollout.SERVED_DTYPE[device_type], "generate_max_abs_logprob_diff": 2e-6,
               "probe_max_abs_diff": 1e-6, "after_sync_max_abs_logprob_diff": 3e-6, "same_tokens_after_resume": True,
               "train_exit_code": 0, "train_steps": [0, 1], "train_logprob_mismatch": [4e-7, 5e-7]}
    numbers["logprob_atol"] = rollout.DTYPE_ATOL[numbers["dtype"]]
    if device_type == "cuda":
        numbers.update(released_mib=20480.0, retaken_mib=20470.0)
    return numbers


@pytest.mark.parametrize("device_type", ["cpu", "cuda"])
def test_evaluate_passes_good_numbers(device_type):
    assert rollout.evaluate(_good(device_type), device_type) == []


@pytest.mark.parametrize("change,message", [
    ({"generate_max_abs_logprob_diff": 0.5}, "generation log-probs vs transformers: max |dlogp| 0.5 > 0.1"),
    ({"probe_max_abs_diff": float("nan")}, "probe after the tensor sync: max |dlogp| nan"),
    ({"same_tokens_after_resume": False}, "greedy tokens changed across release/resume"),
    ({"released_mib": 0.0}, "the server runs without the memory saver"),
    ({"retaken_mib": -3.0}, "resume took back -3.0 MiB"),
    ({"train_exit_code": 1}, "training exit code 1"),
    ({"train_steps": [0]}, "metrics.jsonl steps [0] != [0, 1]"),
    ({"train_logprob_mismatch": [0.01, None]}, "step 1: rollout/logprob_mismatch None not in [0, 0.1]"),
])
def test_evaluate_names_each_failure(change, message):
    failures = rollout.evaluate({**_good("cuda"), **change}, "cuda")
    assert len(failures) == 1 and message in failures[0], failures


def test_cpu_verdict_uses_the_fp32_tolerance_and_no_memory_numbers():
    numbers = {**_good("cpu"), "train_logprob_mismatch": [5e-7, 0.05]}
    assert "released_mib" not in numbers
    assert rollout.evaluate(numbers, "cpu") == ["step 1: rollout/logprob_mismatch 0.05 not in [0, 0.001]"]


def test_without_sglang_the_section_is_skipped_with_the_reason(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "sglang", None)  # `import sglang` raises ImportError, as on the lent GPU nodes
    result = runner.run_section("rollout", "cpu", tmp_path, CONFIG)
    assert result["status"] == "skipped", result
    assert "sglang is not installed" in result["reason"] and "make install-sglang" in result["reason"]


def test_rollout_is_opt_in_and_named_in_the_tool():
    from megatron_lpreg.gpucheck.report import ALL_SECTIONS, SECTION_NAMES

    assert "rollout" in ALL_SECTIONS and "rollout" not in SECTION_NAMES
    with pytest.raises(ValueError, match="unknown sections"):
        runner.run_checks(REPO, device="cpu", config=CONFIG, sections=["rolout"])


@pytest.mark.sglang
def test_cpu_rehearsal_of_the_rollout_section_against_real_sglang(tmp_path):
    """The section as a node runs it (``tools/gpu_check.py --sections rollout``), on CPU with the real server."""
    require_sglang()
    proc = subprocess.run([sys.executable, str(REPO / "tools" / "gpu_check.py"), "--device", "cpu", "--sections",
                           "rollout", "--timeout", "1200", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=1300, cwd="/")
    report = json.loads((tmp_path / "report.json").read_text())
    section = report["rollout"]
    assert proc.returncode == 0 and section["status"] == "ok", (proc.stdout[-2000:], section)
    assert section["dtype"] == "float32" and section["train_steps"] == [0, 1]
    assert section["probe_max_abs_diff"] < rollout.DTYPE_ATOL["float32"]
    print({k: v for k, v in section.items() if k != "train_command"})
