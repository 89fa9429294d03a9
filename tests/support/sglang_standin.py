"""A CPU stand-in for an SGLang 0.5.23 server: the same HTTP routes, request classes and response shapes, backed by
a tiny HF model through the local engine, with weight updates that really change what it generates.

Made of SGLang's own code wherever that code runs on CPU (the pinned wheel in ``.sglang-contract/site``; the tests
fail, not skip, without it):

- every request body is checked against the fields of the ``io_struct`` class SGLang's route parses it into, and
  ``sampling_params`` against ``SamplingParams`` (read from the pinned source by ``tests/support/sglang_contract.py``;
  ``io_struct`` itself cannot be imported on CPU: importing it pulls in ``schedule_batch`` -> model configs ->
  quantization layers, which need torchvision, dill, tvm_ffi, sentencepiece and a real triton for
  ``torch.compile``). The stand-in is stricter than SGLang here: it answers 400 for a field SGLang would ignore;
- the server's TP ranks are processes of their own (``tests/support/sglang_tp_rank.py``) that join the
  weight-update group with SGLang's ``init_custom_process_group``, receive broadcasts as SGLang's weight updater
  does, and decode ``/update_weights_from_tensor`` payloads with SGLang's ``MultiprocessingSerializer`` (TP rank i
  reads ``serialized_named_tensors[i]``, sglang ``managers/tp_worker.py:194``); TP rank 0's tensors are installed in
  the model that serves ``/generate``;
- it refuses what SGLang refuses: ``/get_weights_by_name`` for a model class without ``get_weights_by_name`` (Qwen2,
  Qwen3: ``classes_with_get_weights_by_name``), ``/update_weights_from_tensor`` and ``/update_weights_from_distributed``
  outside ``/begin_weight_update`` ... ``/end_weight_update``; and ``/release_memory_occupation`` frees nothing
  unless the server was started with ``--enable-memory-saver`` (SGLang builds a no-op memory-saver adapter then):
  the ``memory`` counters of ``/standin/info`` show what was freed.

Routes: /health, /health_generate, /get_model_info, /generate, /flush_cache, /update_weights_from_disk,
/begin_weight_update, /end_weight_update, /update_weights_from_tensor, /init_weights_update_group,
/update_weights_from_distributed, /destroy_weights_update_group, /get_weights_by_name,
/release_memory_occupation, /resume_memory_occupation. Test-only: /standin/info (pid, CUDA_VISIBLE_DEVICES, argv,
lifecycle calls in order, memory counters), /standin/weights_digest (SHA-256 of every TP rank's full weights, to
check that all engines and ranks are bit-identical after a sync), /standin/fault (inject hang / drop / 500 / bad
JSON; also ``SGLANG_STANDIN_FAULT``).

Where it differs from SGLang (on purpose): the group backend is whatever the request says (gloo in tests); only
``sampling_seed`` makes sampling reproducible (as SGLang's deterministic mode).

Run in a thread (:class:`StandinServer`) or as ``python -m tests.support.sglang_standin --model-path DIR --port P``
(the subset of ``sglang.launch_server`` flags the client passes; other flags are accepted and ignored).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import pickle
import sys
import threading
import time
import uuid
from typing import Any

import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response

from megatron_lpreg.rollout.base import SamplingParams
from megatron_lpreg.rollout.local import LocalEngine
from megatron_lpreg.rollout.logits_model import HFLogitsModel
from megatron_lpreg.rollout.sampling import request_seed
from tests.support.sglang_contract import cached_http_contract, classes_with_get_weights_by_name, unavailable_reason
from tests.support.sglang_standin_io import (  # noqa: F401  (SamplingParamsIn: the tests' view of the sampling keys)
    FAULT_ENV,
    QUIET_ROUTES,
    DiskIn,
    DistributedIn,
    EmptyIn,
    Fault,
    FaultIn,
    GenerateIn,
    GroupIn,
    GroupNameIn,
    SamplingParamsIn,
    TagsIn,
    TensorIn,
    WeightsByNameIn,
)
from tests.support.sglang_tp_rank import TPRank

logger = logging.getLogger(__name__)


class StandinState:
    """The model, its lock, the TP-rank processes and the server-side flags the routes share."""

    def __init__(self, model_path: str, tp_size: int = 1, memory_saver: bool = False) -> None:
        from megatron_lpreg.models import hf_dir

        self.model_path = model_path
        self.model = HFLogitsModel.from_pretrained(model_path)
        eos = self.model.model.config.eos_token_id
        self.eos_ids = tuple(eos) if isinstance(eos, (list, tuple)) else ((eos,) if eos is not None else ())
        self.architecture = (hf_dir.read_config(model_path).get("architectures") or ["?"])[0]
        self.engine = LocalEngine(self.model)
        self.lock = threading.Lock()
        self.tp_size = tp_size
        self._tp_ranks: list[TPRank] | None = None
        self.in_weight_update = False
        self.memory_saver = memory_saver
        """``--enable-memory-saver``: only then does /release_memory_occupation free anything."""
        self.released = False
        self.memory = {"release_calls": 0, "resume_calls": 0, "freed_bytes": 0}
        """What /release_memory_occupation did (``freed_bytes`` stays 0 without the memory saver)."""
        self.weight_version = "default"
        self.update_counts: dict[str, int] = {"disk": 0, "tensor": 0, "distributed": 0}
        self.events: list[str] = []
        """Routes called, in order (lifecycle and weight routes; not health, info or weight reads)."""
        self.fault = Fault.parse(os.environ.get(FAULT_ENV, ""))

    def tp_ranks(self) -> list[TPRank]:
        """The server's TP-rank processes, started on first use (they hold the current weights)."""
        if self._tp_ranks is None:
            self._tp_ranks = TPRank.start(self.tp_size, self.model_path)
        return self._tp_ranks

    def on_tp_ranks(self, method: str, **kwargs: Any) -> list[Any]:
        """Run ``method`` on every TP rank at once (a collective in SGLang); RuntimeError names a failed rank."""
        ranks = self.tp_ranks()
        for rank in ranks:
            rank.submit(method, **kwargs)
        results, errors = [], []
        for rank in ranks:
            try:
                results.append(rank.result())
            except RuntimeError as exc:
                errors.append(f"TP rank {rank.tp_rank}: {exc}")
        if errors:
            raise RuntimeError("; ".join(errors))
        return results

    def install(self, rank0_tensors: bytes) -> None:
        """Load TP rank 0's tensors (plain pickle from its process) into the model that serves /generate."""
        with self.lock:
            self.model.load_named_tensors(pickle.loads(rank0_tensors))

    def stop(self) -> None:
        TPRank.stop_all(self._tp_ranks or [])
        self._tp_ranks = None


def _fault_middleware(app: FastAPI, state: StandinState) -> None:
    """Record lifecycle calls and apply the injected fault before a route runs."""

    @app.middleware("http")
    async def faults(request: Request, call_next):
        path = request.url.path
        if not path.startswith(QUIET_ROUTES):
            state.events.append(path)
            logger.warning("standin-event %s", path)  # lands in the server's log file (tests read the order)
        mode = state.fault.fire(path)
        if mode is None and not path.startswith("/standin/"):
            problems = await _contract_problems(request)
            if problems:  # SGLang ignores unknown fields; the stand-in refuses them so that tests see the mistake
                return JSONResponse({"error": {"message": "; ".join(problems)}}, status_code=400)
        if mode == "hang":
            await asyncio.sleep(3600)
        if mode == "500":
            return JSONResponse({"error": {"message": "injected internal error"}}, status_code=500)
        if mode == "bad_json":
            return Response('{"text": "abc', media_type="application/json")
        if mode == "drop":
            return _Truncated()
        return await call_next(request)


async def _contract_problems(request: Request) -> list[str]:
    """What in this request's JSON body the SGLang request class of its route does not define (or requires)."""
    raw = await request.body()
    try:
        body = json.loads(raw) if raw else None
    except ValueError as exc:
        return [f"{request.url.path}: body is not JSON ({exc})"]
    if request.method == "GET" and body is None:
        return []
    return cached_http_contract().body_problems(request.url.path, body)


class _Truncated(Response):
    """Declares a 1000-byte body and sends 1 byte: the server then closes the connection mid-answer."""

    def __init__(self) -> None:
        super().__init__(b"{", media_type="application/json")
        self.headers["content-length"] = "1000"


def _fail(status: int, message: str) -> JSONResponse:
    return JSONResponse({"success": False, "message": message}, status_code=status)


def create_app(model_path: str, tp_size: int = 1, *, memory_saver: bool = False) -> FastAPI:
    """Build the FastAPI app serving ``model_path`` (an HF directory) as a server of ``tp_size`` TP ranks (each a
    process running SGLang's weight-update code; see the module docstring), started with
    ``--enable-memory-saver`` when ``memory_saver``."""
    missing = unavailable_reason()
    if missing is not None:  # a stand-in without SGLang's code would test nothing of SGLang: fail, never skip
        raise RuntimeError(f"the SGLang stand-in runs SGLang's own code, which is missing: {missing}")
    state = StandinState(model_path, tp_size, memory_saver)
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
                "argv": sys.argv, "events": list(state.events), "weight_version": state.weight_version,
                "memory_saver": state.memory_saver, "released": state.released, "memory": dict(state.memory)}

    @app.get("/standin/weights_digest")
    def weights_digest() -> dict:
        """SHA-256 of every TP rank's full weights (HF names, checkpoint dtypes), in TP order."""
        return {"tp_ranks": state.on_tp_ranks("digest")}

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
            if state._tp_ranks is not None:  # every TP rank loads its own copy from disk
                state.on_tp_ranks("load_disk", model_path=req.model_path)
        except (ValueError, OSError, RuntimeError) as exc:
            return _fail(400, f"Failed to update weights: {exc}")
        state.model_path = req.model_path
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
        if len(req.serialized_named_tensors) < state.tp_size:  # TP rank i reads entry i (tp_worker.py:200)
            return _fail(400, f"Failed to update weights: serialized_named_tensors has "
                              f"{len(req.serialized_named_tensors)} entries for {state.tp_size} TP ranks")
        try:
            installed = state.on_tp_ranks("from_tensor", serialized_named_tensors=req.serialized_named_tensors)
            state.install(installed[0])
        except (ValueError, RuntimeError) as exc:
            return _fail(400, f"Failed to update weights: {exc}")
        state.update_counts["tensor"] += 1
        state.weight_version = req.weight_version or state.weight_version
        return {"success": True, "message": "Success"}

    @app.post("/init_weights_update_group")
    def init_group(req: GroupIn) -> Any:
        # TP rank r joins as rank rank_offset + r (weight_updater.py:125), each in its own process
        try:
            messages = state.on_tp_ranks("init_group", master_address=req.master_address,
                                         master_port=req.master_port, rank_offset=req.rank_offset,
                                         world_size=req.world_size, group_name=req.group_name, backend=req.backend)
        except RuntimeError as exc:
            return _fail(400, f"Failed to initialize custom process group: {exc}.")
        return {"success": True, "message": messages[0]}

    @app.post("/update_weights_from_distributed")
    def from_distributed(req: DistributedIn) -> Any:
        if not state.in_weight_update:
            return _fail(400, "update_weights_from_distributed outside /begin_weight_update ... /end_weight_update")
        try:
            installed = state.on_tp_ranks("receive", names=req.names, dtypes=req.dtypes, shapes=req.shapes,
                                          group_name=req.group_name)
            state.install(installed[0])
        except (ValueError, RuntimeError) as exc:
            return _fail(400, f"Failed to update parameter online: {exc}")
        state.update_counts["distributed"] += 1
        state.weight_version = req.weight_version or state.weight_version
        return {"success": True, "message": "Succeeded to update parameter online."}

    @app.post("/destroy_weights_update_group")
    def destroy_group(req: GroupNameIn) -> Any:
        try:
            messages = state.on_tp_ranks("destroy_group", group_name=req.group_name)
        except RuntimeError as exc:
            return _fail(400, str(exc))
        return {"success": True, "message": messages[0]}

    @app.api_route("/get_weights_by_name", methods=["GET", "POST"])
    def weights_by_name(req: WeightsByNameIn) -> Any:
        if state.architecture not in classes_with_get_weights_by_name():
            # weight_exporter.py:183 calls model.get_weights_by_name, logs the AttributeError and returns None;
            # http_server.py:1568 then answers 400
            logger.error("Error when getting parameter %s: '%s' object has no attribute 'get_weights_by_name'",
                         req.name, state.architecture)
            return JSONResponse({"error": {"message": "Get parameter by name failed"}}, status_code=400)
        weights = state.model.named_weights()
        if req.name not in weights:
            return JSONResponse({"error": {"message": "Get parameter by name failed"}}, status_code=400)
        return weights[req.name].detach()[: req.truncate_size].float().tolist()

    @app.post("/release_memory_occupation")
    def release(req: TagsIn) -> Any:
        state.memory["release_calls"] += 1
        if state.memory_saver:  # weights and KV cache really go: nothing can be generated until resume
            state.released = True
            state.memory["freed_bytes"] += sum(t.numel() * t.element_size()
                                               for t in state.model.named_weights().values())
        return None  # http_server.py:1582 returns nothing on success (JSON null)

    @app.post("/resume_memory_occupation")
    def resume(req: TagsIn) -> Any:
        state.memory["resume_calls"] += 1
        state.released = False
        return None

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

    def __init__(self, model_path: str, *, port: int | None = None, start_timeout_s: float = 30.0, tp_size: int = 1,
                 memory_saver: bool = False) -> None:
        import uvicorn

        from megatron_lpreg.parallel.spawn import free_port

        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.app = create_app(model_path, tp_size, memory_saver=memory_saver)
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
        self.state.stop()

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
    parser.add_argument("--enable-memory-saver", action="store_true")
    args, ignored = parser.parse_known_args(argv)
    if ignored:
        logger.warning("stand-in ignores launch flags %s", ignored)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    torch.set_num_threads(1)  # several stand-ins share a small CPU
    app = create_app(args.model_path, args.tp_size, memory_saver=args.enable_memory_saver)
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    finally:
        app.state.standin.stop()


if __name__ == "__main__":
    main()
