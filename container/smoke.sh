#!/usr/bin/env bash
# Smoke test of the CPU image inside the image (`make image` runs it after container/build-cpu.sh): the package and
# its heavy dependencies import, the CLI answers, and a few fast test files pass, run by the image's own Python from
# the image's copy of the repository (/opt/megatron_lpreg). Prints the time each part took.
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
IMAGE=${MLPREG_IMAGE:-localhost/megatron-lpreg:cpu}
export CONTAINERS_CONF=${CONTAINERS_CONF:-$REPO/container/containers.conf}
TESTS=${MLPREG_SMOKE_TESTS:-tests/launch/test_slurm.py tests/test_layering.py tests/container}

t0=$SECONDS
podman run --rm --network=none \
  -e RAY_AUTH_MODE=disabled -e HF_HUB_OFFLINE=1 -e TRANSFORMERS_OFFLINE=1 -e TOKENIZERS_PARALLELISM=false \
  "$IMAGE" bash -c '
set -euo pipefail
t=$SECONDS
python -c "import megatron_lpreg, megatron.core, torch, ray, transformers; print(\"import ok: torch\", torch.__version__, \"ray\", ray.__version__, \"megatron-core\", megatron.core.__version__)"
megatron-lpreg --help | head -n 3
test "$(command -v python)" = /opt/venv/bin/python
echo "imports and CLI: $((SECONDS - t)) s"
python -m pytest -q -p no:cacheprovider '"$TESTS"'
'
echo "smoke: image $IMAGE passed in $((SECONDS - t0)) s"
