"""The error every GGUF export raises when it cannot or must not go ahead."""

from __future__ import annotations

from qsimpo.errors import QsimpoError


class GGUFError(QsimpoError, RuntimeError):
    """A GGUF export that cannot or must not go ahead; the message says what to do instead."""
