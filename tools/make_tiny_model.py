"""Write a tiny random Hugging Face Qwen2/Qwen3 checkpoint (offline, deterministic, seconds).

    python tools/make_tiny_model.py --arch qwen3 --out /tmp/tiny-qwen3 --seed 0 --vocab-size 1000 --layers 2
"""
from __future__ import annotations

import argparse

from megatron_lpreg.models.families import FAMILIES
from megatron_lpreg.models.tiny import make_tiny_model


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", choices=sorted(FAMILIES), default="qwen2")
    parser.add_argument("--out", required=True, help="output directory (written atomically)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--vocab-size", type=int, default=1000, help="embedding rows (need not be a multiple of 128)")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--head-dim", type=int, default=None,
                        help="default: hidden/heads (qwen2), 2*hidden/heads (qwen3)")
    parser.add_argument("--ffn", type=int, default=128)
    parser.add_argument("--tie", choices=["auto", "yes", "no"], default="auto", help="auto: qwen3 tied, qwen2 untied")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--shards", type=int, default=1, help="number of safetensors files (index written if > 1)")
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args(argv)
    out = make_tiny_model(
        args.out, args.arch, seed=args.seed, vocab_size=args.vocab_size, num_layers=args.layers,
        hidden_size=args.hidden, num_attention_heads=args.heads, num_kv_heads=args.kv_heads, head_dim=args.head_dim,
        ffn_hidden_size=args.ffn, tie_word_embeddings={"auto": None, "yes": True, "no": False}[args.tie],
        dtype=args.dtype, num_shards=args.shards, overwrite=args.overwrite,
    )
    print(f"tiny {args.arch} model written to {out}")


if __name__ == "__main__":
    main()
