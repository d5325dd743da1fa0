"""`python -m qsimpo ...` (what torchrun / accelerate launch -m run)."""

import sys

from qsimpo.cli import main

sys.exit(main())
