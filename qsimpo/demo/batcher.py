"""Many users, one model: chat requests that wait while the model is busy are generated together.

A request is a few rows (the demo sends two: the left and the right column of one message), each
row a prompt and the adapter it runs under (peft's per-row ``adapter_names``; "__base__" is the
adapter disabled). One worker thread takes every request that is waiting when the model comes
free, oldest first and up to ``max_rows`` rows, left-pads them into one batch, runs one
``generate`` and hands each request its own rows' text as it grows. A request is closed as soon
as its own rows are done, and a reader that leaves stops its rows at the next step.

What one row produces does not depend on the other rows in its batch: the rows share no
randomness (RowSampler gives each its own seeded generator), padding is masked, and peft applies
each row's adapter to that row only. tests/demo/test_app.py checks that answers under load equal the
same prompts answered alone, token for token, on the CPU.

The worker holds ``lock`` for the whole ``generate``: peft passes ``adapter_names`` to the layers
through forward hooks that live for one call, so no other call on the model may run meanwhile.
"""

from __future__ import annotations

import queue
import threading
from collections import deque
from dataclasses import dataclass, field
from typing import Iterator

import torch

from qsimpo.eval.generate import generation_kwargs
from qsimpo.demo.stream import RowSampler, RowStop, RowStreamer


@dataclass
class Request:
    prompts: list[list[int]]  # token ids, one prompt per row
    adapters: list[str]  # the peft adapter name of each row ("__base__": no adapter)
    temperature: float
    top_p: float
    max_new_tokens: int
    seed: int
    out: queue.Queue = field(default_factory=queue.Queue)  # lists of row texts, then None (or an exception)
    stop: threading.Event = field(default_factory=threading.Event)  # set when the reader has gone
    closed: bool = False


class Batcher:
    """Queue of requests and the worker that runs them in batches; the worker exists only while there is work."""

    def __init__(self, model, tokenizer, lock: threading.Lock, max_rows: int = 8):
        self.model, self.tokenizer, self.lock, self.max_rows = model, tokenizer, lock, max_rows
        self.waiting: deque[Request] = deque()
        self.cond = threading.Condition()
        self.worker: threading.Thread | None = None
        self.batches: list[int] = []  # the number of requests in each batch run, for tests and curiosity

    def run(self, request: Request) -> Iterator[list[str]]:
        """Queue ``request`` and yield its rows' texts as they grow; leaving early stops its rows."""
        with self.cond:
            self.waiting.append(request)
            if self.worker is None:
                self.worker = threading.Thread(target=self._work, name="qsimpo-demo-batcher", daemon=True)
                self.worker.start()
        try:
            while (item := request.out.get()) is not None:
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            request.stop.set()

    # ------------------------------------------------------------------------------------ the worker
    def _work(self) -> None:
        while True:
            with self.cond:
                batch = self._take()
                if not batch:
                    self.worker = None  # under the lock: run() starts a new worker for the next request
                    return
            self._run(batch)

    def _take(self) -> list[Request]:
        batch, rows = [], 0
        while self.waiting and (not batch or rows + len(self.waiting[0].prompts) <= self.max_rows):
            request = self.waiting.popleft()
            if request.stop.is_set():  # the reader left before its turn
                continue
            batch.append(request)
            rows += len(request.prompts)
        return batch

    def _run(self, batch: list[Request]) -> None:
        spans, start = [], 0
        for request in batch:
            spans.append((request, start, start + len(request.prompts)))
            start += len(request.prompts)

        def publish(texts: list[str], done: list[bool]) -> None:
            for request, a, b in spans:
                if not request.closed and not request.stop.is_set():
                    request.out.put(texts[a:b])
                    if all(done[a:b]):  # this request's rows are finished: its reader need not wait for the batch
                        request.closed = True
                        request.out.put(None)

        try:
            with self.lock, torch.no_grad():
                self.batches.append(len(batch))
                self.model.generate(**self._inputs(batch, publish))
        except BaseException as e:  # every reader of the batch sees the error
            for request in batch:
                if not request.closed:
                    request.out.put(e)
        finally:
            for request in batch:
                if not request.closed:
                    request.closed = True
                    request.out.put(None)

    def _inputs(self, batch: list[Request], publish) -> dict:
        from transformers import LogitsProcessorList, StoppingCriteriaList

        def per_row(attr):
            return [getattr(r, attr) for r in batch for _ in r.prompts]

        prompts = [p for r in batch for p in r.prompts]
        adapters = [a for r in batch for a in r.adapters]
        width = max(map(len, prompts))
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        device = next(self.model.parameters()).device
        # left padding: every row's answer starts at the same column, its padding masked out
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
        limits, temperatures = per_row("max_new_tokens"), per_row("temperature")
        kwargs = generation_kwargs(self.tokenizer, ids, max(limits))  # greedy: RowSampler does the sampling
        processors = [RowSampler(per_row("seed"), temperatures, per_row("top_p"))] if any(t > 0 for t in temperatures) else []
        return dict(kwargs, attention_mask=mask, use_cache=True, adapter_names=adapters,
                    logits_processor=LogitsProcessorList(processors),
                    stopping_criteria=StoppingCriteriaList([RowStop(width, limits, per_row("stop"))]),
                    streamer=RowStreamer(self.tokenizer, kwargs["eos_token_id"], limits, publish))
