"""A normalised pair -> the prompt text and the two response texts, in the model's chat format.

prompt + response is always the full text the model reads, so the token boundary is exact.
"""

from __future__ import annotations

import re

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


def render_pair(tokenizer, triple: dict, system_prompt: str | None = None) -> tuple[str, str, str]:
    """The prompt text and the two response texts, such that prompt + response is the full text.

    With a chat template, every format is rendered with it: conversational prompts as they are,
    explicit string prompts as one user message, implicit (HH-RLHF) transcripts parsed into their
    turns (``transcript_messages``). The prompt is rendered with add_generation_prompt=True; each
    response is what the template adds for the assistant message, so whatever the template puts
    around it (an injected system message, text after the assistant header, the end-of-turn
    token) falls on the right side of the boundary. A template that is not prefix-stable is a
    bad row, never a wrong boundary. Without a template (base models), implicit and explicit rows
    are raw text, and conversational rows become plain "role: content" lines ending in
    "assistant:" with the response " content". system_prompt is used only with a template, and
    only if the conversation has no system message of its own.
    """
    location = triple.get("location", "row")
    fmt = triple.get("format") or ("conversational" if isinstance(triple["prompt"], list) else "explicit")
    prompt, chosen, rejected = triple["prompt"], triple["chosen"], triple["rejected"]
    if not tokenizer.chat_template and fmt in ("implicit", "explicit"):
        return prompt, chosen, rejected
    if fmt == "implicit":
        messages = transcript_messages(prompt)
        chosen, rejected = chosen.strip(), rejected.strip()  # " Yes." after "Assistant:" is the answer "Yes."
    else:
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    if not tokenizer.chat_template:
        lines = "".join(f"{m['role']}: {m['content']}\n" for m in messages)
        return lines + "assistant:", " " + chosen, " " + rejected
    if system_prompt and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": system_prompt}] + messages
    prompt_text = _chat(tokenizer, messages, True, location)
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
