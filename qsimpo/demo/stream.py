"""Per-row pieces for one batched ``model.generate`` that serves several chat rows at once.

- ``RowStreamer`` splits the batch: after each step, every row's answer so far, as text.
- ``RowSampler`` samples each row from its own seeded generator with its own temperature and top-p,
  so a row's answer does not depend on what else is in the batch: the left column at seed 7 is the
  same text whether it was generated alone or next to the right one (or next to another user's
  rows), and the two columns draw the same random numbers, which keeps the comparison fair.
- ``RowStop`` ends each row at its own max_new_tokens, or as soon as its reader has gone.
"""

from __future__ import annotations

import threading
from typing import Callable

import torch


class RowStreamer:
    """``generate(streamer=...)`` for a batch: calls ``publish(texts, done)`` after each new token.

    transformers' TextIteratorStreamer takes one row and releases text only at spaces; this decodes
    each row after every token, showing each token as it comes and holding back only a trailing
    partial UTF-8 character. A row is done at its EOS or its token limit; generate pads it after that.
    """

    def __init__(self, tokenizer, eos_token_id: int | None, limits: list[int],
                 publish: Callable[[list[str], list[bool]], None]):
        self.tokenizer, self.eos, self.limits, self.publish = tokenizer, eos_token_id, limits, publish
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
            self.ids[row].append(token)
            self.done[row] = token == self.eos or len(self.ids[row]) >= self.limits[row]
            text = self.tokenizer.decode(self.ids[row], skip_special_tokens=True)
            if self.done[row] or not text.endswith("\ufffd"):
                self.texts[row] = text
        self.publish(list(self.texts), list(self.done))

    def end(self) -> None:
        self.texts = [self.tokenizer.decode(ids, skip_special_tokens=True) for ids in self.ids]
        self.done = [True] * len(self.ids)
        self.publish(list(self.texts), list(self.done))


class RowSampler:
    """Logits processor for ``generate(do_sample=False)`` that samples row i from ``generators[i]``.

    Temperature, then top-p, per row; it leaves only the drawn token finite, so greedy decoding picks
    it. Rows at temperature 0 are left alone (greedy). The randomness is per row instead of one
    global stream shared by the whole batch.
    """

    def __init__(self, seeds: list[int], temperatures: list[float], top_ps: list[float]):
        self.seeds, self.temperatures, self.top_ps = seeds, temperatures, top_ps
        self.generators: list[torch.Generator | None] | None = None

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self.generators is None:  # made on the first step, on the device the scores are on
            self.generators = [torch.Generator(device=scores.device).manual_seed(s) if t > 0 else None
                               for s, t in zip(self.seeds, self.temperatures)]
        out = scores.clone()
        for row, generator in enumerate(self.generators):
            if generator is None:
                continue
            probs = torch.softmax(scores[row].float() / self.temperatures[row], dim=-1)
            sorted_probs, order = probs.sort(descending=True)
            # nucleus: the most likely tokens up to top_p of the mass (the first one always)
            sorted_probs = sorted_probs.masked_fill(sorted_probs.cumsum(-1) - sorted_probs >= self.top_ps[row], 0.0)
            token = order[torch.multinomial(sorted_probs, 1, generator=generator)]
            out[row] = float("-inf")
            out[row, token] = 0.0
        return out


class RowStop:
    """Stopping criterion: row i is finished after ``limits[i]`` new tokens, or once ``events[i]`` is set."""

    def __init__(self, prompt_length: int, limits: list[int], events: list[threading.Event]):
        self.prompt_length, self.limits, self.events = prompt_length, limits, events

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        new = input_ids.shape[1] - self.prompt_length
        stop = [new >= limit or event.is_set() for limit, event in zip(self.limits, self.events)]
        return torch.tensor(stop, dtype=torch.bool, device=input_ids.device)
