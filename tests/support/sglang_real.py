"""For tests against a real SGLang server (marker ``sglang``): fail without SGLang where it is required
(``LPREG_REQUIRE_SGLANG=1``, set by .ci/pytest-sglang.sh for ``make test-sglang``), skip with the reason elsewhere."""
from __future__ import annotations

import os

import pytest


def require_sglang() -> None:
    """Return when ``import sglang`` works; otherwise fail (required) or skip (a plain run in ``.venv``)."""
    try:
        import sglang  # noqa: F401
    except ImportError as exc:
        if os.environ.get("LPREG_REQUIRE_SGLANG") == "1":
            pytest.fail(f"LPREG_REQUIRE_SGLANG=1 but sglang cannot be imported: {exc!r}")
        pytest.skip(f"sglang is not installed ({exc}); `make test-sglang` builds .venv-sglang with it")
