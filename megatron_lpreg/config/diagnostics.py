"""The ``diagnostics:`` section: which tokens the exploration diagnostics follow (docs/metrics.md, "Exploration
diagnostics"). The metrics themselves live in ``megatron_lpreg.metrics.diagnostics``; the trainer resolves the
classes once with the run's tokenizer (:meth:`DiagnosticsConfig.resolve`) and logs ``diag/*`` every step.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from megatron_lpreg.config.base import ConfigError


@dataclass(kw_only=True)
class DiagnosticsConfig:
    """Which tokens the diagnostics follow. Ids and strings may be mixed; strings are resolved with the run's
    tokenizer by :meth:`resolve` (each string and its capitalised / space-prefixed forms that encode to one token).
    No spark or noise token (the default) = no ``diag/*`` metrics and no cost.
    """

    spark_ids: list[int] = field(default_factory=list)
    """Token ids of the reasoning sparks (Task A: the id of the scratchpad token "#")."""
    spark_strings: list[str] = field(default_factory=list)
    """Spark words for real models, e.g. [wait, however, perhaps] (each must be one token in some form)."""
    noise_ids: list[int] = field(default_factory=list)
    """Token ids that carry no strategy (Task A: the 100 ids the task never uses)."""
    noise_strings: list[str] = field(default_factory=list)
    """Noise words, resolved as spark_strings."""
    main_ids: list[int] = field(default_factory=list)
    """Ids of the main (default) choice at decision positions (probes); empty = the most likely token there."""
    kappa: float = 0.02
    """Min-p cut of the probes' "mass below the cut" (use the run's algo.kappa)."""

    @property
    def enabled(self) -> bool:
        """Whether any spark or noise token is configured (else the trainer computes no ``diag/*`` metric)."""
        return bool(self.spark_ids or self.spark_strings or self.noise_ids or self.noise_strings)

    def validate(self, vocab_size: int | None = None) -> None:
        """Raise ConfigError on a bad kappa, a negative or (given ``vocab_size``) out-of-vocabulary id, or an id
        in two classes."""
        if not 0.0 < self.kappa <= 1.0:
            raise ConfigError(f"diagnostics.kappa={self.kappa} must be in (0, 1]")
        for key in ("spark_ids", "noise_ids", "main_ids"):
            bad = [i for i in getattr(self, key) if i < 0 or (vocab_size is not None and i >= vocab_size)]
            if bad:
                raise ConfigError(f"diagnostics.{key} has ids {bad} outside the vocabulary [0, {vocab_size}) "
                                  f"(model.vocab_size); remove them or fix model.vocab_size")
        _check_disjoint(set(self.spark_ids), set(self.noise_ids), set(self.main_ids), "_ids")

    def resolve(self, tokenizer=None) -> TokenClasses:
        """Ids of each class (strings through ``tokenizer.encode(text, add_special_tokens=False)``).

        Raises:
            ValueError: strings without a tokenizer, a string none of whose forms is a single token, or a token
                that lands in two classes.
        """
        self.validate()
        spark = set(self.spark_ids) | _string_ids(self.spark_strings, tokenizer, "spark_strings")
        noise = set(self.noise_ids) | _string_ids(self.noise_strings, tokenizer, "noise_strings")
        _check_disjoint(spark, noise, set(self.main_ids), "")
        return TokenClasses(spark=frozenset(spark), noise=frozenset(noise), main=frozenset(self.main_ids))


@dataclass(frozen=True)
class TokenClasses:
    """Resolved id sets of :class:`DiagnosticsConfig` (what the metrics read)."""

    spark: frozenset[int]
    noise: frozenset[int]
    main: frozenset[int] = frozenset()


def _check_disjoint(spark: set[int], noise: set[int], main: set[int], suffix: str) -> None:
    """Raise when a token id is in two classes (``suffix`` "_ids": the config's lists; "": after resolution)."""
    sets = {"spark": spark, "noise": noise, "main": main}
    for name_a, name_b in (("spark", "noise"), ("spark", "main"), ("noise", "main")):
        both = sets[name_a] & sets[name_b]
        if both:
            where = (f"{name_a}_ids and {name_b}_ids" if suffix
                     else f"the {name_a} and {name_b} classes (ids and strings)")
            raise ConfigError(f"token ids {sorted(both)} are in both {where}; a token has one class: remove them "
                              f"from one diagnostics list")


def _string_ids(strings: Sequence[str], tokenizer, key: str) -> set[int]:
    if strings and tokenizer is None:
        raise ConfigError(f"diagnostics.{key}={list(strings)} needs a tokenizer; give ids instead or pass one")
    ids: set[int] = set()
    for text in strings:
        forms = {text, " " + text, text.capitalize(), " " + text.capitalize()}
        found = {enc[0] for form in forms if len(enc := tokenizer.encode(form, add_special_tokens=False)) == 1}
        if not found:
            raise ConfigError(f"diagnostics.{key}: {text!r} is not a single token in any of the forms "
                              f"{sorted(forms)}; give its id(s) in the *_ids list instead")
        ids |= found
    return ids
