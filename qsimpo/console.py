"""Who speaks, and how: the one "am I process 0" test and the one way a command prints progress.

Under torchrun / accelerate launch every process runs the same command on the same config, data
and run folder; process 0 speaks for all of them, so a message or a progress line appears once.
``RANK`` is the global rank torchrun and accelerate set (``LOCAL_RANK`` alone, without ``RANK``, is
a single-machine launch, where the two agree). Outside a launcher there is one process: process 0.
"""

from __future__ import annotations

import os
import sys


def rank() -> int:
    """This process's global rank (0 outside torchrun / accelerate launch)."""
    return int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", 0)))


def is_main() -> bool:
    """Whether this is process 0, the one that prints and writes the shared files."""
    return rank() == 0


def say(*parts, **kw) -> None:
    """Progress and results, on process 0 only (stdout); a command's ``log=`` defaults to this."""
    if is_main():
        print(*parts, **kw, flush=True)


def warn(*parts) -> None:
    """A notice that something was changed or skipped, on process 0 only (stderr)."""
    if is_main():
        print(*parts, file=sys.stderr, flush=True)
