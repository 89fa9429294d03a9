"""Fixtures shared by the models tests: the default tiny Qwen2/Qwen3 checkpoints (tests/support/tiny.py)."""
from __future__ import annotations

from tests.support.tiny import tiny_qwen2, tiny_qwen3  # noqa: F401  (fixtures, registered for this directory)
