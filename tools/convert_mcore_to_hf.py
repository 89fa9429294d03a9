"""Export a megatron dist checkpoint (from convert_hf_to_mcore.py or a training run) as a Hugging Face directory.

    python tools/convert_mcore_to_hf.py --mcore /tmp/tiny-qwen3-mcore --out /tmp/tiny-qwen3-back

Streams: no model is built; two reader ranks (or every rank of a torchrun/srun launch) each read one full
tensor at a time from the checkpoint, whatever TP/PP it was written at, and write their share of safetensors
files. config.json and tokenizer files come from --hf-config,
else from the checkpoint's hf_assets/, else config.json is generated. Output is atomic and readable by
transformers. Exit code 2 on bad input (nothing is written).
"""
from __future__ import annotations

import argparse
import logging
import sys

from megatron_lpreg.models.convert import convert_mcore_to_hf


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mcore", required=True, help="dist checkpoint directory (has manifest.json)")
    parser.add_argument("--out", required=True, help="HF directory to create")
    parser.add_argument("--hf-config", default=None, help="take config.json and tokenizer files from this dir")
    parser.add_argument("--max-shard-gb", type=float, default=1.0, help="safetensors file size limit (GiB)")
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it exists (atomically)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        out = convert_mcore_to_hf(args.mcore, args.out, hf_config_dir=args.hf_config,
                                  overwrite=args.overwrite, max_shard_bytes=int(args.max_shard_gb * 2**30))
    except ValueError as exc:  # CheckpointError/ConfigError: missing or damaged checkpoint, bad layout
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
