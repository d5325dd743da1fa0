"""Scorers to copy for `qsimpo pairs --scorer`: plain functions, no model needed.

    qsimpo pairs prompts.jsonl --model M --scorer qsimpo.pairs.examples:concise_complete --out pairs.jsonl

Copy this file, change the rule, and pass ``--scorer my_scorers.py:concise_complete``. A scorer takes
the prompt's chat messages and one answer and returns a number, higher for better answers; one with
the attribute ``batched = True`` takes lists of both and returns a list (see ``concise_complete_batch``).
"""

from __future__ import annotations

import re

WORD_LIMIT = 60  # words an answer may use before each further word costs a little
_SENTENCE_END = re.compile(r"""[.!?…]["')\]»”’]*$|```$""")  # a full stop, maybe closed by a quote or bracket; or a code block


def concise_complete(prompt: list[dict], response: str) -> float:
    """A concise, complete answer: +1 if it ends with a full sentence, minus 0.02 per word beyond WORD_LIMIT.

    Two habits the rule teaches: finish the sentence (an answer cut at the token limit ends mid-phrase
    and loses the point), and stop once the question is answered (the score falls with every word
    past the limit, so of two complete answers the shorter wins). An empty answer scores -1.
    """
    text = response.strip()
    if not text:
        return -1.0
    complete = 1.0 if _SENTENCE_END.search(text) else 0.0
    return complete - 0.02 * max(0, len(text.split()) - WORD_LIMIT)


def concise_complete_batch(prompts: list[list[dict]], responses: list[str]) -> list[float]:
    """The batch form of ``concise_complete``: one call per batch of answers (a model-backed scorer would batch here)."""
    return [concise_complete(p, r) for p, r in zip(prompts, responses)]


concise_complete_batch.batched = True
