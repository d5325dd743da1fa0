"""Many users, one model: chat requests that wait while the model is busy are generated together.

A request is a few rows (the demo sends two: the left and the right column of one message), each
row a prompt and the adapter it runs under (peft's per-row ``adapter_names``; "__base__" is the
adapter disabled). One worker thread takes every request that is waiting when the model comes
free, oldest first and up to ``max_rows`` rows, left-pads them into one batch, runs one
``generate`` and hands each request its own rows' text as it grows. A request is closed as soon
as its own rows are done, and a reader that leaves stops its rows at the next step.

The batch runs through qsimpo.generate, as every answer in qsimpo does (the same prompts, stop tokens
and sampler). What one row produces does not depend on the other rows in its batch: the rows share no
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

from qsimpo.generate import generate, model_stop_ids


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
        self.stops = model_stop_ids(model, tokenizer)
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
            with self.lock:
                self.batches.append(len(batch))
                self._generate(batch, publish)
        except BaseException as e:  # every reader of the batch sees the error
            for request in batch:
                if not request.closed:
                    request.out.put(e)
        finally:
            for request in batch:
                if not request.closed:
                    request.closed = True
                    request.out.put(None)

    def _generate(self, batch: list[Request], publish) -> None:
        def per_row(attr):
            return [getattr(r, attr) for r in batch for _ in r.prompts]

        generate(self.model, self.tokenizer, [p for r in batch for p in r.prompts], per_row("max_new_tokens"),
                 per_row("temperature"), per_row("top_p"), per_row("seed"), self.stops,
                   adapter_names=[a for r in batch for a in r.adapters], on_step=publish, cancel=per_row("stop"))
