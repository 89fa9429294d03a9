"""Task A of the study (docs/study.md): three-digit addition with a strategy spark at the first response token.

The first response token chooses the strategy:

- ``\\`` starts the direct answer ``\\boxed{579}<eos>`` (8 tokens, 9 for a four-digit sum);
- the spark id ``#`` (a single-byte token the task uses nowhere else) starts a scratchpad of column sums, units
  first, carry written out: ``#3+6=9;2+5=7;1+4=5;\\boxed{579}<eos>`` (about 30 tokens);
- one of 100 noise ids (merged BPE tokens the task never uses): the first 50 are harmless (the direct answer
  follows), the last 50 harmful (a wrong answer follows).

Easy = no carry, hard = at least two carries (over the three columns). Sequences are built from token ids, never
by re-tokenising text (BPE would merge ``boxed``); the reward (``exact_match`` on the last ``\\boxed{}``) reads
the decoded text.
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from megatron_lpreg.reward.exact import exact_match_reward

SPARK_TEXT = "#"
N_NOISE = 100
EASY, MEDIUM, HARD = "easy", "medium", "hard"
TRAIN_MIX = {EASY: 0.5, MEDIUM: 0.2, HARD: 0.3}
"""Training prompts by carry count: 0 carries / 1 carry / >= 2 carries."""
WARM_START_MIX = {"direct": 0.75, "spark": 0.05, "harmless": 0.15, "harmful": 0.05}
"""First-token mix of the warm-start targets (issue 20): tail mass 0.2, 3/4 of it harmless."""


def warm_start_mix(tail_mass: float = 0.2) -> dict[str, float]:
    """The warm-start mix with noise mass ``tail_mass`` (3/4 harmless), spark 0.05, direct the rest.

    Raises:
        ValueError: ``tail_mass`` outside [0, 0.9].
    """
    if not 0.0 <= tail_mass <= 0.9:
        raise ValueError(f"tail_mass={tail_mass} must be in [0, 0.9] (spark 0.05 and a direct majority)")
    return {"direct": 0.95 - tail_mass, "spark": 0.05, "harmless": 0.75 * tail_mass, "harmful": 0.25 * tail_mass}
COLUMN_ERROR_RATE = 0.15
"""Share of scratchpad columns whose digit is wrong in the warm-start targets (the answer follows the error)."""
HELDOUT_PER_CLASS = 200
DEV_PER_CLASS = 100


def carries(a: int, b: int) -> int:
    """Number of carries when adding the three-digit numbers ``a`` and ``b`` column by column."""
    count, carry = 0, 0
    for column in range(3):
        carry = int((a // 10 ** column) % 10 + (b // 10 ** column) % 10 + carry >= 10)
        count += carry
    return count


def difficulty(a: int, b: int) -> str:
    """``easy`` (0 carries), ``medium`` (1) or ``hard`` (>= 2)."""
    return {0: EASY, 1: MEDIUM}.get(carries(a, b), HARD)


@dataclass(frozen=True)
class Problem:
    """One addition problem."""

    a: int
    b: int

    @property
    def answer(self) -> str:
        """The sum as text."""
        return str(self.a + self.b)

    @property
    def level(self) -> str:
        """easy / medium / hard by carries."""
        return difficulty(self.a, self.b)


@dataclass
class TaskASplit:
    """Held-out (200 easy + 200 hard), dev (100 + 100, early stopping only) and the training pool by level; all
    disjoint."""

    heldout: dict[str, list[Problem]]
    dev: dict[str, list[Problem]]
    train: dict[str, list[Problem]]

    def sample_train(self, rng: random.Random, count: int) -> list[Problem]:
        """``count`` training problems, level drawn with :data:`TRAIN_MIX`."""
        levels = rng.choices(list(TRAIN_MIX), weights=list(TRAIN_MIX.values()), k=count)
        return [rng.choice(self.train[level]) for level in levels]


def split_task_a(data_seed: int = 0) -> TaskASplit:
    """The Task A split; depends only on ``data_seed``."""
    by_level: dict[str, list[Problem]] = {EASY: [], MEDIUM: [], HARD: []}
    for a in range(100, 1000):
        for b in range(100, 1000):
            by_level[difficulty(a, b)].append(Problem(a, b))
    rng = random.Random(f"task-a-split:{data_seed}")
    heldout, dev, train = {}, {}, {}
    for level, problems in by_level.items():
        order = list(problems)
        rng.shuffle(order)
        taken = 0
        if level != MEDIUM:
            heldout[level] = order[:HELDOUT_PER_CLASS]
            dev[level] = order[HELDOUT_PER_CLASS:HELDOUT_PER_CLASS + DEV_PER_CLASS]
            taken = HELDOUT_PER_CLASS + DEV_PER_CLASS
        train[level] = order[taken:]
    return TaskASplit(heldout=heldout, dev=dev, train=train)


class TaskATokens:
    """Token ids of Task A in a tokenizer (the tiny model's byte-level BPE); every piece must be one token.

    Raises:
        ValueError: a piece that is not a single token, or fewer than 100 usable noise ids.
    """

    def __init__(self, tokenizer, eos_id: int) -> None:
        self.tokenizer = tokenizer
        self.eos = eos_id
        pieces = [str(d) for d in range(10)] + ["+", "=", ";", "\\", "{", "}", "boxed", SPARK_TEXT]
        ids = {}
        for piece in pieces:
            enc = tokenizer.encode(piece, add_special_tokens=False)
            if len(enc) != 1:
                raise ValueError(f"Task A needs {piece!r} to be one token; the tokenizer gives {enc}")
            ids[piece] = enc[0]
        self.ids = ids
        self.digits = [ids[str(d)] for d in range(10)]
        self.spark = ids[SPARK_TEXT]
        self.noise = self._noise_ids(set(ids.values()))
        self.harmless, self.harmful = self.noise[:N_NOISE // 2], self.noise[N_NOISE // 2:]

    def _noise_ids(self, used: set[int]) -> list[int]:
        noise = []
        for token_id in range(256, len(self.tokenizer)):
            text = self.tokenizer.decode([token_id])
            if token_id in used or token_id == self.eos or len(text) < 2:
                continue
            if text.strip() and all(c.isalpha() or c == " " for c in text):
                noise.append(token_id)
            if len(noise) == N_NOISE:
                return noise
        raise ValueError(f"found only {len(noise)} letter-only merged tokens for noise ids; need {N_NOISE}")

    def prompt(self, problem: Problem) -> list[int]:
        """Ids of ``"478+365="`` (8 tokens: every digit is one token)."""
        return self._number(problem.a) + [self.ids["+"]] + self._number(problem.b) + [self.ids["="]]

    def _number(self, value: int | str) -> list[int]:
        return [self.digits[int(c)] for c in str(value)]

    def box(self, answer: str) -> list[int]:
        """Ids of ``\\boxed{answer}<eos>``."""
        return [self.ids["\\"], self.ids["boxed"], self.ids["{"], *self._number(answer), self.ids["}"], self.eos]

    def scratchpad(self, problem: Problem, rng: random.Random | None = None, error_rate: float = 0.0) -> list[int]:
        """``#`` + column sums (units first) + the box of the digits written; column digits are wrong with
        probability ``error_rate`` (drawn from ``rng``), and the answer follows what was written."""
        out, carry, written = [self.spark], 0, []
        for column in range(3):
            x, y = (problem.a // 10 ** column) % 10, (problem.b // 10 ** column) % 10
            total = x + y + carry
            digit = total % 10
            if rng is not None and rng.random() < error_rate:
                digit = (digit + rng.randint(1, 9)) % 10
            terms = [x, y] + ([carry] if carry else [])
            for index, term in enumerate(terms):
                out += ([self.ids["+"]] if index else []) + self._number(term)
            result = f"{total // 10}{digit}" if total >= 10 else str(digit)
            out += [self.ids["="], *self._number(result), self.ids[";"]]
            written.append(str(digit))
            carry = total // 10
        answer = (str(carry) if carry else "") + "".join(reversed(written))
        return out + self.box(answer)

    def target(self, problem: Problem, strategy: str, rng: random.Random) -> list[int]:
        """A warm-start response for ``strategy`` in direct / spark / harmless / harmful."""
        if strategy == "direct":
            return self.box(problem.answer)
        if strategy == "spark":
            return self.scratchpad(problem, rng, COLUMN_ERROR_RATE)
        if strategy == "harmless":
            return [rng.choice(self.harmless), *self.box(problem.answer)]
        if strategy == "harmful":
            wrong = str(problem.a + problem.b + rng.randint(1, 99))
            return [rng.choice(self.harmful), *self.box(wrong)]
        raise ValueError(f"strategy {strategy!r}; use one of {sorted(WARM_START_MIX)}")

    def reward(self, response_ids: list[int], problem: Problem) -> float:
        """``exact_match`` on the last ``\\boxed{}`` of the decoded response."""
        text = self.tokenizer.decode(response_ids, skip_special_tokens=True)
        return exact_match_reward(text, problem.answer).score

    def strategy_of(self, first_token: int) -> str:
        """The strategy a first response token chooses: direct / spark / harmless / harmful / other."""
        if first_token == self.ids["\\"]:
            return "direct"
        if first_token == self.spark:
            return "spark"
        if first_token in self.harmless:
            return "harmless"
        return "harmful" if first_token in self.harmful else "other"


TRAIN_FILE_SIZE = 20000
"""Problems in ``train.jsonl``, drawn with :data:`TRAIN_MIX`, so that the trainer's uniform sampling keeps it."""


def write_prompt_files(out: Path, split: TaskASplit, data_seed: int = 0) -> dict[str, Path]:
    """``train.jsonl`` (the trainer's ``data.source`` in configs/study_task_a.yaml), ``heldout_easy.jsonl`` and
    ``heldout_hard.jsonl`` in the plain layout ``{"problem": "478+365=", "answer": "843"}``."""
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(f"task-a-train-file:{data_seed}")
    sets = {"train": split.sample_train(rng, TRAIN_FILE_SIZE), "heldout_easy": split.heldout[EASY],
            "heldout_hard": split.heldout[HARD]}
    paths = {}
    for name, problems in sets.items():
        paths[name] = out / f"{name}.jsonl"
        paths[name].write_text("".join(json.dumps({"problem": f"{p.a}+{p.b}=", "answer": p.answer}) + "\n"
                                       for p in problems))
    return paths
