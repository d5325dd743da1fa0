"""Scorers to copy for `qsimpo pairs --scorer` and `qsimpo eval --scorer`: plain functions, no model needed.

    qsimpo pairs prompts.jsonl --model M --scorer qsimpo.pairs.examples:follows_instructions --out pairs.jsonl
    qsimpo pairs prompts.jsonl --model M --scorer qsimpo.pairs.examples:concise_complete --out pairs.jsonl

Copy this file, change the rules, and pass ``--scorer my_scorers.py:follows_instructions``. A scorer takes
the prompt's chat messages and one answer and returns a number, higher for better answers; one with
the attribute ``batched = True`` takes lists of both and returns a list (see ``concise_complete_batch``).

``follows_instructions`` is a verifiable instruction-following judge in the manner of IFEval: the
prompts carry instructions a rule can check ("Answer in at most 25 words.", "Do not use any
commas."), INSTRUCTIONS says how each is phrased and checked, and the score is the fraction the
answer follows. ``concise_complete`` prefers a finished answer of at most 60 words.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

from qsimpo.errors import UsageError

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


# --- verifiable instructions -------------------------------------------------------------------------------------

CUT_PENALTY = 0.25  # taken off an answer that stops mid-sentence (cut at the token limit, most likely)
OFF_TOPIC_PENALTY = 0.5  # taken off an answer that uses none of the question's words ("I can help you with that.")
MIN_WORDS = 3  # an answer of fewer words does not answer an everyday question: it scores as an empty one
# Words of four letters or more that carry no topic in a question ("What are some good ways to ...").
_COMMON = frozenset("""what when where which while with without your yours that this these those there their them they
have does doing should would could some good best ways about into from more most make like just also very than then keep
things tips help other each every easy simple quick better someone something anything properly really""".split())
_WORD = re.compile(r"[^\W_]+(?:['’-][^\W_]+)*")  # a word: letters or digits, with inner apostrophes or hyphens
_QUOTE = "\"“”"


def words(text: str) -> list[str]:
    """The words of ``text`` as every word-counting rule here counts them (punctuation and list dashes are not words)."""
    return _WORD.findall(text)


def _bullets(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.lstrip().startswith("- ")]


def _has_word(text: str, word: str) -> bool:
    return re.search(rf"(?<![^\W_]){re.escape(word)}(?![^\W_])", text, re.IGNORECASE) is not None


def _first_word(text: str) -> str:
    found = words(text)
    return found[0] if found else ""


def _last_word(text: str) -> str:
    found = words(text)
    return found[-1] if found else ""


@dataclass(frozen=True)
class Instruction:
    """One checkable instruction: how prompts state it, how it is found in a prompt, how an answer is checked.

    ``template`` states it with ``{}`` for its parameter (no parameter: no ``{}``); ``values`` are the
    parameters a prompt generator may draw; ``pattern`` finds it in the user's message (case ignored)
    and its one group, if any, is the parameter given to ``check(answer, parameter)``.
    """

    name: str
    template: str
    pattern: str
    check: Callable[[str, str | None], bool]
    values: tuple = ()

    def phrase(self, value=None) -> str:
        """The instruction as a prompt states it, e.g. ``max_words.phrase(25)`` -> 'Answer in at most 25 words.'."""
        return self.template.format(value) if self.values else self.template

    def find(self, text: str) -> re.Match | None:
        return re.search(self.pattern, text, re.IGNORECASE)


INSTRUCTIONS = (
    Instruction("max_words", "Answer in at most {} words.", r"\banswer in at most (\d+) words\b",
                lambda a, n: len(words(a)) <= int(n), (15, 20, 25, 30)),
    Instruction("bullets", "Answer with exactly {} bullet points starting with '- '.",
                r"\banswer with exactly (\d+) bullet points?\b",
                lambda a, n: len(_bullets(a)) == int(n), (2, 3, 4)),
    Instruction("end_word", "End your answer with the word {}.", r"\bend your answer with the word ['\"“]?([^\W_]+)",
                lambda a, w: _last_word(a).lower() == w.lower(), ("Done", "Thanks", "Enjoy")),
    Instruction("start_word", "Start your answer with the word {}.",
                r"\bstart your answer with the word ['\"“]?([^\W_]+)",
                lambda a, w: _first_word(a).lower() == w.lower(), ("Sure", "Well", "Yes")),
    Instruction("lowercase", "Write your answer in lowercase letters only.",
                r"\bwrite your answer in lowercase letters only\b",
                lambda a, _: a == a.lower() and any(c.isalpha() for c in a)),
    Instruction("include_word", "Include the word '{}'.", r"\binclude the word ['\"‘“]([^\W_]+)['\"’”]",
                lambda a, w: _has_word(a, w), ("because", "simple", "important", "example")),
    Instruction("exclude_word", "Do not use the word '{}'.", r"\bdo not use the word ['\"‘“]([^\W_]+)['\"’”]",
                lambda a, w: not _has_word(a, w), ("the", "and", "very")),
    Instruction("no_commas", "Do not use any commas.", r"\bdo not use any commas\b", lambda a, _: "," not in a),
    Instruction("quoted", "Wrap your whole answer in double quotation marks.",
                r"\bwrap your whole answer in double quotation marks\b",
                lambda a, _: len(a) > 1 and a[0] in _QUOTE and a[-1] in _QUOTE),
)
BY_NAME = {i.name: i for i in INSTRUCTIONS}
CONFLICTS = {frozenset({"bullets", "quoted"})}  # pairs no prompt should ask for together


def find_instructions(text: str) -> list[tuple[Instruction, str | None]]:
    """The instructions ``text`` carries, as (instruction, parameter), in INSTRUCTIONS' order."""
    found = []
    for instruction in INSTRUCTIONS:
        match = instruction.find(text)
        if match:
            found.append((instruction, match.group(1) if match.groups() else None))
    return found


def _last_user(prompt: list[dict]) -> str:
    users = [m for m in prompt if m.get("role") == "user"]
    return users[-1]["content"] if users else ""


def check_instructions(prompt: list[dict], response: str) -> dict[str, bool]:
    """{instruction name: followed?} for the instructions the user's last message carries.

    A prompt that carries none is a UsageError: nothing in it can be checked, so every answer would
    score the same and the pair would carry no preference.
    """
    text = _last_user(prompt)
    found = find_instructions(text)
    if not found:
        shown = text if len(text) <= 80 else text[:77] + "..."
        raise UsageError(f"follows_instructions: the prompt {shown!r} carries none of the instructions it checks; add "
                         f"one to the prompt's text, e.g. {INSTRUCTIONS[0].phrase(25)!r} or {BY_NAME['no_commas'].phrase()!r} "
                         "(qsimpo.pairs.examples.INSTRUCTIONS lists them), or judge it with another scorer")
    answer = response.strip()
    return {i.name: bool(i.check(answer, value)) for i, value in found}


def finished(response: str, prompt: list[dict] | None = None) -> bool:
    """Whether the answer ends where an answer can end: a full stop (closed by a quote or bracket or not),
    a closing double quote, a list item on its own line, or the word the prompt asked it to end with."""
    text = response.strip()
    if not text:
        return False
    if _SENTENCE_END.search(text) or text[-1] in _QUOTE or text.splitlines()[-1].startswith("- "):
        return True
    asked = [value for i, value in find_instructions(_last_user(prompt or [])) if i.name == "end_word"]
    return bool(asked) and _last_word(text).lower() == asked[0].lower()


def topic_stems(text: str) -> set[str]:
    """The first four letters of each topic word of a prompt: its words of four letters or more outside
    _COMMON, in the sentences that state no instruction ("How do I clean a cast iron pan?" -> clea, cast, iron)."""
    sentences = re.split(r"(?<=[.!?])\s+", text)
    question = " ".join(s for s in sentences if not any(i.find(s) for i in INSTRUCTIONS))
    return {w.lower()[:4] for w in words(question) if len(w) >= 4 and w.lower() not in _COMMON}


def on_topic(prompt: list[dict], response: str) -> bool:
    """Whether the answer uses a topic word of the question (the same first four letters: "purr" meets
    "purring"). A crude guard against evasions: an answer in other words altogether also fails it. A
    question with no topic word passes every answer."""
    stems = topic_stems(_last_user(prompt))
    return not stems or any(w.lower()[:4] in stems for w in words(response) if len(w) >= 4)


def follows_instructions(prompt: list[dict], response: str) -> float:
    """The fraction of the prompt's instructions the answer follows, minus CUT_PENALTY if it stops
    mid-sentence and OFF_TOPIC_PENALTY if it uses none of the question's topic words.

    An empty answer, or one of fewer than MIN_WORDS words, scores -1: "Done." follows "End your answer
    with the word Done." and "Do not use any commas." but answers nothing. The topic guard does the
    same for longer evasions: "I can help you with that." follows "Do not use any commas." too. So the
    score lies in [-1, 1], 1 for a finished, on-topic answer that follows every instruction. The
    instructions are read from the user's last message (INSTRUCTIONS; a prompt with none is a
    UsageError naming it).
    """
    results = check_instructions(prompt, response)
    if len(words(response)) < MIN_WORDS:
        return -1.0
    followed = sum(results.values()) / len(results)
    return (followed - (0.0 if finished(response, prompt) else CUT_PENALTY)
            - (0.0 if on_topic(prompt, response) else OFF_TOPIC_PENALTY))


def follows_instructions_batch(prompts: list[list[dict]], responses: list[str]) -> list[float]:
    """The batch form of ``follows_instructions``."""
    return [follows_instructions(p, r) for p, r in zip(prompts, responses)]


follows_instructions_batch.batched = True
