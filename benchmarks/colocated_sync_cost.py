"""Bytes moved and modelled time of one colocated tensor weight sync for a config (megatron_lpreg.rollout.sync_cost).

    python benchmarks/colocated_sync_cost.py configs/qwen2.5-32b_lpreg_64gpu.yaml --gpus-per-node 8
    python benchmarks/colocated_sync_cost.py CONFIG --gpus-per-node 8 --nvlink-gbps 360 --internode-gbps 45

Prints the model's bytes per stage, what one GPU receives over NVLink and between nodes, and the modelled time,
with the bandwidths used (defaults: H100 NVLink 450 GB/s per direction, one 400 Gb/s NIC per GPU).
"""
from __future__ import annotations

import argparse

from megatron_lpreg.config import RunConfig
from megatron_lpreg.rollout.sync_cost import INTERNODE_GBPS, NVLINK_GBPS, colocated_sync_cost


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config")
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--gpus-per-node", type=int, default=8)
    parser.add_argument("--nvlink-gbps", type=float, default=NVLINK_GBPS)
    parser.add_argument("--internode-gbps", type=float, default=INTERNODE_GBPS)
    args = parser.parse_args()
    cfg = RunConfig.load(args.config, args.overrides)
    cost = colocated_sync_cost(cfg.model, cfg.parallel, cfg.trainer.world_size, args.gpus_per_node,
                               nvlink_gbps=args.nvlink_gbps, internode_gbps=args.internode_gbps)
    print(f"{args.config}: TP{cfg.parallel.tp} x PP{cfg.parallel.pp} x {cfg.trainer.world_size} ranks on "
          f"{cfg.trainer.world_size // args.gpus_per_node} nodes x {args.gpus_per_node} GPUs, "
          f"{cfg.model.params_dtype}")
    for line in cost.lines():
        print(line)


if __name__ == "__main__":
    main()
