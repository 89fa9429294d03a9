"""The plug-in contract: what a reward function may return, and loading one by path."""
from __future__ import annotations

import pytest

from megatron_lpreg.reward.plugin import as_result, load_callable
from megatron_lpreg.reward.records import RewardResult


def test_return_values_are_normalised():
    result = RewardResult(score=0.5, reason="partial")
    assert as_result(result) is result
    assert as_result(1) == RewardResult(score=1.0, reason="scored")
    assert as_result(True) == RewardResult(score=1.0, reason="scored")
    assert as_result((0.0, "too long")) == RewardResult(score=0.0, reason="too long")
    with pytest.raises(TypeError, match="returned str"):
        as_result("1.0")


@pytest.mark.parametrize("path", ["", "no_colon", ":fn", "os.path:"])
def test_malformed_paths_are_refused(path):
    with pytest.raises(ValueError, match="package.module:function"):
        load_callable(path)
