"""Sampling helpers shared by the quickstart, eval and the demo."""

from __future__ import annotations

import torch
from transformers import LogitsProcessor, LogitsProcessorList


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


class SeededSampler(LogitsProcessor):
    """Temperature and nucleus (top-p) sampling with one torch.Generator per row of the batch.

    It returns scores that are -inf except at the drawn token, so ``generate`` run greedily emits exactly
    that token. Drawing per row is what makes an answer independent of the rest of its batch.
    """

    def __init__(self, generators: list[torch.Generator], temperature: float, top_p: float):
        self.generators, self.temperature, self.top_p = generators, temperature, top_p

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        logits = scores.float() / self.temperature
        if self.top_p < 1:
            ordered, order = logits.sort(dim=-1, descending=True)
            probs = ordered.softmax(-1)
            outside = probs.cumsum(-1) - probs >= self.top_p  # the mass before the token already reaches top_p
            logits = torch.full_like(logits, float("-inf")).scatter(-1, order, ordered.masked_fill(outside, float("-inf")))
        probs = logits.softmax(-1)
        picks = torch.stack([torch.multinomial(p, 1, generator=g) for p, g in zip(probs, self.generators)])
        return torch.full_like(scores, float("-inf")).scatter(-1, picks, 0.0)


@torch.no_grad()
def new_tokens_batch(model, tokenizer, prompts: list[list[int]], max_new_tokens: int, temperature: float = 0.0,
                     top_p: float = 1.0, seeds: list[int] | None = None, stops: list[int] | None = None) -> list[list[int]]:
    """The token ids generated after each of ``prompts`` (up to and including the first stop id), in one left-padded
    ``generate`` call: greedy at temperature 0, else row i sampled from its own generator seeded by ``seeds[i]``, so
    a row's answer does not depend on the other rows of its batch. ``stops``: the tokenizer's EOS by default."""
    device = next(model.parameters()).device
    width = max(map(len, prompts))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    stops = stops or [tokenizer.eos_token_id]
    input_ids = torch.tensor([[pad] * (width - len(p)) + list(p) for p in prompts], device=device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    processors = LogitsProcessorList()
    if temperature > 0:
        seeds = seeds if seeds is not None else list(range(len(prompts)))
        processors.append(SeededSampler([torch.Generator(device=device).manual_seed(s) for s in seeds], temperature, top_p))
    out = model.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                         temperature=None, top_p=None, top_k=None, use_cache=True, pad_token_id=pad, eos_token_id=stops,
                         logits_processor=processors)
    rows = []
    for new in out[:, width:].tolist():
        end = next((i + 1 for i, t in enumerate(new) if t in stops), None)
        rows.append(new[:end])
    return rows
