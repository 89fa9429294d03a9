import sys

from megatron_lpreg.cli import main

sys.exit(main())
