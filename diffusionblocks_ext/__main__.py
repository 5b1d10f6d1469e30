"""`python -m diffusionblocks_ext [--json]`: the build report (build_report.py)."""

import sys

from .build_report import main

sys.exit(main())
