"""Compare transformers and our megatron-core model on one token batch at a given TP/PP (spawns the ranks itself).

    python tools/check_parity.py --hf /tmp/tiny-qwen3 --tp 2 --pp 2
    python tools/check_parity.py --hf /tmp/tiny-qwen3 --mcore /tmp/tiny-qwen3-mcore --tp 1 --pp 2

The last line printed is ``parity: max_abs_logit_diff=<x> max_abs_logprob_diff=<y>``; the exit code is 1 when
either exceeds the tolerance (default 1e-4 for float32), 2 on bad input.
"""
from __future__ import annotations

import argparse
import logging
import sys

from megatron_lpreg.models.parity import check_parity


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hf", required=True, help="HF model directory (the reference)")
    parser.add_argument("--mcore", default=None, help="megatron dist checkpoint to load instead of the HF weights")
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--pp", type=int, default=1)
    parser.add_argument("--vpp", type=int, default=1)
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tol", type=float, default=None, help="default: 1e-4 (float32), 0.25 (bfloat16)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        result = check_parity(args.hf, mcore_dir=args.mcore, tp=args.tp, pp=args.pp, vpp=args.vpp, dtype=args.dtype,
                              batch=args.batch, seq_len=args.seq_len, seed=args.seed, tolerance=args.tol)
    except ValueError as exc:  # ConfigError is a ValueError: bad layout, unsupported architecture, bad paths
        print(f"error: {exc}", file=sys.stderr)
        return 2
    status = "OK" if result.ok else f"FAIL (tolerance {result.tolerance:g})"
    print(f"{args.hf} vs megatron tp={args.tp} pp={args.pp} vpp={args.vpp} {args.dtype}, {result.tokens} tokens: "
          f"{status}")
    print(result.line())
    return 0 if result.ok else 1


if __name__ == "__main__":
    sys.exit(main())
