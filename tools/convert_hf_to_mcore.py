"""Convert a Hugging Face Qwen2/Qwen2.5/Qwen3 checkpoint into a megatron dist checkpoint (torch_dist).

    python tools/convert_hf_to_mcore.py --hf /tmp/tiny-qwen3 --out /tmp/tiny-qwen3-mcore --tp 2 --pp 2

Spawns tp*pp gloo ranks itself on CPU (two for TP1 PP1), or runs as one rank of an existing torchrun/srun
launch (a multiple of tp*pp ranks, at least 2). Streams: no model is built, each rank reads only its slices of
the HF tensors and the checkpoint is written one layer at a time. The output appears atomically (temp dir +
rename) with a manifest of checksums, and loads at any TP/PP. Exit code 2 on bad input (nothing is written).
"""
from __future__ import annotations

import argparse
import logging
import sys

from megatron_lpreg.models.convert import convert_hf_to_mcore


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hf", required=True, help="HF model directory (config.json + safetensors)")
    parser.add_argument("--out", required=True, help="dist checkpoint directory to create")
    parser.add_argument("--tp", type=int, default=1, help="tensor-parallel size to write at")
    parser.add_argument("--pp", type=int, default=1, help="pipeline-parallel size to write at")
    parser.add_argument("--first-stage-layers", type=int, default=0,
                        help="layers on the first pipeline stage (0 = automatic, even-as-possible)")
    parser.add_argument("--last-stage-layers", type=int, default=0,
                        help="layers on the last pipeline stage (0 = automatic, even-as-possible)")
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it exists (atomically)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        out = convert_hf_to_mcore(args.hf, args.out, tp=args.tp, pp=args.pp, overwrite=args.overwrite,
                                  first_stage_layers=args.first_stage_layers, last_stage_layers=args.last_stage_layers)
    except ValueError as exc:  # ConfigError/CheckpointError: bad layout, architecture, or input files
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {out} (tp={args.tp} pp={args.pp})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
