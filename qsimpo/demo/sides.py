"""Chat models on one base in memory: the model side of `qsimpo demo` (the UI is app.py beside it).

One PeftModel holds the 4-bit base and the trained adapter(s). With one adapter there are two
columns: *left*, the SFT model (the base with no adapter: peft's "__base__") or, with
``--compare-adapter``, a second adapter loaded next to the first; *right*, the aligned model (the
trained adapter). With several adapters (``--adapter A --adapter B ...``) the columns are "sft"
and one per adapter, "a1", "a2", ..., each labelled by its name and loss (columns.py). peft's
LoRA layers, bitsandbytes' Linear4bit included, take the adapter per batch row
(``adapter_names``), so one batched ``generate`` answers for every column at once, and nothing
is ever switched on the shared model. Requests from several users are batched too (batcher.py).

    chat = SideBySide.load("adapters/quickstart/adapter")
    user = [{"role": "user", "content": "Describe owls."}]
    for answers in chat.stream({"left": user, "right": user}, Settings(seed=1)):
        print(answers["left"], answers["right"])        # both growing answers
    chat.respond("right", user, Settings())             # one side alone
    chat.stats({"left": user, "right": user}, answers)  # each answer's avg log-prob under both sides
"""

from __future__ import annotations

import importlib.util
import threading
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator

import torch

from qsimpo.console import warn
from qsimpo.errors import InputNotFound, UsageError
from qsimpo.quickstart import DEFAULT_OUT
from qsimpo import generate as G
from qsimpo.demo import columns
from qsimpo.demo.batcher import Batcher, Request
from qsimpo.demo.columns import BASE, Side

SIDES = ("left", "right")  # the two columns of a demo of one adapter, and the two sides every vote compares


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
    """The one model + tokenizer, the columns (``sides``: key -> Side, in order), and the batcher every generation
    goes through."""

    def __init__(self, model, tokenizer, sides: dict[str, Side], beta: float | None = None, description: str = "",
                 max_batch_rows: int = 8, system_prompt: str | None = None):
        self.model, self.tokenizer, self.sides = model, tokenizer, sides
        self.columns = tuple(sides)  # ("left", "right") for one adapter; ("sft", "a1", "a2", ...) for several
        self.beta, self.description = beta, description
        self.system_prompt = system_prompt  # the adapter's data.system_prompt: the UI's default, as it was trained
        # One call on the model at a time: peft hands adapter_names to the layers through forward hooks
        # that live for one call, so a second call running meanwhile would take the first one's rows.
        self.lock = threading.Lock()
        self.batcher = Batcher(model, tokenizer, self.lock, max_batch_rows)
        self.takes_system = template_takes_system(tokenizer)
        config = getattr(model, "config", None)
        self.max_context = getattr(config, "max_position_embeddings", None) or 4096

    @classmethod
    def load(cls, adapter: str | list[str], base: str | None = None, compare_adapter: str | None = None,
             trust_remote_code: bool = False, device: str | None = None) -> "SideBySide":
        """Load the base once (4-bit as the adapter was trained, where bitsandbytes is installed) and the adapter(s):
        one (a str, or a list of one) gives the two columns SFT | aligned; several give SFT | one column each."""
        from qsimpo.load import check_adapter, load_adapter
        from qsimpo.run_dir import read_meta, record_dir
        from qsimpo.train.stack import SFT

        adapters = [adapter] if isinstance(adapter, str) else list(adapter)
        if len(adapters) > 1 and compare_adapter:
            raise UsageError("--compare-adapter goes with one --adapter; with several, each --adapter is a column of its "
                             "own: pass the compared adapter as one more --adapter")
        for a in adapters:
            check_adapter(a, "--adapter")
        if compare_adapter:
            check_adapter(compare_adapter, "--compare-adapter")
        metas = [read_meta(record_dir(a)) for a in adapters]
        if len(adapters) > 1:  # before anything loads: one base, one SFT column
            columns.check_one_base(adapters, metas, base)
            columns.sft_adapter_of(adapters, metas)
        quantization = metas[0].get("quantization", "nf4")
        if quantization != "none" and importlib.util.find_spec("bitsandbytes") is None:
            warn(f"bitsandbytes is not installed: loading the base unquantized instead of {quantization}")
            quantization = "none"
        model, tokenizer, meta, base_name = load_adapter(adapters[0], base, quantization=quantization, device=device,
                                                         trust_remote_code=trust_remote_code, flag="--adapter")
        shown_base = columns.base_label(base_name, meta)  # the name users know it by, not a cache folder
        names = ["default"] + [f"a{i}" for i in range(2, len(adapters) + 1)]  # peft's adapter names
        for name, other in zip(names[1:], adapters[1:]):
            _load_more(model, other, name, "--adapter")
        if len(adapters) > 1:
            sides = cls._columns(adapters, metas, names, SFT in model.peft_config)
            losses = [columns.recorded(a, m) for a, m in zip(adapters, metas)]
            betas = {(loss or {}).get("beta") if (loss or {}).get("type") == "simpo" else None for loss in losses}
            beta = betas.pop() if len(betas) == 1 else None  # the SimPO reward row only where it means one thing
        else:
            if compare_adapter:
                from qsimpo.load import hub_name

                compared = read_meta(record_dir(compare_adapter))
                other = compared.get("base_model")
                if other and hub_name(other) != hub_name(base_name):
                    warn(f"warning: {compare_adapter} records base {other}, not the base loaded here; its column may be noise")
                _load_more(model, compare_adapter, "compare", "--compare-adapter")
                left = Side("compare", f"compare: {compare_adapter}", "compare",
                            columns.loss_text(columns.recorded(compare_adapter, compared)))
            elif SFT in model.peft_config:  # SimPO on top of `qsimpo sft` (qsimpo.train.stack): the SFT model is its adapter
                left = Side("SFT", "SFT (base + SFT adapter)", SFT)
            else:
                left = Side("SFT", "SFT (adapter off)", BASE)
            sides = {"left": left, "right": Side("aligned", f"aligned: {adapters[0]}", "default",
                                                 columns.loss_text(columns.recorded(adapters[0], meta)))}
            beta = (meta.get("simpo") or {}).get("beta")
        model.set_adapter("default")
        model.eval()
        return cls(model, tokenizer, sides, beta=beta, description=f"base {shown_base} ({quantization}), one copy in memory",
                   system_prompt=G.recorded_system_prompt(adapters[0]))

    @staticmethod
    def _columns(adapters: list[str], metas: list[dict], names: list[str], stacked: bool) -> dict[str, Side]:
        from qsimpo.train.stack import SFT

        sft = Side("SFT", "SFT (base + SFT adapter)" if stacked else "SFT (adapter off)", SFT if stacked else BASE)
        out = {"sft": sft}
        for i, (short, adapter, meta, name) in enumerate(zip(columns.short_names(adapters), adapters, metas, names), 1):
            loss = columns.loss_text(columns.recorded(adapter, meta))
            out[f"a{i}"] = Side(short, f"{short} ({loss})", name, loss)
        return out

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
        ids = G.prompt_ids(self.tokenizer, msgs)
        while len(ids) > room:
            first = 1 if msgs and msgs[0]["role"] == "system" else 0
            if len(msgs) - first <= 1:
                bos = ids[:1] if ids and ids[0] == self.tokenizer.bos_token_id else []
                return bos + ids[len(ids) - (room - len(bos)):]
            del msgs[first: first + 2]  # one user turn and the answer to it
            ids = G.prompt_ids(self.tokenizer, msgs)
        return ids

    def stream(self, turns: dict[str, list[dict]], settings: Settings) -> Iterator[dict[str, str]]:
        """Yield every side's growing answer, {side: text}, as the tokens come; one batched generation.

        ``turns`` maps each side to answer to its messages (ending in the user's turn): both sides
        for the demo's two columns, one side for that side alone. Leaving early stops the rows.
        """
        settings.check()
        unknown = set(turns) - set(self.sides)
        if unknown or not turns:
            raise ValueError(f"sides {sorted(unknown) or '(none)'}: each must be one of {', '.join(self.sides)}")
        max_new = min(settings.max_new_tokens, max(1, self.max_context - 1))
        request = Request(prompts=[self.prompt_ids(messages, max_new) for messages in turns.values()],
                          adapters=[self.sides[side].adapter for side in turns], temperature=settings.temperature,
                          top_p=settings.top_p, max_new_tokens=max_new, seed=settings.seed)
        shown = None
        for texts in self.batcher.run(request):
            texts = {side: text.strip() for side, text in zip(turns, texts)}
            if texts != shown:  # a token can be bare whitespace, or a partial character: show only growth
                shown = texts
                yield texts
        if shown is None:
            yield dict.fromkeys(turns, "")  # empty answers (EOS first) are still answers

    def respond(self, side: str, messages: list[dict], settings: Settings) -> str:
        """``side``'s whole answer to ``messages``, generated alone."""
        *_, last = self.stream({side: messages}, settings)
        return last[side]

    # ------------------------------------------------------------------------------------- scoring
    @torch.no_grad()
    def score(self, items: list[tuple[str, list[dict], str]]) -> list[tuple[float, int, int]]:
        """(average log-prob, |y|, the answer's tokens without the end of turn) of each (side, messages, response): the response after the messages under that side.

        Tokenized exactly as `qsimpo train` tokenizes a pair (qsimpo.data.tokenize_pair: the chat
        template, one BOS, the response closed by EOS) and scored by qsimpo.response_logps.score_pairs, the
        training path (packed rows, response-only chunked head), each row under its side's adapter:
        β times this number is the SimPO reward the row would get in training.
        """
        from qsimpo.data import tokenize_pair
        from qsimpo.response_logps import score_pairs

        pairs = []
        for _, messages, response in items:  # a "pair" of the response with itself: one packed row per item
            triple = {"prompt": list(messages), "chosen": response, "rejected": response, "format": "conversational",
                      "location": "demo"}
            pairs.append(tokenize_pair(self.tokenizer, triple, self.max_context, self.max_context // 2))
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        with self.lock:
            scores = score_pairs(self.model, pairs, pad, batch_size=len(pairs),
                                 adapter_names=[self.sides[side].adapter for side, _, _ in items])
        # the answer's own length leaves out the token that closes the turn (|y| counts it, as training does)
        closed = [not p["response_truncated"] and p["chosen_ids"][-1] in self.batcher.stops for p in pairs]
        return [(float(avg), int(n), int(n) - c) for avg, n, c in zip(scores.chosen, scores.chosen_len, closed)]

    def avg_logprob(self, side: str, messages: list[dict], response: str) -> tuple[float, int]:
        """(average log-prob, |y|) of ``response`` after ``messages`` under ``side``'s model."""
        return self.score([(side, messages, response)])[0][:2]

    def stats(self, turns: dict[str, list[dict]], answers: dict[str, str]) -> dict[str, dict]:
        """For each side's answer: its tokens (the end of turn not counted) and its average log-prob under every side's
        model (one forward pass)."""
        items = [(scorer, turns[side], answers[side]) for side in turns for scorer in self.columns]
        scores = iter(self.score(items))
        out = {}
        for side in turns:
            mine = {scorer: next(scores) for scorer in self.columns}
            out[side] = {"tokens": mine[side][2], "avg_logprob": {s: round(v[0], 4) for s, v in mine.items()}}
        return out


def _load_more(model, adapter: str, name: str, flag: str) -> None:
    """One more adapter on the loaded base, as peft adapter ``name``."""
    try:
        model.load_adapter(adapter, adapter_name=name)
    except (OSError, ValueError) as e:
        raise InputNotFound(f"could not load {flag} {adapter}: {e}") from None


def resolve_adapter(adapter: str | None, base: str | None) -> tuple[str, str | None]:
    """The adapter (and base) to serve: the given ones, or the quickstart's output when none is given.

    The base is the one given, else (None) the one the adapter's qsimpo.json records, as for any adapter.
    """
    if adapter:
        return adapter, base
    quickstart = Path(DEFAULT_OUT) / "adapter"
    if not (quickstart / "adapter_config.json").is_file():
        raise InputNotFound(f"no quickstart output at {quickstart} (working directory {Path.cwd()}): "
                            "run `qsimpo quickstart` first, or pass --adapter DIR_OR_HUB_ID")
    return str(quickstart), base
