"""The SGLang engine end to end against the CPU stand-in server, which runs SGLang's own code where it runs on CPU
(tests/support/sglang_standin.py: its TP ranks join the update group with SGLang's ``init_custom_process_group`` and
decode tensor payloads with SGLang's ``MultiprocessingSerializer``; bodies are checked against SGLang's request
classes). These tests fail, never skip, when the pinned sglang package is missing (``make sglang-contract``).

Covered: generation (seeded, matches the local engine on the same weights), multi-engine split, strict keys,
retries, weight sync from disk / tensor / distributed (a gloo group between this process and the stand-in's TP-rank
processes, rebuilt under a new name after a restart), every TP rank bit-identical after a sync, the probe check
catching a server that does not install the update, SGLang's refusals (``/get_weights_by_name`` on Qwen2, weight
updates outside begin/end, release without ``--enable-memory-saver`` freeing nothing), launch mode (subprocess +
health wait + process-group stop), injected server faults (hang, dropped connection, 500, malformed JSON: the chunk
moves to another engine, errors name URL and route, a failing end_weight_update does not hide the sync error).
Engines placed on a multi-node Ray cluster: tests/cluster/. A real SGLang server: ``make test-sglang``.
"""
from __future__ import annotations

import threading
import time

import pytest
import requests

from megatron_lpreg.config.rollout import RolloutConfig
from megatron_lpreg.models import hf_dir
from megatron_lpreg.parallel.spawn import free_port
from megatron_lpreg.rollout.base import LogprobProbe, SamplingParams, WeightSyncError, WeightUpdate
from megatron_lpreg.rollout.local import LocalEngine
from megatron_lpreg.rollout.logits_model import (
    HFLogitsModel,
    make_probe,
    teacher_forced_logprobs,
)
from megatron_lpreg.rollout.sglang import SGLangEngine, SGLangError, sampling_payload
from megatron_lpreg.rollout.sglang_client import SGLangClient
from tests.support.sglang_contract import classes_with_get_weights_by_name, require_sglang
from tests.support.sglang_standin import SamplingParamsIn, StandinServer
from tests.support.sglang_tp_rank import weights_digest

PROMPTS = [[5, 6, 7], [9, 10, 11, 12, 13], [42], [17, 18]]
PARAMS = SamplingParams(n=2, temperature=1.0, top_p=0.9, max_new_tokens=6, seed=21)
LOGP_ATOL = 1e-4
"""Stand-in and reference run the same fp32 code; differences come from batch composition only (~1e-6)."""


@pytest.fixture(autouse=True)
def _sglang_code():
    require_sglang()


def probe_of(model_dir) -> LogprobProbe:
    """What the trainer sends with an update to the weights in ``model_dir``."""
    return make_probe(HFLogitsModel.from_pretrained(model_dir), [3, 4, 5, 6, 7, 8], 3, atol=LOGP_ATOL)


def attach_cfg(*urls: str, **kw) -> RolloutConfig:
    return RolloutConfig(engine="sglang", sglang_urls=list(urls), num_engines=len(urls), max_retries=1,
                         retry_backoff_s=0.05, weight_sync_backend="gloo", weight_sync_host="127.0.0.1", **kw)


def reference(model_dir, prompts=PROMPTS, params=PARAMS):
    model = HFLogitsModel.from_pretrained(model_dir)
    return LocalEngine(model, eos_token_ids=(2,)).generate(prompts, params)


def assert_same(got, want):
    assert [(c.prompt_index, c.sample_index, c.response_ids, c.finish_reason) for c in got] == [
        (c.prompt_index, c.sample_index, c.response_ids, c.finish_reason) for c in want]
    for a, b in zip(got, want):
        assert max(abs(x - y) for x, y in zip(a.logprobs, b.logprobs)) < LOGP_ATOL


@pytest.fixture()
def server(tiny_hf_dir):
    with StandinServer(str(tiny_hf_dir)) as srv:
        yield srv


def test_generate_matches_local_engine_on_one_and_two_engines(tiny_hf_dir, server):
    want = reference(tiny_hf_dir)
    engine = SGLangEngine(attach_cfg(server.url), str(tiny_hf_dir))
    try:
        assert_same(engine.generate(PROMPTS, PARAMS), want)
        assert engine.health().ok
    finally:
        engine.shutdown()
    with StandinServer(str(tiny_hf_dir)) as second:
        engine = SGLangEngine(attach_cfg(server.url, second.url, max_batch_size=3), str(tiny_hf_dir))
        try:
            assert_same(engine.generate(PROMPTS, PARAMS), want)
        finally:
            engine.shutdown()


def test_sampling_payload_uses_only_sglang_keys_and_unknown_keys_are_rejected(server):
    payload = sampling_payload(SamplingParams(stop_token_ids=(2,), seed=1), 0, 0)
    assert set(payload) <= set(SamplingParamsIn.model_fields)
    client = SGLangClient(server.url, max_retries=0)
    try:
        with pytest.raises(SGLangError, match="HTTP 400.*frequency_typo"):
            client.post("/generate", {"input_ids": [1, 2], "sampling_params": {"frequency_typo": 1.0}})
        with pytest.raises(SGLangError, match="HTTP 400"):
            client.post("/generate", {"input_ids": [1, 2], "unknown_top_level": True})
        single = client.post("/generate", {"input_ids": [1, 2], "sampling_params": {"max_new_tokens": 3, "top_k": 1},
                                           "return_logprob": True})
        assert set(single) == {"text", "output_ids", "meta_info"}
        assert [e[1] for e in single["meta_info"]["output_token_logprobs"]] == single["output_ids"]
        assert single["meta_info"]["finish_reason"]["type"] in ("stop", "length")
    finally:
        client.close()


def test_client_retries_until_server_is_up(tiny_hf_dir):
    port = free_port()
    late = StandinServer(str(tiny_hf_dir), port=port)
    starter = threading.Timer(0.4, late.start)
    starter.start()
    client = SGLangClient(f"http://127.0.0.1:{port}", max_retries=6, backoff_s=0.1)
    try:
        assert client.request("GET", "/health") == ""
    finally:
        starter.join()
        client.close()
        late.stop()
    dead = SGLangClient(f"http://127.0.0.1:{free_port()}", max_retries=1, backoff_s=0.01)
    with pytest.raises(SGLangError, match="after 2 attempts"):
        dead.request("GET", "/health")
    dead.close()


@pytest.mark.parametrize("mode", ["disk", "tensor", "distributed"])
def test_weight_sync_changes_generation_and_verifies(mode, tiny_hf_dir, tiny_hf_dir_b, server):
    trainer = HFLogitsModel.from_pretrained(tiny_hf_dir_b)
    probe = make_probe(trainer, [3, 4, 5, 6, 7, 8], 3, atol=LOGP_ATOL)
    engine = SGLangEngine(attach_cfg(server.url, weight_sync=mode, weight_bucket_mb=0.05), str(tiny_hf_dir))
    assert engine.served_dtype == "float16"  # SGLang's auto for an fp32 checkpoint; the probe widens to 0.1
    engine.served_dtype = "float32"  # the stand-in computes in fp32: hold it to the fp32 tolerance
    try:
        assert_same(engine.generate(PROMPTS, PARAMS), reference(tiny_hf_dir))
        if mode == "disk":
            update = WeightUpdate(version=1, path=str(tiny_hf_dir_b), probe=probe)
        else:
            update = WeightUpdate(version=1, tensors=trainer.named_weights().items(), probe=probe)
        engine.update_weights(update)
        assert server.state.update_counts[mode] >= 1
        assert not server.state.in_weight_update
        assert_same(engine.generate(PROMPTS, PARAMS), reference(tiny_hf_dir_b))
        assert engine.health().weight_version == 1
        if mode == "distributed":  # the broadcast group is reused by later syncs
            engine.update_weights(WeightUpdate(version=2, tensors=hf_dir.iter_tensors(tiny_hf_dir),
                                               probe=probe_of(tiny_hf_dir)))
            assert_same(engine.generate(PROMPTS, PARAMS), reference(tiny_hf_dir))
    finally:
        engine.shutdown()


@pytest.mark.parametrize("mode", ["tensor", "disk"])
def test_the_probe_catches_a_server_that_ignores_updates(mode, tiny_hf_dir, tiny_hf_dir_b, server):
    server.state.model.load_named_tensors = lambda tensors: [name for name, _ in tensors]  # fault injection
    server.state.model.load_checkpoint = lambda path: []
    engine = SGLangEngine(attach_cfg(server.url, weight_sync=mode), str(tiny_hf_dir))
    probe = probe_of(tiny_hf_dir_b)
    try:
        update = WeightUpdate(version=1, path=str(tiny_hf_dir_b), probe=probe) if mode == "disk" else WeightUpdate(
            version=1, tensors=hf_dir.iter_tensors(tiny_hf_dir_b), probe=probe)
        with pytest.raises(WeightSyncError, match="probe log-probs differ"):
            engine.update_weights(update)
        assert engine.weight_version == 0
        with pytest.raises(ValueError, match="need WeightUpdate.probe"):
            engine.update_weights(WeightUpdate(version=1, path=str(tiny_hf_dir_b)))
    finally:
        engine.shutdown()


@pytest.mark.slow
def test_every_tp_rank_of_every_engine_holds_the_sent_weights_bit_identical(tiny_hf_dir, tiny_hf_dir_b):
    """Two engines of TP 2 (four SGLang TP-rank processes), tensor then distributed sync: every rank's full weights
    hash to the digest of what was sent; a second distributed group (new name) after a forced rebuild works."""
    sent = dict(hf_dir.iter_tensors(tiny_hf_dir_b))
    with StandinServer(str(tiny_hf_dir), tp_size=2) as one, StandinServer(str(tiny_hf_dir), tp_size=2) as two:
        for mode in ("tensor", "distributed"):
            engine = SGLangEngine(attach_cfg(one.url, two.url, weight_sync=mode, engine_tp=2, weight_bucket_mb=0.02),
                                  str(tiny_hf_dir))
            try:
                engine.update_weights(WeightUpdate(version=1, tensors=iter(sent.items()),
                                                   probe=probe_of(tiny_hf_dir_b)))
                digests = [d for srv in (one, two) for d in srv.state.on_tp_ranks("digest")]
                assert digests == [weights_digest(sent)] * 4, mode
                if mode == "distributed":
                    first = engine._group_name
                    engine._init_group()  # what an engine restart triggers: destroy everywhere, new name
                    assert engine._group_name != first
                    assert one.state.events.count("/destroy_weights_update_group") == 1
                    engine.update_weights(WeightUpdate(version=2, tensors=hf_dir.iter_tensors(tiny_hf_dir),
                                                       probe=probe_of(tiny_hf_dir)))
                    want = weights_digest(dict(hf_dir.iter_tensors(tiny_hf_dir)))
                    assert [d for srv in (one, two) for d in srv.state.on_tp_ranks("digest")] == [want] * 4
            finally:
                engine.shutdown()
            sent = dict(hf_dir.iter_tensors(tiny_hf_dir_b))


def test_the_standin_refuses_what_sglang_refuses(server):
    """/get_weights_by_name: Qwen2/Qwen3 define no get_weights_by_name in sglang 0.5.23 (400, as
    http_server.py:1568); weight updates outside begin/end: 400; a field no SGLang request class has: 400."""
    assert server.state.architecture == "Qwen2ForCausalLM"
    assert {"Qwen2ForCausalLM", "Qwen3ForCausalLM"}.isdisjoint(classes_with_get_weights_by_name())
    assert "LlamaForCausalLM" in classes_with_get_weights_by_name()  # the reader finds the classes that have it
    client = SGLangClient(server.url, max_retries=0)
    try:
        with pytest.raises(SGLangError, match="HTTP 400.*Get parameter by name failed"):
            client.post("/get_weights_by_name", {"name": "model.norm.weight", "truncate_size": 1})
        with pytest.raises(SGLangError, match="HTTP 400.*outside /begin_weight_update"):
            client.post("/update_weights_from_tensor", {"serialized_named_tensors": ["eA=="]})
        with pytest.raises(SGLangError, match="HTTP 400.*outside /begin_weight_update"):
            client.post("/update_weights_from_distributed", {"names": ["x"], "dtypes": ["float32"], "shapes": [[1]],
                                                             "group_name": "g"})
        with pytest.raises(SGLangError, match="HTTP 400.*UpdateWeightFromDiskReqInput has no field 'modle_path'"):
            client.post("/update_weights_from_disk", {"model_path": "x", "modle_path": "x"})
        assert server.state.update_counts == {"disk": 0, "tensor": 0, "distributed": 0}
    finally:
        client.close()


def test_probe_mismatch_raises(tiny_hf_dir, tiny_hf_dir_b, server):
    """Verification off for tensors; the probe alone (expected log-probs of other weights) must fail."""
    stale = HFLogitsModel.from_pretrained(tiny_hf_dir)
    tokens = [3, 4, 5, 6]
    probe = LogprobProbe(token_ids=tuple(tokens), prompt_len=2,
                         expected_logprobs=tuple(teacher_forced_logprobs(stale, tokens, 2)), atol=LOGP_ATOL)
    engine = SGLangEngine(attach_cfg(server.url, weight_sync="disk"), str(tiny_hf_dir))
    try:
        with pytest.raises(WeightSyncError, match="probe log-probs differ"):
            engine.update_weights(WeightUpdate(version=1, path=str(tiny_hf_dir_b), probe=probe))
    finally:
        engine.shutdown()


def _memory(url: str) -> dict:
    return requests.get(f"{url}/standin/info", timeout=10).json()["memory"]


def test_release_frees_memory_only_with_the_memory_saver(tiny_hf_dir, server):
    """Without --enable-memory-saver SGLang's release is a no-op (nothing freed, generation still works); with it
    the weights go until resume."""
    for srv, saver in ((server, False), (StandinServer(str(tiny_hf_dir), memory_saver=True), True)):
        if saver:
            srv.start()
        engine = SGLangEngine(attach_cfg(srv.url, mode="colocated"), str(tiny_hf_dir))
        try:
            engine.release_memory()
            assert _memory(srv.url)["release_calls"] == 1
            if saver:
                assert _memory(srv.url)["freed_bytes"] > 0
                with pytest.raises(SGLangError, match="memory released"):
                    engine.generate(PROMPTS[:1], PARAMS)
            else:
                assert _memory(srv.url)["freed_bytes"] == 0
                assert len(engine.generate(PROMPTS[:1], PARAMS)) == 2
            engine.resume_memory()
            engine.flush_cache()
            assert len(engine.generate(PROMPTS[:1], PARAMS)) == 2
        finally:
            engine.shutdown()
            if saver:
                srv.stop()


def test_launch_mode_starts_waits_and_stops_a_server(tiny_hf_dir):
    cfg = RolloutConfig(engine="sglang", sglang_launch_module="tests.support.sglang_standin", launch_timeout_s=120,
                        sglang_launch_args=["--mem-fraction-static", "0.5"])
    engine = SGLangEngine(cfg, str(tiny_hf_dir), seed=0)
    proc = engine.servers.processes[0].proc
    try:
        assert_same(engine.generate(PROMPTS, PARAMS), reference(tiny_hf_dir))
        info = requests.get(f"{engine.clients[0].url}/standin/info", timeout=10).json()
        assert info["memory_saver"] and "--enable-memory-saver" in info["argv"]  # colocated on GPUs (the default)
        engine.release_memory()
        assert _memory(engine.clients[0].url)["freed_bytes"] > 0
        engine.resume_memory()
    finally:
        engine.shutdown()
    assert proc.poll() is not None
    assert not engine.health().ok


def test_launch_failure_reports_the_server_log(tiny_hf_dir, tmp_path):
    cfg = RolloutConfig(engine="sglang", sglang_launch_module="tests.support.no_such_module", launch_timeout_s=60)
    start = time.monotonic()
    with pytest.raises(SGLangError, match=r"(?s)exited with code 1.*No module named"):
        SGLangEngine(cfg, str(tiny_hf_dir))
    assert time.monotonic() - start < 30


def _fault(url: str, mode: str, route: str = "/generate", count: int = -1) -> None:
    requests.post(f"{url}/standin/fault", json={"mode": mode, "route": route, "count": count}, timeout=10)


def test_malformed_json_names_url_and_route(server):
    _fault(server.url, "bad_json")
    client = SGLangClient(server.url, max_retries=0)
    try:
        with pytest.raises(SGLangError, match=r"POST http://127\.0\.0\.1:\d+/generate .*malformed JSON") as info:
            client.post("/generate", {"input_ids": [1, 2]})
        assert info.value.engine_fault
    finally:
        client.close()


@pytest.mark.parametrize("mode", ["500", "drop", "bad_json"])
def test_failed_chunks_move_to_the_other_engine(mode, tiny_hf_dir, server):
    """One of two engines fails every generate call but answers /health; all rows still come back, equal to the
    reference (its chunks move to the other engine)."""
    with StandinServer(str(tiny_hf_dir)) as healthy:
        _fault(server.url, mode)
        engine = SGLangEngine(attach_cfg(server.url, healthy.url, max_batch_size=2, request_timeout_s=3),
                              str(tiny_hf_dir))
        try:
            assert_same(engine.generate(PROMPTS, PARAMS), reference(tiny_hf_dir))
            assert "/generate" in healthy.state.events
        finally:
            engine.shutdown()


def test_a_hung_attached_engine_fails_the_step_naming_it(tiny_hf_dir, server):
    """A hung engine must be restarted; an attached one cannot be, so the call fails naming it (launched engines
    restart: tests/cluster)."""
    with StandinServer(str(tiny_hf_dir)) as healthy:
        _fault(server.url, "hang")
        engine = SGLangEngine(attach_cfg(server.url, healthy.url, max_batch_size=2, request_timeout_s=2),
                              str(tiny_hf_dir))
        start = time.monotonic()
        try:
            with pytest.raises(SGLangError, match=rf"engine 0 \({server.url}.*cannot be restarted"):
                engine.generate(PROMPTS, PARAMS)
        finally:
            engine.shutdown()
        assert time.monotonic() - start < 30


def test_a_hung_single_engine_fails_within_the_request_timeout(tiny_hf_dir, server):
    _fault(server.url, "hang")
    engine = SGLangEngine(attach_cfg(server.url, request_timeout_s=2), str(tiny_hf_dir))
    start = time.monotonic()
    try:
        with pytest.raises(SGLangError, match=r"no answer within 2 s|cannot be restarted"):
            engine.generate(PROMPTS[:1], PARAMS)
    finally:
        engine.shutdown()
    assert time.monotonic() - start < 30  # one timeout, no retries on a hung server


def test_default_timeouts_fail_a_hung_server_before_the_trainer_group_timeout():
    from megatron_lpreg.config.base import ConfigError
    from megatron_lpreg.config.rollout import TRAINER_GROUP_TIMEOUT_S
    from megatron_lpreg.rollout.dispatch import MAX_MOVES

    cfg = RolloutConfig()
    assert (1 + MAX_MOVES) * cfg.request_timeout_s < TRAINER_GROUP_TIMEOUT_S
    with pytest.raises(ConfigError, match="request_timeout_s=1000"):
        RolloutConfig(request_timeout_s=1000).validate()


def test_failing_end_weight_update_does_not_hide_the_sync_error(tiny_hf_dir, tiny_hf_dir_b, server):
    _fault(server.url, "500", "/update_weights_from_tensor,/end_weight_update")
    engine = SGLangEngine(attach_cfg(server.url, weight_sync="tensor"), str(tiny_hf_dir))
    try:
        with pytest.raises(WeightSyncError) as info:
            engine.update_weights(WeightUpdate(version=1, tensors=hf_dir.iter_tensors(tiny_hf_dir_b),
                                               probe=probe_of(tiny_hf_dir_b)))
        text = str(info.value)
        assert "/update_weights_from_tensor" in text and "/end_weight_update also failed" in text
        assert isinstance(info.value.__cause__, SGLangError)
        assert server.state.events[-2:] == ["/update_weights_from_tensor", "/end_weight_update"]
    finally:
        engine.shutdown()
