"""The reduced rerun of docs/study.md: GRPO against Lp-Reg at rho* on Task A, one process, the project's losses.

Each step samples 16 prompts (50/20/30 by carries) x 8 responses at T = 1 from the current model (transformers'
``generate``), scores them with ``exact_match``, computes GRPO advantages, and takes one on-policy update: the
per-token statistics come from the vocab-parallel op on the update's own forward (old log-probs and the proxy
detached from it, as the trainer does on-policy) and the loss from
:func:`megatron_lpreg.algo.registry.compute_policy_loss`. The arms differ only in their ``AlgoConfig``
(:data:`ARMS`); both start from the same warm start with the same seed.

rho* is measured before any update, as the protocol says: the smallest of :data:`RHO_GRID` whose Lp-Reg selection
regularises at least half of the spark tokens in negative samples over :data:`RHO_STAR_BATCHES` warm-start
batches (the largest when none does).
"""
from __future__ import annotations

import logging
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from megatron_lpreg.algo.advantages import compute_advantages
from megatron_lpreg.algo.lpreg import global_lowprob_threshold, lowprob_candidates
from megatron_lpreg.algo.registry import PolicyLossInputs, compute_policy_loss, loss_requirements
from megatron_lpreg.config.algo import AlgoConfig
from megatron_lpreg.metrics.diagnostics import (
    decision_probe,
    kl_cancel_fraction,
    lpreg_selection,
    sampled_prob_histogram,
    selections_by_class,
)
from megatron_lpreg.ops.vocab_parallel import vocab_parallel_logprob_stats
from megatron_lpreg.study.tables import read_csv, write_csv
from megatron_lpreg.study.task_a import HARD, Problem, TaskASplit, TaskATokens, split_task_a

logger = logging.getLogger(__name__)

ARMS: dict[str, dict] = {
    "grpo": {"name": "grpo", "clip_low": 0.2, "clip_high": 0.2},
    "entropy": {"name": "entropy", "entropy_coef": 0.01, "clip_low": 0.2, "clip_high": 0.2},
    "lpreg_authors": {"name": "lpreg", "rho": 0.01, "kappa": 0.02, "clip_low": 0.2, "clip_high": 0.28},
    "lpreg_rho_star": {"name": "lpreg", "kappa": 0.02, "clip_low": 0.2, "clip_high": 0.28},
    "lpreg_global": {"name": "lpreg", "kappa": 0.02, "clip_low": 0.2, "clip_high": 0.28, "selection": "global",
                     "proxy_kl": "exact_proxy_to_policy"},
}
"""Task A arms -> AlgoConfig fields (rho* is filled in for ``lpreg_rho_star`` and ``lpreg_global``)."""
STUDY_THREADS = 1
"""Intra-op threads of the study's in-process runs: the tiny model gains nothing from more, and two threads beside
another busy process made a 128 x 40-token ``generate`` take 24 s instead of about 1 s (measured 2026-12-07)."""
RHO_GRID = (0.02, 0.05, 0.1, 0.2)
RHO_STAR_BATCHES = 4
RERUN_ARM = "lpreg_rho_star"


@dataclass
class RLSettings:
    """One RL run on Task A."""

    steps: int = 200
    prompts: int = 16
    n: int = 8
    lr: float = 3e-4
    max_new_tokens: int = 40
    seed: int = 1
    heldout_samples: int = 1


@dataclass
class RolloutBatch:
    """Sampled responses of one step (rows = prompts x n)."""

    ids: torch.Tensor
    mask: torch.Tensor
    prompt_len: int
    rewards: torch.Tensor
    first: torch.Tensor
    problems: list[Problem] = field(default_factory=list)


@torch.no_grad()
def rollout(model, tokens: TaskATokens, problems: list[Problem], n: int, max_new_tokens: int) -> RolloutBatch:
    """Sample ``n`` responses per problem at T = 1 and score them."""
    prompts = torch.tensor([tokens.prompt(p) for p in problems]).repeat_interleave(n, 0)
    out = model.generate(input_ids=prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=max_new_tokens,
                         do_sample=True, temperature=1.0, top_k=0, top_p=1.0, eos_token_id=tokens.eos,
                         pad_token_id=tokens.eos)
    response = out[:, prompts.shape[1]:]
    is_eos = (response == tokens.eos).long()
    mask = ((is_eos.cumsum(1) - is_eos) == 0).float()  # tokens up to and including the first eos
    rows = [problem for problem in problems for _ in range(n)]
    rewards = torch.tensor([tokens.reward(r[: int(m.sum())], p) for r, m, p in zip(response.tolist(), mask, rows)])
    return RolloutBatch(ids=out, mask=mask, prompt_len=prompts.shape[1], rewards=rewards, first=response[:, 0],
                        problems=rows)


def _stats(model, batch: RolloutBatch, cfg: AlgoConfig):
    need = loss_requirements(cfg)
    logits = model(input_ids=batch.ids).logits[:, batch.prompt_len - 1:-1].float()
    targets = batch.ids[:, batch.prompt_len:]
    return vocab_parallel_logprob_stats(logits, targets, kappa=cfg.kappa,
                                        with_proxy_kl=need.proxy_kl_direction is not None,
                                        proxy_kl_direction=need.proxy_kl_direction or "proxy_to_policy"), targets


def update(model, optim, batch: RolloutBatch, cfg: AlgoConfig, tokens: TaskATokens, prompts: int) -> dict[str, float]:
    """One on-policy update; returns the loss metrics plus the study's diagnostics of this batch."""
    adv = compute_advantages(cfg.advantage, batch.rewards.reshape(prompts, -1)).reshape(-1, 1).expand_as(batch.mask)
    stats, targets = _stats(model, batch, cfg)
    old = stats.logprobs.detach()
    inputs = PolicyLossInputs(logprobs=stats.logprobs, old_logprobs=old, advantages=adv, response_mask=batch.mask,
                              proxy_logprobs=stats.proxy_logprobs, entropy=stats.entropy, proxy_kl=stats.proxy_kl,
                              global_valid_tokens=float(batch.mask.sum()))
    if loss_requirements(cfg).global_threshold:
        inputs.lowprob_threshold = global_lowprob_threshold([lowprob_candidates(old, adv, batch.mask)], cfg.rho)
    loss, metrics = compute_policy_loss(cfg, inputs)
    optim.zero_grad()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optim.step()
    metrics.update({"reward": float(batch.rewards.mean()),
                    "spark_freq": float((batch.first == tokens.spark).float().mean()),
                    "noise_freq": float(torch.isin(batch.first, torch.tensor(tokens.noise)).float().mean()),
                    "entropy_all": float((stats.entropy.detach() * batch.mask).sum() / batch.mask.sum()),
                    "entropy_decision": float(stats.entropy.detach()[:, 0].mean())})
    hist = sampled_prob_histogram(old, adv, batch.mask)
    metrics.update({f"hist_{sign}_{i}": float(count) for sign in ("positive", "negative")
                    for i, count in enumerate(hist[sign])})
    if cfg.name == "lpreg":
        from megatron_lpreg.study.warmstart import classes

        chosen = lpreg_selection(old, stats.proxy_logprobs, adv, batch.mask, rho=cfg.rho, selection=cfg.selection)
        metrics.update(selections_by_class(chosen, targets, classes(tokens)))
        metrics["lpreg/kl_cancel_fraction"] = kl_cancel_fraction(old, old, stats.proxy_logprobs, adv, chosen,
                                                                 beta=cfg.beta)
    return metrics


@torch.no_grad()
def spark_selected_share(model, tokens: TaskATokens, batches: list[RolloutBatch], rho: float, prompts: int) -> float:
    """Share of negative-sample spark tokens that Lp-Reg (reference selection, kappa 0.02) regularises at ``rho``
    over ``batches`` of the current model, with no update."""
    cfg = AlgoConfig(**{**ARMS[RERUN_ARM], "rho": rho})
    chosen = negatives = 0.0
    for batch in batches:
        adv = compute_advantages("grpo", batch.rewards.reshape(prompts, -1)).reshape(-1, 1).expand_as(batch.mask)
        stats, targets = _stats(model, batch, cfg)
        regularized = lpreg_selection(stats.logprobs, stats.proxy_logprobs, adv, batch.mask, rho=rho)
        spark_neg = (targets == tokens.spark) & (adv < 0) & (batch.mask > 0)
        chosen += float((regularized & spark_neg).sum())
        negatives += float(spark_neg.sum())
    return chosen / negatives if negatives else 0.0


def measure_rho_star(model, tokens: TaskATokens, split: TaskASplit, settings: RLSettings) -> tuple[float, dict]:
    """rho* (see the module docstring) and the share selected at each rho of the grid."""
    rng = random.Random(f"rho-star:{settings.seed}")
    torch.manual_seed(settings.seed + 7919)
    batches = [rollout(model, tokens, split.sample_train(rng, settings.prompts), settings.n, settings.max_new_tokens)
               for _ in range(RHO_STAR_BATCHES)]
    shares = {rho: spark_selected_share(model, tokens, batches, rho, settings.prompts) for rho in RHO_GRID}
    rho_star = next((rho for rho in RHO_GRID if shares[rho] >= 0.5), RHO_GRID[-1])
    return rho_star, shares


def rho_star_row(warm_dir: Path, *, seed: int = 1, out: Path | None = None) -> dict:
    """rho* of ``warm_dir`` with the share selected at each rho of :data:`RHO_GRID`; appended to ``out`` (CSV)."""
    from transformers import AutoModelForCausalLM

    from megatron_lpreg.demo import _torch_threads

    model = AutoModelForCausalLM.from_pretrained(warm_dir, dtype=torch.float32)
    with _torch_threads(STUDY_THREADS):
        rho_star, shares = measure_rho_star(model, _tokens(warm_dir), split_task_a(), RLSettings(seed=seed))
    row = {"warm_start": str(warm_dir), "seed": seed, "rho_star": rho_star,
           **{f"spark_selected_at_{rho:g}": round(share, 4) for rho, share in shares.items()}}
    if out is not None:
        rows = read_csv(out) if out.exists() else []
        write_csv([*rows, row], out)
    return row


@torch.no_grad()
def heldout_accuracy(model, tokens: TaskATokens, problems: list[Problem], samples: int, seed: int) -> float:
    """Sampled (T = 1) exact-match accuracy on ``problems``, ``samples`` per problem."""
    torch.manual_seed(seed)
    batch = rollout(model, tokens, problems, samples, 40)
    return float(batch.rewards.mean())


def run_arm(warm_dir: Path, arm: str, settings: RLSettings, out: Path, *, rho: float | None = None) -> dict:
    """Train ``arm`` from ``warm_dir`` for ``settings.steps`` steps; writes ``out/<arm>_metrics.csv``.

    Returns:
        ``{"arm", "spark_survival", "hard_acc", "spark_p0", ...}``: survival = mean rollout spark frequency over
        the last ``ceil(steps / 12)`` steps (steps 550-600 of 600) / the warm start's mean p(spark) at the
        decision position over the held-out prompts; hard_acc = sampled accuracy on the 200 held-out hard problems.
    """
    from transformers import AutoModelForCausalLM

    from megatron_lpreg.study.warmstart import classes, decision_logits

    if arm not in ARMS:
        raise ValueError(f"arm {arm!r} unknown; choose one of {sorted(ARMS)}")
    torch.manual_seed(settings.seed)
    model = AutoModelForCausalLM.from_pretrained(warm_dir, dtype=torch.float32, attn_implementation="sdpa")
    tokenizer_tokens = _tokens(warm_dir)
    split = split_task_a()
    probe0 = decision_probe(decision_logits(model, tokenizer_tokens, split.heldout[HARD] + split.heldout["easy"]),
                            classes(tokenizer_tokens))
    cfg = AlgoConfig(**{**ARMS[arm], **({"rho": rho} if rho is not None and ARMS[arm]["name"] == "lpreg" else {})})
    cfg.validate()
    optim = torch.optim.AdamW(model.parameters(), lr=settings.lr, betas=(0.9, 0.99), weight_decay=0.0)
    rng = random.Random(f"rerun:{settings.seed}")
    rows = []
    for step in range(settings.steps):
        batch = rollout(model, tokenizer_tokens, split.sample_train(rng, settings.prompts), settings.n,
                        settings.max_new_tokens)
        rows.append({"step": step, **update(model, optim, batch, cfg, tokenizer_tokens, settings.prompts)})
    write_csv(rows, out / f"{arm}_metrics.csv")
    window = rows[-math.ceil(settings.steps / 12):]
    freq = sum(r["spark_freq"] for r in window) / len(window)
    hard = heldout_accuracy(model, tokenizer_tokens, split.heldout[HARD], settings.heldout_samples, settings.seed)
    return {"arm": arm, "rho": cfg.rho, "spark_p0": probe0["probe/p_spark"],
            "spark_survival": freq / max(probe0["probe/p_spark"], 1e-12), "hard_acc": hard}


def _tokens(model_dir: Path) -> TaskATokens:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    return TaskATokens(tokenizer, tokenizer.convert_tokens_to_ids("<|im_end|>"))


def rerun(out: Path, *, seed: int = 1, steps: int = 200, warm_dir: Path | None = None) -> str:
    """The reduced rerun; returns its summary line (see the module docstring and docs/study.md)."""
    from megatron_lpreg.demo import _torch_threads
    from megatron_lpreg.study.warmstart import EXPLORATORY_RECIPE, warm_start_with_gate

    if steps < 1:
        raise ValueError(f"--steps={steps} must be >= 1")
    out.mkdir(parents=True, exist_ok=True)
    if warm_dir is None:
        # No warm start passed Gate G1 within the protocol's 3 attempts; the rerun uses the exploratory attempt 4
        # (docs/study.md), made here when missing (about 7 minutes on one core).
        warm_dir = out / "warm_start_exploratory"
        if not (warm_dir / "config.json").exists():
            warm_start_with_gate(out, **EXPLORATORY_RECIPE)
        if not (warm_dir / "config.json").exists():
            raise RuntimeError(f"the exploratory warm start did not pass G1's thresholds (see {out / 'g1.csv'})")
    with _torch_threads(STUDY_THREADS):
        return _rerun(out, warm_dir, seed=seed, steps=steps)


def _rerun(out: Path, warm_dir: Path, *, seed: int, steps: int) -> str:
    from transformers import AutoModelForCausalLM

    from megatron_lpreg.study.tables import plot_curves

    t0 = time.perf_counter()
    settings = RLSettings(steps=steps, seed=seed)
    model = AutoModelForCausalLM.from_pretrained(warm_dir, dtype=torch.float32)
    rho_star, shares = measure_rho_star(model, _tokens(warm_dir), split_task_a(), settings)
    logger.info("rho* = %g (spark share selected per rho: %s)", rho_star, shares)
    results = [run_arm(warm_dir, arm, settings, out, rho=rho_star) for arm in ("grpo", RERUN_ARM)]
    write_csv([{**r, "seed": seed, "steps": steps} for r in results], out / "rerun_summary.csv")
    plot_curves({arm: [out / f"{arm}_metrics.csv"] for arm in ("grpo", RERUN_ARM)}, out / "rerun_curves.png")
    logger.info("rerun took %.0f s", time.perf_counter() - t0)
    grpo, lpreg = results
    return (f"study-rerun: grpo spark_survival={grpo['spark_survival']:.3f} hard_acc={grpo['hard_acc']:.3f}; "
            f"{lpreg['arm']} spark_survival={lpreg['spark_survival']:.3f} hard_acc={lpreg['hard_acc']:.3f}")
