"""``megatron-lpreg plan CONFIG [dotted.overrides ...] --nodes N --gpus-per-node G``: print where every trainer
rank and rollout engine would run (the plan the Ray launcher uses), without starting anything."""
from __future__ import annotations

import argparse
import sys

from megatron_lpreg.config import ConfigError, RunConfig
from megatron_lpreg.rollout.placement import plan_placement


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="YAML config (e.g. configs/qwen2.5-32b_lpreg_64gpu.yaml)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. rollout.engine_tp=2")
    parser.add_argument("--nodes", type=int, required=True, help="nodes of the job")
    parser.add_argument("--gpus-per-node", type=int, required=True, help="GPUs on each node")
    parser.epilog = ("Prints 'role=trainer rank=<r> node=<i> gpus=<g>' per trainer rank and "
                     "'role=engine id=<e> node=<i> gpus=<g1,g2,...>' per launched engine (0-based ids); exits 2 "
                     "with the reason when the layout cannot be placed.")


def run(args: argparse.Namespace) -> int:
    try:
        cfg = RunConfig.load(args.config, args.overrides)
        plan = plan_placement(cfg.rollout, cfg.trainer.world_size, args.nodes, args.gpus_per_node)
    except (ConfigError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    sys.stdout.write("".join(line + "\n" for line in plan.lines()))
    print(f"# {plan.summary()}", file=sys.stderr)
    return 0
