"""``megatron-lpreg`` console script (also ``python -m megatron_lpreg``).

Each subcommand lives in the module that owns it and exposes ``add_arguments(parser)`` and ``run(args) -> int``;
this file only parses and dispatches (modules are imported lazily so ``--help`` stays fast).
"""
from __future__ import annotations

import argparse
import importlib
import sys

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("megatron_lpreg.trainer.cli", "run RL training from a YAML config with dotted overrides"),
    "eval": ("megatron_lpreg.eval.cli", "evaluate a checkpoint on math benchmarks (AIME, MATH-500, ...)"),
    "sweep": ("megatron_lpreg.launch.cli_sweep", "submit a Slurm job array over a grid of overrides"),
    "eval-array": ("megatron_lpreg.launch.cli_eval_array", "submit a Slurm array over (checkpoint x benchmark)"),
    "demo": ("megatron_lpreg.demo", "CPU demo: tiny model, warm start, Lp-Reg RL on 2 DP ranks via Ray, eval"),
    "collect": ("megatron_lpreg.launch.cli_collect", "collect a sweep/eval array into one table + plots"),
    "plan": ("megatron_lpreg.launch.cli_plan", "print where trainer ranks and rollout engines run on N x G GPUs"),
    "prompt": ("megatron_lpreg.data.cli_prompt", "print the exact prompt text the trainer feeds for --problem TEXT"),
    "study": ("megatron_lpreg.study.cli", "the spark study (docs/study.md): stage0, warmstart + G1, rerun, report"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="megatron-lpreg",
        description="Lp-Reg reinforcement learning for LLMs on megatron-core. "
        "Configs are YAML files (configs/) plus dotted overrides such as algo.rho=0.01.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name, (module_name, help_text) in COMMANDS.items():
        sub_parser = sub.add_parser(name, help=help_text, description=help_text)
        sub_parser.set_defaults(_module=module_name)
        if name in _requested_commands():
            importlib.import_module(module_name).add_arguments(sub_parser)
    return parser


def _requested_commands() -> set[str]:
    return {arg for arg in sys.argv[1:] if arg in COMMANDS}


def main(argv: list[str] | None = None) -> int:
    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    args = build_parser().parse_args(argv)
    module = importlib.import_module(args._module)
    return int(module.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
