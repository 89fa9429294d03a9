"""SGLang 0.5.x rollout engine: launch or attach to servers, generate over HTTP, sync and verify weights.

One server = one engine (TP inside the server), reached through an HTTP client (rollout/sglang_client.py). The
servers come from a pool (rollout/sglang_servers.py): placed by the Ray launcher on the nodes that hold their GPUs,
launched on this host, or attached by URL. Rows go out in chunks of ``max_batch_size`` to the engine with the least
outstanding rows (rollout/dispatch.py); a chunk whose engine failed moves to another engine and the engine is
restarted a bounded number of times. Each (prompt, sample) is sent as its own item with ``n=1`` and, when the
request has a seed, ``sampling_seed = row_seed(seed, prompt, sample)`` (honoured by SGLang's deterministic mode), so
outputs do not depend on which engine served them.

Weight sync (``rollout.weight_sync``):
  disk         POST /update_weights_from_disk {model_path} on every server (the trainer saved an HF directory).
  tensor       /begin_weight_update, then per bucket /update_weights_from_tensor with one payload per engine TP
               rank (rollout/sglang_payload.py: SGLang's serializer format, CUDA IPC or CPU shared memory),
               then /end_weight_update. Colocated trainers hand over ``WeightUpdate.payloads``: each engine TP
               rank's payload written by the trainer rank on its own GPU (trainer/colocated_sync.py); otherwise
               this process serializes ``tensors`` itself (same node only).
  distributed  once: /init_weights_update_group (trainer rank 0 = rank 0, engine k's TP ranks follow;
               rebuilt after an engine restart); per bucket
               /update_weights_from_distributed with names/dtypes/shapes while rank 0 broadcasts the tensors,
               wrapped in begin/end as above.
After every sync each server scores the trainer's probe (``WeightUpdate.probe``, required: the trainer makes it with
``trainer/sync_probe.py``) teacher-forced, and its log-probs must match the trainer's within the probe's tolerance,
widened to that of the dtype the server runs in (``weight_sync.probe_atol``). No other route is read back:
``/get_weights_by_name`` exists only for the model classes that define it, and Qwen2/Qwen3 do not (SGLang 0.5.23
``weight_exporter.py:181``: "TODO: Add support for Qwen models"). Any mismatch raises WeightSyncError.
"""
from __future__ import annotations

import dataclasses
import logging
import socket
import tempfile
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from megatron_lpreg.config.rollout import RolloutConfig
from megatron_lpreg.rollout.base import (
    Colocation,
    Completion,
    EngineHealth,
    PayloadBucket,
    SamplingParams,
    WeightSyncError,
    WeightUpdate,
    finish_reason,
)
from megatron_lpreg.rollout.dispatch import LeastLoadedDispatcher
from megatron_lpreg.rollout.sampling import row_seed, sample_rows, validate_params
from megatron_lpreg.rollout.sglang_client import CONTROL_TIMEOUT_S, SGLangClient
from megatron_lpreg.rollout.sglang_payload import serialize_named_tensors
from megatron_lpreg.rollout.sglang_servers import (
    AttachedServers,
    LocalServers,
    ServerPool,
    SGLangError,
    free_port,
    served_dtype,
)
from megatron_lpreg.rollout.weight_sync import (
    broadcast_bucket,
    destroy_group,
    iter_buckets,
    new_group_name,
    probe_atol,
    standalone_group,
    verify_probe,
)

__all__ = ["SGLangEngine", "SGLangError", "parse_item", "sampling_payload"]

logger = logging.getLogger(__name__)

class SGLangEngine:
    """RolloutEngine over one or more SGLang servers (launched here, placed by the Ray launcher, or attached)."""

    def __init__(self, cfg: RolloutConfig, model_path: str, *, seed: int = 0,
                 servers: ServerPool | None = None) -> None:
        """Use ``servers`` (the Ray launcher's engines), else attach to ``cfg.sglang_urls``, else launch
        ``cfg.num_engines`` servers on this host; wait for all of them to be healthy.

        Raises:
            SGLangError: a server did not start or an attached URL is not healthy.
        """
        self.cfg = cfg
        self.model_path = model_path
        self.served_dtype = served_dtype(cfg, model_path)
        """The dtype the servers compute in (``rollout.dtype``, else SGLang's own choice for the checkpoint)."""
        self.colocation = Colocation(cfg.mode)
        """rollout.mode: colocated servers share the trainer ranks' GPUs and release their memory around updates."""
        self.weight_version = 0
        self._group = None
        self._group_name = ""
        """Name of the current weight-update group (new for every group; see ``_init_group``)."""
        self._group_urls: tuple[str, ...] = ()
        self._stale: set[int] = set()
        self._log_dir = Path(tempfile.mkdtemp(prefix="sglang_logs_"))
        self.servers: ServerPool | None = servers
        self.clients: list[SGLangClient] = []
        try:
            if self.servers is None:
                self.servers = (AttachedServers(cfg.sglang_urls) if cfg.sglang_urls
                                else LocalServers(cfg, model_path, seed, self._log_dir))
            self.clients = [self._client(info.url) for info in self.servers.engines]
            for client in self.clients:
                client.request("GET", "/health", timeout_s=CONTROL_TIMEOUT_S)
        except BaseException:
            self.shutdown()
            raise
        self._dispatcher = LeastLoadedDispatcher(
            send=lambda k, job: self._generate_chunk(self.clients[k], *job), size=lambda job: len(job[1]),
            recover=self._recover, describe=self.describe, max_inflight=cfg.max_inflight_requests)
        logger.info("sglang engines ready: %s", ", ".join(c.url for c in self.clients))

    def _client(self, url: str) -> SGLangClient:
        return SGLangClient(url, timeout_s=self.cfg.request_timeout_s, max_retries=self.cfg.max_retries,
                            backoff_s=self.cfg.retry_backoff_s)

    def describe(self, k: int) -> str:
        """Engine ``k`` for messages: id, URL, node, GPUs and log file."""
        return self.servers.engines[k].describe()

    # ---- generation -----------------------------------------------------------------------------------------
    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[Completion]:
        """See :class:`~megatron_lpreg.rollout.base.RolloutEngine`. Chunks of ``max_batch_size`` rows go to the
        engine with the least outstanding rows; a chunk whose engine fails moves to another engine and the failed
        engine is restarted (at most ``rollout.max_engine_restarts`` times).

        Raises:
            SGLangError: a refused request, an engine that failed beyond its restarts (message names the engine,
                its node and log file), or an answer in an unexpected shape.
        """
        validate_params(params)
        rows = sample_rows(len(prompts), params.n)
        usable = [k for k in range(len(self.clients)) if k not in self._stale]
        step = chunk_rows(len(prompts), params.n, len(usable), self.cfg.max_batch_size)
        jobs = [(prompts, rows[start : start + step], params) for start in range(0, len(rows), step)]
        chunks = self._dispatcher.run(jobs, usable)
        return sorted((c for chunk in chunks for c in chunk), key=lambda c: (c.prompt_index, c.sample_index))

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

    def _recover(self, k: int, error: SGLangError) -> bool:
        """Engine ``k`` failed: keep it when it answers /health again (a transient error, not a hang), else
        restart it through its pool; True when it can serve at once.

        A restarted server holds the initial checkpoint: after the first sync it stays out of generation until
        the next ``update_weights``, which rebuilds the broadcast group and brings it up to date.
        """
        if not error.hung and self.clients[k].healthy():
            logger.warning("%s is healthy again after: %s", self.describe(k), error)
            return True
        info = self.servers.restart(k)
        old = self.clients[k]
        self.clients[k] = self._client(info.url)
        old.close()
        logger.warning("restarted %s (restart %d)", info.describe(), info.restarts)
        if self.weight_version > 0:
            self._stale.add(k)
            return False
        return True

    # ---- weights ----------------------------------------------------------------------------------------------
    def update_weights(self, update: WeightUpdate) -> None:
        """Install ``update`` on every server and verify it (see module docstring).

        Raises:
            ValueError: the update lacks what the sync mode needs (``path`` for disk, ``tensors`` otherwise), or
                its probe.
            WeightSyncError: a server rejected the update or a post-sync check failed (names the engine).
        """
        if update.probe is None:
            raise ValueError("SGLang weight syncs need WeightUpdate.probe (the trainer's log-probs of a fixed "
                             "sequence, trainer/sync_probe.py): without it nothing checks that the servers took the "
                             "weights")
        mode = self.cfg.weight_sync
        if mode == "auto":
            mode = "disk" if update.path is not None else self.cfg.resolved_weight_sync()
        if mode == "disk":
            if update.path is None:
                raise ValueError("rollout.weight_sync='disk' needs WeightUpdate.path (an HF checkpoint directory)")
            self._sync_from_disk(update.path, update.version)
        else:
            if update.tensors is None and (update.payloads is None or mode != "tensor"):
                raise ValueError(f"rollout.weight_sync={mode!r} needs WeightUpdate.tensors ((hf_name, tensor) stream)"
                                 + (" or WeightUpdate.payloads" if mode == "tensor" else ""))
            self._sync_tensors(update, mode)
        self._verify(update)
        self.weight_version = update.version
        self._stale.clear()
        logger.info("sglang engines at weight version %d (%s sync)", update.version, mode)

    def _on_all(self, fn, *args: Any) -> list[Any]:
        with ThreadPoolExecutor(max_workers=len(self.clients)) as pool:
            return [f.result() for f in [pool.submit(fn, c, *args) for c in self.clients]]

    def _sync_from_disk(self, path: str, version: int) -> None:
        payload = {"model_path": str(path), "weight_version": str(version)}
        try:
            self._on_all(lambda c: c.post("/update_weights_from_disk", payload))
        except SGLangError as exc:
            raise WeightSyncError(f"update_weights_from_disk({path}) failed: {exc}") from exc

    def _sync_tensors(self, update: WeightUpdate, mode: str) -> None:
        bucket_bytes = int(self.cfg.weight_bucket_mb * 2**20)
        if mode == "distributed" and (self._group is None or self._group_urls != self._urls()):
            self._init_group()
        try:
            self._on_all(lambda c: c.post("/begin_weight_update"))
            if mode == "tensor":
                for payload_bucket in self._tensor_buckets(update, bucket_bytes):
                    self._push_tensor_bucket(payload_bucket, update.version)
            else:
                for bucket in iter_buckets(update.tensors, bucket_bytes):
                    self._push_distributed_bucket(bucket, update.version)
        except BaseException as exc:
            # always end the update, but the sync's own error is what the caller sees; a failing end is added
            end_error = self._end_update()
            also = f"; then /end_weight_update also failed: {end_error}" if end_error else ""
            if isinstance(exc, SGLangError):
                raise WeightSyncError(f"{mode} weight sync failed: {exc}{also}") from exc
            if end_error:
                exc.add_note(also[2:])
            raise
        end_error = self._end_update()
        if end_error:
            raise WeightSyncError(f"end_weight_update failed after a complete {mode} sync: {end_error}") from end_error

    def _end_update(self) -> SGLangError | None:
        """/end_weight_update on every server; returns its failure instead of raising it."""
        try:
            self._on_all(lambda c: c.post("/end_weight_update"))
        except SGLangError as exc:
            logger.error("end_weight_update failed: %s", exc)
            return exc
        return None

    def _tensor_buckets(self, update: WeightUpdate, bucket_bytes: int) -> Iterator[PayloadBucket]:
        """The colocated trainer's buckets (``update.payloads``), or buckets of ``update.tensors`` serialized here,
        separately for every engine TP rank (each rank consumes its own payload, as SGLang's own senders do)."""
        if update.payloads is not None:
            yield from update.payloads
            return
        for bucket in iter_buckets(update.tensors, bucket_bytes):
            payloads = [[serialize_named_tensors(bucket) for _ in range(self.cfg.engine_tp)] for _ in self.clients]
            yield PayloadBucket(tensors=bucket, payloads=payloads)

    def _push_tensor_bucket(self, bucket: PayloadBucket, version: int) -> None:
        """Engine k's TP rank i reads ``bucket.payloads[k][i]`` (SGLang: ``serialized_named_tensors[tp_rank]``)."""
        if len(bucket.payloads) != len(self.clients) or any(len(p) != self.cfg.engine_tp for p in bucket.payloads):
            raise WeightSyncError(
                f"tensor sync bucket has payloads for {[len(p) for p in bucket.payloads]} TP ranks of "
                f"{len(bucket.payloads)} engines; this engine set has {len(self.clients)} engines x TP "
                f"{self.cfg.engine_tp}")

        def post(k: int) -> Any:
            return self.clients[k].post("/update_weights_from_tensor", {
                "serialized_named_tensors": bucket.payloads[k], "flush_cache": True, "weight_version": str(version)})

        with ThreadPoolExecutor(max_workers=len(self.clients)) as pool:
            for future in [pool.submit(post, k) for k in range(len(self.clients))]:
                future.result()

    def _urls(self) -> tuple[str, ...]:
        return tuple(c.url for c in self.clients)

    def _rendezvous_host(self) -> str:
        """An address of this (trainer rank 0's) node that every engine can reach."""
        if self.cfg.weight_sync_host:
            return self.cfg.weight_sync_host
        try:
            import ray

            if ray.is_initialized():
                return ray.util.get_node_ip_address()
        except ImportError:
            pass
        return socket.gethostname()

    def _init_group(self) -> None:
        """A new group: this process (rank 0) + every engine's TP ranks (world = 1 + num_engines x engine_tp).

        The previous group (an engine was restarted: it lost a member) is destroyed first, on the servers
        (/destroy_weights_update_group) and here; the new one gets a new name (``weight_sync.new_group_name``), so
        no store key or registered name of the old group is reused.
        """
        self._destroy_group()
        backend = self.cfg.weight_sync_backend
        host = self._rendezvous_host()
        port = free_port("0.0.0.0")
        world = 1 + len(self.clients) * self.cfg.engine_tp
        name = new_group_name()
        requests_out = [
            {"master_address": host, "master_port": port, "rank_offset": 1 + k * self.cfg.engine_tp,
             "world_size": world, "group_name": name, "backend": backend}
            for k in range(len(self.clients))
        ]
        with ThreadPoolExecutor(max_workers=len(self.clients)) as pool:
            futures = [
                pool.submit(c.post, "/init_weights_update_group", req, retries=0)
                for c, req in zip(self.clients, requests_out)
            ]
            group = standalone_group(backend, host, port, 0, world, timeout_s=self.cfg.launch_timeout_s,
                                     group_name=name)
            for f in futures:
                f.result()
        self._group, self._group_name = group, name
        self._group_urls = self._urls()
        logger.info("weight broadcast group %s ready: %s:%d, world %d (%s)", name, host, port, world, backend)

    def _destroy_group(self) -> None:
        """Destroy the current group on every server that still has it, then here (no-op without one)."""
        if self._group is None:
            return
        for client in self.clients:
            try:
                client.post("/destroy_weights_update_group", {"group_name": self._group_name}, retries=0,
                            timeout_s=CONTROL_TIMEOUT_S)
            except SGLangError as exc:  # a restarted server never joined it: SGLang says it does not exist
                logger.info("%s: destroy_weights_update_group: %s", client.url, exc)
        destroy_group(self._group)
        self._group, self._group_name = None, ""

    def _push_distributed_bucket(self, bucket: list, version: int) -> None:
        payload = {
            "names": [n for n, _ in bucket], "dtypes": [str(t.dtype).replace("torch.", "") for _, t in bucket],
            "shapes": [list(t.shape) for _, t in bucket], "group_name": self._group_name,
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

    def _verify(self, update: WeightUpdate) -> None:
        """Every engine scores the probe; its log-probs match the trainer's within the probe's tolerance, or that of
        the dtype the servers run in where that is coarser."""
        probe = dataclasses.replace(update.probe, atol=max(update.probe.atol, probe_atol(self.served_dtype)))
        for k, client in enumerate(self.clients):
            try:
                verify_probe(client.score, probe, engine=self.describe(k))
            except SGLangError as exc:
                raise WeightSyncError(f"verifying {self.describe(k)} after the sync failed: {exc}") from exc

    # ---- memory, health, shutdown -----------------------------------------------------------------------------
    def release_memory(self) -> None:
        """Free the servers' GPU memory (weights and KV cache) while the trainer updates (Colocation.COLOCATED;
        engines on GPUs of their own keep it)."""
        if self.colocation is Colocation.COLOCATED:
            self._on_all(lambda c: c.post("/release_memory_occupation", {}, timeout_s=CONTROL_TIMEOUT_S))

    def resume_memory(self) -> None:
        """Re-allocate the servers' memory (after the trainer freed its cache, before the weight sync)."""
        if self.colocation is Colocation.COLOCATED:
            self._on_all(lambda c: c.post("/resume_memory_occupation", {}, timeout_s=CONTROL_TIMEOUT_S))

    def flush_cache(self) -> None:
        self._on_all(lambda c: c.request("POST", "/flush_cache", timeout_s=CONTROL_TIMEOUT_S))

    def health(self) -> EngineHealth:
        bad = [self.describe(k) for k, c in enumerate(self.clients) if not c.healthy()]
        return EngineHealth(ok=not bad, detail=f"unhealthy: {bad}" if bad else "", weight_version=self.weight_version)

    def shutdown(self) -> None:
        for client in self.clients:
            client.close()
        if self._group is not None:
            destroy_group(self._group)  # the servers' side goes with them
            self._group, self._group_name = None, ""
        if self.servers is not None:
            self.servers.shutdown()


def chunk_rows(num_prompts: int, n: int, num_engines: int, max_batch_size: int) -> int:
    """Rows per generation chunk: whole prompt groups (their samples share a server's prefix cache), spread so
    that every usable engine gets a share of the step, and never more than ``max_batch_size`` rows."""
    groups_per_engine = -(-num_prompts // max(1, num_engines))
    return max(1, min(max_batch_size, groups_per_engine * n))


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
    return Completion(
        prompt_index=prompt_index, sample_index=sample_index, prompt_ids=list(prompt), response_ids=response_ids,
        logprobs=[float(e[0]) for e in entries], text=item.get("text", ""),
        finish_reason=finish_reason((meta.get("finish_reason") or {}).get("type")),
    )

