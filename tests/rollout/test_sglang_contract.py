"""The SGLang integration against the real, pinned ``sglang`` package (its Python code only; no CUDA dependency).

- Every launch command the project builds (``rollout.sglang_servers.server_command`` for the default config, a
  multi-GPU engine, and every config in ``configs/`` that uses SGLang) parses with SGLang's own
  ``ServerArgs.add_cli_args`` + ``ServerArgs.from_cli_args``, and each flag lands on the field we mean.
- Every request the real client sends, recorded on the wire while it drives the stand-in server through
  generation, all three weight-sync modes with verification and probe, memory release/resume and cache flush,
  uses only fields of the request class that SGLang's route parses it into (``io_struct``; SGLang *ignores*
  unknown fields there, so a misspelt one would silently do nothing), includes the required ones, and sends only
  ``SamplingParams`` fields, each value of the JSON type the field's annotation allows.
- The stand-in accepts nothing SGLang does not define (routes, body fields, sampling fields), apart from its own
  ``/standin/*`` test-control routes.

Fails with the reason when the package is not unpacked (``make sglang-contract``; ``make test`` runs it first).
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.support.sglang_contract import (
    REPO,
    SGLANG_VERSION,
    contract_site,
    http_contract,
    parse_launch_args,
    require_sglang,
)


@pytest.fixture(autouse=True)
def _sglang_package():
    require_sglang()


ROUTES_THE_CLIENT_USES = {
    "/generate", "/update_weights_from_disk", "/update_weights_from_tensor", "/update_weights_from_distributed",
    "/init_weights_update_group", "/begin_weight_update", "/end_weight_update", "/destroy_weights_update_group",
    "/release_memory_occupation", "/resume_memory_occupation", "/flush_cache", "/health",
}
STANDIN_CONTROL = "/standin/"
"""The stand-in's own test-control routes (fault injection, counters): not part of the API it emulates."""


# ---- launch arguments ----------------------------------------------------------------------------------------
def _sglang_configs() -> list[Path]:
    from megatron_lpreg.config import RunConfig

    return [p for p in sorted((REPO / "configs").rglob("*.yaml"))
            if _loads(p) and RunConfig.load(str(p), []).rollout.engine == "sglang"]


def _loads(path: Path) -> bool:
    from megatron_lpreg.config import RunConfig

    try:
        RunConfig.load(str(path), [])
    except Exception:  # sweep files and other non-run YAML: not launch configs
        return False
    return True


def _launch_cases() -> dict[str, tuple[list[str], dict]]:
    """case -> (the command the project builds, the ServerArgs values it must produce)."""
    from megatron_lpreg.config import RunConfig
    from megatron_lpreg.config.rollout import RolloutConfig
    from megatron_lpreg.rollout.sglang_servers import server_command, uses_memory_saver

    def case(cfg: RolloutConfig, base_gpu_id: int = 0) -> tuple[list[str], dict]:
        cmd = server_command(cfg, "/models/policy", host="10.0.0.7", port=31234, seed=11, base_gpu_id=base_gpu_id)
        want = {"model_path": "/models/policy", "host": "10.0.0.7", "port": 31234, "tp_size": cfg.engine_tp,
                "random_seed": 11, "mem_fraction_static": cfg.mem_fraction_static}
        if uses_memory_saver(cfg):
            want["enable_memory_saver"] = True
        if base_gpu_id:
            want["base_gpu_id"] = base_gpu_id
        return cmd, want

    cases = {"default": case(RolloutConfig(engine="sglang")),
             "tp4-second-engine": case(RolloutConfig(engine="sglang", engine_tp=4, mem_fraction_static=0.45), 4),
             "colocated": case(RolloutConfig(engine="sglang", mode="colocated")),
             "separate": case(RolloutConfig(engine="sglang", mode="separate"))}
    for path in _sglang_configs():
        cases[f"configs/{path.relative_to(REPO / 'configs')}"] = case(RunConfig.load(str(path), []).rollout, 4)
    return cases


@pytest.fixture(scope="module")
def launch_results() -> dict[str, tuple[list[str], dict, dict]]:
    cases = _launch_cases()
    parsed = parse_launch_args([cmd[3:] for cmd, _ in cases.values()] + [["--model-path", "/m", "--tp-sise", "2"]])
    results = {name: (cmd, want, got) for (name, (cmd, want)), got in zip(cases.items(), parsed)}
    results["typo"] = ([], {}, parsed[-1])
    return results


def test_every_launch_command_parses_with_sglangs_own_server_args(launch_results):
    assert len(launch_results) >= 3
    for name, (cmd, want, got) in launch_results.items():
        if name == "typo":
            continue
        assert cmd[1:3] == ["-m", "sglang.launch_server"], (name, cmd)
        assert (contract_site() / "sglang" / "launch_server.py").exists()
        assert got["ok"], f"{name}: sglang {SGLANG_VERSION} refuses `{' '.join(cmd[3:])}`: {got['error']}"
        for dest, value in want.items():
            assert got["values"][dest] == value, (name, dest, got["values"][dest], value)


def test_colocated_gpu_servers_start_with_the_memory_saver(launch_results):
    """``--enable-memory-saver`` for colocated servers on GPUs (both 64-GPU configs), parsed by SGLang's own parser;
    never for separate servers, nor on CPU, where SGLang's memory saver needs libcuda and the server dies at start."""
    from megatron_lpreg.config.rollout import RolloutConfig
    from megatron_lpreg.rollout.sglang_servers import server_command

    cmd, _, got = launch_results["colocated"]
    assert "--enable-memory-saver" in cmd and got["values"]["enable_memory_saver"] is True
    assert "--enable-memory-saver" not in launch_results["separate"][0]
    paper = [name for name in launch_results if name.endswith("64gpu.yaml")]
    assert len(paper) >= 2 and all("--enable-memory-saver" in launch_results[name][0] for name in paper)
    cpu = RolloutConfig(engine="sglang", mode="colocated", sglang_device="cpu")
    assert "--enable-memory-saver" not in server_command(cpu, "/m", host="h", port=1, seed=0)


def test_a_misspelt_flag_is_refused_by_the_parser(launch_results):
    got = launch_results["typo"][2]
    assert not got["ok"] and "unrecognized arguments: --tp-sise" in got["error"]


# ---- request bodies ------------------------------------------------------------------------------------------
class _Recorder:
    """ASGI middleware: appends (method, path, decoded JSON body or None) of every HTTP request to ``sink``."""

    def __init__(self, app, sink: list) -> None:
        self.app, self.sink = app, sink

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        chunks: list[bytes] = []
        index = len(self.sink)
        self.sink.append((scope["method"], scope["path"], None))  # routes that never read a body stay None

        async def recording_receive():
            message = await receive()
            if message["type"] == "http.request":
                chunks.append(message.get("body", b""))
                if not message.get("more_body", False) and b"".join(chunks):
                    self.sink[index] = (scope["method"], scope["path"], json.loads(b"".join(chunks)))
            return message

        return await self.app(scope, recording_receive, send)


@pytest.fixture(scope="module")
def contract():
    return http_contract()


@pytest.fixture(scope="module")
def client_requests(tiny_hf_dir, tiny_hf_dir_b) -> list[tuple[str, str, object]]:
    """What the real SGLangEngine sends while exercising every route it uses (recorded on the stand-in)."""
    from megatron_lpreg.config.rollout import RolloutConfig
    from megatron_lpreg.rollout.base import SamplingParams, WeightUpdate
    from megatron_lpreg.rollout.logits_model import HFLogitsModel, make_probe
    from megatron_lpreg.rollout.sglang import SGLangEngine
    from tests.support.sglang_standin import StandinServer

    records: list = []
    server = StandinServer(str(tiny_hf_dir))
    server.app.add_middleware(_Recorder, sink=records)
    trainer = HFLogitsModel.from_pretrained(tiny_hf_dir_b)
    probe = make_probe(trainer, [3, 4, 5, 6, 7], 2, atol=1e-4)
    with server:
        for mode in ("disk", "tensor", "distributed"):
            cfg = RolloutConfig(engine="sglang", sglang_urls=[server.url], max_retries=0, weight_sync=mode,
                                weight_sync_backend="gloo", weight_sync_host="127.0.0.1", weight_bucket_mb=0.05)
            engine = SGLangEngine(cfg, str(tiny_hf_dir))
            try:
                engine.generate([[5, 6, 7], [9]], SamplingParams(
                    n=2, temperature=0.8, top_p=0.9, top_k=20, min_p=0.05, max_new_tokens=4, stop_token_ids=(2,),
                    seed=3))
                engine.generate([[5, 6]], SamplingParams(top_k=1, max_new_tokens=3))
                update = (WeightUpdate(version=1, path=str(tiny_hf_dir_b), probe=probe) if mode == "disk" else
                          WeightUpdate(version=1, tensors=trainer.named_weights().items(), probe=probe))
                engine.update_weights(update)
                if mode == "distributed":
                    engine._init_group()  # as after an engine restart: /destroy_weights_update_group, a new group
                engine.release_memory()
                engine.resume_memory()
                engine.flush_cache()
                engine.health()
            finally:
                engine.shutdown()
    return records


def test_the_client_exercised_every_route_it_uses(client_requests):
    assert ROUTES_THE_CLIENT_USES <= {path for _, path, _ in client_requests}


def test_every_request_body_uses_only_fields_of_sglangs_request_classes(contract, client_requests):
    problems = sorted({p for _, path, body in client_requests for p in contract.body_problems(path, body)})
    assert not problems, f"against sglang {SGLANG_VERSION}:\n" + "\n".join(problems)


def test_the_body_check_catches_misspelt_missing_and_unknown(contract):
    assert contract.body_problems("/update_weights_from_disk", {"model_path": "x", "weight_versoin": "1"}) == [
        "/update_weights_from_disk: UpdateWeightFromDiskReqInput has no field 'weight_versoin'"]
    assert contract.body_problems("/init_weights_update_group", {"master_address": "h", "master_port": 1,
                                                                  "world_size": 2}) == [
        "/init_weights_update_group: InitWeightsUpdateGroupReqInput requires 'rank_offset'"]
    assert contract.body_problems("/generate", {"input_ids": [1], "sampling_params": [{"max_tokens": 3}]}) == [
        "/generate: SamplingParams has no field 'max_tokens'"]
    assert contract.body_problems("/update_weights", {}) == ["/update_weights: SGLang serves no such route"]
    assert contract.body_problems("/init_weights_update_group", {
        "master_address": "h", "master_port": "29500", "rank_offset": 1, "world_size": 2}) == [
        "/init_weights_update_group: InitWeightsUpdateGroupReqInput.master_port is int, got '29500'"]
    assert contract.body_problems("/update_weights_from_disk", {"model_path": "x", "weight_version": 3}) == [
        "/update_weights_from_disk: UpdateWeightFromDiskReqInput.weight_version is Optional[str], got 3"]
    assert contract.body_problems("/generate", {"input_ids": [[1, 2]], "sampling_params": {"top_k": 0.5}}) == [
        "/generate: SamplingParams.top_k is int, got 0.5"]
    assert contract.body_problems("/flush_cache", {"all": True})


# ---- the stand-in stays in step ------------------------------------------------------------------------------
def test_the_standin_accepts_nothing_sglang_does_not_define(contract, tiny_hf_dir):
    from tests.support.sglang_standin import create_app

    schema = create_app(str(tiny_hf_dir)).openapi()
    components = schema["components"]["schemas"]
    problems = []
    for path, ops in schema["paths"].items():
        if path.startswith(STANDIN_CONTROL):
            continue
        if path not in contract.routes:
            problems.append(f"stand-in serves {path}, SGLang does not")
            continue
        for op in ops.values():
            ref = (op.get("requestBody", {}).get("content", {}).get("application/json", {}).get("schema", {})
                   .get("$ref"))
            if ref is None:
                continue
            fields = set(components[ref.rsplit("/", 1)[-1]].get("properties", {}))
            sglang = contract.classes[contract.routes[path]].fields if contract.routes[path] else {}
            problems += [f"{path}: stand-in accepts '{f}', SGLang's {contract.routes[path]} has no such field"
                         for f in sorted(fields - set(sglang))]
    sampling = set(components["SamplingParamsIn"]["properties"])
    problems += [f"stand-in SamplingParamsIn accepts '{f}', SGLang's SamplingParams does not"
                 for f in sorted(sampling - set(contract.sampling_params.fields))]
    assert not problems, "\n".join(problems)
