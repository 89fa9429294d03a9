"""The local engine on the trainer's megatron-core GPTModel (KV cache via StaticInferenceContext), TP1 and TP2 over
gloo ranks, against the HF adapter on the same weights (loaded through models.bridge)."""
from __future__ import annotations

import collections
import dataclasses

# imported here, in the parent, so that forked ranks start without paying megatron's import time
import megatron.core.inference.contexts  # noqa: F401
import megatron.core.models.gpt  # noqa: F401
import pytest
import torch

from megatron_lpreg.config.model import ModelConfig, ParallelConfig
from megatron_lpreg.config.rollout import RolloutConfig
from megatron_lpreg.models.bridge import load_hf_weights
from megatron_lpreg.models.qwen import build_gpt_model, resolve_model_config
from megatron_lpreg.parallel.bootstrap import init_parallel
from megatron_lpreg.parallel.spawn import run_ranks
from megatron_lpreg.rollout.base import SamplingParams
from megatron_lpreg.rollout.factory import build_engine
from megatron_lpreg.rollout.local import LocalEngine
from megatron_lpreg.rollout.logits_model import HFLogitsModel

PROMPTS = [[5, 6, 7], [9, 10, 11, 12, 13], [42]]
GREEDY = SamplingParams(top_k=1, max_new_tokens=6)
SAMPLED = SamplingParams(n=2, temperature=1.0, top_p=0.95, max_new_tokens=6, seed=9)
LOGP_ATOL = 1e-4
"""megatron vs HF fp32 forwards (different kernels, RoPE at shifted positions for padded rows): ~1e-6 seen."""


def _generate_on_rank(rank: int, world: int, hf_dir: str) -> dict:
    parallel = ParallelConfig(tp=world)
    ctx = init_parallel(parallel, seed=0)
    model_cfg = resolve_model_config(ModelConfig(hf_path=hf_dir))
    model = build_gpt_model(model_cfg, parallel)
    load_hf_weights([model], hf_dir, model_cfg, ctx)
    model.train()
    engine = build_engine(RolloutConfig(max_batch_size=4), hf_dir, seed=0, model=[model])
    greedy = engine.generate(PROMPTS, GREEDY)
    sampled = engine.generate(PROMPTS, SAMPLED)
    still_training = model.training
    free = [c.response_ids for c in sampled]
    stop = collections.Counter(t for r in free for t in r[1:-1]).most_common(1)[0][0]
    stopped = engine.generate(PROMPTS, dataclasses.replace(SAMPLED, stop_token_ids=(stop,)))
    cut_ok = [c.response_ids == (r[: r.index(stop) + 1] if stop in r else r) for c, r in zip(stopped, free)]
    scored = engine.score(greedy[1].prompt_ids + greedy[1].response_ids, len(greedy[1].prompt_ids))
    with torch.no_grad():  # the trainer steps its parameters in place: the engine must see it (no copy)
        model.shared_embedding_or_output_weight().mul_(-1.0)
    flipped = engine.generate(PROMPTS, GREEDY)
    return {
        "greedy": [(c.response_ids, c.logprobs) for c in greedy],
        "sampled": [(c.response_ids, c.logprobs, c.finish_reason) for c in sampled],
        "scored": scored, "training_restored": still_training, "stop_cut_ok": cut_ok,
        "num_stopped": sum(c.finish_reason == "stop" for c in stopped), "flipped": [c.response_ids for c in flipped],
    }


@pytest.mark.parametrize("arch", ["qwen2", "qwen3"])
def test_megatron_tp1_tp2_and_hf_agree(arch, tiny_dirs):
    hf_dir = str(tiny_dirs[arch])
    tp1 = run_ranks(_generate_on_rank, 1, hf_dir, timeout_s=120, threads_per_rank=1)[0]
    tp2 = run_ranks(_generate_on_rank, 2, hf_dir, timeout_s=120, threads_per_rank=1)
    # every TP rank samples the same tokens with bit-identical log-probs (gathered logits, same seeded streams)
    assert tp2[0] == tp2[1]
    for result in (tp1, tp2[0]):
        assert result["training_restored"]
        assert all(result["stop_cut_ok"]) and result["num_stopped"] >= 1  # rows leave the KV cache as they stop
        assert [r for r, _, _ in result["sampled"]] == [r for r, _, _ in tp1["sampled"]]
        assert result["flipped"] != [r for r, _ in result["greedy"]]
    hf = LocalEngine(HFLogitsModel.from_pretrained(hf_dir), eos_token_ids=())
    hf_greedy = hf.generate(PROMPTS, GREEDY)
    hf_sampled = hf.generate(PROMPTS, SAMPLED)
    for result in (tp1, tp2[0]):
        assert [r for r, _ in result["greedy"]] == [c.response_ids for c in hf_greedy]
        for (_, logps), ref in zip(result["greedy"], hf_greedy):
            assert max(abs(a - b) for a, b in zip(logps, ref.logprobs)) < LOGP_ATOL
        # KV-cached decode log-probs == cache-free teacher forcing of the same tokens
        assert max(abs(a - b) for a, b in zip(result["scored"], result["greedy"][1][1])) < LOGP_ATOL
    assert [r for r, _, _ in tp1["sampled"]] == [c.response_ids for c in hf_sampled]


def _pp2_rank(rank: int, world: int, hf_dir: str) -> str:
    parallel = ParallelConfig(pp=2)
    init_parallel(parallel, seed=0)
    model = build_gpt_model(resolve_model_config(ModelConfig(hf_path=hf_dir)), parallel)
    try:
        build_engine(RolloutConfig(), hf_dir, seed=0, model=[model])
    except ValueError as exc:
        return str(exc)
    return "no error"


def test_pipeline_parallel_model_is_rejected(tiny_dirs):
    messages = run_ranks(_pp2_rank, 2, str(tiny_dirs["qwen2"]), timeout_s=120, threads_per_rank=1)
    assert all("parallel.pp=1" in m for m in messages)


UNEVEN = [[5, 6, 7], [9, 10, 11, 12, 13, 14, 15], [42], [7, 8, 9, 10, 11]]
"""Four prompts of four lengths: batched together, three rows are left-padded."""
PAD_TOL = 1e-5
"""Batched vs alone on the local spec: the same fp32 math at shifted RoPE positions (module docstring), ~1e-7."""


def _batched_vs_alone(rank: int, world: int, hf_dir: str) -> dict:
    from megatron_lpreg.models import qwen
    from tests.support.te_mask_attention import mask_type_only_layer_spec

    ctx = init_parallel(ParallelConfig(), seed=0)
    model_cfg = resolve_model_config(ModelConfig(hf_path=hf_dir))
    local_spec = qwen.layer_spec
    results = {}
    for name in ("local", "te_like", "te_like_padded"):
        if name != "local":  # TE's role: the mask type alone decides what is masked
            qwen.layer_spec = lambda cfg: mask_type_only_layer_spec(local_spec(cfg))
        model = build_gpt_model(model_cfg, ParallelConfig())
        qwen.layer_spec = local_spec
        load_hf_weights([model], hf_dir, model_cfg, ctx)
        engine = build_engine(RolloutConfig(), hf_dir, seed=0, model=[model])
        masks = engine.model.masks_padding
        if name == "te_like_padded":
            engine.model.masks_padding = True  # what the engine did before: pad and trust the mask
        batched = engine.generate(UNEVEN, GREEDY)
        alone = [engine.generate([p], GREEDY)[0] for p in UNEVEN]
        results[name] = (masks, [(c.response_ids, c.logprobs) for c in batched],
                         [(c.response_ids, c.logprobs) for c in alone])
    return results


def test_left_padded_batch_equals_each_prompt_alone_with_and_without_mask_support(tiny_dirs):
    """Uneven prompt lengths batched == each prompt generated alone (tokens and log-probs), on megatron's local
    attention (masks the pad keys) and on a stand-in that, like Transformer Engine, ignores the padding mask (the
    engine then batches by prompt length). The stand-in batched with padding anyway must differ: the pad keys
    leak into the padded rows, which is the GPU bug this guards against."""
    results = run_ranks(_batched_vs_alone, 1, str(tiny_dirs["qwen2"]), timeout_s=180, threads_per_rank=1)[0]
    assert results["local"][0] and not results["te_like"][0]

    def worst(batched, alone):
        assert [r for r, _ in batched] == [r for r, _ in alone]
        return max(abs(a - b) for (_, la), (_, lb) in zip(batched, alone) for a, b in zip(la, lb))

    assert worst(*results["local"][1:]) < PAD_TOL
    assert worst(*results["te_like"][1:]) < PAD_TOL
    _, leaked, alone = results["te_like_padded"]
    padded_rows = [i for i, p in enumerate(UNEVEN) if len(p) < max(map(len, UNEVEN))]
    diffs = [max(abs(a - b) for a, b in zip(leaked[i][1], alone[i][1])) if leaked[i][0] == alone[i][0] else 1.0
             for i in padded_rows]
    assert min(diffs) > 1e-3, diffs
