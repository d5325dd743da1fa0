"""A normalised pair -> the prompt text and the two response texts, in the model's chat format.

prompt + response is always the full text the model reads, so the token boundary is exact.
"""

from __future__ import annotations

import re
import weakref

from qsimpo.data.formats import HH_MARKER, DataError

# "\n\nHuman:" / "\n\nAssistant:" open each turn of an HH-RLHF transcript.
_TURN = re.compile(r"\n\n(Human|Assistant):")
_ROLE = {"Human": "user", "Assistant": "assistant"}


def transcript_messages(prompt: str) -> list[dict]:
    """An implicit (HH-RLHF) prompt as chat messages: Human -> user, Assistant -> assistant, every turn.

    The prompt ends with the final "\n\nAssistant:" marker (the answer is the response). Text before
    the first marker is the user's. Consecutive turns of one role (a few HH-RLHF transcripts have two
    Assistant turns in a row) are joined with a blank line, since most templates require alternation.
    """
    if not prompt.endswith(HH_MARKER):
        raise ValueError(f"an implicit prompt ends with {HH_MARKER!r}, got ...{prompt[-30:]!r}")
    parts = _TURN.split(prompt[: -len(HH_MARKER)])
    turns = [("user", parts[0])] if parts[0].strip() else []
    turns += [(_ROLE[role], text) for role, text in zip(parts[1::2], parts[2::2])]
    messages: list[dict] = []
    for role, text in turns:
        text = text.strip()
        if messages and messages[-1]["role"] == role:
            messages[-1]["content"] = f"{messages[-1]['content']}\n\n{text}".strip()
        else:
            messages.append({"role": role, "content": text})
    return messages


def _chat(tokenizer, messages: list[dict], generation_prompt: bool, location: str) -> str:
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    except Exception as e:
        hint = " (does the template reject system messages? set data.system_prompt: null)" if messages[0]["role"] == "system" else ""
        raise DataError.bad_row(location, "chat_template", f"the tokenizer's chat template failed: {type(e).__name__}: {e}{hint}") from e


def prompt_messages(text: dict) -> list[dict]:
    """A row's prompt as chat messages: an implicit transcript as its turns, a string as one user message."""
    if text.get("format") == "implicit":
        return transcript_messages(text["prompt"])
    return [{"role": "user", "content": text["prompt"]}] if isinstance(text["prompt"], str) else list(text["prompt"])


_MARK = "\u00a7qsimpo-answer\u00a7"  # no spaces: templates that trim the content leave it whole
_TURN_END: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # tokenizer -> (its template, the end-of-turn id)


def turn_end_id(tokenizer) -> int | None:
    """The special token the chat template closes an assistant turn with, or None (no template, or none there).

    Found by rendering a one-message assistant turn and reading the first token after the content:
    ``<|im_end|>`` (ChatML), ``<end_of_turn>`` (Gemma), ``<|eot_id|>`` (Llama 3), ``</s>`` (Llama 2,
    Mistral). Training ends a response there (qsimpo.data.tokenize) and generation stops there
    (qsimpo.generate.stop_ids), so the two agree on where a turn ends, whatever the tokenizer's EOS is.
    """
    template = tokenizer.chat_template
    if not template:
        return None
    cached = _TURN_END.get(tokenizer)
    if cached is None or cached[0] != template:
        cached = _TURN_END[tokenizer] = (template, _find_turn_end(tokenizer))
    return cached[1]


def _find_turn_end(tokenizer) -> int | None:
    try:
        text = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}, {"role": "assistant", "content": _MARK}],
                                             tokenize=False, add_generation_prompt=False)
    except Exception:  # a template that refuses this conversation has no turn end we can read
        return None
    if not isinstance(text, str) or _MARK not in text:
        return None
    after = text[text.rindex(_MARK) + len(_MARK):].lstrip()
    ids = tokenizer(after, add_special_tokens=False)["input_ids"] if after else []
    special = set(tokenizer.all_special_ids) | {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
    return ids[0] if ids and ids[0] in special else None


def render_prompt(tokenizer, triple: dict, system_prompt: str | None = None) -> str:
    """The prompt text of a row (a pair or a prompt alone), ending where the model's answer starts.

    With a chat template, every format is rendered with it (add_generation_prompt=True): conversational
    prompts as they are, explicit string prompts as one user message, implicit (HH-RLHF) transcripts
    parsed into their turns (``transcript_messages``), after ``system_prompt`` as a system message when
    the conversation has none of its own. Without a template (base models), implicit and explicit
    prompts are the raw text, and conversational ones plain "role: content" lines ending in
    "assistant:"; the system prompt is not used there.
    """
    fmt = triple.get("format") or ("conversational" if isinstance(triple["prompt"], list) else "explicit")
    if not tokenizer.chat_template and fmt in ("implicit", "explicit"):
        return triple["prompt"]
    messages = prompt_messages({**triple, "format": fmt})
    if not tokenizer.chat_template:
        return "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"
    return _chat(tokenizer, _with_system(messages, system_prompt), True, triple.get("location", "row"))


def _with_system(messages: list[dict], system_prompt: str | None) -> list[dict]:
    if system_prompt and messages[0]["role"] != "system":
        return [{"role": "system", "content": system_prompt}] + messages
    return messages


def render_pair(tokenizer, triple: dict, system_prompt: str | None = None) -> tuple[str, str, str]:
    """The prompt text (``render_prompt``) and the two response texts, such that prompt + response is the full text.

    With a chat template, each response is what the template adds for the assistant message, so
    whatever the template puts around it (an injected system message, text after the assistant
    header, the end-of-turn token) falls on the right side of the boundary. A template that is not
    prefix-stable is a bad row, never a wrong boundary. Without a template, implicit and explicit
    responses are the raw text, conversational ones " content" after "assistant:".
    """
    location = triple.get("location", "row")
    fmt = triple.get("format") or ("conversational" if isinstance(triple["prompt"], list) else "explicit")
    prompt_text = render_prompt(tokenizer, triple, system_prompt)
    chosen, rejected = triple["chosen"], triple["rejected"]
    if not tokenizer.chat_template and fmt in ("implicit", "explicit"):
        return prompt_text, chosen, rejected
    if fmt == "implicit":
        chosen, rejected = chosen.strip(), rejected.strip()  # " Yes." after "Assistant:" is the answer "Yes."
    if not tokenizer.chat_template:
        return prompt_text, " " + chosen, " " + rejected
    messages = _with_system(prompt_messages({**triple, "format": fmt}), system_prompt)
    responses = []
    for response in (chosen, rejected):
        full = _chat(tokenizer, messages + [{"role": "assistant", "content": response}], False, location)
        if not full.startswith(prompt_text):
            k = next((i for i, (a, b) in enumerate(zip(prompt_text, full)) if a != b), min(len(prompt_text), len(full)))
            raise DataError.bad_row(location, "chat_template", "the chat template is not prefix-stable: the prompt rendered "
                                    f"with add_generation_prompt=True is not a prefix of prompt + response (they differ at "
                                    f"character {k}: {prompt_text[k:k + 30]!r} vs {full[k:k + 30]!r}), so the prompt/response "
                                    "boundary would be wrong")
        responses.append(full[len(prompt_text):])
    return prompt_text, responses[0], responses[1]
