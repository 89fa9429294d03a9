"""Build the offline wheelhouse for a GPU node with Python 3.12 + torch and no network (``make gpu-wheelhouse``).

    python tools/gpu_wheelhouse.py --out wheelhouse

Prints each wheel and the total size (must stay <= 64 MiB); exit code 1 when pip fails or the limit is exceeded.
On the node: python3 -m pip install --no-index --no-deps --find-links wheelhouse -r wheelhouse/requirements-gpu.txt
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from megatron_lpreg.gpucheck.wheelhouse import build_wheelhouse

REPO = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(REPO / "wheelhouse"), help="output directory (emptied first)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        house = build_wheelhouse(args.out, REPO)
    except (RuntimeError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(house.describe())
    return 0


if __name__ == "__main__":
    sys.exit(main())
