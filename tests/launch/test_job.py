"""The in-job runner (megatron_lpreg.launch.job): manifest row -> child process, signal forwarding, status."""
from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from pathlib import Path

import pytest

from megatron_lpreg.launch.job import main, resolve_task_argv, run_array_task, run_forwarding_signals, task_index
from megatron_lpreg.launch.manifest import ArrayManifest, read_status
from megatron_lpreg.launch.slurm import SlurmError

# A child that records its argv into its trainer.output_dir, then exits with the code in its first argument.
RECORD = ("import json, sys, pathlib; "
          "d = pathlib.Path(next(a for a in sys.argv if a.startswith('trainer.output_dir=')).split('=', 1)[1]); "
          "(d / 'argv.json').write_text(json.dumps(sys.argv[1:])); sys.exit(int(sys.argv[1]))")


def _train_array(root: Path, codes: list[str]) -> ArrayManifest:
    manifest = ArrayManifest(kind="train", command=[sys.executable, "-c", RECORD], tasks=[[c] for c in codes],
                             task_args=["trainer.output_dir={task_dir}"])
    manifest.write(root)
    return manifest


def test_task_index():
    assert task_index({"SLURM_ARRAY_TASK_ID": "3"}) == 3
    assert task_index({}, 1) == 1
    with pytest.raises(SlurmError, match="SLURM_ARRAY_TASK_ID is not set"):
        task_index({})


def test_array_task_runs_its_row_and_records_the_exit_code(tmp_path):
    _train_array(tmp_path, ["0", "3"])
    env = {"SLURM_ARRAY_TASK_ID": "1", "SLURM_JOB_ID": "11", "SLURM_ARRAY_JOB_ID": "10"}
    assert run_array_task(tmp_path, env) == 3
    assert json.loads((tmp_path / "task_1" / "argv.json").read_text()) == ["3", f"trainer.output_dir={tmp_path}/task_1"]
    status = read_status(tmp_path, 1)
    got = (status["exit_code"], status["job_id"], status["array_job_id"], status["restart_count"])
    assert got == (3, "11", "10", 0)
    assert read_status(tmp_path, 0) is None


def test_requeued_train_task_resumes_and_gets_extra_args(tmp_path):
    _train_array(tmp_path, ["0"])
    assert run_array_task(tmp_path, {"SLURM_RESTART_COUNT": "1"}, 0, extra=["trainer.launcher=ray"]) == 0
    assert json.loads((tmp_path / "task_0" / "argv.json").read_text()) == [
        "0", f"trainer.output_dir={tmp_path}/task_0", "trainer.launcher=ray", "trainer.resume=auto"]


def test_eval_task_resolves_latest_checkpoint_at_start(tmp_path):
    run = tmp_path / "run"
    manifest = ArrayManifest(kind="eval", command=["eval"],
                             tasks=[["--checkpoint", f"{run}@latest", "--benchmarks", "b"]],
                             task_args=["--out", "{task_dir}"])
    manifest.write(tmp_path / "ev")
    with pytest.raises(FileNotFoundError, match="no checkpoint under"):
        resolve_task_argv(manifest, tmp_path / "ev", 0)
    assert run_array_task(tmp_path / "ev", {}, 0) == 2  # the task fails cleanly and says why
    assert "no checkpoint under" in read_status(tmp_path / "ev", 0)["error"]
    for step in (2, 4):
        (run / "checkpoints" / f"step_{step:07d}").mkdir(parents=True)
    (run / "checkpoints" / "latest").write_text("step_0000002")
    assert resolve_task_argv(manifest, tmp_path / "ev", 0) == [
        "eval", "--checkpoint", str(run / "checkpoints" / "step_0000002"), "--benchmarks", "b",
        "--out", str((tmp_path / "ev" / "task_0").resolve())]


WAIT_FOR_USR1 = ("import signal, sys, time\n"
                 "signal.signal(signal.SIGUSR1, lambda s, f: sys.exit(42))\n"
                 "open(sys.argv[1], 'w').close()\n"
                 "time.sleep(30)\n"
                 "sys.exit(0)\n")


def test_usr1_is_forwarded_to_the_child(tmp_path):
    ready = tmp_path / "ready"

    def send_when_ready() -> None:
        deadline = time.monotonic() + 20
        while not ready.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGUSR1)

    threading.Thread(target=send_when_ready, daemon=True).start()
    start = time.monotonic()
    assert run_forwarding_signals([sys.executable, "-c", WAIT_FOR_USR1, str(ready)]) == 42
    assert time.monotonic() - start < 20
    assert signal.getsignal(signal.SIGUSR1) is signal.SIG_DFL  # our handler is removed afterwards


def test_killed_child_reports_128_plus_signal():
    kill_self = "import os, signal; os.kill(os.getpid(), signal.SIGKILL)"
    assert run_forwarding_signals([sys.executable, "-c", kill_self]) == 137


def test_main_requeue_code_and_errors(capsys, monkeypatch):
    assert main(["requeue-code"]) == 0
    assert capsys.readouterr().out == "42\n"
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    assert main(["ray-env"]) == 1


def test_training_run_dir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    tiny = Path(__file__).resolve().parents[2] / "configs" / "tiny_cpu.yaml"
    from megatron_lpreg.launch.job import training_run_dir

    assert training_run_dir({}, str(tiny), ["trainer.output_dir=runs/x"]) == tmp_path / "runs" / "x"
    _train_array(tmp_path / "sw", ["0", "1"])
    assert training_run_dir({"SLURM_ARRAY_TASK_ID": "1"}, array_dir=str(tmp_path / "sw")) == tmp_path / "sw" / "task_1"
    ArrayManifest(kind="eval", command=["e"], tasks=[["x"]]).write(tmp_path / "ev")
    with pytest.raises(ValueError, match="only training tasks have a run directory"):
        training_run_dir({"SLURM_ARRAY_TASK_ID": "0"}, array_dir=str(tmp_path / "ev"))
    assert main(["run-dir", str(tiny), "trainer.output_dir=/r", "algo.rhoo=1"]) == 1  # bad config: clear failure


def test_preempt_request_is_the_trainers_flag_file(tmp_path):
    from megatron_lpreg.trainer.signals import PreemptionWatcher

    watcher = PreemptionWatcher(tmp_path, install_handlers=False)
    assert not watcher.should_stop()
    assert main(["preempt", str(tmp_path)]) == 0
    assert watcher.should_stop()
    assert main(["preempt", "--clear", str(tmp_path)]) == 0
    assert not watcher.should_stop()
