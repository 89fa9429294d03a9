"""Fault injection through the train CLI: a run killed (SIGKILL, via the test-only ``MLPREG_FAULT`` hook) at each
named point of a checkpoint save, or at random moments, and then simply rerun, ends with the same final parameters
and optimizer state, the same metric rows (one per step) and the same eval rows as a run that was never
interrupted. Plus damaged run directories (missing/empty ``latest``, a truncated RNG file) and a full disk.

Every run is tiny (3 steps, 2 ranks at TP2, a checkpoint after every step, 4 held-out problems evaluated after
every step); one uninterrupted reference run serves all tests (module fixture).
"""
from __future__ import annotations

import json
import random
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import torch

from megatron_lpreg.cli import main as cli_main
from megatron_lpreg.models.checkpoint import checkpoint_problems
from megatron_lpreg.parallel.faults import ENV
from megatron_lpreg.rundir import EVAL_FILE, METRICS_FILE, read_latest_pointer

pytestmark = pytest.mark.slow

STEPS = 3
ARGS = ["rollout.prompts_per_step=4", "rollout.n=4", "checkpoint.interval=1", "checkpoint.keep_last=2",
        "reward.name=tests.support.rewards:even_length", "eval.benchmarks=[synthetic]", "eval.interval=1",
        "data.heldout_size=4", "eval.max_new_tokens=6", "rollout.max_new_tokens=8",
        "trainer.world_size=2", "parallel.tp=2"]


def _train(run: Path, steps: int = STEPS, *extra: str) -> int:
    return cli_main(["train", "configs/tiny_cpu.yaml", f"trainer.max_steps={steps}", f"trainer.output_dir={run}",
                     *ARGS, *extra])


def _train_and_log(run: Path, steps: int = STEPS) -> tuple[int, str]:
    """Train; return the exit code and what rank 0 logged meanwhile (ranks are forked: caplog cannot see them)."""
    log = run / "logs" / "rank0.log"
    offset = log.stat().st_size if log.exists() else 0
    code = _train(run, steps)
    return code, log.read_text()[offset:] if log.exists() else ""


def _killed(capsys) -> bool:
    """Whether the last run ended because a rank was SIGKILLed (not for any other error)."""
    err = capsys.readouterr().err
    return "died without a result (exit code -9)" in err


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _final_state(run: Path) -> dict[str, torch.Tensor]:
    """Every tensor (model and optimizer) of the checkpoint ``latest`` names, read without process groups."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict_from_keys

    ckpt = run / "checkpoints" / read_latest_pointer(run)
    with pytest.warns(UserWarning, match="single process"):
        state = _load_state_dict_from_keys(storage_reader=FileSystemReader(str(ckpt / "dist")))
    return {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}


def _assert_same_run(run: Path, reference: dict) -> None:
    rows, evals = _rows(run / METRICS_FILE), _rows(run / EVAL_FILE)
    assert [r["step"] for r in rows] == list(range(STEPS)), "one metric row per step"
    assert [r["step"] for r in evals] == list(range(STEPS + 1)), "one eval row per evaluated step"
    for got, want in zip(rows, reference["rows"]):
        for key in want:
            if not key.startswith("perf/"):
                assert got[key] == want[key], (got["step"], key)
    assert evals == reference["evals"]
    state = _final_state(run)
    assert state.keys() == reference["state"].keys()
    for name, tensor in reference["state"].items():
        assert torch.equal(state[name], tensor), name
    assert read_latest_pointer(run) == f"step_{STEPS:07d}"
    assert not [p.name for p in (run / "checkpoints").iterdir() if p.name.startswith(".step_")], "leftovers"


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict:
    run = tmp_path_factory.mktemp("reference") / "run"
    start = time.monotonic()
    assert _train(run) == 0
    wall = time.monotonic() - start
    rows = _rows(run / METRICS_FILE)
    assert any(r["loss/policy"] != 0 for r in rows), "the test needs steps with a real update"
    return {"run": run, "rows": rows, "evals": _rows(run / EVAL_FILE), "state": _final_state(run), "wall_s": wall}


# (point, step whose save is killed, the checkpoint the rerun resumes from). temp_written@1 is a kill during the
# first save (it used to restart at step 0 and append: metrics [0, 0, 1, 2]); renamed@2 is the window in which
# step_2 exists but `latest` still names step_1 (it used to fail every rerun with "step_0000002 already exists").
KILLS = [("temp_written", 1, None), ("rng_written", 2, 1), ("manifest_written", 2, 1), ("renamed", 2, 2),
         ("pointer_written", 2, 2), ("pruned", 3, 3)]


@pytest.mark.parametrize("point,step,resumes_from", KILLS, ids=[f"{p}@{s}" for p, s, _ in KILLS])
def test_kill_at_save_point_then_rerun_equals_uninterrupted(point, step, resumes_from, reference, tmp_path,
                                                            monkeypatch, capsys):
    run = tmp_path / "run"
    monkeypatch.setenv(ENV, f"{point}@{step}")
    assert _train(run) == 1 and _killed(capsys)
    monkeypatch.delenv(ENV)
    code, log = _train_and_log(run)
    assert code == 0, log[-3000:]
    if resumes_from is None:
        assert "resuming from" not in log
    else:
        assert f"resuming from {run / 'checkpoints' / f'step_{resumes_from:07d}'}" in log
    if point in ("temp_written", "rng_written", "manifest_written"):
        assert "leftover(s) of interrupted checkpoint saves" in log
    if point == "renamed":
        assert "but step_0000002 is complete" in log
    _assert_same_run(run, reference)


def test_kills_at_random_moments_then_rerun_equals_uninterrupted(reference, tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    rng = random.Random(20261206)
    delays = []
    for _ in range(3):
        # A moment inside the run (start-up, a step, an eval, a save or a restore) on a machine of any speed.
        delays.append(round(rng.uniform(0.15, 0.9) * reference["wall_s"], 2))
        monkeypatch.setenv(ENV, f"after:{delays[-1]}")
        code = _train(run)
        if code == 0:
            break
        assert _killed(capsys), delays
    monkeypatch.delenv(ENV)
    assert _train(run) == 0, delays
    _assert_same_run(run, reference)


def _copy_of_reference_at_step_2(reference: dict, tmp_path: Path) -> Path:
    """The reference run with its last checkpoint gone: what is left resumes at step 2 (its rows of step 2 and
    the eval after step 3 are now newer than the newest checkpoint)."""
    run = tmp_path / "run"
    shutil.copytree(reference["run"], run)
    shutil.rmtree(run / "checkpoints" / f"step_{STEPS:07d}")
    return run


@pytest.mark.parametrize("damage", ["deleted", "empty"])
def test_missing_or_empty_latest_falls_back_to_newest_complete_checkpoint(damage, reference, tmp_path):
    run = _copy_of_reference_at_step_2(reference, tmp_path)
    pointer = run / "checkpoints" / "latest"
    pointer.unlink() if damage == "deleted" else pointer.write_text("")
    code, log = _train_and_log(run)
    assert code == 0, log[-3000:]
    assert f"{pointer} is {'missing' if damage == 'deleted' else 'empty'}" in log
    assert f"resuming from {run / 'checkpoints' / 'step_0000002'}" in log
    assert "dropped 1 row(s) of step >= 2, logged after the checkpoint" in log
    _assert_same_run(run, reference)


def test_truncated_rng_file_is_refused_naming_file_and_cause(reference, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(reference["run"], run)
    rng = run / "checkpoints" / f"step_{STEPS:07d}" / "rng_rank0.pt"
    rng.write_bytes(rng.read_bytes()[:100])
    before = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert _train(run, STEPS + 1) == 1
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert "rng_rank0.pt: truncated (100 bytes" in last and str(rng.parent) in last
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == before, "a refusal changes nothing"


@pytest.fixture
def small_disk(reference, tmp_path):
    """``tmp_path/run/checkpoints`` on a tmpfs with room for 1.5 checkpoints of the reference run (~13 MB each)."""
    ckpt = reference["run"] / "checkpoints" / f"step_{STEPS:07d}"
    size_kib = int(1.5 * sum(f.stat().st_size for f in ckpt.rglob("*") if f.is_file()) / 1024)
    mount = tmp_path / "run" / "checkpoints"
    mount.mkdir(parents=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kib}k", "tmpfs", str(mount)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs (needs root): {done.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=True)


def test_disk_full_names_the_cause_and_path_last_and_keeps_earlier_checkpoints(small_disk, capsys):
    run = small_disk.parent
    assert _train(run, 2) == 1
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert "No space left on device [ENOSPC]" in last, last
    assert str(small_disk / "step_0000002") in last, last
    assert read_latest_pointer(run) == "step_0000001"
    assert checkpoint_problems(small_disk / "step_0000001") == []
    assert sorted(p.name for p in small_disk.iterdir()) == ["latest", "step_0000001"], "temp dir removed"
