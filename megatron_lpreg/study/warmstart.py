"""Task A's supervised warm start and Gate G1 (docs/study.md).

The warm start takes the demo's deterministic path (:data:`megatron_lpreg.demo.WARM_START_DTYPE` float64 on
:data:`megatron_lpreg.demo.WARM_START_THREADS` thread, the float32 islands of transformers' Qwen2 removed) and
trains the tiny model of configs/study_task_a.yaml on Task A targets drawn with the first-token mix
:func:`~megatron_lpreg.study.task_a.warm_start_mix` and 15% wrong scratchpad columns. It stops at the first check
(every ``check_every`` steps) where dev direct accuracy on easy problems reaches 0.85, or at ``max_steps``.

Gate G1 is then measured on the held-out set with forced prefixes (first response token fixed, the rest sampled at
T = 1, :data:`G1_SAMPLES` samples per problem) and, at the decision position, with
:func:`megatron_lpreg.metrics.diagnostics.decision_probe`.
"""
from __future__ import annotations

import dataclasses
import logging
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from megatron_lpreg.metrics.diagnostics import TokenClasses, decision_probe
from megatron_lpreg.study.tables import read_csv, write_csv
from megatron_lpreg.study.task_a import (
    EASY,
    HARD,
    Problem,
    TaskASplit,
    TaskATokens,
    carries,
    split_task_a,
    warm_start_mix,
    write_prompt_files,
)

logger = logging.getLogger(__name__)

REPO_CONFIGS = Path(__file__).resolve().parents[2] / "configs"
STUDY_CONFIG = REPO_CONFIGS / "study_task_a.yaml"
KAPPA = 0.02
G1_SAMPLES = 2
MAX_NEW_TOKENS = 40
MAX_ATTEMPTS = 3


EXPLORATORY_RECIPE = {"first_attempt": 4, "attempts": 1, "beyond_protocol": True, "stop_on_dev_gate": True,
                      "max_steps": 2000, "continuation_share": 0.3, "check_every": 50, "direct_max_carries": 0}
"""Warm-start attempt 4 (seed 1 + 4), the exploratory one that passes G1's thresholds (docs/study.md): keyword
arguments of :func:`warm_start_with_gate`; its model is linked as ``warm_start_exploratory``."""


@dataclass(frozen=True)
class GateG1:
    """Gate G1's thresholds (issue 20), inclusive."""

    spark_p: tuple[float, float] = (0.03, 0.08)
    mass_below_cut: tuple[float, float] = (0.15, 0.3)
    direct_easy_min: float = 0.8
    direct_hard_max: float = 0.3
    spark_easy: tuple[float, float] = (0.4, 0.75)
    spark_hard_over_direct: float = 0.1

    def checks(self, m: dict[str, float]) -> dict[str, bool]:
        """Each criterion on the measured values ``m`` (keys of :func:`measure_g1`)."""
        return {
            "spark_p": self.spark_p[0] <= m["p_spark"] <= self.spark_p[1],
            "noise_below_cut": m["noise_max_rel"] < KAPPA,
            "mass_below_cut": self.mass_below_cut[0] <= m["mass_below_cut"] <= self.mass_below_cut[1],
            "direct_easy": m["direct_easy"] >= self.direct_easy_min,
            "direct_hard": m["direct_hard"] <= self.direct_hard_max,
            "spark_easy": self.spark_easy[0] <= m["spark_easy"] <= self.spark_easy[1],
            "spark_hard": m["spark_hard"] >= m["direct_hard"] + self.spark_hard_over_direct,
        }


def load_base(seed: int = 0):
    """(model dir, tokenizer, TaskATokens) of the study's tiny model (configs/study_task_a.yaml's shape)."""
    from transformers import AutoTokenizer

    from megatron_lpreg.config import RunConfig
    from megatron_lpreg.trainer.cli import materialize_tiny

    cfg = RunConfig.load(str(STUDY_CONFIG))
    base = materialize_tiny(dataclasses.replace(cfg.model, hf_path=f"tiny:{seed}"))
    tokenizer = AutoTokenizer.from_pretrained(base)
    return base, tokenizer, TaskATokens(tokenizer, tokenizer.convert_tokens_to_ids("<|im_end|>"))


DIRECT_STRATEGIES = ("direct", "harmless")
"""Strategies whose target writes the correct sum without a scratchpad."""


def _batch(tokens: TaskATokens, problems: list[Problem], rng: random.Random, mix: dict[str, float],
           continuation_share: float = 0.0, direct_max_carries: int | None = None,
           direct_pool: list[Problem] = ()) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and loss mask of one warm-start batch: each row's strategy drawn from ``mix``; a
    ``continuation_share`` of the rows are instead scratchpads whose first token (the spark) has no loss, so they
    train the scratchpad without moving p(spark) at the decision position. With ``direct_max_carries``, a row whose
    target writes the sum directly (:data:`DIRECT_STRATEGIES`) on a problem with more carries either trains only its
    first token (``direct_pool`` empty: the strategy choice stays independent of the problem, the answer is never
    shown) or takes a problem drawn from ``direct_pool`` (attempt 2's recipe, which makes the first-token mix depend
    on the carries: hard prompts see only spark and harmful rows)."""
    strategies = rng.choices(list(mix), weights=list(mix.values()), k=len(problems))
    seqs, masks = [], []
    for problem, strategy in zip(problems, strategies):
        continuation = rng.random() < continuation_share
        first_only = False
        if (direct_max_carries is not None and not continuation and strategy in DIRECT_STRATEGIES
                and carries(problem.a, problem.b) > direct_max_carries):
            if direct_pool:
                problem = rng.choice(direct_pool)
            else:
                first_only = True
        prompt = tokens.prompt(problem)
        target = tokens.target(problem, "spark" if continuation else strategy, rng)
        seqs.append(prompt + target)
        trained = [1] * (len(target) - continuation) if not first_only else [1] + [0] * (len(target) - 1)
        masks.append([0] * (len(prompt) + continuation) + trained)
    width = max(map(len, seqs))
    ids = torch.tensor([s + [tokens.eos] * (width - len(s)) for s in seqs])
    mask = torch.tensor([m + [0] * (width - len(m)) for m in masks], dtype=torch.float64)
    return ids, mask


@torch.no_grad()
def forced_accuracy(model, tokens: TaskATokens, problems: list[Problem], first: int, *, samples: int, seed: int
                    ) -> float:
    """Mean ``exact_match`` with the first response token forced to ``first``, the rest sampled at T = 1."""
    prompts = torch.tensor([tokens.prompt(p) + [first] for p in problems]).repeat(samples, 1)
    torch.manual_seed(seed)
    out = model.generate(input_ids=prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=MAX_NEW_TOKENS,
                         do_sample=True, temperature=1.0, top_k=0, top_p=1.0, eos_token_id=tokens.eos,
                         pad_token_id=tokens.eos)
    responses = out[:, prompts.shape[1] - 1:].tolist()
    rewards = [tokens.reward(r, p) for r, p in zip(responses, problems * samples)]
    return sum(rewards) / len(rewards)


@torch.no_grad()
def decision_logits(model, tokens: TaskATokens, problems: list[Problem]) -> torch.Tensor:
    """``[N, V]`` logits of the first response token."""
    ids = torch.tensor([tokens.prompt(p) for p in problems])
    return model(input_ids=ids).logits[:, -1].double()


def classes(tokens: TaskATokens) -> TokenClasses:
    """Task A's token classes for the diagnostics: main = the direct answer's first token."""
    return TokenClasses(spark=frozenset({tokens.spark}), noise=frozenset(tokens.noise),
                        main=frozenset({tokens.ids["\\"]}))


def measure_g1(model, tokens: TaskATokens, sets: dict[str, list[Problem]], *, samples: int = G1_SAMPLES,
               seed: int = 0) -> dict[str, float]:
    """Gate G1's measurements on ``sets`` (``easy`` and ``hard`` problem lists)."""
    logits = decision_logits(model, tokens, sets[EASY] + sets[HARD])
    probe = decision_probe(logits, classes(tokens), kappa=KAPPA, prefix="probe")
    mean_probs = torch.softmax(logits, -1).mean(0)
    out = {"p_spark": probe["probe/p_spark"], "p_main": probe["probe/p_main"],
           "mass_below_cut": probe["probe/mass_below_cut"], "entropy": probe["probe/entropy"],
           "noise_max_rel": float(mean_probs[list(tokens.noise)].max() / mean_probs.max()),
           "noise_max_rel_any_prompt": probe["probe/noise_max_rel"]}
    for level in (EASY, HARD):
        for name, first in (("direct", tokens.ids["\\"]), ("spark", tokens.spark)):
            out[f"{name}_{level}"] = forced_accuracy(model, tokens, sets[level], first, samples=samples, seed=seed)
    return out


def warm_start(base_dir: Path, out_dir: Path, tokens: TaskATokens, split: TaskASplit, *, seed: int,
               max_steps: int = 3000, batch_size: int = 64, lr: float = 1e-3, check_every: int = 100,
               stop_easy_direct: float = 0.85, tail_mass: float = 0.2, continuation_share: float = 0.0,
               direct_max_carries: int | None = None, stop_easy_spark: float = 0.0,
               stop_on_dev_gate: GateG1 | None = None, resample_direct: bool = False) -> dict:
    """Supervised warm start on Task A (see the module docstring); saves the model (float32) to ``out_dir``.

    ``continuation_share`` of each batch's rows are scratchpads with no loss on the spark token (see ``_batch``);
    the stop rule is checked every ``check_every`` steps. ``direct_max_carries``: direct answers are shown only on
    training problems with at most that many carries (None: all); on the others a direct row trains only its first
    token, or, with ``resample_direct`` (attempt 2), takes a carry-free problem instead (see ``_batch``).
    ``stop_easy_spark`` > 0 adds a second stop condition, forced-spark accuracy on the dev easy set at least that
    high (the scratchpad is learned).
    ``stop_on_dev_gate`` replaces the stop rule: stop at the first check where every criterion of that gate holds
    on the dev set (one sample per problem), i.e. early stopping on the dev-set version of Gate G1."""
    from transformers import AutoModelForCausalLM

    from megatron_lpreg.demo import (
        WARM_START_DTYPE,
        WARM_START_THREADS,
        _compute_in_float64,
        _torch_threads,
        supervised_step,
    )

    torch.manual_seed(seed)
    rng = random.Random(f"task-a-warm:{seed}")
    model = AutoModelForCausalLM.from_pretrained(base_dir, torch_dtype=torch.float32, attn_implementation="sdpa")
    model.to(WARM_START_DTYPE)
    _compute_in_float64(model)
    optim = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    direct_pool = [p for level in split.train.values() for p in level
                   if resample_direct and direct_max_carries is not None and carries(p.a, p.b) <= direct_max_carries]
    t0, step, dev = time.perf_counter(), 0, {}
    with _torch_threads(WARM_START_THREADS):
        for step in range(1, max_steps + 1):
            ids, mask = _batch(tokens, split.sample_train(rng, batch_size), rng, warm_start_mix(tail_mass),
                               continuation_share, direct_max_carries, direct_pool)
            loss = supervised_step(model, optim, ids, mask)
            if step % check_every == 0:
                dev, log, stop = _dev_check(model, tokens, split, step, stop_easy_direct, stop_easy_spark,
                                            stop_on_dev_gate)
                logger.info("task A warm start step %d: loss %.3f %s (%.0f s)", step, loss.item(), log,
                            time.perf_counter() - t0)
                if stop:
                    break
    model.to(torch.float32).save_pretrained(out_dir)
    tokens.tokenizer.save_pretrained(out_dir)
    return {"steps": step, "seconds": time.perf_counter() - t0, **dev}


def _dev_check(model, tokens: TaskATokens, split: TaskASplit, step: int, stop_easy_direct: float,
               stop_easy_spark: float, gate: GateG1 | None) -> tuple[dict, str, bool]:
    """The warm start's stop rule on the dev set: ``(dev measurements, log text, stop?)`` (see :func:`warm_start`)."""
    if gate is not None:
        dev = {f"dev_{k}": v for k, v in measure_g1(model, tokens, split.dev, samples=1, seed=step).items()}
        failed = [k for k, ok in gate.checks({k[4:]: v for k, v in dev.items()}).items() if not ok]
        return dev, f"dev gate fails {failed or 'nothing'}", not failed
    dev = {"dev_direct_easy": forced_accuracy(model, tokens, split.dev[EASY], tokens.ids["\\"], samples=1,
                                              seed=step)}
    if stop_easy_spark > 0:
        dev["dev_spark_easy"] = forced_accuracy(model, tokens, split.dev[EASY], tokens.spark, samples=1, seed=step)
    log = "dev " + " ".join(f"{k[4:]} {v:.3f}" for k, v in dev.items())
    stop = dev["dev_direct_easy"] >= stop_easy_direct and dev.get("dev_spark_easy", 1.0) >= stop_easy_spark
    return dev, log, stop


def warm_start_with_gate(out: Path, *, attempts: int = MAX_ATTEMPTS, seed: int = 1, max_steps: int = 3000,
                        tail_mass: float = 0.2, continuation_share: float = 0.0, check_every: int = 100,
                        first_attempt: int = 0, direct_max_carries: int | None = None,
                        stop_easy_spark: float = 0.0, stop_on_dev_gate: bool = False,
                        beyond_protocol: bool = False, resample_direct: bool = False) -> bool:
    """Up to ``attempts`` (at most 3) warm starts (seeds ``seed``, ``seed + 1``, ...), each followed by Gate G1 on
    the held-out set; every attempt is a row of ``out/g1.csv``. ``tail_mass`` (the dose-response controls) sets the
    noise share of the mix and Gate G1's band for the mass below the cut, ``[0.75, 1.5] x tail_mass`` (0.15-0.3 at
    the protocol's 0.2). ``continuation_share`` and ``check_every``: see :func:`warm_start` (attempt 0 of
    2026-12-07 used 0 and 100), ``direct_max_carries`` and ``stop_easy_spark`` too (attempts 0 and 1 used None and
    0); ``stop_on_dev_gate``: stop on the dev-set version of this gate (see :func:`warm_start`);
    ``beyond_protocol`` allows attempts past the protocol's 3, marked ``protocol=False`` in g1.csv (exploratory:
    docs/study.md never counts them as passing G1); ``first_attempt`` numbers the attempts when earlier ones are
    already in g1.csv.
    Stops at the first pass; ``out/warm_start`` then holds the passing model (``out/warm_start_<i>`` every
    attempt's).

    Returns:
        Whether an attempt passed.
    """
    from transformers import AutoModelForCausalLM

    if not 1 <= attempts <= MAX_ATTEMPTS:
        raise ValueError(f"attempts={attempts}: the protocol allows 1 to {MAX_ATTEMPTS} warm-start attempts")
    if first_attempt + attempts > MAX_ATTEMPTS and not beyond_protocol:
        raise ValueError(f"attempts {first_attempt}..{first_attempt + attempts - 1}: the protocol allows "
                         f"{MAX_ATTEMPTS} in all (--beyond-protocol runs exploratory ones, reported as such)")
    base, _, tokens = load_base()
    split = split_task_a()
    write_prompt_files(out, split)
    gate = GateG1(mass_below_cut=(0.75 * tail_mass, 1.5 * tail_mass))
    previous = read_csv(out / "g1.csv") if first_attempt and (out / "g1.csv").exists() else []
    rows = [row for row in previous if int(row["attempt"]) < first_attempt]
    for attempt in range(first_attempt, first_attempt + attempts):
        target = out / f"warm_start_{attempt}"
        summary = warm_start(base, target, tokens, split, seed=seed + attempt, max_steps=max_steps,
                             tail_mass=tail_mass, continuation_share=continuation_share, check_every=check_every,
                             direct_max_carries=direct_max_carries, stop_easy_spark=stop_easy_spark,
                             stop_on_dev_gate=gate if stop_on_dev_gate else None, resample_direct=resample_direct)
        model = AutoModelForCausalLM.from_pretrained(target, torch_dtype=torch.float32)
        measured = measure_g1(model, tokens, split.heldout)
        checks = gate.checks(measured)
        row = {"attempt": attempt, "seed": seed + attempt, "protocol": attempt < MAX_ATTEMPTS,
               "continuation_share": continuation_share,
               "check_every": check_every,
               "direct_max_carries": "" if direct_max_carries is None else direct_max_carries,
               "stop_easy_spark": stop_easy_spark, "stop_on_dev_gate": stop_on_dev_gate,
               "resample_direct": resample_direct, **summary, **measured,
               **{f"ok_{k}": v for k, v in checks.items()}, "passed": all(checks.values())}
        rows.append(row)
        print("study g1: " + " ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))
        write_csv(rows, out / "g1.csv")
        if row["passed"] and not row["protocol"]:
            logger.warning("attempt %d passes G1's thresholds outside the protocol's %d attempts: exploratory only; "
                           "linked as %s", attempt, MAX_ATTEMPTS, out / "warm_start_exploratory")
            link = out / "warm_start_exploratory"
            if link.is_symlink() or link.exists():
                link.unlink()
            link.symlink_to(target.name)
            return False
        if row["passed"]:
            link = out / "warm_start"
            if link.is_symlink() or link.exists():
                link.unlink()
            link.symlink_to(target.name)
            return True
    return False
