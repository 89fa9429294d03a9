"""Check a freshly built .venv-sglang (last step of ``make install-sglang``); exit 1 with the reason otherwise.

1. ``pip check`` reports nothing but sglang's own CUDA-only requirements (flashinfer, sglang-kernel, torch==2.14.1,
   ...), so every other package, the project's setup.py pins included, is consistent with requirements/sglang-cpu.txt.
2. SGLang's HTTP server imports with ``SGLANG_USE_CPU_ENGINE=1`` on CPU torch, next to the sgl_kernel shim, the
   patched torchvision and megatron_lpreg.
"""
from __future__ import annotations

import os
import subprocess
import sys

SGLANG_VERSION = "0.5.23"


def main() -> int:
    check = subprocess.run([sys.executable, "-m", "pip", "check"], capture_output=True, text=True)
    other = [line for line in check.stdout.splitlines()
             if line.strip() and not line.startswith(f"sglang {SGLANG_VERSION} ")]
    if other:
        print("check_venv: pip check found conflicts outside sglang's CUDA-only requirements "
              "(update requirements/sglang-cpu.txt):\n  " + "\n  ".join(other), file=sys.stderr)
        return 1
    os.environ["SGLANG_USE_CPU_ENGINE"] = "1"
    import sgl_kernel
    import sglang
    import sglang.srt.entrypoints.http_server  # noqa: F401 (the server's import chain, torchvision included)
    import torch
    import torchvision

    import megatron_lpreg  # noqa: F401

    if not getattr(sgl_kernel, "IS_SHIM", False) or torch.version.cuda is not None:
        print(f"check_venv: expected the sgl_kernel shim on CPU torch, got {sgl_kernel.__file__}, torch "
              f"{torch.__version__}", file=sys.stderr)
        return 1
    print(f"check_venv: ok: sglang {sglang.__version__}, torch {torch.__version__}, torchvision "
          f"{torchvision.__version__} (no C ops), sgl_kernel shim; pip check: only sglang's CUDA-only requirements")
    return 0


if __name__ == "__main__":
    sys.exit(main())
