"""Sampling helpers shared by the quickstart, eval and the demo."""

from __future__ import annotations

import torch


def render_prompt(tokenizer, messages: list[dict]) -> list[int]:
    """Token ids of a chat prompt ending where the assistant's answer starts (one BOS)."""
    if tokenizer.chat_template:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    else:
        text = "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"
    ids = tokenizer(text, add_special_tokens=False).input_ids
    bos = tokenizer.bos_token_id
    if bos is not None and (not ids or ids[0] != bos):
        ids = [bos] + ids
    return ids


@torch.no_grad()
def generate(model, tokenizer, messages: list[dict], max_new_tokens: int = 64, temperature: float = 0.0,
             top_p: float = 1.0, seed: int = 0) -> str:
    """One answer to ``messages``; greedy when temperature is 0. The same seed gives the same text."""
    device = next(model.parameters()).device
    ids = torch.tensor([render_prompt(tokenizer, messages)], device=device)
    torch.manual_seed(seed)
    sample = temperature > 0
    out = model.generate(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=max_new_tokens,
        do_sample=sample,
        temperature=temperature if sample else None,
        top_p=top_p if sample else None,
        top_k=None,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()
