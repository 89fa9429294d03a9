"""The study's sweep files load and every task's config validates (as `megatron-lpreg sweep` checks before
submitting), once the warm starts and prompt files they name exist."""
from __future__ import annotations

from pathlib import Path

import pytest

from megatron_lpreg.config.base import ConfigError
from megatron_lpreg.launch.cli_sweep import build_sweep, validate_tasks

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


@pytest.mark.parametrize("name,count", [("study_task_a", 15), ("study_task_a_controls", 5),
                                        ("study_task_a_offpolicy", 12), ("study_task_a_exploratory", 15),
                                        ("study_task_a_exploratory_mechanism", 5)])
def test_study_sweeps_validate(name, count, tmp_path, monkeypatch):
    config = str(CONFIGS / "study_task_a.yaml")
    spec = build_sweep(config, [], [], str(CONFIGS / "sweeps" / f"{name}.yaml"))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match="warm_start"):  # before `study warmstart` the paths are missing
        validate_tasks(config, spec)
    for run in ("task_a", "task_a_tail0.02", "task_a_tail0.4"):
        (tmp_path / "runs/study" / run / "warm_start").mkdir(parents=True)
        (tmp_path / "runs/study" / run / "warm_start_exploratory").mkdir()
        for name in ("train", "heldout_hard"):
            (tmp_path / "runs/study" / run / f"{name}.jsonl").write_text('{"problem": "123+456=", "answer": "579"}\n')
    assert len(validate_tasks(config, spec)) == count
