"""The error every GGUF export raises when it cannot or must not go ahead."""

from __future__ import annotations

from qsimpo.errors import CheckFailed, QsimpoError


class GGUFError(QsimpoError, RuntimeError):
    """A GGUF export that cannot or must not go ahead; the message says what to do instead."""


class GGUFCheckFailed(GGUFError, CheckFailed):
    """A written GGUF file that, read back, does not answer like the merged model (exit 1: a check that failed)."""
