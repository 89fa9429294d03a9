"""One-command check of a single-GPU node: fused op parity and speed, HF vs megatron logits, 3 Lp-Reg steps.

    python tools/gpu_check.py --out gpu_check            # CUDA when available
    python tools/gpu_check.py --device cpu --out DIR     # CPU rehearsal of every section

    python tools/gpu_check.py --sections rollout --out DIR   # opt-in: trainer rank + real SGLang server on one GPU

Writes DIR/report.json (sections op_parity, op_speed, model_parity, train_steps, each with "status") and
DIR/report.md, plus DIR/logs/<section>.log. Exit code 0 when every section is ok, 1 otherwise, 2 on bad input.
On a node without network see docs/benchmarks.md ("GPU check") for the offline wheelhouse (make gpu-wheelhouse).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from megatron_lpreg import telemetry
from megatron_lpreg.gpucheck.report import ALL_SECTIONS, SECTION_NAMES
from megatron_lpreg.gpucheck.runner import DEFAULT_SECTION_TIMEOUT_S, run_checks

REPO = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="report directory")
    parser.add_argument("--device", choices=["cuda", "cpu"], default=None, help="default: cuda when available")
    parser.add_argument("--config", default=str(REPO / "configs" / "tiny_cpu.yaml"), help="train_steps config")
    parser.add_argument("--sections", nargs="+", choices=ALL_SECTIONS, default=list(SECTION_NAMES),
                        help="default: all but rollout (it needs SGLang installed)")
    parser.add_argument("--skip", nargs="+", choices=ALL_SECTIONS, default=[], help="report these as skipped")
    parser.add_argument("--timeout", type=float, default=DEFAULT_SECTION_TIMEOUT_S, help="seconds per section")
    args = parser.parse_args(argv)
    telemetry.setup(0, 1)
    try:
        report = run_checks(args.out, device=args.device, config=args.config, sections=args.sections,
                            timeout_s=args.timeout, skip=args.skip)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for name in args.sections:
        section = report[name]
        print(f"{name:13s} {section['status']:7s} {section.get('error') or section.get('reason') or ''}"[:300])
    print(f"report: {Path(args.out) / 'report.md'} ({'all ok' if report['ok'] else 'NOT all ok'})")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
