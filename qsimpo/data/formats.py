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

Columns with other names are read through ``data.columns`` (``map_columns``): a mapping from
qsimpo's roles (prompt, chosen, rejected, system) to the data set's columns; a ``system`` column
becomes a system message in front of the prompt conversation.

`qsimpo pairs` reads prompts to answer with the same rules (``normalise_prompt``): a ``prompt``
column alone (a string, or messages ending with the user's turn), or a preference row's prompt.

A row that fits none is a *bad row*. Every bad row of a source is counted in one place
(``DataSummary.record``: count per reason, the first few locations each), so one run reports them
all: with ``data.on_bad_row: error`` the run stops before any model loads, with a DataError listing
every reason, where and how to fix it; with ``skip`` the rest is kept and the same table is reported
(``DataSummary.report``). When no row survives, ``diagnose`` says which format the rows look like
and which setting to change. A `qsimpo demo` vote row of "tie" or "both_bad" is not bad but has no
preference: always counted as ``no_preference``. Nothing is dropped silently.
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
    "no_user_turn": "a prompt to answer (`qsimpo pairs`) ends with the assistant's message, not the user's",
}
# How to fix each kind of bad row (shown under the reason in the bad-row table).
FIXES = {
    "malformed_json": "each line of a .jsonl file must be one complete JSON object",
    "not_utf8": "re-save the file as UTF-8 (e.g. iconv -f latin1 -t utf-8 IN > OUT)",
    "not_an_object": 'each row must be an object like {"prompt": ..., "chosen": ..., "rejected": ...}',
    "missing_key": "every row needs chosen and rejected (explicit rows also prompt); if the data set names them otherwise, "
                   "map them with data.columns (e.g. data.columns: {prompt: question})",
    "empty_text": "fill in the missing text, or remove the row",
    "identical_pair": "remove the row: equal answers carry no preference",
    "mixed_types": "give every row the same shape (all strings, or all message lists); set data.format if auto picked wrong",
    "unknown_role": "rename roles to system/user/assistant (e.g. human -> user, gpt -> assistant)",
    "no_assistant_turn": "end chosen and rejected with the assistant's answer",
    "no_shared_prompt": "chosen and rejected must share the conversation and differ only in the final answer",
    "no_user_turn": "end the prompt's messages with the user turn to be answered",
    "chat_template": "use a tokenizer whose template renders the prompt as a prefix of prompt + answer, or set "
                     "tokenizer.chat_template; for a template that rejects system messages, set data.system_prompt: null",
}
# What to do when rows are dropped for the reasons that are not malformed data (said only when they occurred).
HINTS = {**FIXES, "too_long": "raise data.max_length or lower data.max_prompt_length",
         "no_preference": "these are `qsimpo demo` votes of tie or both_bad: they carry no preference to train on"}
EXAMPLES_PER_REASON = 3  # locations shown per reason; the count covers them all
# The roles data.columns maps to a data set's columns; prompt, chosen and rejected default to columns of their own name.
COLUMN_ROLES = ("prompt", "chosen", "rejected", "system")
# What each row shape is, in the words a person recognises.
SHAPES = {"explicit": "prompt, chosen and rejected strings", "implicit": "HH transcripts",
          "conversational": "message lists"}
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
    diagnosis: str = ""  # when no row survived: the format the rows look like and the setting to change

    def record(self, reason: str, detail: str = "") -> None:
        """Count a dropped row under its reason, keeping the first few "location: detail" lines to show.

        The one place rows are counted: bad rows, too_long and no_preference alike."""
        self.dropped[reason] = self.dropped.get(reason, 0) + 1
        shown = self.examples.setdefault(reason, [])
        if detail and len(shown) < EXAMPLES_PER_REASON:
            shown.append(detail)

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
        what = (f"{self.diagnosis}\nFix that, or the rows listed above" if self.diagnosis else
                f"Fix the rows listed, or set data.on_bad_row: skip to train on the other {good} and report these")
        raise DataError(f"{self.source}: {n} bad row{'s' * (n != 1)} of {self.rows_read} read; nothing was trained:\n"
                        f"{self.bad_row_table()}\n{what}", reason, first)

    def no_pairs(self) -> "DataError":
        """The error for a source of which no pair is left: the summary, the fix of each reason that occurred."""
        fixes = [f"{r}: {HINTS[r]}" for n, r in sorted(((n, r) for r, n in self.dropped.items() if n), key=lambda x: (-x[0], x[1]))
                 if r in HINTS]
        table = self.bad_row_table()
        return DataError(f"no usable pairs: {self.line()}" + (f"\n{table}" if table else "")
                         + (f"\n{self.diagnosis}" if self.diagnosis else "")
                         + (f"\nfix: {'; '.join(fixes)}" if fixes else ""))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def check_policy(on_bad_row: str) -> None:
    if on_bad_row not in ("error", "skip"):
        raise ValueError(f"on_bad_row = {on_bad_row!r} must be 'error' or 'skip'")


def check_columns(columns: dict | None) -> None:
    """data.columns names qsimpo's roles (keys) and the data set's columns (values); anything else stops at once."""
    for role, column in (columns or {}).items():
        if role not in COLUMN_ROLES:
            raise DataError(f"data.columns: unknown role {role!r}; the keys are qsimpo's roles ({', '.join(COLUMN_ROLES)}) "
                            f"and the values your data set's columns, e.g. data.columns: {{prompt: {role}}} if {role!r} is "
                            "the column holding the prompt")
        if not isinstance(column, str) or not column:
            raise DataError(f"data.columns.{role} = {column!r} must name a column of the data set")


class _Bad(Exception):
    """Raised inside the normalisers; the caller adds the row's location and counts it."""

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


def _explicit(row: dict, distinct: bool = True) -> tuple[Any, str, str]:
    prompt, chosen, rejected = _text(row, "prompt"), _text(row, "chosen"), _text(row, "rejected")
    if distinct and chosen == rejected:
        raise _Bad("identical_pair", "chosen and rejected are identical, so the pair carries no preference")
    return prompt, chosen, rejected


def _implicit(row: dict, distinct: bool = True) -> tuple[Any, str, str]:
    chosen, rejected = _text(row, "chosen"), _text(row, "rejected")
    if distinct and chosen == rejected:
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


def _conversational(row: dict, distinct: bool = True) -> tuple[Any, str, str]:
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
    if distinct and c == r:
        raise _Bad("identical_pair", "the chosen and rejected responses are identical, so the pair carries no preference")
    return conversation, c, r


_NORMALISE = {"explicit": _explicit, "implicit": _implicit, "conversational": _conversational}
FORMATS = ("auto", *_NORMALISE)


def map_columns(row: Any, columns: dict | None) -> tuple[Any, Any]:
    """(row with qsimpo's keys, the system text or None) for a row whose columns ``data.columns`` names.

    prompt, chosen and rejected are read from the mapped column, else from the column of their own
    name; system only when mapped. A mapped column the row lacks is a missing_key bad row naming it.
    """
    if not columns or not isinstance(row, dict):
        return row, None
    out = {k: v for k, v in row.items() if k not in COLUMN_ROLES}
    for role in COLUMN_ROLES:
        column = columns.get(role, role if role != "system" else None)
        if column is None:
            continue
        if column in row:
            out[role] = row[column]
        elif role in columns:
            raise _Bad("missing_key", f"no column {column!r} for data.columns.{role} (columns: {', '.join(map(str, row)) or 'none'}); "
                       f"set data.columns.{role} to the column that holds the {role}")
    system = out.pop("system", None)
    if system is not None and not isinstance(system, str):
        raise _Bad("mixed_types", f"system (column {columns['system']!r}) is a {_kind(system)}, expected a string")
    return out, (system if system and system.strip() else None)


def _with_system(triple: dict, system: str) -> dict:
    """The pair with a system message in front of its prompt conversation (a conversation of its own keeps its own)."""
    prompt = triple["prompt"]
    if triple["format"] == "implicit":
        from qsimpo.data.render import transcript_messages

        messages = transcript_messages(prompt)
        triple = {**triple, "chosen": triple["chosen"].strip(), "rejected": triple["rejected"].strip()}
    else:
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    if messages[0]["role"] != "system":
        messages = [{"role": "system", "content": system}] + messages
    return {**triple, "prompt": messages, "format": "conversational"}


def normalise_row(row: Any, fmt: str | None, columns: dict | None = None, distinct: bool = True) -> dict | None:
    """{"prompt", "chosen", "rejected", "format"} of one row in a data set of format ``fmt`` (None: none detected).

    prompt/chosen/rejected are strings (explicit, implicit), or for conversational a list of
    {"role", "content"} messages and the two final assistant contents. None for a `qsimpo demo`
    vote without a preference; raises _Bad for a bad row. ``distinct=False`` reads a row only for its prompt
    (``normalise_prompt``): chosen and rejected may then be equal, and a vote of no preference is read too.
    """
    row, system = map_columns(row, columns)
    if distinct and isinstance(row, dict) and row.get("vote") in NO_PREFERENCE_VOTES:
        return None
    shape = row_format(row)
    if shape is None or fmt is None:
        raise _Bad("empty_text", "chosen and rejected are both null")
    if (shape == "conversational") != (fmt == "conversational"):
        want = "message lists" if fmt == "conversational" else "strings"
        raise _Bad("mixed_types", f"this row has {'message lists' if shape == 'conversational' else 'strings'} but the "
                   f"dataset is {fmt} ({want}); every row must have the same shape (set data.format if auto picked wrong)")
    prompt, chosen, rejected = _NORMALISE[fmt](row, distinct)
    triple = {"prompt": prompt, "chosen": chosen, "rejected": rejected, "format": fmt}
    return _with_system(triple, system) if system else triple


def normalise_prompt(row: Any, fmt: str | None, columns: dict | None = None) -> dict:
    """{"prompt", "format"} of one row of a prompt source (`qsimpo pairs`); raises _Bad for a bad row.

    A row with a prompt and neither chosen nor rejected is a prompt row: a string (format explicit) or
    messages ending in the user's turn (conversational). A preference row of format ``fmt`` gives its
    prompt as ``normalise_row`` reads it (the conversation before the last assistant turn), whether or
    not its two answers differ. A mapped system column becomes a system message, as for pairs.
    """
    mapped, system = map_columns(row, columns)
    if isinstance(mapped, dict) and "chosen" not in mapped and "rejected" not in mapped:
        if "prompt" not in mapped:
            raise _Bad("missing_key", f"no 'prompt' key (keys: {', '.join(map(str, mapped)) or 'none'}); a prompt row needs "
                       "a prompt (a string or messages), or chosen and rejected to take it from")
        if isinstance(mapped["prompt"], list):
            prompt, kind = _messages(mapped, "prompt"), "conversational"
            if prompt[-1]["role"] == "assistant":
                raise _Bad("no_user_turn", f"the prompt's last message (prompt[{len(prompt) - 1}]) is the assistant's; "
                           "a prompt to answer ends with the user's turn")
        else:
            prompt, kind = _text(mapped, "prompt"), "explicit"
        triple = {"prompt": prompt, "format": kind}
        return _with_system(triple, system) if system else triple
    triple = normalise_row(row, fmt, columns, distinct=False)
    return {"prompt": triple["prompt"], "format": triple["format"]}


def row_shape(row: Any, columns: dict | None = None) -> str | None:
    """The format one row looks like once its columns are mapped (None: no usable chosen/rejected)."""
    try:
        row, _ = map_columns(row, columns)
        if isinstance(row, dict) and row.get("vote") in NO_PREFERENCE_VOTES:
            return None
        return row_format(row)
    except _Bad:
        return None


def detect_format(rows: Iterable[Any], columns: dict | None = None) -> str | None:
    """The format of the first usable row (what ``data.format: auto`` means); None if no row has one."""
    return next((shape for shape in (row_shape(row, columns) for row in rows) if shape is not None), None)
