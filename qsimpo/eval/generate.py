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


def generation_kwargs(tokenizer, ids: torch.Tensor, max_new_tokens: int, temperature: float = 0.0,
                      top_p: float = 1.0) -> dict:
    """``model.generate`` arguments for one unpadded prompt: greedy at temperature 0, else nucleus sampling."""
    sample = temperature > 0
    return dict(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=sample,
                temperature=temperature if sample else None, top_p=top_p if sample else None, top_k=None,
                pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)


@torch.no_grad()
def new_tokens(model, tokenizer, prompt_ids: list[int], max_new_tokens: int, temperature: float = 0.0,
               top_p: float = 1.0, seed: int | None = 0) -> list[int]:
    """The token ids generated after ``prompt_ids`` (EOS included if reached); ``seed`` None leaves the RNG alone."""
    ids = torch.tensor([prompt_ids], device=next(model.parameters()).device)
    if seed is not None:
        torch.manual_seed(seed)
    out = model.generate(**generation_kwargs(tokenizer, ids, max_new_tokens, temperature, top_p))
    return out[0, ids.shape[1]:].tolist()


def generate(model, tokenizer, messages: list[dict], max_new_tokens: int = 64, temperature: float = 0.0,
             top_p: float = 1.0, seed: int = 0) -> str:
    """One answer to ``messages``; greedy when temperature is 0. The same seed gives the same text."""
    new = new_tokens(model, tokenizer, render_prompt(tokenizer, messages), max_new_tokens, temperature, top_p, seed)
    return tokenizer.decode(new, skip_special_tokens=True).strip()
