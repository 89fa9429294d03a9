"""Rollout-engine config."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from megatron_lpreg.config.base import ConfigError

TRAINER_GROUP_TIMEOUT_S = 1800.0
"""Collective timeout of the trainer's process groups (parallel.bootstrap.init_parallel's default)."""


@dataclass(kw_only=True)
class RolloutConfig:
    """How responses are generated."""

    engine: Literal["local", "sglang", "vllm"] = "local"
    """local = in-process engine on the trainer's own parameters (CPU default); sglang/vllm on GPU clusters."""
    n: int = 8
    """Responses per prompt (the GRPO group size)."""
    temperature: float = 1.0
    """Sampling temperature."""
    top_p: float = 1.0
    """Nucleus sampling threshold (1.0 = off)."""
    top_k: int = -1
    """Top-k sampling (-1 = off)."""
    min_p: float = 0.0
    """Min-p sampling (0 = off)."""
    max_new_tokens: int = 64
    """Longest response (tokens)."""
    prompts_per_step: int = 16
    """Prompts sampled per RL step."""
    sglang_urls: list[str] = field(default_factory=list)
    """Attach to running SGLang servers (http://host:port); empty = launch them."""
    sglang_launch_args: list[str] = field(default_factory=list)
    """Extra `python -m sglang.launch_server` arguments when launching."""
    engine_tp: int = 1
    """Tensor parallelism inside each SGLang/vLLM engine."""
    num_engines: int = 1
    """Rollout engines (data parallel)."""
    weight_sync: Literal["auto", "disk", "tensor", "distributed"] = "auto"
    """How engines receive new weights (auto: no copy for local; for sglang ``tensor`` when mode=colocated, each
    engine TP rank fed by CUDA IPC from the trainer rank on its own GPU, ``distributed`` when mode=separate; see
    :meth:`resolved_weight_sync`)."""
    placement: Literal["rank0", "actor"] = "rank0"
    """Where a hosted engine lives (sglang/vllm, or local with pp>1): in trainer rank 0's process, or in its own
    Ray actor (needs trainer.launcher=ray) with ``engine_num_gpus`` GPUs: 1 = separate devices, a fraction =
    colocated with the trainer (the engine's memory is released during the update when it supports it). Not used
    for sglang on a GPU Ray cluster: there the placement plan starts one engine actor per engine (rollout.mode)."""
    engine_num_gpus: float = 1.0
    """GPUs per engine actor when the Ray cluster has GPUs (ignored on CPU)."""
    mode: Literal["colocated", "separate"] = "colocated"
    """Launched SGLang engines on a GPU Ray cluster (rollout/placement.py): colocated = every node runs
    gpus_per_node / engine_tp engines on the GPUs of its trainer ranks (memory released around each update);
    separate = engines on ``num_gpus`` GPUs of their own, after the trainer ranks' GPUs."""
    num_gpus: int = 0
    """mode=separate: GPUs for all engines together (= num_engines x engine_tp); unused when colocated."""
    mem_fraction_static: float = 0.5
    """SGLang ``--mem-fraction-static`` of launched servers: share of a GPU for weights + KV cache (colocated
    engines share the GPU with a trainer rank, whose memory they get only while released)."""
    engine_fleet: str = ""
    """Set by the Ray launcher, not by users: the Ray name prefix of the engine actors it started for this run
    (trainer rank 0 attaches to them and restarts a failed one through them)."""
    max_engine_restarts: int = 2
    """Restarts of a launched engine that died or hung, per run; one more failure fails the step with an error
    naming the engine, its node and its log file."""
    request_timeout_s: float = 600.0
    """HTTP timeout for one generate call. A read timeout is not retried on the same server (a hung server does
    not recover by being asked again): the chunk moves to another engine once, so a hung server fails a step
    within 2 x request_timeout_s, below the trainer's 30-minute process-group timeout (validate() checks)."""
    max_batch_size: int = 256
    """Rows (prompt x sample) per forward in the local engine, per HTTP request for sglang. Bigger is faster on CPU
    with TP>1 (fewer all-gathers per token): 512 rows x 14 tokens of the tiny demo model at TP2 took 1.5 s in one
    batch vs 4.1 s in batches of 64 (2 busy cores)."""
    max_inflight_requests: int = 8
    """HTTP generate requests in flight at once per SGLang engine (chunks of max_batch_size rows)."""
    sglang_launch_module: str = "sglang.launch_server"
    """Module run as `python -m <module>` to launch a server (tests point it at the CPU stand-in)."""
    sglang_device: Literal["cuda", "cpu"] = "cuda"
    """Where launched SGLang servers run. cpu (tests and configs/tiny_cpu.yaml; sglang_servers.server_command): the
    server gets ``--device cpu --disable-overlap-schedule`` and a small ``--max-total-tokens``, its environment
    ``SGLANG_USE_CPU_ENGINE=1``, never ``--enable-memory-saver`` (it needs CUDA), so release/resume free nothing."""
    launch_timeout_s: float = 900.0
    """How long a launched server may take to answer /health."""
    max_retries: int = 3
    """Retries of an HTTP call on connection errors and 502/503/504 (exponential backoff)."""
    retry_backoff_s: float = 1.0
    """First backoff delay (seconds); doubles each retry."""
    weight_bucket_mb: float = 512.0
    """Tensor/distributed weight sync sends the stream in buckets of about this many MiB."""
    weight_sync_backend: Literal["nccl", "gloo"] = "nccl"
    """Backend of the trainer-rank-0 -> engines broadcast group (distributed sync)."""
    weight_sync_host: str = ""
    """Address engines use to reach trainer rank 0 for the broadcast group; empty = this host's name."""
    vllm_gpu_memory_utilization: float = 0.5
    """Fraction of GPU memory the offline vLLM engine may take (colocated with the trainer). Not used on CPU, where
    the vLLM engine reserves a fixed KV cache instead (1 GiB, or ``VLLM_CPU_KVCACHE_SPACE`` GiB when set)."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """Weight/compute dtype of the vLLM engine; auto = the model's own (``torch_dtype``/``dtype`` in config.json),
    so an fp32 checkpoint is not silently run in bf16. Launched SGLang servers get ``--dtype <dtype>`` unless auto
    (SGLang's own auto runs an fp32 checkpoint in fp16 on CPU, bf16 on GPU)."""

    def validate(self) -> None:
        if self.n < 1:
            raise ConfigError(f"rollout.n={self.n} must be >= 1")
        if self.temperature <= 0:
            raise ConfigError(f"rollout.temperature={self.temperature} must be > 0 (use top_k=1 for greedy)")
        if not 0.0 < self.top_p <= 1.0:
            raise ConfigError(f"rollout.top_p={self.top_p} must be in (0, 1]")
        if self.max_new_tokens < 1:
            raise ConfigError(f"rollout.max_new_tokens={self.max_new_tokens} must be >= 1")
        if self.top_k == 0 or self.top_k < -1:
            raise ConfigError(f"rollout.top_k={self.top_k} must be -1 (off) or >= 1")
        if not 0.0 <= self.min_p < 1.0:
            raise ConfigError(f"rollout.min_p={self.min_p} must be in [0, 1)")
        for name in ("max_batch_size", "max_inflight_requests", "engine_tp", "num_engines"):
            if getattr(self, name) < 1:
                raise ConfigError(f"rollout.{name}={getattr(self, name)} must be >= 1")
        if self.max_retries < 0:
            raise ConfigError(f"rollout.max_retries={self.max_retries} must be >= 0")
        if self.max_engine_restarts < 0 or self.num_gpus < 0:
            raise ConfigError(f"rollout.max_engine_restarts={self.max_engine_restarts} and rollout.num_gpus="
                              f"{self.num_gpus} must be >= 0")
        if not 0.0 < self.mem_fraction_static < 1.0:
            raise ConfigError(f"rollout.mem_fraction_static={self.mem_fraction_static} must be in (0, 1)")
        if 2 * self.request_timeout_s >= TRAINER_GROUP_TIMEOUT_S:
            raise ConfigError(
                f"rollout.request_timeout_s={self.request_timeout_s}: a hung server is detected only after up to 2 x "
                f"request_timeout_s, which must stay below the trainer's process-group timeout "
                f"({TRAINER_GROUP_TIMEOUT_S:.0f} s) so the rollout error, not a collective timeout, ends the step; "
                f"use <= {TRAINER_GROUP_TIMEOUT_S / 2 - 60:.0f}"
            )
        if self.weight_bucket_mb <= 0:
            raise ConfigError(f"rollout.weight_bucket_mb={self.weight_bucket_mb} must be > 0")
        if self.engine == "local" and self.weight_sync not in ("auto", "disk", "tensor"):
            raise ConfigError(
                f"rollout.weight_sync={self.weight_sync!r} is not available for rollout.engine='local'; use 'auto' "
                f"(shares the trainer's parameters)"
            )
        if (self.engine == "sglang" and self.mode == "colocated" and self.weight_sync == "distributed"
                and self.weight_sync_backend == "nccl"):
            raise ConfigError(
                "rollout.weight_sync='distributed' with rollout.weight_sync_backend='nccl' and rollout.mode="
                "'colocated' puts a trainer rank and a colocated engine rank that share one GPU into one NCCL "
                "broadcast group (trainer rank 0 and engine 0's first TP rank both sit on node 0 GPU 0), which NCCL "
                "refuses (ncclInvalidUsage: duplicate GPU); use rollout.weight_sync=tensor (or auto): every engine "
                "TP rank then receives the weights by CUDA IPC from the trainer rank on its own GPU. Distributed "
                "sync is for rollout.mode=separate (engines on GPUs of their own)"
            )
        if (self.engine == "sglang" and self.sglang_device == "cpu" and self.weight_sync_backend == "nccl"
                and self.resolved_weight_sync() == "distributed"):
            raise ConfigError(
                "rollout.sglang_device='cpu' with distributed weight sync needs rollout.weight_sync_backend='gloo': "
                "NCCL has no CPU tensors (set rollout.weight_sync_backend=gloo, as configs/tiny_cpu.yaml does)"
            )
        if self.engine == "sglang" and self.sglang_urls and len(self.sglang_urls) != self.num_engines:
            raise ConfigError(
                f"rollout.sglang_urls has {len(self.sglang_urls)} URLs but rollout.num_engines={self.num_engines}; "
                f"give one URL per engine or set num_engines to {len(self.sglang_urls)}"
            )

    def resolved_weight_sync(self) -> str:
        """``weight_sync`` with ``auto`` resolved where it names one transport: for sglang ``tensor`` when
        ``mode=colocated`` (an engine and a trainer rank share each GPU, so no NCCL group may hold both) and
        ``distributed`` when ``mode=separate``; other engines keep ``auto`` (their own default)."""
        if self.weight_sync != "auto" or self.engine != "sglang":
            return self.weight_sync
        return "tensor" if self.mode == "colocated" else "distributed"
