"""Preference-row formats: detect them, normalise rows to (prompt, chosen, rejected), count bad rows.

Three row shapes are accepted (``data.format``; ``auto`` detects from the first usable row):

  explicit        {"prompt": str, "chosen": str, "rejected": str}
  conversational  {"prompt"?: str | [msg], "chosen": [msg, ...], "rejected": [msg, ...]}, msg = {"role", "content"}
                  - TRL style: prompt is the conversation, chosen/rejected are [final assistant message];
                  - UltraFeedback style: chosen/rejected are the whole conversation ending in the assistant turn
                    (any string prompt is then a copy of the first user turn and is not used).
  implicit        {"chosen": transcript, "rejected": transcript}, transcripts in Anthropic HH-RLHF form
                  ("\\n\\nHuman: ...\\n\\nAssistant: ..."); the prompt is the shared text up to and including
                  the last shared "\\n\\nAssistant:", so the response keeps its leading space (rendering
                  turns the transcript into chat messages where the tokenizer has a template).

A row that fits none is a *bad row*. Every bad row of a source is recorded (count per reason, the
first few locations each), so one run reports them all: with ``data.on_bad_row: error`` the run stops
before any model loads, with a DataError listing every reason, where and how to fix it; with ``skip``
the rest is kept and the same table is reported (``DataSummary.report``).
A `qsimpo demo` vote row of "tie" or "both_bad" is not bad but has no preference: always counted as
``no_preference``. Nothing is dropped silently.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any, Iterable

from qsimpo.errors import UsageError

# Every reason a row can be dropped for, with what it means (the keys of DataSummary.dropped).
REASONS = {
    "malformed_json": "the line is not valid JSON",
    "not_utf8": "the line is not valid UTF-8 text",
    "not_an_object": "the row is not a JSON object",
    "missing_key": "a required key is absent",
    "empty_text": "a text is null, empty or whitespace only",
    "identical_pair": "chosen and rejected are the same",
    "mixed_types": "strings where messages were expected, or the other way round",
    "unknown_role": "a message role other than system/user/assistant",
    "no_assistant_turn": "chosen/rejected do not end with an assistant message",
    "no_shared_prompt": "chosen and rejected do not share a prompt",
    "chat_template": "the tokenizer's chat template cannot render the row with an exact prompt/response boundary",
    "too_long": "the pair cannot fit in data.max_length even after truncation",
    "no_preference": "a `qsimpo demo` vote of tie or both bad: kept in the file, never trained on",
}
# How to fix each kind of bad row (shown under the reason in the bad-row table).
FIXES = {
    "malformed_json": "each line of a .jsonl file must be one complete JSON object",
    "not_utf8": "re-save the file as UTF-8 (e.g. iconv -f latin1 -t utf-8 IN > OUT)",
    "not_an_object": 'each row must be an object like {"prompt": ..., "chosen": ..., "rejected": ...}',
    "missing_key": "every row needs chosen and rejected (explicit rows also prompt); rename the keys if they differ",
    "empty_text": "fill in the missing text, or remove the row",
    "identical_pair": "remove the row: equal answers carry no preference",
    "mixed_types": "give every row the same shape (all strings, or all message lists); set data.format if auto picked wrong",
    "unknown_role": "rename roles to system/user/assistant (e.g. human -> user, gpt -> assistant)",
    "no_assistant_turn": "end chosen and rejected with the assistant's answer",
    "no_shared_prompt": "chosen and rejected must share the conversation and differ only in the final answer",
    "chat_template": "use a tokenizer whose template renders the prompt as a prefix of prompt + answer, or set "
                     "tokenizer.chat_template; for a template that rejects system messages, set data.system_prompt: null",
}
EXAMPLES_PER_REASON = 3  # locations shown per reason; the count covers them all
ROLES = ("system", "user", "assistant")
# Votes of `qsimpo demo` (qsimpo.demo.votes) that record two answers but prefer neither. Such rows are
# not malformed, so they are counted under no_preference whatever data.on_bad_row says.
NO_PREFERENCE_VOTES = ("tie", "both_bad")
HH_MARKER = "\n\nAssistant:"
SKIP_HINT = "set data.on_bad_row: skip to skip and count such rows"


class DataError(UsageError):
    """A data problem; the message names the file and row, the reason and the fix.

    ``reason`` is one of REASONS for a bad row (which ``on_bad_row: skip`` may count instead), or None
    for a problem with the whole source (file not found, chat template unusable) that always stops.
    """

    def __init__(self, message: str, reason: str | None = None, location: str | None = None, detail_line: str = ""):
        super().__init__(message)
        self.reason, self.location, self.detail_line = reason, location, detail_line or message

    @classmethod
    def bad_row(cls, location: str, reason: str, detail: str) -> "DataError":
        line = f"{location}: {reason}: {detail}"
        return cls(f"{line}. Fix the row, or {SKIP_HINT}", reason, location, line)


@dataclass
class DataSummary:
    """What happened to every row read from one source; ``kept + sum(dropped.values()) == rows_read``."""

    source: str
    rows_read: int = 0
    kept: int = 0
    dropped: dict[str, int] = field(default_factory=lambda: dict.fromkeys(REASONS, 0))
    truncated_prompt: int = 0  # kept pairs whose prompt was cut (from the left)
    truncated_response: int = 0  # kept pairs with at least one response cut (from the right)
    format: str = ""
    examples: dict[str, list[str]] = field(default_factory=dict)  # reason -> first "location: detail" lines

    def record(self, err: "DataError") -> None:
        """Count a bad row under its reason, keeping the first few locations to show."""
        self.dropped[err.reason] = self.dropped.get(err.reason, 0) + 1
        shown = self.examples.setdefault(err.reason, [])
        if len(shown) < EXAMPLES_PER_REASON:
            shown.append(err.detail_line)

    @property
    def bad_rows(self) -> int:
        """Rows dropped for being malformed (not for length, not votes without a preference)."""
        return sum(n for r, n in self.dropped.items() if r in FIXES)

    def line(self) -> str:
        n_dropped = sum(self.dropped.values())
        reasons = sorted(((n, r) for r, n in self.dropped.items() if n), key=lambda x: (-x[0], x[1]))
        why = f" ({', '.join(f'{r} {n}' for n, r in reasons)})" if reasons else ""
        return (f"data {self.source}: {self.rows_read} rows read, {self.kept} kept, {n_dropped} dropped{why}; "
                f"{self.truncated_prompt} prompts truncated, {self.truncated_response} responses truncated; "
                f"format {self.format or 'unknown'}")

    def bad_row_table(self) -> str:
        """Every bad-row reason with its count, meaning, fix and first locations; '' when there are none."""
        lines = []
        for n, reason in sorted(((n, r) for r, n in self.dropped.items() if n and r in FIXES), key=lambda x: (-x[0], x[1])):
            lines.append(f"  {reason}: {n} row{'s' * (n != 1)} ({REASONS[reason]}); fix: {FIXES[reason]}")
            lines += [f"      {example}" for example in self.examples.get(reason, [])]
            if n > len(self.examples.get(reason, [])):
                lines.append(f"      ... and {n - len(self.examples.get(reason, []))} more")
        return "\n".join(lines)

    def report(self) -> str:
        """The summary line, then the bad-row table when rows were skipped."""
        table = self.bad_row_table()
        return self.line() + (f"\nskipped bad rows (data.on_bad_row: skip):\n{table}" if table else "")

    def check(self, on_bad_row: str) -> None:
        """Under on_bad_row=error, stop with every bad row of the source in one message."""
        if on_bad_row == "skip" or not self.bad_rows:
            return
        n = self.bad_rows
        reason = max((r for r in FIXES), key=lambda r: self.dropped.get(r, 0))
        first = self.examples[reason][0].split(": ", 1)[0]
        good = self.rows_read - n
        raise DataError(f"{self.source}: {n} bad row{'s' * (n != 1)} of {self.rows_read} read; nothing was trained:\n"
                        f"{self.bad_row_table()}\n"
                        f"Fix the rows listed, or set data.on_bad_row: skip to train on the other {good} and report these",
                        reason, first)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def check_policy(on_bad_row: str) -> None:
    if on_bad_row not in ("error", "skip"):
        raise ValueError(f"on_bad_row = {on_bad_row!r} must be 'error' or 'skip'")


def handle_bad_row(err: "DataError", summary: DataSummary) -> None:
    """Record a bad row in ``summary``; a problem with the whole source (no reason) stops at once."""
    if err.reason is None:
        raise err
    summary.record(err)


class _Bad(Exception):
    """Raised inside the normalisers; to_triples adds the row's location and applies on_bad_row."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason, self.detail = reason, detail


def _kind(value: Any) -> str | None:
    if value is None:
        return None
    return "string" if isinstance(value, str) else "messages" if isinstance(value, list) else type(value).__name__


def row_format(row: Any) -> str | None:
    """The format this one row looks like (None if chosen and rejected are both null)."""
    if not isinstance(row, dict):
        raise _Bad("not_an_object", f"the row is a {type(row).__name__}, expected an object with chosen/rejected keys")
    for key in ("chosen", "rejected"):
        if key not in row:
            raise _Bad("missing_key", f"no {key!r} key (keys: {', '.join(map(str, row)) or 'none'}); every format needs chosen and rejected")
    kinds = {k: _kind(row[k]) for k in ("chosen", "rejected")}
    for key, kind in kinds.items():
        if kind not in (None, "string", "messages"):
            raise _Bad("mixed_types", f"{key} is a {kind}, expected a string or a list of messages")
    if kinds["chosen"] and kinds["rejected"] and kinds["chosen"] != kinds["rejected"]:
        raise _Bad("mixed_types", f"chosen is {kinds['chosen']} but rejected is {kinds['rejected']}; both must be one kind")
    kind = kinds["chosen"] or kinds["rejected"]
    if kind is None:
        return None
    if kind == "messages":
        return "conversational"
    return "explicit" if "prompt" in row else "implicit"


def _text(row: dict, key: str) -> str:
    if key not in row:
        raise _Bad("missing_key", f"no {key!r} key (keys: {', '.join(map(str, row))}); explicit rows need prompt, chosen and rejected "
                   "(set data.format: implicit if the prompt is inside chosen/rejected)")
    value = row[key]
    if value is None or (isinstance(value, str) and not value.strip()):
        raise _Bad("empty_text", f"{key} is {'null' if value is None else 'empty'}")
    if not isinstance(value, str):
        raise _Bad("mixed_types", f"{key} is a {_kind(value)}, expected a string like the rest of this dataset")
    return value


def _messages(row: dict, key: str) -> list[dict]:
    value = row[key]
    if value is None:
        raise _Bad("empty_text", f"{key} is null")
    if not isinstance(value, list):
        raise _Bad("mixed_types", f"{key} is a {_kind(value)} in a dataset of message lists")
    if not value:
        raise _Bad("empty_text", f"{key} is an empty list of messages")
    out = []
    for i, m in enumerate(value):
        where = f"{key}[{i}]"
        if not isinstance(m, dict):
            raise _Bad("mixed_types", f"{where} is a {_kind(m)}, expected a message {{'role': ..., 'content': ...}}")
        for k in ("role", "content"):
            if k not in m:
                raise _Bad("missing_key", f"{where} has no {k!r} (keys: {', '.join(map(str, m))}); messages need role and content "
                           "(ShareGPT 'from'/'value' must be renamed)")
        if m["role"] not in ROLES:
            raise _Bad("unknown_role", f"{where} has role {m['role']!r}; roles must be one of {', '.join(ROLES)} "
                       "(rename e.g. human -> user, gpt -> assistant)")
        content = m["content"]
        if content is None or (isinstance(content, str) and not content.strip()):
            raise _Bad("empty_text", f"{where}.content is {'null' if content is None else 'empty'}")
        if not isinstance(content, str):
            raise _Bad("mixed_types", f"{where}.content is a {_kind(content)}, expected a string")
        out.append({"role": m["role"], "content": content})  # drop extra keys so message lists compare cleanly
    return out


def _explicit(row: dict) -> tuple[Any, str, str]:
    prompt, chosen, rejected = _text(row, "prompt"), _text(row, "chosen"), _text(row, "rejected")
    if chosen == rejected:
        raise _Bad("identical_pair", "chosen and rejected are identical, so the pair carries no preference")
    return prompt, chosen, rejected


def _implicit(row: dict) -> tuple[Any, str, str]:
    chosen, rejected = _text(row, "chosen"), _text(row, "rejected")
    if chosen == rejected:
        raise _Bad("identical_pair", "chosen and rejected are identical, so the pair carries no preference")
    shared = os.path.commonprefix([chosen, rejected])
    cut = shared.rfind(HH_MARKER)
    if cut < 0:
        raise _Bad("no_shared_prompt", f"chosen and rejected share no text ending in {HH_MARKER!r}; implicit rows must be "
                   "HH-RLHF transcripts that differ only after an assistant marker (or use explicit prompt/chosen/rejected)")
    prompt = shared[: cut + len(HH_MARKER)]
    for key, text in (("chosen", chosen), ("rejected", rejected)):
        if not text[len(prompt):].strip():
            raise _Bad("empty_text", f"{key} has no response after the shared prompt's last {HH_MARKER!r}")
    return prompt, chosen[len(prompt):], rejected[len(prompt):]


def _conversational(row: dict) -> tuple[Any, str, str]:
    chosen, rejected = _messages(row, "chosen"), _messages(row, "rejected")
    prompt = row.get("prompt")
    if isinstance(prompt, str):
        if not prompt.strip():
            raise _Bad("empty_text", "prompt is empty")
        prompt_msgs = [{"role": "user", "content": prompt}]
    elif isinstance(prompt, list):
        prompt_msgs = _messages(row, "prompt")
    elif prompt is None:
        prompt_msgs = []
    else:
        raise _Bad("mixed_types", f"prompt is a {_kind(prompt)}, expected a string or a list of messages")
    for key, msgs in (("chosen", chosen), ("rejected", rejected)):
        if msgs[-1]["role"] != "assistant":
            raise _Bad("no_assistant_turn", f"the last message of {key} has role {msgs[-1]['role']!r}; it must be the assistant's response")
    if chosen[:-1] != rejected[:-1]:
        raise _Bad("no_shared_prompt", "chosen and rejected differ before their last message; they must share the conversation "
                   "and differ only in the final assistant turn")
    shared = chosen[:-1]
    if not shared:
        conversation = prompt_msgs
    elif isinstance(prompt, list) and shared[: len(prompt_msgs)] != prompt_msgs:
        conversation = prompt_msgs + shared  # the prompt list is the start, chosen/rejected continue it
    else:
        conversation = shared  # full conversations; a string prompt is a copy of the first user turn
    if not conversation:
        raise _Bad("empty_text", "no prompt messages: give a 'prompt' key or include the user turn in chosen/rejected")
    c, r = chosen[-1]["content"], rejected[-1]["content"]
    if c == r:
        raise _Bad("identical_pair", "the chosen and rejected responses are identical, so the pair carries no preference")
    return conversation, c, r


_NORMALISE = {"explicit": _explicit, "implicit": _implicit, "conversational": _conversational}
FORMATS = ("auto", *_NORMALISE)


def normalise_row(row: Any, fmt: str | None) -> tuple[Any, str, str] | None:
    """(prompt, chosen, rejected) of one row in a dataset of format ``fmt`` (None: none detected yet).

    None for a `qsimpo demo` vote without a preference; raises _Bad for a bad row.
    """
    if isinstance(row, dict) and row.get("vote") in NO_PREFERENCE_VOTES:
        return None
    shape = row_format(row)
    if shape is None or fmt is None:
        raise _Bad("empty_text", "chosen and rejected are both null")
    if (shape == "conversational") != (fmt == "conversational"):
        want = "message lists" if fmt == "conversational" else "strings"
        raise _Bad("mixed_types", f"this row has {'message lists' if shape == 'conversational' else 'strings'} but the "
                   f"dataset is {fmt} ({want}); every row must have the same shape (set data.format if auto picked wrong)")
    return _NORMALISE[fmt](row)


def detect_format(rows: Iterable[Any]) -> str | None:
    """The format of the first usable row (what ``data.format: auto`` means); None if no row has one."""
    for row in rows:
        if isinstance(row, dict) and row.get("vote") in NO_PREFERENCE_VOTES:
            continue
        try:
            shape = row_format(row)
        except _Bad:
            continue
        if shape is not None:
            return shape
    return None


def to_triples(rows: Iterable[tuple[str, Any]], fmt: str = "auto", on_bad_row: str = "error",
               summary: DataSummary | None = None) -> list[dict]:
    """Normalise ``(location, row)`` pairs to {"prompt", "chosen", "rejected", "format", "location"}.

    prompt/chosen/rejected are strings (explicit, implicit), or for conversational a list of
    {"role", "content"} messages and the two final assistant contents. ``format`` is added (beyond
    the three texts) because rendering depends on it.
    With ``fmt="auto"`` the first usable row decides; a later row of the other kind (strings vs
    messages) is a ``mixed_types`` bad row. Sets ``summary.format``. Every bad row is recorded in
    ``summary``; with ``on_bad_row=error`` a DataError listing them all is raised after the last row.
    """
    check_policy(on_bad_row)
    if fmt not in FORMATS:
        raise ValueError(f"data.format = {fmt!r} is not one of {', '.join(FORMATS)}")
    summary = summary if summary is not None else DataSummary("rows")
    rows = list(rows)
    detected = detect_format(row for _, row in rows) if fmt == "auto" else fmt
    out = []
    for location, row in rows:
        try:
            triple = normalise_row(row, detected)
        except _Bad as bad:
            handle_bad_row(DataError.bad_row(location, bad.reason, bad.detail), summary)
            continue
        if triple is None:
            summary.dropped["no_preference"] = summary.dropped.get("no_preference", 0) + 1
            continue
        prompt, chosen, rejected = triple
        out.append({"prompt": prompt, "chosen": chosen, "rejected": rejected, "format": detected, "location": location})
    summary.format = detected or ""
    summary.check(on_bad_row)
    return out
