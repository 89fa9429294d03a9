#!/usr/bin/env bash
# The `sglang`-marked tests against real SGLang 0.5.23 servers on CPU in .venv-sglang (built by `make install-sglang`).
# A missing or broken sglang, or a server that does not start, is a failure here, never a skip; so is a run that
# collects no tests (pytest exit 5).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=.venv-sglang/bin/python
export RAY_AUTH_MODE=disabled HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export LPREG_REQUIRE_SGLANG=1
if ! SGLANG_USE_CPU_ENGINE=1 "$PY" -c "import sglang.srt.entrypoints.http_server, sgl_kernel" ; then
  echo "sglang cannot be imported in .venv-sglang: rebuild it (rm -rf .venv-sglang && make install-sglang)" >&2
  exit 1
fi
"$PY" -m pytest -q --durations=15 -m sglang "$@"
rc=$?
if [ "$rc" -eq 5 ]; then
  echo "pytest collected no sglang tests: failing" >&2
  exit 1
fi
exit "$rc"
