"""Answers from a model: the one place qsimpo prompts a model and reads what it says.

Every command that answers a prompt goes through here: the quickstart, `qsimpo eval` (greedy answers
and ``--scorer``), the demo, `qsimpo pairs` (its vLLM backend included, which shares the prompts, the
stop ids and the cut), and merge's and the GGUF export's checks. What they share:

- the prompt: ``prompt_ids``, training's own renderer (qsimpo.data.tokenize.prompt_ids), so a row is
  asked token for token as `qsimpo train` showed it to the model, system prompt and BOS included;
- where an answer ends (``stop_ids``): the tokenizer's EOS, the model's generation config EOS ids and
  the chat template's end of turn (``<end_of_turn>``, ``<|eot_id|>``, ``<|im_end|>``), whichever comes
  first; the answer is cut there and the stop token is neither shown nor counted (``finish``);
- batching: prompts left-padded into one ``generate`` call, their padding masked, so a greedy answer
  equals that prompt's answer alone (tests/eval/test_generate_batch.py);
- sampling: ``RowSampler`` draws every row from its own generator seeded by that row's seed, with the
  row's own temperature and top-p, so an answer depends on its prompt and seed only, never on the rest
  of its batch or on the global RNG; rows at temperature 0 are greedy;
- streaming (the demo): ``generate(on_step=...)`` hands over every row's text after each step, and
  ``cancel`` events stop a row whose reader has gone.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from qsimpo.data.render import turn_end_id
from qsimpo.data.tokenize import prompt_ids as _prompt_ids


# ------------------------------------------------------------------------------------------ prompts
def prompt_ids(tokenizer, prompt, system_prompt: str | None = None) -> list[int]:
    """The ids a model is asked ``prompt`` with, as training renders it: ``prompt`` is a row's prompt
    ({"prompt", "format"}: a string, messages or an HH transcript), a list of chat messages (a
    conversation), or a string (an explicit prompt: one user message with a template, raw text without)."""
    if isinstance(prompt, list):
        prompt = {"prompt": prompt, "format": "conversational"}
    elif isinstance(prompt, str):
        prompt = {"prompt": prompt, "format": "explicit"}
    return _prompt_ids(tokenizer, prompt, system_prompt)


def recorded_system_prompt(adapter: str | None) -> str | None:
    """The data.system_prompt an adapter was trained with (its config.yaml), None for a base model or none recorded."""
    if not adapter:
        return None
    from qsimpo.run_dir import read_config

    cfg = read_config(adapter)  # a config.yaml that no longer loads is a ConfigError naming it
    return cfg.data.system_prompt if cfg is not None else None


# ------------------------------------------------------------------------------------------- stops
def stop_ids(tokenizer, generation_config=None) -> list[int]:
    """The tokens that end an answer: the tokenizer's EOS, the generation config's eos_token_id (an int or a
    list) and the chat template's end-of-turn token (qsimpo.data.render.turn_end_id)."""
    ids = getattr(generation_config, "eos_token_id", None) if generation_config is not None else None
    ids = [ids] if isinstance(ids, int) else list(ids or [])
    return sorted({*ids, tokenizer.eos_token_id, turn_end_id(tokenizer)} - {None})


def model_stop_ids(model, tokenizer) -> list[int]:
    """``stop_ids`` with the generation config the model was loaded with."""
    return stop_ids(tokenizer, getattr(model, "generation_config", None))


@dataclass
class Answer:
    ids: list[int]  # the answer's tokens, the stop token left out
    text: str  # decoded without special tokens, stripped
    stop: int | None  # the stop token that ended it; None: cut at the token limit

    @property
    def stopped(self) -> bool:
        return self.stop is not None


def cut(ids: Sequence[int], stops) -> tuple[list[int], int | None]:
    """(the tokens before the first stop id, that stop id or None)."""
    for i, t in enumerate(ids):
        if t in stops:
            return list(ids[:i]), t
    return list(ids), None


def finish(tokenizer, ids: Sequence[int], stops) -> Answer:
    """New tokens -> the answer: cut at the first stop, decoded."""
    kept, stop = cut(ids, stops)
    return Answer(kept, tokenizer.decode(kept, skip_special_tokens=True).strip(), stop)


# ---------------------------------------------------------------------------------------- sampling
class RowSampler:
    """Logits processor for ``generate(do_sample=False)`` that samples row i from its own generator.

    Temperature, then top-p (the most likely tokens up to top_p of the mass, the first one always), per
    row, drawn over the vocabulary in its own order; it leaves only the drawn token finite, so greedy
    decoding picks it. Rows at temperature 0 are left alone (greedy).
    """

    def __init__(self, seeds: Sequence[int], temperatures: Sequence[float], top_ps: Sequence[float]):
        self.seeds, self.temperatures, self.top_ps = list(seeds), list(temperatures), list(top_ps)
        self.generators: list[torch.Generator | None] | None = None

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self.generators is None:  # made on the first step, on the device the scores are on
            self.generators = [torch.Generator(device=scores.device).manual_seed(int(s)) if t > 0 else None
                               for s, t in zip(self.seeds, self.temperatures)]
        out = scores.clone()
        for row, generator in enumerate(self.generators):
            if generator is None:
                continue
            logits = scores[row].float() / self.temperatures[row]
            if self.top_ps[row] < 1:
                ordered, order = logits.sort(descending=True)
                probs = ordered.softmax(-1)
                outside = probs.cumsum(-1) - probs >= self.top_ps[row]  # the mass before the token already reaches top_p
                logits = torch.full_like(logits, float("-inf")).scatter(-1, order, ordered.masked_fill(outside, float("-inf")))
            token = torch.multinomial(logits.softmax(-1), 1, generator=generator)
            out[row] = float("-inf")
            out[row, token] = 0.0
        return out


# --------------------------------------------------------------------------------------- streaming
class RowStreamer:
    """``generate(streamer=...)`` for a batch: calls ``on_step(texts, done)`` after each new token.

    transformers' TextIteratorStreamer takes one row and releases text only at spaces; this decodes
    each row after every token, holding back only a trailing partial UTF-8 character. A row is done
    at a stop token (not shown) or its token limit; generate pads it after that.
    """

    def __init__(self, tokenizer, stops, limits: list[int], on_step: Callable[[list[str], list[bool]], None]):
        self.tokenizer, self.stops, self.limits, self.on_step = tokenizer, set(stops), limits, on_step
        self.ids: list[list[int]] = [[] for _ in limits]
        self.texts = [""] * len(limits)
        self.done = [False] * len(limits)
        self.prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:  # generate() first puts the prompts
            self.prompt_seen = True
            return
        for row, token in enumerate(value.reshape(len(self.ids), -1)[:, -1].tolist()):
            if self.done[row]:
                continue
            if token in self.stops:
                self.done[row] = True
            else:
                self.ids[row].append(token)
                self.done[row] = len(self.ids[row]) >= self.limits[row]
            text = self.tokenizer.decode(self.ids[row], skip_special_tokens=True)
            if self.done[row] or not text.endswith("\ufffd"):
                self.texts[row] = text
        self.on_step(list(self.texts), list(self.done))

    def end(self) -> None:
        self.texts = [self.tokenizer.decode(ids, skip_special_tokens=True) for ids in self.ids]
        self.done = [True] * len(self.ids)
        self.on_step(list(self.texts), list(self.done))


class RowStop:
    """Stopping criterion: row i is finished after ``limits[i]`` new tokens, or once ``cancel[i]`` is set."""

    def __init__(self, prompt_length: int, limits: list[int], cancel: list[threading.Event] | None):
        self.prompt_length, self.limits, self.cancel = prompt_length, limits, cancel

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        new = input_ids.shape[1] - self.prompt_length
        stop = [new >= limit or (self.cancel is not None and self.cancel[i].is_set()) for i, limit in enumerate(self.limits)]
        return torch.tensor(stop, dtype=torch.bool, device=input_ids.device)


# -------------------------------------------------------------------------------------- generation
def _per_row(value, n: int) -> list:
    return list(value) if isinstance(value, (list, tuple)) else [value] * n


@torch.no_grad()
def generate(model, tokenizer, prompts: list[list[int]], max_new_tokens, temperature=0.0, top_p=1.0,
             seeds: Sequence[int] | None = None, stops: Sequence[int] | None = None, adapter_names: list[str] | None = None,
             on_step: Callable[[list[str], list[bool]], None] | None = None,
             cancel: list[threading.Event] | None = None) -> list[Answer]:
    """The answers to ``prompts`` (token ids, e.g. from ``prompt_ids``) in one left-padded ``generate`` call.

    ``max_new_tokens``, ``temperature`` and ``top_p`` are one value or one per row; temperature 0 is greedy,
    else row i is sampled from its own generator seeded by ``seeds[i]`` (default: i). ``stops``: the
    model's ``model_stop_ids`` by default. ``adapter_names``: peft's per-row adapters (mixed-adapter batches: "__base__"
    runs a row with no adapter; the demo answers all its columns so, on bitsandbytes' 4-bit layers too). ``on_step`` streams
    every row's text as it grows; a set ``cancel[i]`` event stops row i at the next step.
    """
    n = len(prompts)
    if adapter_names is not None and len(adapter_names) != n:  # peft would apply the names to the wrong rows
        raise ValueError(f"adapter_names has {len(adapter_names)} names for {n} prompts: give one per prompt")
    limits, temperatures, top_ps = _per_row(max_new_tokens, n), _per_row(temperature, n), _per_row(top_p, n)
    stops = list(stops) if stops is not None else model_stop_ids(model, tokenizer)
    device = next(model.parameters()).device
    width = max(map(len, prompts))
    pad = next((t for t in (tokenizer.pad_token_id, tokenizer.eos_token_id, *stops) if t is not None), 0)
    # left padding: every row's answer starts at the same column, its padding masked out
    input_ids = torch.tensor([[pad] * (width - len(p)) + list(p) for p in prompts], device=device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    from transformers import LogitsProcessorList, StoppingCriteriaList

    processors = LogitsProcessorList()
    if any(t > 0 for t in temperatures):
        processors.append(RowSampler(seeds if seeds is not None else range(n), temperatures, top_ps))
    kwargs = dict(input_ids=input_ids, attention_mask=mask, max_new_tokens=max(limits), do_sample=False, temperature=None,
                  top_p=None, top_k=None, use_cache=True, pad_token_id=pad, eos_token_id=stops or None, logits_processor=processors)
    if len(set(limits)) > 1 or cancel is not None:
        kwargs["stopping_criteria"] = StoppingCriteriaList([RowStop(width, limits, cancel)])
    if adapter_names is not None:
        kwargs["adapter_names"] = adapter_names
    if on_step is not None:
        kwargs["streamer"] = RowStreamer(tokenizer, stops, limits, on_step)
    out = model.generate(**kwargs)
    # a row stopped by ``cancel`` is padded after that; its answer is the streamer's (the demo reads nothing else)
    return [finish(tokenizer, new[:limit], stops) for new, limit in zip(out[:, width:].tolist(), limits)]


def greedy_answers(model, tokenizer, prompts: list, max_new_tokens: int = 64, system_prompt: str | None = None) -> list[str]:
    """The greedy answers' texts to ``prompts`` (anything ``prompt_ids`` takes), all in one left-padded batch."""
    return [a.text for a in generate(model, tokenizer, [prompt_ids(tokenizer, p, system_prompt) for p in prompts],
                                     max_new_tokens)]


def answer(model, tokenizer, prompt, max_new_tokens: int = 64, system_prompt: str | None = None,
           temperature: float = 0.0, top_p: float = 1.0, seed: int = 0) -> str:
    """One answer's text to ``prompt`` (anything ``prompt_ids`` takes); greedy at temperature 0."""
    ids = prompt_ids(tokenizer, prompt, system_prompt)
    return generate(model, tokenizer, [ids], max_new_tokens, temperature, top_p, [seed])[0].text
