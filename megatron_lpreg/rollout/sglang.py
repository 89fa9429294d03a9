"""SGLang 0.5.x rollout engine: launch or attach to servers, generate over HTTP, sync and verify weights.

One server = one engine (TP inside the server); prompts are spread over engines by prompt index so that a prompt's
samples share a server's prefix cache. Each (prompt, sample) is sent as its own item with ``n=1`` and, when the
request has a seed, ``sampling_seed = row_seed(seed, prompt, sample)`` (honoured by SGLang's deterministic mode),
so outputs are ordered unambiguously and seeded like the local engine.

Weight sync (``rollout.weight_sync``):
  disk         POST /update_weights_from_disk {model_path} on every server (the trainer saved an HF directory).
  tensor       /begin_weight_update, then per bucket /update_weights_from_tensor with pickled tensors, then
               /end_weight_update (same node only for CUDA tensors).
  distributed  once: /init_weights_update_group (trainer rank 0 = rank 0, engine k's TP ranks follow); per bucket
               /update_weights_from_distributed with names/dtypes/shapes while rank 0 broadcasts the tensors,
               wrapped in begin/end as above.
After every sync each server is checked: ``verify_tensors`` tensors' first rows via /get_weights_by_name must equal
what was sent (up to the server's dtype rounding), and an optional teacher-forced probe must match the trainer's
log-probs. Any mismatch raises WeightSyncError.
"""
from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import requests
import torch

from megatron_lpreg.config.rollout import RolloutConfig
from megatron_lpreg.rollout.base import (
    Completion,
    EngineHealth,
    SamplingParams,
    WeightSyncError,
    WeightUpdate,
)
from megatron_lpreg.rollout.local import verify_probe
from megatron_lpreg.rollout.logits_model import read_safetensor_rows, safetensors_files
from megatron_lpreg.rollout.sampling import row_seed, validate_params
from megatron_lpreg.rollout.weight_sync import (
    WeightSamples,
    broadcast_bucket,
    first_row_sample,
    iter_buckets,
    serialize_named_tensors,
    standalone_group,
)

logger = logging.getLogger(__name__)

RETRY_STATUS = (502, 503, 504)
CONTROL_TIMEOUT_S = 60.0
"""Timeout of health/flush/memory calls (weight updates and generation use rollout.request_timeout_s)."""


class SGLangError(RuntimeError):
    """A server answered with an error, or could not be reached after the configured retries."""


class SGLangClient:
    """HTTP client for one SGLang server; owns one ``requests.Session`` per calling thread (call ``close()``).

    Sessions are not thread-safe, and generation sends several requests to one server at once so that SGLang's
    continuous batching sees them all; each thread therefore gets its own keep-alive session.
    """

    def __init__(self, url: str, *, timeout_s: float = 600.0, max_retries: int = 3, backoff_s: float = 1.0) -> None:
        self.url = url.rstrip("/")
        self.timeout_s = timeout_s
        self.max_retries = max_retries
        self.backoff_s = backoff_s
        self._local = threading.local()
        self._sessions: list[requests.Session] = []
        self._sessions_lock = threading.Lock()

    @property
    def session(self) -> requests.Session:
        """This thread's session (created on first use)."""
        session = getattr(self._local, "session", None)
        if session is None:
            session = requests.Session()
            self._local.session = session
            with self._sessions_lock:
                self._sessions.append(session)
        return session

    def request(
        self, method: str, route: str, payload: dict | None = None, *, timeout_s: float | None = None,
        retries: int | None = None,
    ) -> Any:
        """Call ``route``; retry connection errors and 502/503/504 with exponential backoff.

        Returns:
            The decoded JSON body, or the text for non-JSON answers.

        Raises:
            SGLangError: a 4xx/5xx answer (message includes the server's body) or retries exhausted.
        """
        retries = self.max_retries if retries is None else retries
        for attempt in range(retries + 1):
            try:
                resp = self.session.request(
                    method, f"{self.url}{route}", json=payload, timeout=timeout_s or self.timeout_s
                )
            except (requests.ConnectionError, requests.Timeout) as exc:
                error = f"{type(exc).__name__}: {exc}"
            else:
                if resp.status_code < 400:
                    if "application/json" in resp.headers.get("content-type", ""):
                        return resp.json()
                    return resp.text
                error = f"HTTP {resp.status_code}: {resp.text[:2000]}"
                if resp.status_code not in RETRY_STATUS:
                    raise SGLangError(f"{method} {self.url}{route} failed: {error}")
            if attempt < retries:
                delay = self.backoff_s * 2**attempt
                logger.warning("%s %s%s: %s; retry in %.1f s", method, self.url, route, error, delay)
                time.sleep(delay)
        raise SGLangError(f"{method} {self.url}{route} failed after {retries + 1} attempts: {error}")

    def post(self, route: str, payload: dict | None = None, **kw: Any) -> Any:
        result = self.request("POST", route, payload if payload is not None else {}, **kw)
        if isinstance(result, dict) and result.get("success") is False:
            raise SGLangError(f"POST {self.url}{route}: {result.get('message', result)}")
        return result

    def healthy(self, *, generate: bool = False) -> bool:
        """True when /health (or /health_generate) answers 200 right now (no retries)."""
        try:
            route = "/health_generate" if generate else "/health"
            return self.session.get(f"{self.url}{route}", timeout=CONTROL_TIMEOUT_S).status_code == 200
        except (requests.ConnectionError, requests.Timeout):
            return False

    def weights_by_name(self, name: str, truncate_size: int = 1) -> torch.Tensor:
        rows = self.post("/get_weights_by_name", {"name": name, "truncate_size": truncate_size})
        return torch.tensor(rows, dtype=torch.float32)

    def score(self, token_ids: list[int], prompt_len: int) -> list[float]:
        """Teacher-forced log-probs (temperature 1) of ``token_ids[prompt_len:]`` via ``input_token_logprobs``."""
        out = self.post("/generate", {
            "input_ids": token_ids, "sampling_params": {"max_new_tokens": 1, "temperature": 1.0, "top_k": 1},
            "return_logprob": True, "logprob_start_len": prompt_len - 1,
        })
        entries = [e for e in out["meta_info"]["input_token_logprobs"] if e[0] is not None]
        continuation = token_ids[prompt_len:]
        tail = entries[-len(continuation) :]
        if [int(e[1]) for e in tail] != continuation:
            raise WeightSyncError(f"{self.url}: input_token_logprobs do not line up with the probe tokens")
        return [float(e[0]) for e in tail]

    def close(self) -> None:
        with self._sessions_lock:
            for session in self._sessions:
                session.close()
            self._sessions.clear()


class SGLangServerProcess:
    """A server this engine launched (``python -m <module> ...``); stopped with its whole process group."""

    def __init__(self, cmd: list[str], url: str, log_path: Path) -> None:
        self.url = url
        self.log_path = log_path
        self._log = open(log_path, "wb")
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True)

    def wait_healthy(self, client: SGLangClient, timeout_s: float) -> None:
        """Poll /health until it answers 200.

        Raises:
            SGLangError: the process exited or did not become healthy in time (message has the log tail).
        """
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SGLangError(f"server {self.url} exited with code {self.proc.returncode}:\n{self.log_tail()}")
            if client.healthy():
                return
            time.sleep(0.5)
        raise SGLangError(f"server {self.url} not healthy after {timeout_s:.0f} s:\n{self.log_tail()}")

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


def _free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


class SGLangEngine:
    """RolloutEngine over one or more SGLang servers (launched here or attached by URL)."""

    def __init__(self, cfg: RolloutConfig, model_path: str, *, seed: int = 0) -> None:
        """Launch ``cfg.num_engines`` servers on ``model_path`` (or attach to ``cfg.sglang_urls``) and wait for
        them to be healthy.

        Raises:
            SGLangError: a server did not start or an attached URL is not healthy.
        """
        self.cfg = cfg
        self.model_path = model_path
        self.weight_version = 0
        self.processes: list[SGLangServerProcess] = []
        self._group = None
        self._log_dir = Path(tempfile.mkdtemp(prefix="sglang_logs_"))
        urls = list(cfg.sglang_urls)
        try:
            if not urls:
                urls = self._launch(seed)
            self.clients = [
                SGLangClient(u, timeout_s=cfg.request_timeout_s, max_retries=cfg.max_retries,
                             backoff_s=cfg.retry_backoff_s)
                for u in urls
            ]
            for proc, client in zip(self.processes, self.clients):
                proc.wait_healthy(client, cfg.launch_timeout_s)
            for client in self.clients:
                client.request("GET", "/health", timeout_s=CONTROL_TIMEOUT_S)
        except BaseException:
            self.shutdown()
            raise
        logger.info("sglang engines ready: %s", ", ".join(urls))

    def _launch(self, seed: int) -> list[str]:
        urls = []
        for k in range(self.cfg.num_engines):
            port = _free_port()
            url = f"http://127.0.0.1:{port}"
            cmd = [
                sys.executable, "-m", self.cfg.sglang_launch_module, "--model-path", self.model_path,
                "--host", "127.0.0.1", "--port", str(port), "--tp-size", str(self.cfg.engine_tp),
                "--random-seed", str(seed), *(["--base-gpu-id", str(k * self.cfg.engine_tp)] if k else []),
                *self.cfg.sglang_launch_args,
            ]
            logger.info("launching sglang engine %d: %s", k, " ".join(cmd))
            self.processes.append(SGLangServerProcess(cmd, url, self._log_dir / f"engine{k}.log"))
            urls.append(url)
        return urls

    # ---- generation -----------------------------------------------------------------------------------------
    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[Completion]:
        """See :class:`~megatron_lpreg.rollout.base.RolloutEngine`; prompts go to engine ``i % num_engines``.

        Raises:
            SGLangError: a server failed (after retries) or answered in an unexpected shape.
        """
        validate_params(params)
        rows = [(i, j) for i in range(len(prompts)) for j in range(params.n)]
        jobs = []
        for k, client in enumerate(self.clients):
            engine_rows = [r for r in rows if r[0] % len(self.clients) == k]
            for start in range(0, len(engine_rows), self.cfg.max_batch_size):
                jobs.append((client, engine_rows[start : start + self.cfg.max_batch_size]))
        workers = max(1, min(len(jobs), len(self.clients) * self.cfg.max_inflight_requests))
        # every chunk is in flight at once (up to max_inflight_requests per engine): no chunk waits for the
        # slowest response of the previous one
        with ThreadPoolExecutor(max_workers=workers) as pool:
            futures = [pool.submit(self._generate_chunk, client, prompts, chunk, params) for client, chunk in jobs]
            results = [c for f in futures for c in f.result()]
        return sorted(results, key=lambda c: (c.prompt_index, c.sample_index))

    def _generate_chunk(
        self, client: SGLangClient, prompts: list[list[int]], chunk: list[tuple[int, int]], params: SamplingParams
    ) -> list[Completion]:
        payload = {
            "input_ids": [prompts[i] for i, _ in chunk],
            "sampling_params": [sampling_payload(params, i, j) for i, j in chunk],
            "return_logprob": True,
        }
        items = client.post("/generate", payload)
        if not isinstance(items, list) or len(items) != len(chunk):
            raise SGLangError(f"{client.url}/generate returned {type(items).__name__} for {len(chunk)} items")
        return [parse_item(item, prompts[i], i, j) for item, (i, j) in zip(items, chunk)]

    # ---- weights ----------------------------------------------------------------------------------------------
    def update_weights(self, update: WeightUpdate) -> None:
        """Install ``update`` on every server and verify it (see module docstring).

        Raises:
            ValueError: the update lacks what the sync mode needs (``path`` for disk, ``tensors`` otherwise).
            WeightSyncError: a server rejected the update or a post-sync check failed.
        """
        mode = self.cfg.weight_sync
        if mode == "auto":
            mode = "disk" if update.path is not None else "distributed"
        if mode == "disk":
            if update.path is None:
                raise ValueError("rollout.weight_sync='disk' needs WeightUpdate.path (an HF checkpoint directory)")
            samples = self._sync_from_disk(update.path, update.version)
        else:
            if update.tensors is None:
                raise ValueError(f"rollout.weight_sync={mode!r} needs WeightUpdate.tensors ((hf_name, tensor) stream)")
            samples = self._sync_tensors(update, mode)
        self._verify(samples, update)
        self.weight_version = update.version
        logger.info("sglang engines at weight version %d (%s sync)", update.version, mode)

    def _on_all(self, fn, *args: Any) -> list[Any]:
        with ThreadPoolExecutor(max_workers=len(self.clients)) as pool:
            return [f.result() for f in [pool.submit(fn, c, *args) for c in self.clients]]

    def _sync_from_disk(self, path: str, version: int) -> WeightSamples:
        payload = {"model_path": str(path), "weight_version": str(version)}
        try:
            self._on_all(lambda c: c.post("/update_weights_from_disk", payload))
        except SGLangError as exc:
            raise WeightSyncError(f"update_weights_from_disk({path}) failed: {exc}") from exc
        samples = WeightSamples()
        names = _safetensor_names(path)
        for name in WeightSamples(samples=dict.fromkeys(names)).pick(self.cfg.verify_tensors):
            samples.samples[name] = first_row_sample(read_safetensor_rows(path, name, 1))
        return samples

    def _sync_tensors(self, update: WeightUpdate, mode: str) -> WeightSamples:
        samples = WeightSamples()
        bucket_bytes = int(self.cfg.weight_bucket_mb * 2**20)
        if mode == "distributed" and self._group is None:
            self._init_group()
        self._on_all(lambda c: c.post("/begin_weight_update"))
        try:
            for bucket in iter_buckets(update.tensors, bucket_bytes):
                samples.record(bucket)
                if mode == "tensor":
                    self._push_tensor_bucket(bucket, update.version)
                else:
                    self._push_distributed_bucket(bucket, update.version)
        except SGLangError as exc:
            raise WeightSyncError(f"{mode} weight sync failed: {exc}") from exc
        finally:
            self._on_all(lambda c: c.post("/end_weight_update"))
        return samples

    def _push_tensor_bucket(self, bucket: list, version: int) -> None:
        payload = {
            "serialized_named_tensors": [serialize_named_tensors(bucket)] * self.cfg.engine_tp,
            "flush_cache": True, "weight_version": str(version),
        }
        self._on_all(lambda c: c.post("/update_weights_from_tensor", payload))

    def _init_group(self) -> None:
        backend = self.cfg.weight_sync_backend
        host = self.cfg.weight_sync_host or socket.gethostname()
        port = _free_port("0.0.0.0")
        world = 1 + len(self.clients) * self.cfg.engine_tp
        requests_out = [
            {"master_address": host, "master_port": port, "rank_offset": 1 + k * self.cfg.engine_tp,
             "world_size": world, "group_name": "weight_update_group", "backend": backend}
            for k in range(len(self.clients))
        ]
        with ThreadPoolExecutor(max_workers=len(self.clients)) as pool:
            futures = [
                pool.submit(c.post, "/init_weights_update_group", req, retries=0)
                for c, req in zip(self.clients, requests_out)
            ]
            group = standalone_group(backend, host, port, 0, world, timeout_s=self.cfg.launch_timeout_s)
            for f in futures:
                f.result()
        self._group = group
        logger.info("weight broadcast group ready: %s:%d, world %d (%s)", host, port, world, backend)

    def _push_distributed_bucket(self, bucket: list, version: int) -> None:
        payload = {
            "names": [n for n, _ in bucket], "dtypes": [str(t.dtype).replace("torch.", "") for _, t in bucket],
            "shapes": [list(t.shape) for _, t in bucket], "group_name": "weight_update_group",
            "flush_cache": True, "weight_version": str(version),
        }
        with ThreadPoolExecutor(max_workers=len(self.clients)) as pool:
            # the servers block in their broadcast receive until rank 0 sends: post first, then broadcast
            futures = [
                pool.submit(c.post, "/update_weights_from_distributed", payload, retries=0) for c in self.clients
            ]
            broadcast_bucket(self._group, bucket, self.cfg.weight_sync_backend)
            for f in futures:
                f.result()

    def _verify(self, samples: WeightSamples, update: WeightUpdate) -> None:
        for client in self.clients:
            for name in samples.pick(self.cfg.verify_tensors):
                samples.check(name, client.weights_by_name(name, 1), engine=client.url)
            if update.probe is not None:
                verify_probe(client.score, update.probe, engine=client.url)

    # ---- colocation, health, shutdown -------------------------------------------------------------------------
    def release_memory(self) -> None:
        """Free the servers' GPU memory (weights and KV cache) while the trainer runs."""
        self._on_all(lambda c: c.post("/release_memory_occupation", {}, timeout_s=CONTROL_TIMEOUT_S))

    def resume_memory(self) -> None:
        self._on_all(lambda c: c.post("/resume_memory_occupation", {}, timeout_s=CONTROL_TIMEOUT_S))

    def flush_cache(self) -> None:
        self._on_all(lambda c: c.request("POST", "/flush_cache", timeout_s=CONTROL_TIMEOUT_S))

    def health(self) -> EngineHealth:
        bad = [c.url for c in self.clients if not c.healthy()]
        return EngineHealth(ok=not bad, detail=f"unhealthy: {bad}" if bad else "", weight_version=self.weight_version)

    def shutdown(self) -> None:
        for client in getattr(self, "clients", []):
            client.close()
        for proc in self.processes:
            proc.stop()
        self.processes = []
        self._group = None


def sampling_payload(params: SamplingParams, prompt_index: int, sample_index: int) -> dict:
    """SGLang ``sampling_params`` for one (prompt, sample) item; only keys SGLang 0.5 accepts."""
    payload: dict[str, Any] = {
        "max_new_tokens": params.max_new_tokens, "temperature": params.temperature, "top_p": params.top_p,
        "top_k": params.top_k, "min_p": params.min_p, "n": 1,
    }
    if params.stop_token_ids:
        payload["stop_token_ids"] = list(params.stop_token_ids)
    if params.seed is not None:
        payload["sampling_seed"] = row_seed(params.seed, prompt_index, sample_index)
    return payload


def parse_item(item: dict, prompt: list[int], prompt_index: int, sample_index: int) -> Completion:
    """One /generate result -> Completion.

    Raises:
        SGLangError: missing ``output_token_logprobs`` or token ids that disagree with ``output_ids``.
    """
    meta = item.get("meta_info", {})
    entries = meta.get("output_token_logprobs")
    if entries is None:
        raise SGLangError("generate result lacks meta_info.output_token_logprobs (send return_logprob=true)")
    response_ids = [int(e[1]) for e in entries]
    if "output_ids" in item and list(item["output_ids"]) != response_ids:
        raise SGLangError("output_ids and output_token_logprobs token ids disagree")
    finish = (meta.get("finish_reason") or {}).get("type", "abort")
    return Completion(
        prompt_index=prompt_index, sample_index=sample_index, prompt_ids=list(prompt), response_ids=response_ids,
        logprobs=[float(e[0]) for e in entries], finish_reason=finish if finish in ("stop", "length") else "abort",
        text=item.get("text", ""),
    )


def _safetensor_names(path: str) -> list[str]:
    from safetensors import safe_open

    names: list[str] = []
    for file in safetensors_files(path):
        with safe_open(str(file), framework="pt") as handle:
            names.extend(handle.keys())
    return names
