"""megatron_lpreg.rundir: the run directory's names, the latest pointer, pruning and the preemption flag."""
from __future__ import annotations

import subprocess
import sys

import pytest

from megatron_lpreg import rundir


def _checkpoint(run, step: int, complete: bool = True):
    path = rundir.checkpoints_root(run) / rundir.step_dir_name(step)
    path.mkdir(parents=True)
    if complete:
        (path / rundir.MANIFEST_FILE).write_text("{}")
    return path


def test_prune_keeps_the_newest_and_the_named_one(tmp_path):
    for step in (1, 2, 3, 4):
        _checkpoint(tmp_path, step)
    (rundir.checkpoints_root(tmp_path) / ".step_5.tmp-abc").mkdir()  # a save in progress is never pruned or listed
    assert rundir.prune_checkpoints(tmp_path, 2, keep="step_0000001") == ["step_0000002"]
    assert [p.name for p in rundir.list_checkpoints(tmp_path)] == ["step_0000001", "step_0000003", "step_0000004"]
    assert (rundir.checkpoints_root(tmp_path) / ".step_5.tmp-abc").is_dir()



def test_keep_every_keeps_every_kth_step_for_good_besides_the_last_n(tmp_path):
    # A run saving every 20 steps with keep_last=2, keep_every=60: after step 200, 60/120/180 stay and 180/200 are
    # the last two; a save through 9 checkpoints prunes one at a time, as the manager does after each save.
    for step in range(20, 220, 20):
        _checkpoint(tmp_path, step)
        rundir.prune_checkpoints(tmp_path, 2, keep=rundir.step_dir_name(step), keep_every=60)
    assert [rundir.checkpoint_step(p) for p in rundir.list_checkpoints(tmp_path)] == [60, 120, 180, 200]
    assert rundir.kept_for_good("step_0000060", 60) and not rundir.kept_for_good("step_0000040", 60)
    assert not rundir.kept_for_good("step_0000000", 60) and not rundir.kept_for_good("step_0000060", 0)
    # keep_every=0 is the old behaviour
    assert rundir.prune_checkpoints(tmp_path, 1, keep="step_0000200") == ["step_0000060", "step_0000120",
                                                                           "step_0000180"]

def test_latest_pointer_then_newest_complete_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        rundir.resolve_checkpoint(f"{tmp_path}{rundir.LATEST_SUFFIX}")
    first = _checkpoint(tmp_path, 10)
    _checkpoint(tmp_path, 20, complete=False)
    assert rundir.resolve_checkpoint(f"{tmp_path}{rundir.LATEST_SUFFIX}") == first  # no pointer: newest complete
    rundir.write_latest_pointer(tmp_path, "step_0000020")
    assert rundir.read_latest_pointer(tmp_path) == "step_0000020"
    assert rundir.latest_checkpoint(tmp_path).name == "step_0000020"
    assert rundir.checkpoint_step(rundir.latest_checkpoint(tmp_path)) == 20



def test_wandb_run_id_is_made_once_and_kept(tmp_path):
    run_id = rundir.wandb_run_id(tmp_path / "run")
    assert run_id.isalnum() and len(run_id) == 16
    assert (tmp_path / "run" / rundir.WANDB_ID_FILE).read_text() == run_id + "\n"
    assert rundir.wandb_run_id(tmp_path / "run") == run_id  # a requeued attempt gets the same id
    assert rundir.wandb_run_id(tmp_path / "other") != run_id
    (tmp_path / "run" / rundir.WANDB_ID_FILE).write_text("")  # an emptied file gets a new id, never ""
    assert rundir.wandb_run_id(tmp_path / "run") not in ("", run_id)

def test_preemption_flag_round_trip(tmp_path):
    run = tmp_path / "run"
    assert not rundir.preemption_requested(run)
    rundir.request_preemption(run)  # creates the run dir if needed
    assert rundir.preemption_requested(run) and rundir.preempt_flag(run).name == rundir.PREEMPT_FILE
    rundir.clear_preemption(run)
    rundir.clear_preemption(run)  # idempotent
    assert not rundir.preemption_requested(run)


def test_importing_it_loads_neither_torch_nor_another_package_module():
    code = ("import sys, megatron_lpreg.rundir; "
            "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('megatron_lpreg.')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "['megatron_lpreg.rundir']"
