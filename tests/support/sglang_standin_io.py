"""The stand-in SGLang server's request models (pydantic, strict: an unknown key is a 400) and its fault injection.

The field names follow SGLang 0.5.23's ``io_struct`` request classes and ``SamplingParams``;
``tests/rollout/test_sglang_contract.py`` checks that they accept nothing SGLang lacks, and the server also checks
every body against the classes read from the pinned source (``sglang_contract.cached_http_contract``).
"""
from __future__ import annotations

from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SamplingParamsIn(_Strict):
    max_new_tokens: int = 128
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    n: int = 1
    stop_token_ids: list[int] | None = None
    sampling_seed: int | None = None
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    no_stop_trim: bool = False


class GenerateIn(_Strict):
    input_ids: list[int] | list[list[int]]
    sampling_params: SamplingParamsIn | list[SamplingParamsIn] = SamplingParamsIn()
    return_logprob: bool = False
    logprob_start_len: int = -1
    rid: str | list[str] | None = None
    stream: bool = False


class DiskIn(_Strict):
    model_path: str
    load_format: str | None = None
    abort_all_requests: bool = False
    weight_version: str | None = None


class TensorIn(_Strict):
    serialized_named_tensors: list[str]
    load_format: str | None = None
    flush_cache: bool = True
    abort_all_requests: bool = False
    weight_version: str | None = None


class GroupIn(_Strict):
    master_address: str
    master_port: int
    rank_offset: int
    world_size: int
    group_name: str = "weight_update_group"
    backend: str = "nccl"


class DistributedIn(_Strict):
    names: list[str]
    dtypes: list[str]
    shapes: list[list[int]]
    group_name: str = "weight_update_group"
    flush_cache: bool = True
    abort_all_requests: bool = False
    weight_version: str | None = None
    load_format: str | None = None


class GroupNameIn(_Strict):
    group_name: str = "weight_update_group"


class WeightsByNameIn(_Strict):
    name: str
    truncate_size: int = 100


class TagsIn(_Strict):
    tags: list[str] | None = None


class EmptyIn(_Strict):
    pass


FAULT_ENV = "SGLANG_STANDIN_FAULT"
"""``MODE:ROUTE[:COUNT]`` injects a fault from start-up (also settable by POST /standin/fault)."""
QUIET_ROUTES = ("/health", "/health_generate", "/get_weights_by_name", "/get_model_info", "/standin/")


@dataclass
class Fault:
    """An injected failure: ``mode`` on calls to ``route`` (comma-separated routes; ``count`` calls, -1 = all).

    Modes: hang (never answer), drop (close the connection mid-answer), 500 (internal error), bad_json (200 with a
    truncated JSON body).
    """

    mode: str = "none"
    route: str = "/generate"
    count: int = -1

    @classmethod
    def parse(cls, text: str) -> Fault:
        if not text:
            return cls()
        mode, route, *count = text.split(":")
        return cls(mode=mode, route=route, count=int(count[0]) if count else -1)

    def fire(self, path: str) -> str | None:
        """The mode to apply to this call of ``path`` (consumes one count), or None."""
        if self.mode == "none" or path not in self.route.split(",") or self.count == 0:
            return None
        if self.count > 0:
            self.count -= 1
        return self.mode


class FaultIn(_Strict):
    mode: str
    route: str = "/generate"
    count: int = -1
