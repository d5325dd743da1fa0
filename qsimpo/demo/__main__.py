"""`python -m qsimpo.demo [flags]`: the same as `qsimpo demo [flags]`."""

import sys

from qsimpo.cli import main

sys.exit(main(["demo", *sys.argv[1:]]))
