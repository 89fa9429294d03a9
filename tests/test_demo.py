"""The demo's own housekeeping (the demo itself is `make demo`, about 7 minutes, and not run here)."""
from __future__ import annotations

import pytest

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
