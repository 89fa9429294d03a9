"""A CPU stand-in for an SGLang 0.5.x server: the same HTTP routes, strict keys and response shapes, backed by a
tiny HF model through the local engine, with weight updates that really change what it generates.

Real SGLang cannot run on CPU (see shared notes), so the SGLang client is tested end to end against this server.
Routes: /health, /health_generate, /get_model_info, /generate, /flush_cache, /update_weights_from_disk,
/begin_weight_update, /end_weight_update, /update_weights_from_tensor, /init_weights_update_group,
/update_weights_from_distributed, /destroy_weights_update_group, /get_weights_by_name,
/release_memory_occupation, /resume_memory_occupation. Test-only: /standin/info (pid, CUDA_VISIBLE_DEVICES, argv,
lifecycle calls in order), /standin/fault (inject hang / drop / 500 / bad JSON; also ``SGLANG_STANDIN_FAULT``).

Where it differs from SGLang (on purpose, and documented in docs/rollout.md): the distributed weight group is gloo
over TCP instead of NCCL; tensor payloads are read with plain ``pickle`` (so CPU tensors pickled inline work across
processes; SGLang uses ForkingPickler, which also accepts them); only ``sampling_seed`` makes sampling
reproducible (as SGLang's deterministic mode).

Run in a thread (:class:`StandinServer`) or as ``python -m tests.support.sglang_standin --model-path DIR --port P``
(the subset of ``sglang.launch_server`` flags the client passes; other flags are accepted and ignored).
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import datetime
import logging
import os
import pickle
import sys
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from pydantic import BaseModel, ConfigDict

from megatron_lpreg.rollout.base import SamplingParams
from megatron_lpreg.rollout.local import LocalEngine
from megatron_lpreg.rollout.logits_model import HFLogitsModel
from megatron_lpreg.rollout.sampling import request_seed

logger = logging.getLogger(__name__)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


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


class StandinState:
    """The model, its lock and the server-side flags the routes share."""

    def __init__(self, model_path: str) -> None:
        self.model_path = model_path
        self.model = HFLogitsModel.from_pretrained(model_path)
        eos = self.model.model.config.eos_token_id
        self.eos_ids = tuple(eos) if isinstance(eos, (list, tuple)) else ((eos,) if eos is not None else ())
        self.engine = LocalEngine(self.model)
        self.lock = threading.Lock()
        self.in_weight_update = False
        self.released = False
        self.weight_version = "default"
        self.groups: dict[str, tuple[Any, int]] = {}
        self.update_counts: dict[str, int] = {"disk": 0, "tensor": 0, "distributed": 0}
        self.events: list[str] = []
        """Routes called, in order (lifecycle and weight routes; not health, info or weight reads)."""
        self.fault = Fault.parse(os.environ.get(FAULT_ENV, ""))


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


def _fault_middleware(app: FastAPI, state: StandinState) -> None:
    """Record lifecycle calls and apply the injected fault before a route runs."""

    @app.middleware("http")
    async def faults(request: Request, call_next):
        path = request.url.path
        if not path.startswith(QUIET_ROUTES):
            state.events.append(path)
            logger.warning("standin-event %s", path)  # lands in the server's log file (tests read the order)
        mode = state.fault.fire(path)
        if mode == "hang":
            await asyncio.sleep(3600)
        if mode == "500":
            return JSONResponse({"error": {"message": "injected internal error"}}, status_code=500)
        if mode == "bad_json":
            return Response('{"text": "abc', media_type="application/json")
        if mode == "drop":
            return _Truncated()
        return await call_next(request)


class _Truncated(Response):
    """Declares a 1000-byte body and sends 1 byte: the server then closes the connection mid-answer."""

    def __init__(self) -> None:
        super().__init__(b"{", media_type="application/json")
        self.headers["content-length"] = "1000"


def _fail(status: int, message: str) -> JSONResponse:
    return JSONResponse({"success": False, "message": message}, status_code=status)


def create_app(model_path: str, tp_size: int = 1) -> FastAPI:
    """Build the FastAPI app serving ``model_path`` (an HF directory) as a server of ``tp_size`` TP ranks (they
    matter only for the size of the weight-broadcast group)."""
    state = StandinState(model_path)
    app = FastAPI()
    app.state.standin = state

    _fault_middleware(app, state)

    @app.post("/standin/fault")
    def set_fault(req: FaultIn) -> dict:
        state.fault = Fault(mode=req.mode, route=req.route, count=req.count)
        return {"success": True, "message": ""}

    @app.get("/standin/info")
    def info() -> dict:
        """What the process sees (placement checks) and the lifecycle calls it got."""
        return {"pid": os.getpid(), "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
                "argv": sys.argv, "events": list(state.events), "weight_version": state.weight_version}

    @app.exception_handler(RequestValidationError)
    async def _bad_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse({"error": {"message": str(exc.errors())}}, status_code=400)

    @app.get("/health")
    def health() -> PlainTextResponse:
        return PlainTextResponse("")

    @app.get("/health_generate")
    def health_generate() -> PlainTextResponse:
        with state.lock:
            state.engine.generate_rows([[1]], SamplingParams(max_new_tokens=1, top_k=1), [0])
        return PlainTextResponse("")

    @app.get("/get_model_info")
    def model_info() -> dict:
        return {"model_path": state.model_path, "is_generation": True, "weight_version": state.weight_version}

    @app.api_route("/flush_cache", methods=["GET", "POST"])
    def flush_cache() -> PlainTextResponse:
        return PlainTextResponse("Cache flushed.\n")

    @app.post("/generate")
    def generate(req: GenerateIn) -> Any:
        if state.released:
            return JSONResponse({"error": {"message": "memory released; call /resume_memory_occupation"}}, 400)
        batched = bool(req.input_ids) and isinstance(req.input_ids[0], list)
        prompts = req.input_ids if batched else [req.input_ids]
        per_item = req.sampling_params
        if not isinstance(per_item, list):
            per_item = [per_item] * len(prompts)
        if len(per_item) != len(prompts):
            return JSONResponse({"error": {"message": "sampling_params list length != input_ids length"}}, 400)
        try:
            outs, input_lps = [], []
            with state.lock:
                for chunk in _same_params_chunks(per_item):
                    outs_chunk, lps_chunk = _generate_chunk(
                        state, [prompts[i] for i in chunk], [per_item[i] for i in chunk], req
                    )
                    outs.extend(outs_chunk)
                    input_lps.extend(lps_chunk)
        except ValueError as exc:
            return JSONResponse({"error": {"message": str(exc)}}, status_code=400)
        items = [_item(out, lps, req.return_logprob, state.weight_version) for out, lps in zip(outs, input_lps)]
        return items if batched or len(items) > 1 else items[0]

    @app.post("/update_weights_from_disk")
    def from_disk(req: DiskIn) -> Any:
        try:
            with state.lock:
                state.model.load_checkpoint(req.model_path)
        except (ValueError, OSError) as exc:
            return _fail(400, f"Failed to update weights: {exc}")
        state.update_counts["disk"] += 1
        state.weight_version = req.weight_version or state.weight_version
        return {"success": True, "message": "Succeeded to update model weights.", "num_paused_requests": 0}

    @app.post("/begin_weight_update")
    def begin(req: EmptyIn) -> Any:
        state.in_weight_update = True
        return {"success": True, "message": ""}

    @app.post("/end_weight_update")
    def end(req: EmptyIn) -> Any:
        state.in_weight_update = False
        return {"success": True, "message": ""}

    @app.post("/update_weights_from_tensor")
    def from_tensor(req: TensorIn) -> Any:
        if not state.in_weight_update:
            return _fail(400, "update_weights_from_tensor outside /begin_weight_update ... /end_weight_update")
        try:
            named = pickle.loads(base64.b64decode(req.serialized_named_tensors[0]))
            with state.lock:
                state.model.load_named_tensors(named)
        except (ValueError, pickle.UnpicklingError) as exc:
            return _fail(400, f"Failed to update weights: {exc}")
        state.update_counts["tensor"] += 1
        state.weight_version = req.weight_version or state.weight_version
        return {"success": True, "message": "Succeeded to update model weights."}

    @app.post("/init_weights_update_group")
    def init_group(req: GroupIn) -> Any:
        # one group member per TP rank of this server (ranks rank_offset .. rank_offset + tp_size - 1), as SGLang's
        # TP workers join; each member here is a thread of this process
        try:
            with ThreadPoolExecutor(max_workers=tp_size) as pool:
                groups = list(pool.map(lambda r: _standalone_group(req.master_address, req.master_port,
                                                                   req.rank_offset + r, req.world_size),
                                       range(tp_size)))
        except RuntimeError as exc:
            return _fail(400, f"Failed to init group: {exc}")
        state.groups[req.group_name] = (groups, req.rank_offset)
        return {"success": True, "message": "Succeeded to initialize custom process group."}

    @app.post("/update_weights_from_distributed")
    def from_distributed(req: DistributedIn) -> Any:
        if not state.in_weight_update:
            return _fail(400, "update_weights_from_distributed outside /begin_weight_update ... /end_weight_update")
        if req.group_name not in state.groups:
            return _fail(400, f"unknown group '{req.group_name}'; call /init_weights_update_group first")
        groups, _ = state.groups[req.group_name]
        received = []
        for name, dtype, shape in zip(req.names, req.dtypes, req.shapes):
            copies = [torch.empty(shape, dtype=DTYPES[dtype.replace("torch.", "")]) for _ in groups]
            with ThreadPoolExecutor(max_workers=len(groups)) as pool:
                list(pool.map(_receive, groups, copies))
            received.append((name, copies[0]))
        try:
            with state.lock:
                state.model.load_named_tensors(received)
        except ValueError as exc:
            return _fail(400, f"Failed to update weights: {exc}")
        state.update_counts["distributed"] += 1
        state.weight_version = req.weight_version or state.weight_version
        return {"success": True, "message": "Succeeded to update parameter online."}

    @app.post("/destroy_weights_update_group")
    def destroy_group(req: GroupNameIn) -> Any:
        state.groups.pop(req.group_name, None)
        return {"success": True, "message": ""}

    @app.api_route("/get_weights_by_name", methods=["GET", "POST"])
    def weights_by_name(req: WeightsByNameIn) -> Any:
        weights = state.model.named_weights()
        if req.name not in weights:
            raise HTTPException(400, f"no weight named {req.name}")
        return weights[req.name].detach()[: req.truncate_size].float().tolist()

    @app.post("/release_memory_occupation")
    def release(req: TagsIn) -> Any:
        state.released = True
        return {"success": True, "message": ""}

    @app.post("/resume_memory_occupation")
    def resume(req: TagsIn) -> Any:
        state.released = False
        return {"success": True, "message": ""}

    return app


def _same_params_chunks(per_item: list[SamplingParamsIn]) -> list[list[int]]:
    """Consecutive item indices whose sampling params differ at most in ``sampling_seed``."""
    chunks: list[list[int]] = []
    for i, sp in enumerate(per_item):
        key = sp.model_copy(update={"sampling_seed": None})
        if chunks and per_item[chunks[-1][0]].model_copy(update={"sampling_seed": None}) == key:
            chunks[-1].append(i)
        else:
            chunks.append([i])
    return chunks


def _generate_chunk(state: StandinState, prompts: list[list[int]], per_item: list[SamplingParamsIn], req: GenerateIn):
    """Generate ``n`` rows per prompt in one batch (items share params except the seed)."""
    sp = per_item[0]
    stop = () if sp.ignore_eos else state.eos_ids
    params = SamplingParams(
        temperature=sp.temperature, top_p=sp.top_p, top_k=sp.top_k, min_p=sp.min_p,
        max_new_tokens=max(sp.max_new_tokens, 1), stop_token_ids=tuple(sp.stop_token_ids or ()) + stop,
    )
    rows, seeds = [], []
    for prompt, item in zip(prompts, per_item):
        seed = item.sampling_seed if item.sampling_seed is not None else request_seed(params)
        rows.extend([prompt] * item.n)
        seeds.extend([seed] * item.n)
    outs = state.engine.generate_rows(rows, params, seeds)
    if req.return_logprob and req.logprob_start_len >= 0:
        return outs, [_input_logprobs(state, p, req.logprob_start_len) for p in rows]
    return outs, [None] * len(rows)


def _receive(group: Any, tensor: torch.Tensor) -> None:
    opts = dist.BroadcastOptions()
    opts.rootRank = 0
    group.broadcast([tensor], opts).wait()


def _standalone_group(host: str, port: int, rank: int, world_size: int) -> Any:
    store = dist.TCPStore(host, port, world_size, is_master=False, timeout=datetime.timedelta(seconds=60))
    timeout = datetime.timedelta(seconds=60)
    return dist.ProcessGroupGloo(dist.PrefixStore("weight_sync", store), rank, world_size, timeout)


def _input_logprobs(state: StandinState, prompt: list[int], start: int) -> list[list]:
    """SGLang's ``input_token_logprobs`` from position ``start``: [logprob or None, token_id, None]."""
    logits_SV = state.model.sequence_logits(prompt).double()
    logp_SV = torch.log_softmax(logits_SV, dim=-1)
    return [
        [None if t == 0 else float(logp_SV[t - 1, prompt[t]]), prompt[t], None] for t in range(start, len(prompt))
    ]


def _item(out, input_lps, return_logprob: bool, weight_version: str) -> dict:
    last = out.response_ids[-1] if out.response_ids else None
    finish = (
        {"type": "stop", "matched": last} if out.finish_reason == "stop"
        else {"type": "length", "length": len(out.response_ids)}
    )
    meta: dict[str, Any] = {
        "id": uuid.uuid4().hex, "finish_reason": finish, "prompt_tokens": len(out.prompt_ids),
        "completion_tokens": len(out.response_ids), "cached_tokens": 0, "weight_version": weight_version,
    }
    if return_logprob:
        meta["output_token_logprobs"] = [[lp, tok, None] for lp, tok in zip(out.logprobs, out.response_ids)]
        if input_lps is not None:
            meta["input_token_logprobs"] = input_lps
    return {"text": "", "output_ids": out.response_ids, "meta_info": meta}


class StandinServer:
    """Run the stand-in in a background thread on 127.0.0.1; ``with StandinServer(path) as url: ...``."""

    def __init__(self, model_path: str, *, port: int | None = None, start_timeout_s: float = 30.0) -> None:
        import uvicorn

        from megatron_lpreg.parallel.spawn import free_port

        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.app = create_app(model_path)
        self._server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="warning"))
        self._thread = threading.Thread(target=self._server.run, daemon=True)
        self._start_timeout_s = start_timeout_s

    @property
    def state(self) -> StandinState:
        return self.app.state.standin

    def start(self) -> str:
        self._thread.start()
        deadline = time.monotonic() + self._start_timeout_s
        while not self._server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError(f"stand-in server on port {self.port} did not start")
            time.sleep(0.02)
        return self.url

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=10)

    def __enter__(self) -> StandinServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> None:
    import uvicorn

    parser = argparse.ArgumentParser(description="CPU stand-in for sglang.launch_server (tests only)")
    parser.add_argument("--model-path", required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=30000)
    parser.add_argument("--tp-size", type=int, default=1)
    args, ignored = parser.parse_known_args(argv)
    if ignored:
        logger.warning("stand-in ignores launch flags %s", ignored)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    torch.set_num_threads(1)  # several stand-ins share a small CPU
    uvicorn.run(create_app(args.model_path, args.tp_size), host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
