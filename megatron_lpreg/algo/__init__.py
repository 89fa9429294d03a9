"""RL algorithms as pure tensor functions: advantages, Lp-Reg (reference + global) and the baselines.

The trainer calls :func:`megatron_lpreg.algo.registry.compute_policy_loss` and
:func:`megatron_lpreg.algo.registry.compute_advantages`; see docs/algorithms.md.
"""
