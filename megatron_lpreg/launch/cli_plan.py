"""``megatron-lpreg plan CONFIG [dotted.overrides ...] --nodes N --gpus-per-node G``: print where every trainer
rank and rollout engine would run (the plan the Ray launcher uses), without starting anything.

Refused before submission (exit 2, naming the keys): ``trainer.world_size`` that is not ``tp x pp x dp`` (the
config loader), a layout that does not fit the GPUs (:func:`~megatron_lpreg.rollout.placement.plan_placement`),
and nodes the layout leaves idle (:func:`check_nodes_match`). Also prints, on stderr, the bytes of one checkpoint
(:mod:`megatron_lpreg.models.footprint`)."""
from __future__ import annotations

import argparse
import sys

from megatron_lpreg.config import ConfigError, RunConfig
from megatron_lpreg.eval.layout import plan_eval_layout
from megatron_lpreg.models.footprint import checkpoint_size
from megatron_lpreg.rollout.placement import PlacementError, PlacementPlan, plan_placement


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="YAML config (e.g. configs/qwen2.5-32b_lpreg_64gpu.yaml)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. rollout.engine_tp=2")
    parser.add_argument("--nodes", type=int, required=True, help="nodes of the job")
    parser.add_argument("--gpus-per-node", type=int, required=True, help="GPUs on each node")
    parser.add_argument("--eval", action="store_true",
                        help="print the layout of one eval / eval-array task instead: eval.num_engines engines of "
                             "eval.engine_tp GPUs on one node of --gpus-per-node GPUs (refused when they do not fit)")
    parser.epilog = ("Prints 'role=trainer rank=<r> node=<i> gpus=<g>' per trainer rank and "
                     "'role=engine id=<e> node=<i> gpus=<g1,g2,...>' per launched engine (0-based ids), then "
                     "'role=sync engine=<e> mode=<tensor|distributed> ranks=<r1,...>' per engine (tensor: the "
                     "trainer rank on each engine TP rank's GPU, in TP order; distributed: the source rank); "
                     "exits 2 with the reason when the layout cannot be placed or synced.")


def check_nodes_match(plan: PlacementPlan, world_size: int) -> None:
    """Every node of the job runs a trainer rank or an engine (a node left idle is a node too many).

    Raises:
        PlacementError: naming --nodes, trainer.world_size and the node count that fits.
    """
    used = {t.node for t in plan.trainers} | {e.node for e in plan.engines}
    idle = [n for n in range(plan.nodes) if n not in used]
    if idle:
        raise PlacementError(
            f"--nodes={plan.nodes}: node(s) {idle} would run nothing (trainer.world_size={world_size} and "
            f"{len(plan.engines)} engine(s) fill {len(used)} node(s) of {plan.gpus_per_node} GPUs); submit with "
            f"--nodes={len(used)}, or raise trainer.world_size (and parallel.dp) to use them")


def run(args: argparse.Namespace) -> int:
    try:
        cfg = RunConfig.load(args.config, args.overrides)
        eval_layout = plan_eval_layout(cfg.eval, cfg.rollout, args.gpus_per_node)  # one node per eval task
        if args.eval:
            sys.stdout.write("".join(line + "\n" for line in eval_layout.lines()))
            print(f"# {eval_layout.summary()}", file=sys.stderr)
            return 0
        plan = plan_placement(cfg.rollout, cfg.trainer.world_size, args.nodes, args.gpus_per_node)
        check_nodes_match(plan, cfg.trainer.world_size)
    except (ConfigError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    sys.stdout.write("".join(line + "\n" for line in plan.lines()))
    print(f"# {plan.summary()}", file=sys.stderr)
    print(f"# {eval_layout.summary()} per eval-array task (`--eval` prints it)", file=sys.stderr)
    print(f"# {checkpoint_size(cfg.model, cfg.parallel, cfg.checkpoint).line()}", file=sys.stderr)
    return 0
