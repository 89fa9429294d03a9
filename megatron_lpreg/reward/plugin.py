"""The reward function plug-in contract: ``'package.module:function'`` paths and what such a function may return.

A reward function takes ``(response, ground_truth)`` (two strings) and returns a float, a ``(float, reason)`` pair
or a :class:`~megatron_lpreg.reward.records.RewardResult`. Deadline workers load it with :func:`load_callable` and
normalise its return value with :func:`as_result`.
"""
from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

from megatron_lpreg.reward.records import RewardResult


def load_callable(path: str) -> Callable[..., Any]:
    """Import ``'package.module:function'`` (the attribute may be dotted: ``'pkg.mod:Class.method'``).

    Args:
        path: the function's import path.

    Returns:
        The callable object.

    Raises:
        ValueError: malformed path, missing module or attribute, or not callable; the message names the path.
    """
    module_name, sep, attr = path.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"reward function {path!r} must be 'package.module:function'")
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(f"reward function {path!r}: cannot import module {module_name!r}: {exc}") from exc
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"reward function {path!r}: {module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ValueError(f"reward function {path!r} names a {type(obj).__name__}, not a function")
    return obj


def as_result(value: Any) -> RewardResult:
    """Normalise what a reward function returns: a RewardResult, a number, or a (number, reason) pair.

    Raises:
        TypeError: any other return type.
    """
    if isinstance(value, RewardResult):
        return value
    if isinstance(value, tuple) and len(value) == 2:
        return RewardResult(score=float(value[0]), reason=str(value[1]))
    if isinstance(value, (bool, int, float)):
        return RewardResult(score=float(value), reason="scored")
    raise TypeError(f"reward function returned {type(value).__name__}; expected float, (float, reason) or RewardResult")
