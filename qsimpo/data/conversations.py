"""SFT data: rows -> conversations -> token ids with an assistant-only mask, for `qsimpo sft`.

The same pipeline as preference pairs (qsimpo.data.dataset: sources, the whole-file bad-row report,
cached `datasets` maps); only the row shape and the tokenization differ:

    normalise_conversation  a row -> {"messages": [...]}: a ``messages`` list (HuggingFaceH4/ultrachat_200k's
                            train_sft rows), or ``prompt`` + ``completion`` (strings or message lists); data.columns
                            maps roles messages, prompt, completion and system to other column names
    tokenize_conversation   messages -> input_ids + assistant_mask (1 on every assistant turn's tokens)
    tokenize_conversations  a read source through it: Conversations, a sequence over the memory-mapped table
    format_conversation     a readable view of one, masked and trained tokens apart (`qsimpo inspect-data --sft`)

Each assistant turn is cut out of the chat template's own rendering, as ``render_pair`` cuts a
response: the conversation up to the turn rendered with add_generation_prompt=True is the context,
what rendering the turn adds is the response, tokenized by ``qsimpo.data.tokenize`` (one BOS, the turn
ending at the end-of-turn token). So each assistant turn is trained on exactly what `qsimpo train`,
eval and the demo will ask the model to produce after that context.
"""

from __future__ import annotations

from typing import Any

from qsimpo.data.dataset import TableRows, encode_row
from qsimpo.data.formats import DataError, DataSummary, _Bad, _messages, _text
from qsimpo.data.render import _chat
from qsimpo.data.tokenize import _encode, _response_ids

ROLES = ("messages", "prompt", "completion", "system")  # what data.columns may map for `qsimpo sft`


def check_sft_columns(columns: dict | None) -> None:
    for role, column in (columns or {}).items():
        if role not in ROLES:
            raise DataError(f"data.columns: unknown role {role!r} for `qsimpo sft`; the keys are {', '.join(ROLES)} and the "
                            f"values your data set's columns, e.g. data.columns: {{messages: conversations}}")
        if not isinstance(column, str) or not column:
            raise DataError(f"data.columns.{role} = {column!r} must name a column of the data set")


def normalise_conversation(row: Any, columns: dict | None = None) -> dict:
    """{"messages": [...]} of one SFT row, with at least one assistant turn; raises _Bad for a bad row.

    A ``messages`` column wins (ultrachat_200k also has a ``prompt`` column, a copy of the first user turn);
    else ``prompt`` (a string: one user turn; or messages) followed by ``completion`` (a string: one
    assistant turn; or messages). A mapped ``system`` column becomes a system message in front.
    """
    if not isinstance(row, dict):
        raise _Bad("not_an_object", f"the row is a {type(row).__name__}, expected an object with messages, or prompt "
                   "and completion")
    columns = columns or {}
    col = {role: columns.get(role, role) for role in ROLES}
    if col["messages"] in row:
        messages = _messages({"messages": row[col["messages"]]}, "messages")
    elif col["prompt"] in row and col["completion"] in row:
        part = {"prompt": row[col["prompt"]], "completion": row[col["completion"]]}
        prompt = _messages(part, "prompt") if isinstance(part["prompt"], list) else [
            {"role": "user", "content": _text(part, "prompt")}]
        completion = _messages(part, "completion") if isinstance(part["completion"], list) else [
            {"role": "assistant", "content": _text(part, "completion")}]
        messages = prompt + completion
    else:
        raise _Bad("missing_key", f"no {col['messages']!r} list and no {col['prompt']!r} + {col['completion']!r} (keys: "
                   f"{', '.join(map(str, row)) or 'none'}); an SFT row needs a conversation: map its column with "
                   "data.columns (e.g. data.columns: {messages: conversations})")
    if "system" in columns:
        system = row.get(columns["system"])
        if isinstance(system, str) and system.strip() and messages[0]["role"] != "system":
            messages = [{"role": "system", "content": system}] + messages
    if not any(m["role"] == "assistant" for m in messages):
        raise _Bad("no_assistant_turn", "the conversation has no assistant message, so there is nothing to learn from it")
    return {"messages": messages, "format": "conversation"}


def _through_turn_end(tokenizer, response: str) -> str:
    """The part of an assistant turn's rendered text that _response_ids turned into ids: up to and including its
    last end-of-turn token (or, with none, the EOS it ends with; else all of it)."""
    from qsimpo.data.render import turn_end_id

    end = turn_end_id(tokenizer)
    mark = tokenizer.convert_ids_to_tokens(end) if end is not None else None
    if mark and mark in response:
        return response[:response.rindex(mark) + len(mark)]
    eos = tokenizer.eos_token
    return response.rstrip() if eos and response.rstrip().endswith(eos) else response


def tokenize_conversation(tokenizer, conv: dict, max_length: int) -> dict | None:
    """input_ids and assistant_mask of one conversation; None if no assistant token fits in max_length.

    The text the template renders is cut at each assistant turn: context (everything before the turn and
    the assistant header, masked) then the turn (trained). A conversation longer than max_length is cut
    from the right; the messages after the last assistant turn are not rendered.
    """
    messages, location = conv["messages"], conv.get("location", "row")
    ids: list[int] = []
    mask: list[int] = []
    done = ""  # the rendered text already turned into ids
    for k, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = _chat(tokenizer, messages[:k], True, location) if k else ""
        full = _chat(tokenizer, messages[:k + 1], False, location)
        if not prompt.startswith(done) or not full.startswith(prompt):
            raise DataError.bad_row(location, "chat_template", f"the chat template is not prefix-stable at message {k}: "
                                    "the conversation rendered up to an assistant turn does not start with its rendering "
                                    "up to the turn before, so the assistant tokens cannot be cut out exactly")
        context = _encode(tokenizer, prompt[len(done):])
        if not ids:  # exactly one BOS in front, as tokenize_pair does for a prompt
            bos = tokenizer.bos_token_id
            while bos is not None and context and context[0] == bos:
                context = context[1:]
            context = ([bos] if bos is not None else []) + context
            if not context:
                raise DataError.bad_row(location, "empty_text", "the conversation starts with the assistant and the "
                                        "tokenizer has no BOS, so its first token has nothing to be predicted from")
        response = full[len(prompt):]
        turn = _response_ids(tokenizer, response)
        ids += context + turn
        mask += [0] * len(context) + [1] * len(turn)
        # _response_ids ends a turn at its end-of-turn token (or the EOS the template closed it with): what the
        # template renders after that (Gemma's and ChatML's newline) was not trained, so it opens the next context
        done = prompt + _through_turn_end(tokenizer, response)
    truncated = len(ids) > max_length
    ids, mask = ids[:max_length], mask[:max_length]
    if not any(mask[1:]):
        return None
    return {"input_ids": ids, "assistant_mask": mask, "truncated": truncated}


def _tokenize_batch(batch: dict, tokenizer, max_length: int) -> dict:
    out = {k: [] for k in ("input_ids", "assistant_mask", "truncated", "length", "reason", "detail")}
    for location, text, reason, detail in zip(batch["location"], batch["text"], batch["reason"], batch["detail"]):
        enc, reason, detail = encode_row(lambda row: tokenize_conversation(tokenizer, row, max_length), location, text,
                                         reason, detail)
        enc = enc or {"input_ids": [], "assistant_mask": [], "truncated": False}
        for k in ("input_ids", "assistant_mask", "truncated"):
            out[k].append(enc[k])
        out["length"].append(len(enc["input_ids"]))
        out["reason"].append(reason)
        out["detail"].append(detail)
    return out


def format_conversation(tokenizer, conv: dict) -> str:
    """One tokenized conversation as `qsimpo inspect-data --sft` shows it: runs of masked (context) and trained
    (assistant) tokens, special tokens shown, each boundary's tokens on either side."""
    def show(ids):
        return tokenizer.decode(ids, skip_special_tokens=False)

    def pieces(ids):
        return " ".join(repr(show([i])) for i in ids)

    ids, mask = list(conv["input_ids"]), list(conv["assistant_mask"])
    lines = [f"═══ {conv.get('location', 'conversation')}: {len(ids)} tokens, {sum(mask)} trained ═══"]
    start = 0
    while start < len(ids):
        end = start
        while end < len(ids) and mask[end] == mask[start]:
            end += 1
        what = "trained (assistant)" if mask[start] else "masked-out (context)"
        lines += [f"──── {what}, {end - start} tokens ────", show(ids[start:end])]
        if start:
            lines.append(f"  boundary: … {pieces(ids[max(0, start - 3):start])} ┃ {pieces(ids[start:start + 3])} …")
        start = end
    return "\n".join(lines)


def sft_report(summary: DataSummary) -> str:
    """The data summary in SFT words: a conversation is cut as a whole, it has no prompt cut from the left."""
    cut = f"{summary.truncated_prompt} prompts truncated, {summary.truncated_response} responses truncated"
    return summary.report().replace(cut, f"{summary.truncated_response} conversations cut to data.max_length")


class Conversations(TableRows):
    """The kept conversations of a source, read from the memory-mapped table on access: input_ids, assistant_mask."""

    COLUMNS = ["input_ids", "assistant_mask", "location"]


def tokenize_conversations(cfg, source, tokenizer) -> tuple[Conversations, DataSummary]:
    """A source read with ``read_source(..., conversations=True)``, tokenized; its summary counts too_long and cuts."""
    from qsimpo.data.dataset import (_code_version, _fingerprint, _progress, _record_reasons, _workers,
                                     tokenizer_fingerprint)

    table, summary = source.table, source.summary
    fingerprint = _fingerprint(table._fingerprint, "sft", tokenizer_fingerprint(tokenizer), cfg.max_length, _code_version())
    with _progress(len(table)):
        table = table.map(_tokenize_batch, batched=True, num_proc=_workers(len(table)), new_fingerprint=fingerprint,
                          fn_kwargs={"tokenizer": tokenizer, "max_length": cfg.max_length},
                          remove_columns=["raw", "reason", "detail"], desc=f"tokenizing {summary.source}")
    counted = DataSummary(summary.source)
    kept = _record_reasons(table, counted)
    summary.dropped, summary.examples = counted.dropped, counted.examples
    convs = Conversations(table.select(kept))
    summary.kept = len(convs)
    summary.truncated_response = sum(convs.table["truncated"])
    summary.check(cfg.on_bad_row)
    if not convs:
        raise summary.no_pairs()
    return convs, summary
