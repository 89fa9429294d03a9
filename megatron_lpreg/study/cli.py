"""``megatron-lpreg study {stage0,warmstart,rerun,report}``: the study of docs/study.md.

- ``stage0 --out DIR``: the one-position simulation (CSV of every run, seed-paired effects, plot);
- ``warmstart --out DIR``: Task A's data split, the supervised warm start and Gate G1 (up to 3 attempts);
- ``rerun --out DIR [--seed S] [--steps N]``: GRPO against the best Lp-Reg arm on Task A (16 prompts x 8), ending
  with the line ``study-rerun: grpo spark_survival=<x> hard_acc=<y>; <arm> spark_survival=<x> hard_acc=<y>``;
- ``rhostar --warm DIR``: rho* of a warm start (the smallest rho of the grid whose selection regularises >= 50% of
  the spark tokens in negative samples of warm-start batches, no update);
- ``collect --sweep DIR``: a Task A sweep's runs as CSVs in docs/study/task_a/ (``study/arms.py``);
- ``report``: docs/study.md's tables and plots from the committed CSVs in docs/study/.
"""
from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

logger = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="study_command", metavar="STEP")
    sub.required = True
    stage0 = sub.add_parser("stage0", help="one-position simulation with the project's losses (seconds to minutes)")
    stage0.add_argument("--out", required=True, help="directory for stage0_runs.csv, stage0_effects.csv, stage0.png")
    stage0.add_argument("--seeds", type=int, default=20, help="seeds per setup (paired across arms)")
    stage0.add_argument("--steps", type=int, default=60, help="RL steps per simulated run")
    warm = sub.add_parser("warmstart", help="Task A data, warm start and Gate G1 (CPU, minutes)")
    warm.add_argument("--out", required=True, help="directory for the data, the warm-started model and g1.csv")
    warm.add_argument("--attempts", type=int, default=3, help="warm-start attempts before giving up (max 3)")
    warm.add_argument("--seed", type=int, default=1, help="seed of the first attempt (attempt i uses seed + i)")
    warm.add_argument("--max-steps", type=int, default=3000, help="supervised steps per attempt at most")
    warm.add_argument("--tail-mass", type=float, default=0.2, help="noise mass of the mix (controls: 0.02, 0.4)")
    warm.add_argument("--spark-continuation", type=float, default=0.0,
                      help="share of rows that are scratchpads with no loss on the spark token (trains the skill)")
    warm.add_argument("--check-every", type=int, default=100, help="steps between stop-rule checks")
    warm.add_argument("--direct-max-carries", type=int, default=None,
                      help="show direct answers only on problems with at most this many carries (default: all)")
    warm.add_argument("--stop-spark-easy", type=float, default=0.0,
                      help="also require dev forced-spark accuracy on easy >= this before stopping (0: off)")
    warm.add_argument("--resample-direct", action="store_true",
                      help="with --direct-max-carries: give direct rows a carry-free problem instead of training only "
                           "their first token (attempt 2; makes the strategy depend on the carries)")
    warm.add_argument("--stop-on-dev-gate", action="store_true",
                      help="stop at the first check where Gate G1 holds on the dev set (replaces the stop rule)")
    warm.add_argument("--beyond-protocol", action="store_true",
                      help="allow attempts past the protocol's 3; they are marked protocol=False (exploratory)")
    warm.add_argument("--first-attempt", type=int, default=0, help="number of the first attempt (keeps earlier rows)")
    rerun = sub.add_parser("rerun", help="reduced rerun: GRPO vs the best Lp-Reg arm on Task A")
    rerun.add_argument("--out", required=True, help="output directory (warm start is made there if missing)")
    rerun.add_argument("--seed", type=int, default=1, help="RL seed (both arms, paired)")
    rerun.add_argument("--steps", type=int, default=200, help="RL steps per arm")
    rho = sub.add_parser("rhostar", help="measure rho* on a warm start (no update) and append it to a CSV")
    rho.add_argument("--warm", required=True, help="the warm-started model directory")
    rho.add_argument("--seed", type=int, default=1, help="seed of the warm-start batches")
    rho.add_argument("--out", default=None, help="CSV to append the measurement to (default: none)")
    collect = sub.add_parser("collect", help="copy a Task A sweep's per-run metrics into docs/study/task_a/ (rerun "
                                             "as runs finish; then `study report`)")
    collect.add_argument("--sweep", required=True, action="append",
                         help="a sweep directory (megatron-lpreg sweep --out); repeat it: a later sweep's run of the "
                              "same arm and seed replaces an earlier one")
    collect.add_argument("--results", default=None, help="CSV directory (default docs/study)")
    collect.add_argument("--mechanism", action="store_true",
                         help="the mechanism sweep (off-policy, kappa 0.1): into docs/study/task_a_mechanism/")
    report = sub.add_parser("report", help="regenerate docs/study.md's tables and plots from docs/study/*.csv")
    report.add_argument("--results", default=None, help="CSV directory (default docs/study)")
    report.add_argument("--doc", default=None, help="the study document (default docs/study.md)")


def run(args: argparse.Namespace) -> int:
    from megatron_lpreg import telemetry

    telemetry.setup(0, 1)
    commands = {"stage0": _stage0, "warmstart": _warmstart, "rerun": _rerun, "rhostar": _rhostar,
                "collect": _collect, "report": _report}
    return commands[args.study_command](args)


def _stage0(args: argparse.Namespace) -> int:
    import torch

    from megatron_lpreg.study.report import plot_stage0
    from megatron_lpreg.study.stage0 import Stage0Grid, effect_rows, simulate
    from megatron_lpreg.study.tables import write_csv

    if args.seeds < 1 or args.steps < 1:
        raise SystemExit(f"--seeds={args.seeds} and --steps={args.steps} must be >= 1")
    torch.set_num_threads(1)  # a 512-token softmax gains nothing from threads; 2-3 ms of CPU per step on one
    out = Path(args.out)
    t0 = time.perf_counter()
    setups = Stage0Grid(seeds=args.seeds, steps=args.steps).setups()
    results = []
    for index, setup in enumerate(setups):
        results.append(simulate(setup))
        if index % 50 == 0:
            logger.info("stage0: %d/%d runs (%.0f s)", index + 1, len(setups), time.perf_counter() - t0)
    write_csv([r.row() for r in results], out / "stage0_runs.csv")
    effects = effect_rows(results)
    write_csv(effects, out / "stage0_effects.csv")
    plot_stage0(effects, out / "stage0.png")
    print(f"stage0: {len(results)} runs, {len(effects)} seed-paired effects in {out} "
          f"({time.perf_counter() - t0:.0f} s)")
    return 0


def _warmstart(args: argparse.Namespace) -> int:
    from megatron_lpreg.study.warmstart import warm_start_with_gate

    passed = warm_start_with_gate(Path(args.out), attempts=args.attempts, seed=args.seed, max_steps=args.max_steps,
                                  tail_mass=args.tail_mass, continuation_share=args.spark_continuation,
                                  check_every=args.check_every, first_attempt=args.first_attempt,
                                  direct_max_carries=args.direct_max_carries, stop_easy_spark=args.stop_spark_easy,
                                  stop_on_dev_gate=args.stop_on_dev_gate, beyond_protocol=args.beyond_protocol,
                                  resample_direct=args.resample_direct)
    return 0 if passed else 1


def _rerun(args: argparse.Namespace) -> int:
    from megatron_lpreg.study.rerun import rerun

    print(rerun(Path(args.out), seed=args.seed, steps=args.steps))
    return 0


def _rhostar(args: argparse.Namespace) -> int:
    from megatron_lpreg.study.rerun import rho_star_row

    row = rho_star_row(Path(args.warm), seed=args.seed, out=Path(args.out) if args.out else None)
    print("study rho*: " + " ".join(f"{k}={v}" for k, v in row.items()))
    return 0


def _collect(args: argparse.Namespace) -> int:
    from megatron_lpreg.study.arms import MECHANISM_DIR, RUNS_DIR, collect
    from megatron_lpreg.study.report import RESULTS_DIR

    dest = (Path(args.results) if args.results else RESULTS_DIR) / (MECHANISM_DIR if args.mechanism else RUNS_DIR)
    index = collect([Path(p) for p in args.sweep], dest)
    done = sum(bool(r["complete"]) for r in index)
    print(f"study collect: {len(index)} runs ({done} complete) -> {dest}")
    return 0


def _report(args: argparse.Namespace) -> int:
    from megatron_lpreg.study.report import RESULTS_DIR, STUDY_DOC, regenerate

    for line in regenerate(Path(args.results) if args.results else RESULTS_DIR,
                           Path(args.doc) if args.doc else STUDY_DOC):
        print(f"study report: {line}")
    return 0
