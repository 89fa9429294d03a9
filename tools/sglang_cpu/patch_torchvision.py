"""Make ``import torchvision`` work on CPU torch when torchvision's C extension cannot load (``make install-sglang``).

The torchvision 0.28.0 wheel on PyPI is built against CUDA torch; on torch 2.13.0+cpu its ``_C`` extension does not
load (no libtorch_cuda.so), ``torchvision.extension._has_ops()`` is False and no ``torchvision::*`` op exists. Its
``_meta_registrations.py`` guards the ``register_meta`` ops on ``_has_ops()`` but registers fake kernels for
``torchvision::nms`` and ``torchvision::qnms`` unconditionally, so the import fails with "operator torchvision::nms
does not exist". SGLang imports torchvision at start (``sglang/srt/configs/deepseek_ocr.py``). This puts the same
guard on those two registrations; the pure-Python parts SGLang uses (transforms) are untouched.

    python tools/sglang_cpu/patch_torchvision.py      # with the venv's python; idempotent, fails loudly
"""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

EXPECTED_VERSION = "0.28.0"
OLD = '@torch.library.register_fake("torchvision::{op}")'
NEW = '@_register_fake_if_ops("torchvision::{op}")  # patched by megatron_lpreg tools/sglang_cpu'
HELPER = '''

def _register_fake_if_ops(qualname):  # patched by megatron_lpreg tools/sglang_cpu: no _C ops on CPU torch
    if torchvision.extension._has_ops():
        return torch.library.register_fake(qualname)
    return lambda fn: fn
'''
ANCHOR = "    return wrapper\n"


def main() -> int:
    from importlib import metadata

    version = metadata.version("torchvision").split("+")[0]
    if version != EXPECTED_VERSION:
        sys.exit(f"patch_torchvision: torchvision {version} installed, this patch is for {EXPECTED_VERSION}")
    spec = importlib.util.find_spec("torchvision")
    path = Path(spec.origin).parent / "_meta_registrations.py"
    text = path.read_text()
    if "_register_fake_if_ops" in text:
        print(f"patch_torchvision: {path} already patched")
        return 0
    olds = [OLD.format(op=op) for op in ("nms", "qnms")]
    if text.count(ANCHOR) != 1 or any(text.count(old) != 1 for old in olds):
        sys.exit(f"patch_torchvision: {path} does not look like torchvision {EXPECTED_VERSION}'s; not patched")
    text = text.replace(ANCHOR, ANCHOR + HELPER, 1)
    for op, old in zip(("nms", "qnms"), olds):
        text = text.replace(old, NEW.format(op=op))
    path.write_text(text)
    print(f"patch_torchvision: guarded the nms/qnms fake registrations in {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
