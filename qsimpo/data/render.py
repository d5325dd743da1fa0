"""A normalised pair -> the prompt text and the two response texts, in the model's chat format.

prompt + response is always the full text the model reads, so the token boundary is exact.
"""

from __future__ import annotations

from .formats import DataError

def _chat(tokenizer, messages: list[dict], generation_prompt: bool, location: str) -> str:
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    except Exception as e:
        hint = " (does the template reject system messages? set data.system_prompt: null)" if messages[0]["role"] == "system" else ""
        raise DataError(f"{location}: the tokenizer's chat template failed: {type(e).__name__}: {e}{hint}") from e


def render_pair(tokenizer, triple: dict, system_prompt: str | None = None) -> tuple[str, str, str]:
    """The prompt text and the two response texts, such that prompt + response is the full text.

    With a chat template: conversational prompts, and explicit string prompts as one user message,
    are rendered with add_generation_prompt=True; each response is what the template adds for the
    assistant message. Implicit (HH-RLHF) transcripts are raw text, never templated. Without a
    template, conversational rows become plain "role: content" lines ending in "assistant:" and the
    response " content"; explicit rows are raw prompt text. system_prompt is used only with a
    template, and only if the conversation has no system message of its own.
    """
    location = triple.get("location", "row")
    fmt = triple.get("format") or ("conversational" if isinstance(triple["prompt"], list) else "explicit")
    prompt, chosen, rejected = triple["prompt"], triple["chosen"], triple["rejected"]
    if fmt == "implicit" or (fmt == "explicit" and not tokenizer.chat_template):
        return prompt, chosen, rejected
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
            raise DataError(f"{location}: the chat template is not prefix-stable: the prompt rendered with "
                            f"add_generation_prompt=True is not a prefix of prompt + response (they differ at character {k}: "
                            f"{prompt_text[k:k + 30]!r} vs {full[k:k + 30]!r}), so the prompt/response boundary would be wrong; "
                            "use a tokenizer whose template renders the prompt as a prefix, or set tokenizer.chat_template")
        responses.append(full[len(prompt_text):])
    return prompt_text, responses[0], responses[1]
