"""Stage 0 of the study (docs/study.md): one decision position, one softmax, the project's own loss functions.

A policy over V tokens at one position (the first response token of Task A): token 0 is the main strategy
(direct answer), token 1 the spark (scratchpad), tokens 2.. the noise tail, spread evenly so that every tail token
lies below ``kappa x p_max`` and their total is ``tail_mass``; the first half of the tail is harmless (rewarded as
the main token), the second half harmful (reward 0). Contexts (easy, medium, hard, drawn 50/20/30 as Task A's
carries) share the softmax and differ only in the success probability of each strategy, so easy prompts push the
spark down in negative samples while hard prompts would reward it: the trap the study looks for.

Every step samples ``prompts x n`` tokens, scores them with Bernoulli rewards, computes GRPO advantages with
:func:`megatron_lpreg.algo.advantages.compute_advantages`, the per-token statistics with the vocab-parallel op
(single process) and the loss with :func:`megatron_lpreg.algo.registry.compute_policy_loss` (the trainer's entry),
then takes an SGD step on the logits (a gradient proportional to the probability, as in a network). On-policy
takes one update per step; off-policy splits the batch into ``updates_per_step`` mini-batches against the
behaviour policy's log-probs and proxy.
"""
from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace

import torch

from megatron_lpreg.algo.advantages import compute_advantages
from megatron_lpreg.algo.lpreg import compute_proxy_logprobs, global_lowprob_threshold, lowprob_candidates
from megatron_lpreg.algo.registry import PolicyLossInputs, compute_policy_loss, loss_requirements
from megatron_lpreg.config.algo import AlgoConfig
from megatron_lpreg.ops.vocab_parallel import vocab_parallel_logprob_stats

logger = logging.getLogger(__name__)

MAIN, SPARK = 0, 1
CONTEXTS = ("easy", "medium", "hard")
CONTEXT_MIX = (0.5, 0.2, 0.3)
"""Share of easy / medium / hard prompts, as Task A's training split by carry count (0 / 1 / >= 2)."""
SUCCESS = {"easy": (0.95, 0.6), "medium": (0.5, 0.6), "hard": (0.15, 0.5)}
"""Per context: success probability of (main, spark); harmless noise succeeds as main, harmful noise never."""

ARMS: dict[str, dict] = {
    "grpo": {"name": "grpo", "clip_low": 0.2, "clip_high": 0.2},
    "clip_higher": {"name": "dapo", "clip_low": 0.2, "clip_high": 0.28},
    "kl_cov": {"name": "kl_cov", "kl_cov_ratio": 0.002, "kl_cov_coef": 1.0},
    "entropy": {"name": "entropy", "entropy_coef": 0.01, "clip_low": 0.2, "clip_high": 0.2},
    "lpreg": {"name": "lpreg", "clip_low": 0.2, "clip_high": 0.28},
    "lpreg_global": {"name": "lpreg", "clip_low": 0.2, "clip_high": 0.28, "selection": "global",
                     "proxy_kl": "exact_proxy_to_policy"},
}
"""Stage 0 arms -> AlgoConfig fields (``rho``/``kappa`` are added per grid point for the Lp-Reg arms)."""


@dataclass(frozen=True)
class Stage0Setup:
    """One simulated run.

    Attributes:
        arm: key of :data:`ARMS`.
        tail_mass: initial probability below the kappa cut (the noise tail), in [0, 1).
        rho: Lp-Reg selection fraction (ignored by other arms).
        kappa: Lp-Reg min-p threshold.
        off_policy: 4 mini-batch updates per rollout instead of one on-policy update.
        seed: sampling seed (paired across arms: the same seed draws the same first batch).
        steps, prompts, n, lr, vocab, spark_p: run size, SGD learning rate on the logits, vocabulary and the
            spark's initial probability.
        updates_per_step: mini-batch updates per step when off-policy.
    """

    arm: str = "grpo"
    tail_mass: float = 0.2
    rho: float = 0.1
    kappa: float = 0.02
    off_policy: bool = False
    seed: int = 0
    steps: int = 100
    prompts: int = 16
    n: int = 8
    lr: float = 2.0
    vocab: int = 512
    spark_p: float = 0.05
    updates_per_step: int = 4

    def algo(self) -> AlgoConfig:
        """The arm's AlgoConfig (validated)."""
        if self.arm not in ARMS:
            raise ValueError(f"stage0 arm {self.arm!r} unknown; choose one of {sorted(ARMS)}")
        fields = dict(ARMS[self.arm])
        if fields["name"] == "lpreg":
            fields.update(rho=self.rho, kappa=self.kappa)
        cfg = AlgoConfig(**fields)
        cfg.validate()
        return cfg


def initial_logits(vocab: int, spark_p: float, tail_mass: float) -> torch.Tensor:
    """float64 logits with p(spark) = ``spark_p``, the tail (tokens 2..) sharing ``tail_mass`` evenly, main the rest.

    Raises:
        ValueError: probabilities that do not fit (main would not be the most likely token).
    """
    main = 1.0 - spark_p - tail_mass
    if not 0.0 <= tail_mass < 1.0 or not 0.0 < spark_p < main or vocab < 3:
        raise ValueError(f"spark_p={spark_p}, tail_mass={tail_mass}, vocab={vocab}: need 0 < spark_p < "
                         f"1 - spark_p - tail_mass and vocab >= 3")
    probs = torch.full((vocab,), max(tail_mass, 1e-12) / (vocab - 2), dtype=torch.float64)
    probs[MAIN], probs[SPARK] = main, spark_p
    return probs.log()


def success_table(vocab: int) -> torch.Tensor:
    """``[contexts, V]`` success probabilities (see :data:`SUCCESS`)."""
    harmless_end = 2 + (vocab - 2) // 2
    table = torch.zeros(len(CONTEXTS), vocab, dtype=torch.float64)
    for index, name in enumerate(CONTEXTS):
        main, spark = SUCCESS[name]
        table[index, MAIN], table[index, SPARK] = main, spark
        table[index, 2:harmless_end] = main
    return table


@dataclass
class Stage0Result:
    """Summary of one run (one CSV row)."""

    setup: Stage0Setup
    spark_p_end: float
    spark_survival: float
    hard_acc_start: float
    hard_acc_end: float
    tail_mass_end: float
    regularized_per_step: float
    spark_selected_frac: float
    curve: list[float] = field(default_factory=list)

    def row(self) -> dict:
        """The setup's fields and the summary numbers, flat (the curve is left out)."""
        out = {k: v for k, v in asdict(self.setup).items()}
        out.update({k: getattr(self, k) for k in ("spark_p_end", "spark_survival", "hard_acc_start", "hard_acc_end",
                                                  "tail_mass_end", "regularized_per_step", "spark_selected_frac")})
        return out


def _loss_inputs(logits: torch.Tensor, old_logits: torch.Tensor, tokens: torch.Tensor, adv: torch.Tensor,
                 cfg: AlgoConfig, kappa: float, on_policy: bool) -> PolicyLossInputs:
    need = loss_requirements(cfg)
    tokens_bt = tokens.reshape(1, -1)
    stats = vocab_parallel_logprob_stats(logits.expand(tokens_bt.shape[1], -1).unsqueeze(0), tokens_bt, kappa=kappa,
                                         with_proxy_kl=need.proxy_kl_direction is not None,
                                         proxy_kl_direction=need.proxy_kl_direction or "proxy_to_policy")
    old_bt_v = old_logits.expand(tokens_bt.shape[1], -1).unsqueeze(0)
    if on_policy:  # the trainer's on-policy path: old log-probs detached from the loss's own forward
        old = stats.logprobs.detach()
    else:
        old = vocab_parallel_logprob_stats(old_bt_v, tokens_bt, kappa=kappa).logprobs.detach()
    mask = torch.ones_like(old)
    advantages = adv.reshape(1, -1).to(old.dtype)
    inputs = PolicyLossInputs(logprobs=stats.logprobs, old_logprobs=old, advantages=advantages, response_mask=mask,
                              entropy=stats.entropy, proxy_kl=stats.proxy_kl,
                              proxy_logprobs=compute_proxy_logprobs(old_bt_v, tokens_bt, kappa=kappa),
                              global_valid_tokens=float(mask.sum()))
    if need.global_threshold:
        inputs.lowprob_threshold = global_lowprob_threshold([lowprob_candidates(old, advantages, mask)], cfg.rho)
    return inputs


def hard_accuracy(logits: torch.Tensor, table: torch.Tensor) -> float:
    """Expected reward of the policy on hard prompts."""
    return float((torch.softmax(logits, -1) * table[CONTEXTS.index("hard")]).sum())


def simulate(setup: Stage0Setup) -> Stage0Result:
    """Run one Stage 0 simulation (see the module docstring)."""
    cfg = setup.algo()
    gen = torch.Generator().manual_seed(setup.seed)
    table = success_table(setup.vocab)
    logits = initial_logits(setup.vocab, setup.spark_p, setup.tail_mass).requires_grad_(True)
    optim = torch.optim.SGD([logits], lr=setup.lr)
    mix = torch.tensor(CONTEXT_MIX, dtype=torch.float64)
    cut = math.log(setup.kappa)
    start_spark = setup.spark_p
    hard_start = hard_accuracy(logits.detach(), table)
    curve, regularized, spark_neg, spark_sel = [], 0.0, 0.0, 0.0
    updates = setup.updates_per_step if setup.off_policy else 1
    for _ in range(setup.steps):
        old_logits = logits.detach().clone()
        probs = torch.softmax(old_logits, -1)
        contexts = torch.multinomial(mix, setup.prompts, replacement=True, generator=gen)
        tokens = torch.multinomial(probs, setup.prompts * setup.n, replacement=True, generator=gen)
        success = table[contexts.repeat_interleave(setup.n), tokens]
        rewards = (torch.rand(success.shape, generator=gen, dtype=torch.float64) < success).double()
        adv = compute_advantages(cfg.advantage, rewards.reshape(setup.prompts, setup.n)).reshape(-1)
        kept_spark = bool(torch.log(probs[SPARK] / probs.max()) >= cut)
        for chunk in torch.arange(tokens.numel()).chunk(updates):
            inputs = _loss_inputs(logits, old_logits, tokens[chunk], adv[chunk], cfg, setup.kappa, updates == 1)
            loss, metrics = compute_policy_loss(cfg, inputs)
            optim.zero_grad()
            loss.backward()
            optim.step()
            regularized += metrics.get("lpreg/num_regularized", 0.0)
        negative_spark = (tokens == SPARK) & (adv < 0)
        spark_neg += float(negative_spark.sum())
        if cfg.name == "lpreg" and kept_spark:
            spark_sel += float(_spark_selected(old_logits, tokens, adv, cfg).sum())
        curve.append(float(torch.softmax(logits.detach(), -1)[SPARK]))
    final = torch.softmax(logits.detach(), -1)
    return Stage0Result(
        setup=setup, spark_p_end=float(final[SPARK]), spark_survival=float(final[SPARK]) / start_spark,
        hard_acc_start=hard_start, hard_acc_end=hard_accuracy(logits.detach(), table),
        tail_mass_end=float(final[2:].sum()), regularized_per_step=regularized / setup.steps,
        spark_selected_frac=spark_sel / spark_neg if spark_neg else 0.0, curve=curve)


def _spark_selected(old_logits: torch.Tensor, tokens: torch.Tensor, adv: torch.Tensor, cfg: AlgoConfig
                    ) -> torch.Tensor:
    """Negative-advantage spark samples the arm's selection would regularise at the behaviour policy (no update)."""
    from megatron_lpreg.metrics.diagnostics import lpreg_selection

    logp = torch.log_softmax(old_logits, -1)[tokens].reshape(1, -1)
    proxy = compute_proxy_logprobs(old_logits.expand(tokens.numel(), -1).unsqueeze(0), tokens.reshape(1, -1),
                                   kappa=cfg.kappa)
    regularized = lpreg_selection(logp, proxy, adv.reshape(1, -1).to(logp.dtype), torch.ones_like(logp),
                                  rho=cfg.rho, selection=cfg.selection)
    return regularized.reshape(-1) & (tokens == SPARK) & (adv < 0)


@dataclass(frozen=True)
class Stage0Grid:
    """The Stage 0 design: three one-factor axes around a centre point (tail 0.2, rho 0.2, on-policy), each Lp-Reg
    arm paired by seed with GRPO at the same tail mass and policy mode.

    - tail axis: GRPO, Lp-Reg and Lp-Reg global at every ``tail_masses`` value, rho ``centre_rho``, on-policy;
    - rho axis: Lp-Reg and Lp-Reg global at every ``rhos`` value, tail ``centre_tail``, on-policy;
    - policy axis: every arm of ``offpolicy_arms`` at tail ``centre_tail``, rho ``centre_rho``, on- and off-policy.
    """

    tail_masses: Sequence[float] = (0.001, 0.05, 0.2, 0.4)
    rhos: Sequence[float] = (0.01, 0.05, 0.2, 0.5)
    offpolicy_arms: Sequence[str] = ("grpo", "clip_higher", "kl_cov", "lpreg", "lpreg_global")
    centre_tail: float = 0.2
    centre_rho: float = 0.2
    seeds: int = 20
    steps: int = 60

    def setups(self) -> list[Stage0Setup]:
        """Every distinct setup of the three axes (duplicates at the centre point removed), in a stable order."""
        base = {"steps": self.steps}
        points = []
        for tail in self.tail_masses:
            points += [dict(arm=arm, tail_mass=tail, rho=self.centre_rho) for arm in ("grpo", "lpreg", "lpreg_global")]
        for rho in self.rhos:
            points += [dict(arm=arm, tail_mass=self.centre_tail, rho=rho) for arm in ("lpreg", "lpreg_global")]
        for off in (False, True):
            points += [dict(arm=arm, tail_mass=self.centre_tail, rho=self.centre_rho, off_policy=off)
                       for arm in self.offpolicy_arms]
        unique: dict[Stage0Setup, None] = {}
        for point in points:
            for seed in range(self.seeds):
                setup = Stage0Setup(seed=seed, **base, **point)
                if ARMS[setup.arm]["name"] != "lpreg":
                    setup = replace(setup, rho=0.0)
                unique[setup] = None
        return list(unique)


def run_grid(grid: Stage0Grid) -> list[Stage0Result]:
    """Simulate every setup of ``grid``."""
    return [simulate(setup) for setup in grid.setups()]


def effect_rows(results: Sequence[Stage0Result]) -> list[dict]:
    """Seed-paired effect of each arm against GRPO at the same tail mass and policy mode.

    ``survival_ratio`` = arm's spark survival / GRPO's (geometric mean over seeds, with min and max);
    ``hard_acc_diff`` = arm's final hard accuracy minus GRPO's (mean, min, max over seeds).
    """
    grpo = {(r.setup.tail_mass, r.setup.off_policy, r.setup.seed): r for r in results if r.setup.arm == "grpo"}
    groups: dict[tuple, list[tuple[float, float, float]]] = {}
    for r in results:
        base = grpo.get((r.setup.tail_mass, r.setup.off_policy, r.setup.seed))
        if r.setup.arm == "grpo" or base is None:
            continue
        key = (r.setup.arm, r.setup.tail_mass, r.setup.rho, r.setup.off_policy)
        ratio = math.log(max(r.spark_survival, 1e-12) / max(base.spark_survival, 1e-12))
        groups.setdefault(key, []).append((ratio, r.hard_acc_end - base.hard_acc_end, r.spark_selected_frac))
    rows = []
    for (arm, tail, rho, off), values in sorted(groups.items()):
        logs, diffs, sel = zip(*values)
        rows.append({"arm": arm, "tail_mass": tail, "rho": rho, "off_policy": off, "seeds": len(values),
                     "survival_ratio": math.exp(sum(logs) / len(logs)), "survival_ratio_min": math.exp(min(logs)),
                     "survival_ratio_max": math.exp(max(logs)), "hard_acc_diff": sum(diffs) / len(diffs),
                     "hard_acc_diff_min": min(diffs), "hard_acc_diff_max": max(diffs),
                     "spark_selected_frac": sum(sel) / len(sel)})
    return rows


