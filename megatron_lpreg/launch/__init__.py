"""Slurm launching: sbatch command lines, Slurm job environment, job-array manifests (sweeps, eval arrays),
the in-job task runner and result collection. See docs/slurm.md."""
