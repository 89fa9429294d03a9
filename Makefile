# megatron_lpreg — the two commands: `make demo` and `make test` (each installs first).
PY ?= python3
VENV ?= .venv
VPY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cat setup.py | md5sum | cut -c1-12)
PYTEST_ARGS ?=

.PHONY: install demo test test-fast slurm-up slurm-down bench clean help

help:
	@echo "make demo   - install, then run the CPU demo (tiny Qwen, warm start, Lp-Reg RL at TP2 via Ray, eval)"
	@echo "make test   - install, then run the whole CPU test suite (incl. real local Slurm tests)"
	@echo "make bench  - run the benchmark scripts in benchmarks/"

$(STAMP): setup.py
	test -x $(VPY) || $(PY) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip
	# The local CPU torch wheel first: any torch range alone would pull a multi-GB CUDA build.
	$(VPY) -m pip install -q torch==2.13.0
	$(VPY) -m pip install -q -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(VPY) -m megatron_lpreg demo

test: install
	bash .ci/pytest.sh $(PYTEST_ARGS)

test-fast: install
	$(VPY) -m pytest -q -m "not slow and not slurm" $(PYTEST_ARGS)

slurm-up:
	bash slurm/dev/local-cluster.sh up

slurm-down:
	bash slurm/dev/local-cluster.sh down

bench: install
	$(VPY) benchmarks/vocab_parallel.py
	$(VPY) benchmarks/convert_memory.py
	$(VPY) benchmarks/onpolicy_step.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
