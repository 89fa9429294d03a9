#!/usr/bin/env python
"""Plot metric curves of one or more run directories into a PNG.

    python tools/plot_metrics.py runs/lpreg runs/grpo --out compare.png [--keys reward/mean,entropy/mean]
"""
from __future__ import annotations

import argparse
import sys

from megatron_lpreg.plotting import DEFAULT_KEYS, plot_runs


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dirs", nargs="+", help="run directories (each with metrics.jsonl)")
    parser.add_argument("--out", default=None, help="PNG path (default: <first run>/metrics.png)")
    parser.add_argument("--keys", default=",".join(DEFAULT_KEYS), help="comma-separated metric names")
    parser.add_argument("--smooth", type=int, default=1, help="moving-average window (steps)")
    args = parser.parse_args()
    out = args.out or f"{args.run_dirs[0].rstrip('/')}/metrics.png"
    try:
        path = plot_runs(args.run_dirs, out, keys=args.keys.split(","), smooth=args.smooth)
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"plot: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
