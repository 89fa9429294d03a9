"""Process groups and launch: ``bootstrap`` (init_parallel -> ParallelContext), ``cpu`` (the megatron-core CPU
shim, installed by bootstrap only when CUDA is absent) and ``spawn`` (fork gloo ranks for tests/benchmarks).
Import the submodules directly; this package import stays light (no megatron import)."""
