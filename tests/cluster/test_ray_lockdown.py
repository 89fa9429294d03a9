"""Ray on the Slurm path is locked down: slurm/common.sh makes a per-job token (mode 600 under the run directory)
and the head's flags (no dashboard, Ray Client not on the fixed 10001); a Ray head started with them runs code for
a driver holding the token and refuses one that knows only IP:PORT (the attack the issue measured)."""
from __future__ import annotations

import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from megatron_lpreg.rollout.sglang_servers import free_port

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
RAY = Path(sys.executable).parent / "ray"
MARK = "ran-as-job-owner"
DRIVER = ("import ray, sys; ray.init(address=sys.argv[1], log_to_driver=False); "
          f"print(ray.get(ray.remote(lambda: '{MARK}').remote()))")


def _common_sh(run_dir: Path) -> tuple[Path, list[str]]:
    script = ("set -euo pipefail; source slurm/common.sh; "
              'mlpreg_eval_py "the Ray layout" -m megatron_lpreg.launch.job ray-env; mlpreg_ray_auth; '
              'mlpreg_ray_head_flags; echo "$RAY_AUTH_MODE $RAY_AUTH_TOKEN_PATH"; echo "${MLPREG_RAY_HEAD_FLAGS[*]}"')
    env = {**os.environ, "SLURM_JOB_ID": "4242", "SLURM_JOB_NODELIST": "localhost", "SLURM_JOB_NUM_NODES": "1",
           "SLURM_CPUS_ON_NODE": "1", "MLPREG_PREEMPT_DIR": str(run_dir), "MLPREG_PYTHON": sys.executable}
    out = subprocess.run(["bash", "-c", script], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    auth, flags = out.stdout.splitlines()
    mode, token_path = auth.split()
    assert mode == "token"
    return Path(token_path), flags.split()


def _listening(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def _driver(address: str, env: dict[str, str]) -> str:
    try:
        out = subprocess.run([sys.executable, "-c", DRIVER, address], env=env, capture_output=True, text=True,
                             timeout=180)
    except subprocess.TimeoutExpired:
        return "timed out"
    return out.stdout + out.stderr


@pytest.mark.skipif(not RAY.exists(), reason="ray CLI not installed")
def test_token_auth_refuses_a_driver_that_knows_only_the_address(tmp_path):
    token, flags = _common_sh(tmp_path / "run")
    assert stat.S_IMODE(token.stat().st_mode) == 0o600 and stat.S_IMODE(token.parent.stat().st_mode) == 0o700
    assert len(token.read_text().strip()) == 64 and token.parent.parent == tmp_path / "run"
    assert "--include-dashboard=false" in flags
    client_port = int(next(f for f in flags if f.startswith("--ray-client-server-port=")).split("=")[1])
    assert client_port != 10001

    temp_dir = tempfile.mkdtemp(prefix="rl", dir="/tmp")  # short: Ray's socket paths must stay < 108 chars
    port = free_port()
    base = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    base.update(RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", HOME=str(tmp_path))  # loopback only; no ~/.ray token
    owner = {**base, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token)}
    head = subprocess.Popen(
        [str(RAY), "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={port}", *flags,
         "--num-cpus=1", "--num-gpus=0", f"--temp-dir={temp_dir}", "--disable-usage-stats"],
        env=owner, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    address = f"127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while not _listening(port) and time.monotonic() < deadline:
            assert head.poll() is None, "ray start --head exited"
            time.sleep(1)
        result = _driver(address, owner)
        assert MARK in result, result[-2000:]
        assert MARK not in _driver(address, base)  # knows IP:PORT only
        wrong = tmp_path / "wrong_token"
        wrong.write_text("0" * 64)
        assert MARK not in _driver(address, {**base, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(wrong)})
    finally:
        os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
            head.wait()
        shutil.rmtree(temp_dir, ignore_errors=True)
