"""Per-benchmark numbers: accuracy, avg@k, pass@k (unbiased estimator), response length, and the report tables."""
from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any


def pass_at_k(n: int, c: int, k: int) -> float:
    """Probability that at least one of ``k`` samples drawn from ``n`` (``c`` correct) is correct:
    ``1 - C(n-c, k) / C(n, k)`` (Chen et al. 2021, eq. 1).

    Raises:
        ValueError: not 0 <= c <= n, or not 1 <= k <= n.
    """
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass_at_k needs 0 <= c <= n and 1 <= k <= n, got n={n} c={c} k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


@dataclass(kw_only=True)
class BenchmarkResult:
    """What one benchmark scored."""

    name: str
    mode: str
    """'sampled' (avg@k at the eval temperature) or 'greedy'."""
    num_problems: int
    k: int
    """Responses per problem."""
    accuracy: float
    """The headline number: avg@k for sampled benchmarks, greedy accuracy otherwise."""
    avg_at_k: float
    """Mean correctness over all k responses of all problems."""
    pass_at_k: float
    """Share of problems with at least one correct response among k."""
    mean_response_tokens: float
    truncated_frac: float
    """Share of responses that hit max_new_tokens."""
    reasons: dict[str, int] = field(default_factory=dict)
    """Reward reasons (verified, wrong, no_box, timeout, ...) counted over responses."""
    temperature: float | None = None
    seconds: float = 0.0

    def metrics(self, prefix: str = "eval") -> dict[str, float]:
        """Flat namespaced metrics: ``eval/<name>/accuracy``, ``/avg@k``, ``/pass@k``, ``/mean_tokens``."""
        base = f"{prefix}/{self.name}"
        return {f"{base}/accuracy": self.accuracy, f"{base}/avg@{self.k}": self.avg_at_k,
                f"{base}/pass@{self.k}": self.pass_at_k, f"{base}/mean_tokens": self.mean_response_tokens}

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def summarize(name: str, *, mode: str, k: int, scores: Sequence[Sequence[float]], lengths: Sequence[int],
              truncated: Sequence[bool], reasons: Sequence[str], temperature: float | None = None,
              seconds: float = 0.0) -> BenchmarkResult:
    """Fold per-response scores into a :class:`BenchmarkResult`.

    Args:
        scores: per problem, its k rewards (1 = correct).
        lengths, truncated, reasons: per response (any order).
    """
    if any(len(s) != k for s in scores):
        raise ValueError(f"{name}: every problem needs exactly k={k} scores")
    n_problems = len(scores)
    flat = [x for s in scores for x in s]
    avg = sum(flat) / len(flat) if flat else 0.0
    passed = sum(pass_at_k(k, int(sum(1 for x in s if x > 0)), k) for s in scores) / n_problems if n_problems else 0.0
    return BenchmarkResult(
        name=name, mode=mode, num_problems=n_problems, k=k, accuracy=avg, avg_at_k=avg, pass_at_k=passed,
        mean_response_tokens=sum(lengths) / len(lengths) if lengths else 0.0,
        truncated_frac=sum(truncated) / len(truncated) if truncated else 0.0,
        reasons=dict(sorted(Counter(reasons).items())), temperature=temperature, seconds=seconds,
    )


def markdown_table(results: Sequence[BenchmarkResult]) -> str:
    """The results.md table (percentages with one decimal)."""
    lines = ["| benchmark | mode | problems | k | accuracy | avg@k | pass@k | mean length (tokens) | truncated |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r.name} | {r.mode} | {r.num_problems} | {r.k} | {100 * r.accuracy:.1f} | "
                     f"{100 * r.avg_at_k:.1f} | {100 * r.pass_at_k:.1f} | {r.mean_response_tokens:.1f} | "
                     f"{100 * r.truncated_frac:.1f}% |")
    return "\n".join(lines) + "\n"
