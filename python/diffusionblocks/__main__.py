"""`python -m diffusionblocks ...` is the `diffusionblocks` command."""

import sys

from .cli import main

sys.exit(main())
