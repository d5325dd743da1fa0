"""The one error family every command raises for an expected failure, and cli.py prints.

An expected failure is something the user can fix: a bad config or data file, a missing adapter,
an output folder already used, a run stopped by a NaN or by a signal, a merge that does not verify.
Each is a ``QsimpoError`` whose message names the file, row or key, the problem and the fix; the
command line prints it as ``error: MESSAGE`` with the class's exit code and no traceback
(``--debug`` or ``QSIMPO_DEBUG=1`` shows the traceback too). Anything else is a bug and keeps its
traceback.

Exit codes follow one rule (docs/cli.md):

    0    done (a --dry-run that found nothing wrong included)
    1    a check that ran and failed: a plan that does not fit, a merge or GGUF file that does not
         verify, a training step that went non-finite (``CheckFailed``)
    2    anything the user typed or pointed at must change: arguments, config, data, paths, an
         output that is not ours to overwrite, a refused merge or push (every other ``QsimpoError``)
    130  interrupted (Ctrl-C / SIGTERM; ``Interrupted``)

Each subclass also derives from the builtin its callers caught before (ValueError, RuntimeError,
FileNotFoundError...), so ``except ValueError`` around library calls keeps working.
"""

from __future__ import annotations


class QsimpoError(Exception):
    """An expected failure: the message says what went wrong and what to do (exit 2: the user changes something)."""

    exit_code = 2


class CheckFailed(QsimpoError):
    """A check that ran to the end and failed (a merge that does not verify, a plan that does not fit)."""

    exit_code = 1


class UsageError(QsimpoError, ValueError):
    """Wrong arguments or configuration: the user must change what they typed."""

    exit_code = 2


class InputNotFound(QsimpoError, FileNotFoundError):
    """A file, folder, adapter or Hub id the command needs is not there."""

    exit_code = 2


class OutputExists(QsimpoError, FileExistsError):
    """The output folder already holds a result the command would overwrite."""

    exit_code = 2


class Interrupted(QsimpoError):
    """A run stopped by SIGINT/SIGTERM after saving what it reached (130: the shell's code for Ctrl-C)."""

    exit_code = 130
