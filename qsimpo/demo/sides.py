"""Two chat models on one base in memory: the model side of `qsimpo demo` (the UI is qsimpo/demo/app.py).

One PeftModel holds the 4-bit base and the trained adapter. The *left* side is the SFT model
(the same weights with the adapter disabled) or, with ``--compare-adapter``, a second adapter
loaded next to the first; the *right* side is the aligned model (the adapter enabled). Every
use of the model, a whole generation or a scoring pass, holds ``SideBySide.lock`` and switches
the adapter inside it, so two requests can never interleave adapter switching.

    chat = SideBySide.load("adapters/quickstart/adapter")
    for text in chat.stream("right", [{"role": "user", "content": "Describe owls."}], Settings(seed=1)):
        print(text)                      # the growing answer
    chat.avg_logprob("left", messages, text)   # (average log-prob, |y|) as SimPO scores it
"""

from __future__ import annotations

import importlib.util
import queue
import threading
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator

import torch

from ..errors import InputNotFound, UsageError
from ..generate import generation_kwargs, render_prompt

SIDES = ("left", "right")
QUICKSTART = Path("adapters/quickstart")


@dataclass
class Settings:
    """Generation settings, shared by both sides so a comparison is fair (same seed on each)."""

    temperature: float = 0.7  # 0: greedy
    top_p: float = 0.95
    max_new_tokens: int = 96
    seed: int = 0
    system_prompt: str = ""  # used only where the chat template renders a system message

    def check(self) -> "Settings":
        problems = [f"{name} = {value!r} {why}" for name, value, bad, why in (
            ("temperature", self.temperature, self.temperature < 0, "must be >= 0 (0 is greedy)"),
            ("top_p", self.top_p, not 0 < self.top_p <= 1, "must be in (0, 1]"),
            ("max_new_tokens", self.max_new_tokens, self.max_new_tokens < 1, "must be >= 1"),
        ) if bad]
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Side:
    name: str  # short name: "SFT", "compare", "aligned"
    label: str  # what the column is called in the UI and in vote rows
    adapter: str | None  # the PEFT adapter name to activate; None: adapter disabled (the SFT model)


class _TextStreamer:
    """Token-by-token text for ``generate(streamer=...)``: after each new token, the whole answer so far.

    transformers' TextIteratorStreamer releases text only at spaces; decoding everything after
    every token shows each token as it comes, holding back only a trailing partial UTF-8 character.
    """

    def __init__(self, tokenizer):
        self.tokenizer, self.ids, self.queue, self.prompt_seen = tokenizer, [], queue.Queue(), False

    def _text(self) -> str:
        return self.tokenizer.decode(self.ids, skip_special_tokens=True)

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:  # generate() first puts the prompt
            self.prompt_seen = True
            return
        self.ids.extend(value.reshape(-1).tolist())
        text = self._text()
        if not text.endswith("\ufffd"):
            self.queue.put(text)

    def end(self) -> None:
        self.queue.put(self._text())
        self.queue.put(None)

    def __iter__(self) -> Iterator[str]:
        while (text := self.queue.get()) is not None:
            yield text


class _Stop:
    """Stopping criterion that ends generation once the reader has gone (the UI cancelled)."""

    def __init__(self, event: threading.Event):
        self.event = event

    def __call__(self, input_ids, scores, **kwargs) -> torch.Tensor:
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


def template_takes_system(tokenizer) -> bool:
    """Whether the chat template renders a system message (many do; Gemma's rejects it)."""
    if not tokenizer.chat_template:
        return False
    marker = "\u00a7system\u00a7"
    try:
        text = tokenizer.apply_chat_template([{"role": "system", "content": marker}, {"role": "user", "content": "hi"}],
                                             tokenize=False, add_generation_prompt=True)
    except Exception:  # templates that raise on a system role
        return False
    return marker in text


class SideBySide:
    """The one model + tokenizer, the lock that serializes them, and the two sides."""

    def __init__(self, model, tokenizer, sides: dict[str, Side], default_adapter: str = "default",
                 beta: float | None = None, description: str = ""):
        self.model, self.tokenizer, self.sides = model, tokenizer, sides
        self.default_adapter, self.beta, self.description = default_adapter, beta, description
        self.lock = threading.Lock()  # a plain Lock: gradio may resume a generator on another thread
        self.takes_system = template_takes_system(tokenizer)
        config = getattr(model, "config", None)
        self.max_context = getattr(config, "max_position_embeddings", None) or 4096

    @classmethod
    def load(cls, adapter: str, base: str | None = None, compare_adapter: str | None = None,
             trust_remote_code: bool = False, device: str | None = None) -> "SideBySide":
        """Load the base once (4-bit as the adapter was trained, where bitsandbytes is installed) and the adapter(s)."""
        from ..data import looks_local
        from ..model import load_trained, read_run_metadata

        meta = read_run_metadata(adapter)
        check_adapter(adapter, "--adapter")
        base_name = base or meta.get("base_model")
        if not base_name:
            raise UsageError(f"{adapter} records no base model (no qsimpo.json): pass the base model's Hub id or folder "
                             "with --base")
        if looks_local(base_name) and not Path(base_name).expanduser().exists():
            where = "given with --base" if base else f"recorded in {adapter}/qsimpo.json"
            raise InputNotFound(f"the base model {base_name} ({where}) was not found: pass the model the adapter was "
                                "trained on with --base PATH_OR_HUB_ID")
        quantization = meta.get("quantization", "nf4")
        if quantization != "none" and importlib.util.find_spec("bitsandbytes") is None:
            print(f"bitsandbytes is not installed: loading the base unquantized instead of {quantization}")
            quantization = "none"
        compare_meta = read_run_metadata(compare_adapter) if compare_adapter else {}
        if compare_adapter:
            check_adapter(compare_adapter, "--compare-adapter")
        try:
            model, tokenizer = load_trained(adapter, base, quantization=quantization, device=device,
                                            trust_remote_code=trust_remote_code)
        except OSError as e:  # a Hub id that does not resolve (offline without a cached copy), a base not there
            raise InputNotFound(f"could not load the adapter {adapter} on the base {base_name}: {e}\n"
                                "pass a `qsimpo train` output folder with --adapter, and its base with --base") from None
        if compare_adapter:
            other = compare_meta.get("base_model")
            if other and other != base_name:
                print(f"warning: {compare_adapter} records base {other}, not the base loaded here; its column may be noise")
            try:
                model.load_adapter(compare_adapter, adapter_name="compare")
            except OSError as e:
                raise InputNotFound(f"could not load --compare-adapter {compare_adapter}: {e}") from None
            left = Side("compare", f"compare: {compare_adapter}", "compare")
        else:
            left = Side("SFT", "SFT (adapter off)", None)
        model.set_adapter("default")
        model.eval()
        beta = (meta.get("simpo") or {}).get("beta")
        return cls(model, tokenizer, {"left": left, "right": Side("aligned", f"aligned: {adapter}", "default")}, beta=beta,
                   description=f"base {base_name} ({quantization}), one copy in memory")

    # ------------------------------------------------------------------------------------ switching
    @contextmanager
    def use(self, side: str):
        """Hold the lock with ``side``'s adapter active; restore the default adapter on the way out."""
        if side not in self.sides:
            raise ValueError(f"side = {side!r} must be one of {', '.join(self.sides)}")
        adapter = self.sides[side].adapter
        with self.lock:
            if adapter is None:
                with self.model.disable_adapter():
                    yield self.model
            else:
                self.model.set_adapter(adapter)
                try:
                    yield self.model
                finally:
                    self.model.set_adapter(self.default_adapter)

    # ----------------------------------------------------------------------------------- generation
    def context(self, history: list[dict], settings: Settings) -> list[dict]:
        """The messages a side is prompted with: its own history, after the system prompt if the template has one."""
        system = settings.system_prompt.strip()
        if system and self.takes_system and not (history and history[0]["role"] == "system"):
            return [{"role": "system", "content": system}] + list(history)
        return list(history)

    def prompt_ids(self, messages: list[dict], max_new_tokens: int) -> list[int]:
        """Token ids of the prompt, oldest turns dropped (then the oldest tokens cut) to leave room for the answer."""
        room = max(1, self.max_context - max_new_tokens)
        msgs = list(messages)
        ids = render_prompt(self.tokenizer, msgs)
        while len(ids) > room:
            first = 1 if msgs and msgs[0]["role"] == "system" else 0
            if len(msgs) - first <= 1:
                bos = ids[:1] if ids and ids[0] == self.tokenizer.bos_token_id else []
                return bos + ids[len(ids) - (room - len(bos)):]
            del msgs[first: first + 2]  # one user turn and the answer to it
            ids = render_prompt(self.tokenizer, msgs)
        return ids

    def stream(self, side: str, messages: list[dict], settings: Settings) -> Iterator[str]:
        """Yield the growing answer of ``side`` to ``messages`` (ending in the user's turn), token by token.

        The lock is held and the side's adapter active from before the first token until the
        generation thread has finished, even when the reader stops early (the thread is told to
        stop and joined), so the other side can never switch adapters under it.
        """
        from transformers import StoppingCriteriaList

        settings.check()
        max_new = min(settings.max_new_tokens, max(1, self.max_context - 1))
        ids = torch.tensor([self.prompt_ids(messages, max_new)], device=next(self.model.parameters()).device)
        streamer = _TextStreamer(self.tokenizer)
        stop, errors = threading.Event(), []
        kwargs = dict(generation_kwargs(self.tokenizer, ids, max_new, settings.temperature, settings.top_p),
                      use_cache=True, streamer=streamer, stopping_criteria=StoppingCriteriaList([_Stop(stop)]))

        def run():
            try:
                with torch.no_grad():
                    self.model.generate(**kwargs)
            except BaseException as e:  # re-raised in the reader; end() unblocks it
                errors.append(e)
                streamer.end()

        with self.use(side):
            torch.manual_seed(settings.seed)  # under the lock: both sides start from the same RNG state
            thread = threading.Thread(target=run, name=f"qsimpo-generate-{side}", daemon=True)
            thread.start()
            shown = None
            try:
                for text in streamer:
                    if text.strip() != (shown or ""):  # a token can be bare whitespace; show only growth
                        shown = text.strip()
                        yield shown
                if shown is None:
                    yield ""  # an empty answer (EOS first) is still an answer
            finally:
                stop.set()
                thread.join()
        if errors:
            raise errors[0]

    def respond(self, side: str, messages: list[dict], settings: Settings) -> str:
        """The whole answer (the last value ``stream`` yields)."""
        return list(self.stream(side, messages, settings))[-1]

    # ------------------------------------------------------------------------------------- scoring
    @torch.no_grad()
    def avg_logprob(self, side: str, messages: list[dict], response: str) -> tuple[float, int]:
        """(average log-prob, |y|) of ``response`` after ``messages`` under ``side``'s model.

        Tokenized exactly as `qsimpo train` tokenizes a pair (qsimpo.data.tokenize_pair: the chat
        template, one BOS, the response closed by EOS) and averaged by qsimpo.logprobs, so β times
        this number is the SimPO reward the row would get in training.
        """
        from ..data import tokenize_pair
        from ..logprobs import sequence_logps

        triple = {"prompt": list(messages), "chosen": response, "rejected": response, "format": "conversational",
                  "location": "demo"}
        enc = tokenize_pair(self.tokenizer, triple, self.max_context, self.max_context // 2)
        prompt, answer = enc["prompt_ids"], enc["chosen_ids"]
        device = next(self.model.parameters()).device
        ids = torch.tensor([prompt + answer], device=device)
        mask = torch.tensor([[0] * len(prompt) + [1] * len(answer)], device=device)
        with self.use(side) as model:
            logits = model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False).logits
        lp = sequence_logps(logits, ids, mask)
        return float(lp.avg[0]), int(lp.count[0])

    def stats(self, messages: list[dict], response: str) -> dict:
        """|y| and the average log-prob of ``response`` under each side's model (two scoring passes)."""
        scores = {side: self.avg_logprob(side, messages, response) for side in SIDES}
        return {"tokens": scores["right"][1], "avg_logprob": {side: round(s[0], 4) for side, s in scores.items()}}


def check_adapter(adapter: str, flag: str) -> None:
    """Fail before any loading when ``adapter`` is neither an adapter folder nor (possibly) a Hub id."""
    from ..data import looks_local  # the one rule for "a path, not a Hub id"

    local = Path(adapter).expanduser()
    if local.is_dir():
        if not (local / "adapter_config.json").is_file():
            raise InputNotFound(f"{flag} {adapter} holds no adapter_config.json: pass the train.output_dir of a finished "
                                "`qsimpo train` run (or a checkpoint-N folder inside it)")
    elif looks_local(adapter) or local.exists():
        raise InputNotFound(f"{flag} {adapter}: no such folder; pass the train.output_dir of a `qsimpo train` run "
                            "or a Hub adapter id")


def resolve_adapter(adapter: str | None, base: str | None) -> tuple[str, str | None]:
    """The adapter (and base) to serve: the given ones, or the quickstart's output when none is given."""
    if adapter:
        return adapter, base
    if not (QUICKSTART / "adapter" / "adapter_config.json").is_file():
        raise InputNotFound(f"no quickstart output at {QUICKSTART / 'adapter'} (working directory {Path.cwd()}): "
                                "run `qsimpo quickstart` first, or pass --adapter DIR_OR_HUB_ID")
    return str(QUICKSTART / "adapter"), base or str(QUICKSTART / "base")

