"""Exploration/diversity metrics: token entropy, low-probability sampled tokens, self-BLEU, distinct-n."""
from megatron_lpreg.metrics.exploration import (
    distinct_n,
    entropy_stats,
    group_self_bleu,
    low_prob_token_stats,
    self_bleu,
    token_entropy,
    words,
)

__all__ = ["distinct_n", "entropy_stats", "group_self_bleu", "low_prob_token_stats", "self_bleu", "token_entropy",
           "words"]
