"""Where SGLang servers come from: launched by this process, launched by Ray actors on the nodes that hold their
GPUs, or attached by URL. Every pool gives the client the same three things: the URLs, a description of an
engine for error messages (engine id, node, log file) and a bounded restart.

``server_command`` is the one place that builds a ``python -m <rollout.sglang_launch_module>`` command line.
"""
from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol

from megatron_lpreg.config.rollout import RolloutConfig
from megatron_lpreg.parallel.spawn import free_port

logger = logging.getLogger(__name__)


class SGLangError(RuntimeError):
    """A server answered with an error, or could not be reached after the configured retries.

    ``engine_fault`` is True when the server itself is at fault (unreachable, hung, 5xx, malformed answer): the
    request may succeed on another engine. False for a refused request (4xx), which would fail anywhere.
    """

    def __init__(self, message: str, *, engine_fault: bool = True, hung: bool = False) -> None:
        super().__init__(message)
        self.engine_fault = engine_fault
        self.hung = hung
        """True when the server did not answer in time (it is restarted even if /health still answers)."""


def server_command(cfg: RolloutConfig, model_path: str, *, host: str, port: int, seed: int,
                   base_gpu_id: int = 0) -> list[str]:
    """The launch command of one server (TP ``cfg.engine_tp`` inside it) bound to ``host:port``; run it with
    :func:`server_env` (``rollout.sglang_device=cpu`` needs an environment variable)."""
    return [
        sys.executable, "-m", cfg.sglang_launch_module, "--model-path", model_path, "--host", host,
        "--port", str(port), "--tp-size", str(cfg.engine_tp), "--random-seed", str(seed),
        "--mem-fraction-static", str(cfg.mem_fraction_static),
        *(["--base-gpu-id", str(base_gpu_id)] if base_gpu_id else []),
        *(["--dtype", cfg.dtype] if cfg.dtype != "auto" else []),
        *(CPU_SERVER_ARGS if cfg.sglang_device == "cpu" else []),
        *(["--enable-memory-saver"] if uses_memory_saver(cfg) else []), *cfg.sglang_launch_args,
    ]


def served_dtype(cfg: RolloutConfig, model_path: str) -> str:
    """The dtype a server of ``model_path`` computes in: ``rollout.dtype`` (passed as ``--dtype``) unless auto, else
    SGLang 0.5.23's "auto" (``configs/model_config.py:2303``): the checkpoint's own dtype, except that a float32
    checkpoint runs in float16 (bfloat16 for Gemma, which the project does not serve). An attached server or a
    ``--dtype`` in ``sglang_launch_args`` may differ; the probe tolerance follows this value."""
    from megatron_lpreg.models import hf_dir

    if cfg.dtype != "auto":
        return cfg.dtype
    declared = hf_dir.declared_dtype(hf_dir.read_config(model_path, missing_ok=True)) or "float32"
    return "float16" if declared == "float32" else declared


def uses_memory_saver(cfg: RolloutConfig) -> bool:
    """Whether launched servers start with ``--enable-memory-saver``: colocated servers on GPUs.

    Without the flag SGLang 0.5.23 builds a no-op memory-saver adapter and ``/release_memory_occupation`` frees
    nothing (``torch_memory_saver``, in the ``sglang`` extra, does the freeing). The flag needs CUDA (on CPU the
    server dies at start, ``libcuda.so.1``), so ``rollout.sglang_device=cpu`` servers never get it and their
    release/resume stay no-ops.
    """
    return cfg.mode == "colocated" and cfg.sglang_device == "cuda"


CPU_SERVER_ARGS = ("--device", "cpu", "--disable-overlap-schedule", "--max-total-tokens", "16384")
"""What a CPU server needs (measured with sglang 0.5.23 on torch 2.13.0+cpu, docs/rollout.md "Real SGLang on CPU"):
the overlap scheduler is CUDA-only, and without a token cap SGLang sizes the KV cache from ``mem_fraction_static`` of
the host's RAM (16384 tokens of the tiny CPU model's cache are ~32 MiB)."""


def server_env(cfg: RolloutConfig, base: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of a launched server: ``base`` (default this process's) plus ``SGLANG_USE_CPU_ENGINE=1``
    for ``rollout.sglang_device=cpu`` (without it SGLang 0.5.23 imports vLLM's CUDA rotary kernels and dies)."""
    env = dict(os.environ if base is None else base)
    if cfg.sglang_device == "cpu":
        env["SGLANG_USE_CPU_ENGINE"] = "1"
    return env


class SGLangServerProcess:
    """A launched server process (its own session); stopped with its whole process group."""

    def __init__(self, cmd: list[str], url: str, log_path: Path, env: dict[str, str] | None = None) -> None:
        self.url = url
        self.log_path = log_path
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(log_path, "ab")
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True,
                                     env=env)

    def wait_healthy(self, healthy: Callable[[], bool], timeout_s: float) -> None:
        """Poll ``healthy()`` until True.

        Raises:
            SGLangError: the process exited or did not become healthy in time (message has the log tail).
        """
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SGLangError(f"server {self.url} exited with code {self.proc.returncode} (log {self.log_path}):"
                                  f"\n{self.log_tail()}")
            if healthy():
                return
            time.sleep(0.5)
        raise SGLangError(f"server {self.url} not healthy after {timeout_s:.0f} s (log {self.log_path}):\n"
                          f"{self.log_tail()}")

    def log_tail(self, chars: int = 4000) -> str:
        self._log.flush()
        return self.log_path.read_bytes()[-chars:].decode(errors="replace")

    def stop(self, grace_s: float = 15.0) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self._log.close()


def is_healthy(url: str, timeout_s: float = 10.0) -> bool:
    """True when ``url``/health answers 200 right now."""
    import requests

    try:
        return requests.get(f"{url}/health", timeout=timeout_s).status_code == 200
    except (requests.ConnectionError, requests.Timeout):
        return False


@dataclass(frozen=True)
class EngineInfo:
    """One running engine: where it is and where its log goes."""

    engine_id: int
    url: str
    node: int
    """Node index in the placement plan (0 for servers this process launched)."""
    node_id: str
    """Ray node id ('' outside Ray)."""
    gpus: tuple[int, ...]
    """GPU ids the server sees (its CUDA_VISIBLE_DEVICES); () when unknown (attached servers)."""
    log_path: str
    pid: int = 0
    restarts: int = 0

    def describe(self) -> str:
        gpus = ",".join(map(str, self.gpus)) or "?"
        return f"engine {self.engine_id} ({self.url}, node {self.node}, GPUs {gpus}, log {self.log_path or 'n/a'})"


class ServerPool(Protocol):
    """The servers behind one SGLangEngine."""

    engines: list[EngineInfo]

    def restart(self, engine_id: int) -> EngineInfo:
        """Stop and relaunch engine ``engine_id``; raise SGLangError when it cannot (attached, or it failed)."""
        ...

    def shutdown(self) -> None: ...


class AttachedServers:
    """Servers someone else runs (``rollout.sglang_urls``): never restarted by us."""

    def __init__(self, urls: list[str]) -> None:
        self.engines = [EngineInfo(engine_id=k, url=u.rstrip("/"), node=0, node_id="", gpus=(), log_path="")
                        for k, u in enumerate(urls)]

    def restart(self, engine_id: int) -> EngineInfo:
        raise SGLangError(f"{self.engines[engine_id].describe()} failed and is attached by URL "
                          f"(rollout.sglang_urls), so it cannot be restarted from here; restart it and resume")

    def shutdown(self) -> None:
        pass


class LocalServers:
    """Servers launched by this process on this host (no Ray placement): engine k on GPUs k*tp .. k*tp+tp-1."""

    def __init__(self, cfg: RolloutConfig, model_path: str, seed: int, log_dir: Path) -> None:
        self.cfg, self.model_path, self.seed, self.log_dir = cfg, model_path, seed, log_dir
        self.processes: list[SGLangServerProcess | None] = [None] * cfg.num_engines
        self.engines = [self._launch(k, 0) for k in range(cfg.num_engines)]
        try:
            for proc in self.processes:
                proc.wait_healthy(lambda u=proc.url: is_healthy(u), cfg.launch_timeout_s)
        except BaseException:
            self.shutdown()
            raise

    def _launch(self, k: int, restarts: int) -> EngineInfo:
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        cmd = server_command(self.cfg, self.model_path, host="127.0.0.1", port=port, seed=self.seed,
                             base_gpu_id=k * self.cfg.engine_tp)
        log_path = self.log_dir / f"engine{k}.log"
        logger.info("launching sglang engine %d: %s", k, " ".join(cmd))
        proc = SGLangServerProcess(cmd, url, log_path, env=server_env(self.cfg))
        self.processes[k] = proc
        gpus = tuple(range(k * self.cfg.engine_tp, (k + 1) * self.cfg.engine_tp))
        return EngineInfo(engine_id=k, url=url, node=0, node_id="", gpus=gpus, log_path=str(log_path),
                          pid=proc.proc.pid, restarts=restarts)

    def restart(self, engine_id: int) -> EngineInfo:
        old = self.engines[engine_id]
        self.processes[engine_id].stop(grace_s=5)
        info = self._launch(engine_id, old.restarts + 1)
        self.processes[engine_id].wait_healthy(lambda: is_healthy(info.url), self.cfg.launch_timeout_s)
        self.engines[engine_id] = info
        return info

    def shutdown(self) -> None:
        for proc in self.processes:
            if proc is not None:
                proc.stop()
        self.processes = [None] * len(self.processes)


class ServerActor:
    """Ray actor body: runs one engine's server on the node Ray placed it on, with the given GPUs visible."""

    def __init__(self, cfg: RolloutConfig, model_path: str, seed: int, engine_id: int, node: int,
                 gpus: list[int], log_dir: str) -> None:
        self.cfg, self.model_path, self.seed = cfg, model_path, seed
        self.info = EngineInfo(engine_id=engine_id, url="", node=node, node_id="", gpus=tuple(gpus),
                               log_path=str(Path(log_dir) / f"engine{engine_id}.log"), restarts=-1)
        self.proc: SGLangServerProcess | None = None

    def start(self) -> EngineInfo:
        """(Re)launch the server bound to this node's address and a free port there; wait until healthy."""
        import ray

        self.stop()
        host = ray.util.get_node_ip_address()
        port = free_port(host)
        url = f"http://{host}:{port}"
        cmd = server_command(self.cfg, self.model_path, host=host, port=port, seed=self.seed)
        env = server_env(self.cfg, {**os.environ, "CUDA_VISIBLE_DEVICES": ",".join(map(str, self.info.gpus))})
        logger.info("engine %d on node %d (GPUs %s): %s", self.info.engine_id, self.info.node,
                    env["CUDA_VISIBLE_DEVICES"], " ".join(cmd))
        self.proc = SGLangServerProcess(cmd, url, Path(self.info.log_path), env=env)
        self.proc.wait_healthy(lambda: is_healthy(url), self.cfg.launch_timeout_s)
        self.info = replace(self.info, url=url, node_id=ray.get_runtime_context().get_node_id(),
                            pid=self.proc.proc.pid, restarts=self.info.restarts + 1)
        return self.info

    def describe(self) -> EngineInfo:
        return self.info

    def kill_server(self) -> int:
        """SIGKILL the server process (fault-injection in tests); returns its pid."""
        pid = self.proc.proc.pid
        os.killpg(pid, signal.SIGKILL)
        return pid

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.stop(grace_s=5)
            self.proc = None


class RayServers:
    """Engines run by :class:`ServerActor` s that the Ray launcher placed (handles found by name in Ray)."""

    def __init__(self, actors: list[Any], engines: list[EngineInfo], max_restarts: int) -> None:
        self.actors, self.engines, self.max_restarts = actors, engines, max_restarts

    @classmethod
    def attach(cls, prefix: str, num_engines: int, max_restarts: int) -> RayServers:
        """The engine actors the launcher named ``<prefix><id>`` (they are already serving)."""
        import ray

        actors = [ray.get_actor(f"{prefix}{k}") for k in range(num_engines)]
        engines = ray.get([a.describe.remote() for a in actors])
        return cls(actors, engines, max_restarts)

    def restart(self, engine_id: int) -> EngineInfo:
        import ray

        old = self.engines[engine_id]
        if old.restarts >= self.max_restarts:
            raise SGLangError(f"{old.describe()} failed again after {old.restarts} restart(s) "
                              f"(rollout.max_engine_restarts={self.max_restarts}); see its log")
        try:
            info = ray.get(self.actors[engine_id].start.remote())
        except Exception as exc:  # noqa: BLE001 - a RayActorError or the actor's SGLangError, both end here
            raise SGLangError(f"restarting {old.describe()} failed: {exc}") from exc
        self.engines[engine_id] = info
        return info

    def shutdown(self) -> None:
        """Stop the servers (the launcher kills the actors when the run ends)."""
        import ray

        ray.get([a.stop.remote() for a in self.actors])
