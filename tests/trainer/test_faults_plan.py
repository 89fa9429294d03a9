"""What a restore decides from a run directory that a kill, a full disk or a person left behind (no ranks, no
model: checkpoints here are small files with a real manifest), and the test-only fault hook itself."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from megatron_lpreg import rundir
from megatron_lpreg.config.model import ModelConfig
from megatron_lpreg.models.checkpoint import CheckpointError, write_manifest
from megatron_lpreg.parallel import faults
from megatron_lpreg.trainer.state import apply_resume_plan, drop_rows_after, plan_resume

CTX = SimpleNamespace(tp_size=1, pp_size=1)


def _checkpoint(run: Path, step: int, *, complete: bool = True) -> Path:
    path = rundir.checkpoints_root(run) / rundir.step_dir_name(step)
    (path / "dist").mkdir(parents=True)
    (path / "dist" / "__0_0.distcp").write_bytes(bytes(range(200)) * 5)
    (path / "rng_rank0.pt").write_bytes(b"r" * 300)
    if complete:
        write_manifest(path, ModelConfig(), CTX, vpp=1, has_optimizer=False, hf_assets_dir=None)
    return path


def _run(tmp_path: Path, steps: list[int], latest: int | None) -> Path:
    run = tmp_path / "run"
    for step in steps:
        _checkpoint(run, step)
    if latest is not None:
        rundir.write_latest_pointer(run, rundir.step_dir_name(latest))
    return run


def test_no_checkpoints_dir_starts_fresh(tmp_path):
    assert plan_resume(tmp_path / "run").checkpoint is None


def test_complete_checkpoint_newer_than_latest_wins_and_latest_is_repointed(tmp_path):
    run = _run(tmp_path, [1, 2], latest=1)  # killed after step_2 was renamed, before the pointer moved (D1)
    plan = plan_resume(run)
    assert plan.checkpoint.name == "step_0000002" and plan.repoint and not plan.set_aside
    assert any("step_0000002 is complete" in note for note in plan.notes)
    apply_resume_plan(run, plan)
    assert rundir.read_latest_pointer(run) == "step_0000002"


@pytest.mark.parametrize("pointer", ["missing", "empty", "dangling"])
def test_missing_empty_or_dangling_latest_falls_back_to_newest_complete(tmp_path, pointer):
    run = _run(tmp_path, [1, 2], latest=None)  # D2, D7
    latest = rundir.checkpoints_root(run) / rundir.LATEST_POINTER
    if pointer == "empty":
        latest.write_text("\n")
    elif pointer == "dangling":
        latest.write_text("step_0000009\n")
    plan = plan_resume(run)
    assert plan.checkpoint.name == "step_0000002" and plan.repoint
    expected = {"missing": "is missing", "empty": "is empty", "dangling": "names step_0000009, which does not exist"}
    assert any(expected[pointer] in note for note in plan.notes), plan.notes


def test_leftover_temp_dirs_are_removed(tmp_path):
    run = _run(tmp_path, [1], latest=1)
    root = rundir.checkpoints_root(run)
    leftovers = [root / ".step_0000002.tmp-1a2b3c4d", root / ".step_0000000.deleting-00000001"]
    for path in leftovers:
        (path / "dist").mkdir(parents=True)
    (root / "latest.tmp").write_text("step_0000002")
    plan = plan_resume(run)
    assert plan.checkpoint.name == "step_0000001" and not plan.repoint
    assert set(plan.leftovers) == {*leftovers, root / "latest.tmp"}
    assert rundir.list_checkpoints(run) == [root / "step_0000001"], "a temp dir is never a checkpoint"
    apply_resume_plan(run, plan)
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_0000001"]


def test_incomplete_step_dir_newer_than_the_checkpoint_is_set_aside(tmp_path):
    run = _run(tmp_path, [1], latest=1)
    _checkpoint(run, 2, complete=False)
    truncated = _checkpoint(run, 3)
    (truncated / "dist" / "__0_0.distcp").write_bytes(b"x" * 10)
    plan = plan_resume(run)
    assert plan.checkpoint.name == "step_0000001"
    reasons = dict((p.name, why) for p, why in plan.set_aside)
    assert "manifest.json is missing" in reasons["step_0000002"]
    assert "dist/__0_0.distcp: truncated (10 bytes, the manifest says 1000)" in reasons["step_0000003"]
    apply_resume_plan(run, plan)
    root = rundir.checkpoints_root(run)
    assert [p.name for p in rundir.list_checkpoints(run)] == ["step_0000001"]
    assert sorted(p.name.split(".")[0] for p in (root / rundir.SET_ASIDE).iterdir()) == ["step_0000002", "step_0000003"]


def test_damaged_checkpoint_named_by_latest_is_refused_naming_file_and_cause(tmp_path):
    run = _run(tmp_path, [1, 2], latest=2)
    rng = rundir.checkpoints_root(run) / "step_0000002" / "rng_rank0.pt"
    rng.write_bytes(b"r" * 7)  # D6: truncated after the pointer moved to it
    with pytest.raises(CheckpointError) as err:
        plan_resume(run)
    message = str(err.value)
    assert f"{rng.parent}/rng_rank0.pt: truncated (7 bytes, the manifest says 300)" in message
    assert "to resume from step_0000001" in message


def test_only_incomplete_step_dirs_refuse_instead_of_restarting_at_step_0(tmp_path):
    run = tmp_path / "run"
    _checkpoint(run, 1, complete=False)
    with pytest.raises(CheckpointError, match="refusing to start again at step 0 over step_0000001"):
        plan_resume(run)


def test_rows_after_the_checkpoint_are_dropped(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / rundir.EVAL_FILE).write_text("".join(json.dumps({"step": s}) + "\n" for s in range(4)) + '{"step": 4, "he')
    (run / rundir.METRICS_FILE).write_text("".join(json.dumps({"step": s}) + "\n" for s in range(3)))
    truncated_at = []
    drop_rows_after(run, 2, truncated_at.append)
    assert truncated_at == [2]
    assert [r["step"] for r in runs_rows(run / rundir.EVAL_FILE)] == [0, 1, 2], "eval at step 2 precedes its checkpoint"
    drop_rows_after(run, 0, truncated_at.append)
    assert (run / rundir.EVAL_FILE).read_text() == "", "a fresh start evaluates step 0 again"


def runs_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_fault_point_kills_only_at_the_named_point_and_step(tmp_path):
    code = ("from megatron_lpreg.parallel.faults import fault_point\n"
            "fault_point('renamed', step=1)\nfault_point('temp_written', step=2)\n"
            "print('alive', flush=True)\nfault_point('renamed', step=2)\nprint('not reached')\n")
    done = subprocess.run([sys.executable, "-c", code], env={**os.environ, faults.ENV: "renamed@2"},
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == -9 and done.stdout == "alive\n", (done.returncode, done.stdout, done.stderr)
    assert "killing pid" in done.stderr


def test_fault_spec_typos_are_refused(monkeypatch):
    monkeypatch.setenv(faults.ENV, "renamd@2")
    with pytest.raises(ValueError, match="expected <point>"):
        faults.arm_timer()
    monkeypatch.setenv(faults.ENV, "after:soon")
    with pytest.raises(ValueError, match="needs a number"):
        faults.arm_timer()
