"""``python -m megatron_lpreg.gpucheck --section NAME ...``: one section in this process (internal; the runner
starts it). Use tools/gpu_check.py for the whole check."""
import sys

from megatron_lpreg.gpucheck.runner import section_main

sys.exit(section_main())
