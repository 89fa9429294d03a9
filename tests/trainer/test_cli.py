"""`megatron-lpreg train` refuses bad input before any rank, Ray actor or file is created."""
from __future__ import annotations

import pytest

from megatron_lpreg.cli import main as cli_main


@pytest.mark.parametrize("overrides,message", [
    (["algo.rhoo=1"], "unknown config key 'algo.rhoo' (did you mean 'rho'?)"),
    (["parallel.tp=3"], "parallel.tp=3 must divide model.num_attention_heads=4"),
    (["model.hf_path=tiny:x"], "expected 'tiny:<seed>'"),
    (["trainer.max_steps"], "must look like dotted.key=value"),
])
def test_bad_config_exits_2_with_a_message_and_writes_nothing(tmp_path, capsys, overrides, message):
    out = tmp_path / "run"
    assert cli_main(["train", "configs/tiny_cpu.yaml", f"trainer.output_dir={out}", *overrides]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_missing_config_file(tmp_path, capsys):
    assert cli_main(["train", str(tmp_path / "nope.yaml")]) == 2
    assert "config file not found" in capsys.readouterr().err


def test_a_fresh_start_over_existing_checkpoints_is_refused_before_anything_runs(tmp_path, capsys):
    out = tmp_path / "run"
    for step in (2, 4):
        (out / "checkpoints" / f"step_{step:07d}").mkdir(parents=True)
        (out / "checkpoints" / f"step_{step:07d}" / "weights").write_text(str(step))
    (out / "config.yaml").write_text("kept: yes\n")
    before = sorted((p.relative_to(out), p.read_bytes() if p.is_file() else None) for p in out.rglob("*"))
    assert cli_main(["train", "configs/tiny_cpu.yaml", f"trainer.output_dir={out}", "trainer.resume=never"]) == 2
    err = capsys.readouterr().err
    assert "trainer.resume=never" in err and "2 checkpoint(s) (step_0000002 .. step_0000004)" in err
    assert sorted((p.relative_to(out), p.read_bytes() if p.is_file() else None) for p in out.rglob("*")) == before
