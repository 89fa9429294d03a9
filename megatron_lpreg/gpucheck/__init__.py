"""One-command readiness check of a single-GPU node (``tools/gpu_check.py``; CPU rehearsal with ``--device cpu``).

Sections: ``op_parity`` and ``op_speed`` (:mod:`.ops`), ``model_parity`` (:mod:`.model`), ``train_steps``
(:mod:`.train`); :mod:`.runner` runs each in its own process and :mod:`.report` writes ``report.json`` and
``report.md``. :mod:`.wheelhouse` builds the offline wheel set for a node that has Python 3.12 and torch but no
network (``make gpu-wheelhouse``).
"""
from megatron_lpreg.gpucheck.report import SECTION_NAMES, write_report
from megatron_lpreg.gpucheck.runner import run_checks

__all__ = ["SECTION_NAMES", "run_checks", "write_report"]
