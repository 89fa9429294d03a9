"""``megatron-lpreg collect DIR [DIR ...] [--out OUT]``: one table (summary.md, summary.csv) and plots
(curves.png, eval.png) from sweep directories, eval-array directories and run directories."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from megatron_lpreg.launch.report import write_report


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("dirs", nargs="+", metavar="DIR",
                        help="sweep / eval-array directories (array.json) or run directories (metrics.jsonl)")
    parser.add_argument("--out", default=None, help="where to write the table and plots (default: the first DIR)")


def run(args: argparse.Namespace) -> int:
    out = Path(args.out or args.dirs[0])
    try:
        table, written = write_report(args.dirs, out)
    except (ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(table, end="")
    for path in written:
        print(f"wrote {path}")
    return 0
