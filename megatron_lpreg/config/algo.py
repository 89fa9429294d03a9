"""Algorithm config: which policy loss, its hyper-parameters, the advantage estimator."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from megatron_lpreg.config.base import ConfigError

AlgoName = Literal["lpreg", "grpo", "dapo", "entropy", "clip_cov", "kl_cov", "forking_80_20", "gspo"]


@dataclass(kw_only=True)
class AlgoConfig:
    """Policy-loss selection and hyper-parameters (defaults: the Lp-Reg authors' recipe)."""

    name: AlgoName = "lpreg"
    """Policy loss, looked up in megatron_lpreg.algo.registry."""
    advantage: Literal["grpo", "rloo", "drgrpo"] = "grpo"
    """Advantage estimator over each prompt's group of responses."""
    rho: float = 0.01
    """Lp-Reg: fraction of negative-advantage tokens (lowest probability) considered for regularization."""
    kappa: float = 0.02
    """Lp-Reg: min-p threshold of the proxy (keep p >= kappa * max p)."""
    beta: float = 1.0
    """Lp-Reg: weight of the proxy regularizer."""
    selection: Literal["reference", "global"] = "reference"
    """Lp-Reg: per-micro-batch selection as the authors' code, or a global percentile across DP and micro-batches."""
    proxy_kl: Literal["k3", "exact_proxy_to_policy", "exact_policy_to_proxy"] = "k3"
    """Lp-Reg regularizer: sampled-token k3 term (reference) or exact full-vocabulary KL (global mode only)."""
    clip_low: float = 0.2
    """PPO ratio clip below 1 (ratio >= 1 - clip_low)."""
    clip_high: float = 0.2
    """PPO ratio clip above 1 (ratio <= 1 + clip_high); DAPO clip-higher uses 0.28."""
    clip_ratio_c: float = 0.0
    """Dual-clip constant (> 1 enables it for negative advantages); 0 disables."""
    loss_agg: Literal["token_mean", "seq_mean_token_mean", "global_token_mean", "seq_mean_token_sum_norm"] = (
        "token_mean")
    """Loss aggregation: per-micro-batch token mean (reference), sequence mean of token means (required by gspo),
    token mean over the whole gradient-accumulation batch (length-unbiased), or Dr.GRPO's sequence mean of token
    sums over the constant ``loss_norm_len``."""
    loss_norm_len: int = 0
    """seq_mean_token_sum_norm (Dr.GRPO) only: the constant length in tokens each response's token sum is divided
    by (Dr.GRPO: the response budget, e.g. rollout.max_new_tokens); must be > 0 with that aggregation."""
    entropy_coef: float = 0.0
    """Entropy bonus weight (algo 'entropy')."""
    clip_cov_ratio: float = 0.0002
    """Clip-Cov: fraction of tokens whose gradient is detached."""
    clip_cov_lb: float = 1.0
    """Clip-Cov: lower covariance bound."""
    clip_cov_ub: float = 5.0
    """Clip-Cov: upper covariance bound."""
    kl_cov_ratio: float = 0.002
    """KL-Cov: fraction of top-covariance tokens that get the KL penalty."""
    kl_cov_coef: float = 1.0
    """KL-Cov: weight of the KL penalty."""
    top_entropy_frac: float = 0.2
    """80/20: fraction of highest-entropy tokens that receive policy gradient."""
    gspo_clip_low: float = 3e-4
    """GSPO: sequence-ratio clip below 1."""
    gspo_clip_high: float = 4e-4
    """GSPO: sequence-ratio clip above 1."""
    logprob_chunk_size: int = 0
    """Tokens per chunk of the vocab-parallel log-prob op (one MAX + one SUM all-reduce per chunk); on GPU it also
    bounds the op's work memory to chunk x vocab/tp. 0 = the whole micro-batch in one chunk."""

    def validate(self) -> None:
        if not 0.0 < self.kappa <= 1.0:
            raise ConfigError(f"algo.kappa={self.kappa} must be in (0, 1]; the authors use 0.02")
        if not 0.0 <= self.rho <= 1.0:
            raise ConfigError(f"algo.rho={self.rho} must be in [0, 1]; the authors use 0.005 or 0.01")
        if self.clip_low < 0 or self.clip_high < 0:
            raise ConfigError(f"algo.clip_low={self.clip_low}, algo.clip_high={self.clip_high} must be >= 0")
        if self.clip_ratio_c and self.clip_ratio_c <= 1.0:
            raise ConfigError(f"algo.clip_ratio_c={self.clip_ratio_c} must be > 1 (or 0 to disable dual clip)")
        if self.logprob_chunk_size < 0:
            raise ConfigError(f"algo.logprob_chunk_size={self.logprob_chunk_size} must be >= 0 (0 = one chunk)")
        if not 0.0 < self.top_entropy_frac <= 1.0:
            raise ConfigError(f"algo.top_entropy_frac={self.top_entropy_frac} must be in (0, 1]")
        if self.name == "gspo" and self.loss_agg != "seq_mean_token_mean":
            raise ConfigError(f"algo.name=gspo is sequence-level (mean over sequences of each sequence's token mean): "
                              f"set algo.loss_agg=seq_mean_token_mean (got {self.loss_agg})")
        if self.loss_agg == "seq_mean_token_sum_norm" and self.loss_norm_len < 1:
            raise ConfigError(f"algo.loss_agg=seq_mean_token_sum_norm needs algo.loss_norm_len >= 1 (got "
                              f"{self.loss_norm_len}); Dr.GRPO uses the response budget, e.g. rollout.max_new_tokens")
        if self.loss_norm_len < 0:
            raise ConfigError(f"algo.loss_norm_len={self.loss_norm_len} must be >= 0")
        if self.proxy_kl != "k3" and self.selection != "global":
            raise ConfigError(
                f"algo.proxy_kl={self.proxy_kl} needs algo.selection=global (reference mode is the authors' k3 term)"
            )
