"""Scorers: what judges the sampled answers of `qsimpo pairs` (and `qsimpo eval --scorer`), given as --scorer SPEC.

    module:function           a Python callable, imported (the current folder is on the path)
    path/to/file.py:function  a Python callable in a file
    FOLDER_OR_HUB_ID          a reward model: an AutoModelForSequenceClassification with one output, or one that
                              ships its own modelling code (ArmoRM; with --trust-remote-code); or PairRM
    pairrm:FOLDER_OR_HUB_ID   PairRM, LLM-Blender's pairwise ranker (qsimpo.pairs.pairrm), named as such

A callable is called once per answer as ``fn(prompt, response) -> float``: ``prompt`` is the chat
messages before the answer ([{"role": "user", "content": ...}, ...]), ``response`` the answer's text.
A callable with the attribute ``batched = True`` is called once per batch instead, as
``fn(prompts, responses) -> list of floats`` (equal-length lists, one prompt per answer). Higher is
better. A score that is not a real number, or is NaN or infinite, stops the run naming the prompt.

A reward model scores prompt + answer rendered with its own tokenizer's chat template (plain
"prompt\\nanswer" without one), in passes sized by memory (qsimpo.pairs.judges), reading its single output
logit, or the ``score`` its own code returns. PairRM ranks the answers to one prompt against each other.
Every scorer is called as ``scorer(prompts, responses, where, sizes)``: ``sizes`` says how many consecutive
answers belong to each prompt (PairRM needs them together; the others score each answer alone).
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import numbers
import os
import sys
import time
from pathlib import Path

import torch

from qsimpo.console import warn
from qsimpo.errors import InputNotFound, UsageError

SPEC_HELP = ("module:function or path/to/file.py:function (a Python scorer); a folder or Hub id of a reward model "
             "(a sequence classifier with one output, e.g. Skywork/Skywork-Reward-Llama-3.1-8B-v0.2, or one with its own "
             "modelling code such as RLHFlow/ArmoRM-Llama3-8B-v0.1, with --trust-remote-code); or PairRM, the paper's "
             "pairwise judge: llm-blender/PairRM, its folder, or pairrm:FOLDER_OR_HUB_ID")
REMOTE_CODE = ("--trust-remote-code lets qsimpo import and run the Python files that come with the model (its own "
               "modelling code): pass it if you trust their author")


def load_scorer(spec: str, device: str | None = None, batch_size: int | None = None, trust_remote_code: bool = False):
    """The scorer ``spec`` names: a CallableScorer, a RewardModel or a PairRM. Bad specs are UsageError/InputNotFound.

    ``batch_size``: at most this many rows per forward pass (None: as many as the memory budget allows)."""
    from qsimpo.pairs.pairrm import PairRM, ranker_config

    if spec.startswith("pairrm:"):
        return PairRM(spec[len("pairrm:"):], device or "cpu", max_rows=batch_size)
    target, sep, name = spec.rpartition(":")
    if sep and target and name and not (len(target) == 1 and name.startswith(("\\", "/"))):  # not C:\ or C:/
        return CallableScorer(spec, _import_callable(spec, target, name))
    config = _model_config(spec)
    if config.get("ranker_type") is not None:
        if ranker_config(spec) is None:
            raise UsageError(f"--scorer {spec} is an LLM-Blender ranker of type {config['ranker_type']!r}; qsimpo runs "
                             f"its pairwise ranker (ranker_type \"pairranker\", PairRM); give {SPEC_HELP}")
        return PairRM(spec, device or "cpu", config, max_rows=batch_size)
    return RewardModel(spec, device or "cpu", batch_size, trust_remote_code, config)


def _model_config(spec: str) -> dict:
    """The config.json of the model ``spec`` names, or one message saying what is there instead."""
    import json

    from qsimpo.data import looks_local
    from qsimpo.run_dir import fetch

    local = Path(spec).expanduser()
    if looks_local(spec) and not local.exists():
        raise InputNotFound(f"--scorer {spec}: no such folder; give {SPEC_HELP}")
    if local.is_file():
        raise UsageError(f"--scorer {spec} is a file, not a model folder; a Python scorer is given as {spec}:FUNCTION; "
                         f"give {SPEC_HELP}")
    path = fetch(spec, "config.json")
    if path is None:
        if local.is_dir():
            held = sorted(p.name for p in local.iterdir())
            what = "a LoRA adapter (adapter_config.json), not a judge" if "adapter_config.json" in held else \
                f"a folder without config.json (it holds: {', '.join(held[:8]) or 'nothing'}{' ...' if len(held) > 8 else ''})"
            raise UsageError(f"--scorer {spec} is {what}; give {SPEC_HELP}")
        raise InputNotFound(f"--scorer {spec}: not a Python scorer (no ':') and no model of that name could be read "
                            f"(no config.json in a folder or Hub repo {spec}); give {SPEC_HELP}")
    try:
        config = json.loads(path.read_text())
    except ValueError as e:
        raise UsageError(f"--scorer {spec}: its config.json is not JSON ({e}); give {SPEC_HELP}") from None
    if not isinstance(config, dict):
        raise UsageError(f"--scorer {spec}: its config.json is not a JSON object; give {SPEC_HELP}")
    return config


def _import_callable(spec: str, target: str, name: str):
    if target.endswith(".py") or "/" in target or os.sep in target:
        path = Path(target).expanduser()
        if not path.is_file():
            raise InputNotFound(f"--scorer {spec}: no file {target}; give path/to/file.py:function or module:function")
        module_name = f"qsimpo_scorer_{abs(hash(str(path.resolve())))}"
        where = f"the file {target}"
        try:
            module_spec = importlib.util.spec_from_file_location(module_name, path)
            module = importlib.util.module_from_spec(module_spec)
            sys.modules[module_name] = module  # dataclasses and pickling look the module up by name
            module_spec.loader.exec_module(module)
        except Exception as e:
            sys.modules.pop(module_name, None)
            raise UsageError(f"--scorer {spec}: {where} does not import: {type(e).__name__}: {e}") from e
    else:
        where = f"the module {target}"
        if os.getcwd() not in sys.path:  # `qsimpo` as a console script does not put the current folder on the path
            sys.path.insert(0, os.getcwd())
        try:
            module = importlib.import_module(target)
        except Exception as e:
            raise UsageError(f"--scorer {spec}: {where} does not import: {type(e).__name__}: {e}; give module:function "
                             "with the module importable from here, or path/to/file.py:function") from e
    if not hasattr(module, name):
        found = sorted(k for k, v in vars(module).items()  # its own functions, not the names it imported
                       if callable(v) and not k.startswith("_") and getattr(v, "__module__", None) == module.__name__)
        raise UsageError(f"--scorer {spec}: {where} has no {name!r} (its functions: {', '.join(found) or 'none'})")
    fn = getattr(module, name)
    if not callable(fn):
        raise UsageError(f"--scorer {spec}: {name!r} in {where} is a {type(fn).__name__}, not a function; the scorer is "
                         "called as fn(prompt_messages, response) -> float")
    return fn


def check_scores(spec: str, values, prompts: list, responses: list[str], where: list[str]) -> list[float]:
    """The scores as floats; anything that is not one real, finite number per answer stops the run, naming the prompt."""
    values = list(values) if not isinstance(values, (str, bytes)) and hasattr(values, "__iter__") else values
    if not isinstance(values, list) or len(values) != len(responses):
        got = f"{len(values)} values" if isinstance(values, list) else f"a {type(values).__name__}"
        raise UsageError(f"--scorer {spec}: returned {got} for {len(responses)} answers; a batched scorer returns one "
                         "number per answer")
    out = []
    for value, prompt, location in zip(values, prompts, where):
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise UsageError(f"--scorer {spec} returned {value!r} (a {type(value).__name__}) for the prompt at {location} "
                             f"({_show(prompt)}); a score is a real number (int or float)")
        if not math.isfinite(float(value)):
            raise UsageError(f"--scorer {spec} returned {float(value)} for the prompt at {location} ({_show(prompt)}); "
                             "a score must be a finite number")
        out.append(float(value))
    return out


def _show(prompt: list[dict]) -> str:
    text = prompt[-1]["content"] if prompt else ""
    return repr(text if len(text) <= 60 else text[:57] + "...")


class CallableScorer:
    """A Python function as the scorer, per answer or (``fn.batched = True``) per batch."""

    kind = "python"

    def __init__(self, spec: str, fn):
        self.spec, self.fn = spec, fn
        self.batched = bool(getattr(fn, "batched", False))
        self.scored, self.seconds = 0, 0.0

    def __call__(self, prompts: list[list[dict]], responses: list[str], where: list[str],
                 sizes: list[int] | None = None) -> list[float]:
        t0 = time.perf_counter()
        if self.batched:
            values = self.fn(prompts, responses)
        else:
            values = [self.fn(prompt, response) for prompt, response in zip(prompts, responses)]
        self.seconds += time.perf_counter() - t0
        self.scored += len(responses)
        return check_scores(self.spec, values, prompts, responses, where)

    def cut_line(self) -> str | None:
        return None


class RewardModel:
    """A sequence-classification reward model, applied with its own tokenizer and chat template, in passes sized by
    memory. With its own modelling code (``auto_map``, e.g. ArmoRM) it runs only under --trust-remote-code, reads
    the ``score`` its forward returns, and batches only answers of equal length (its code may not know padding)."""

    kind = "reward_model"

    def __init__(self, name: str, device: str, batch_size: int | None = None, trust_remote_code: bool = False,
                 raw_config: dict | None = None):
        from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

        self.spec, self.device, self.max_rows = name, device, batch_size
        raw = raw_config if raw_config is not None else _model_config(name)
        auto_map = raw.get("auto_map") or {}
        self.remote = "AutoModelForSequenceClassification" in auto_map
        if (self.remote or "AutoConfig" in auto_map) and not trust_remote_code:
            code = auto_map.get("AutoModelForSequenceClassification") or auto_map.get("AutoConfig")
            raise UsageError(f"--scorer {name} ships its own modelling code ({code}), which qsimpo runs only when told: "
                             f"{REMOTE_CODE}")
        try:
            config = AutoConfig.from_pretrained(name, trust_remote_code=trust_remote_code)
        except (OSError, ValueError) as e:
            raise InputNotFound(f"--scorer {name}: its config.json does not load as a transformers model ({e}); give "
                                f"{SPEC_HELP}") from None
        architectures = config.architectures or []
        if not self.remote and not any(a.endswith("ForSequenceClassification") for a in architectures):
            raise UsageError(f"--scorer {name} is not a sequence classifier (its architectures: "
                             f"{', '.join(architectures) or 'none recorded'}); give {SPEC_HELP}")
        if not self.remote and config.num_labels != 1:
            raise UsageError(f"--scorer {name} has {config.num_labels} outputs: a reward model has one (num_labels=1)")
        if self.remote:
            warn(f"--trust-remote-code: running {name}'s own modelling code ({auto_map['AutoModelForSequenceClassification']})")
        dtype = torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
        self.tokenizer = AutoTokenizer.from_pretrained(name, trust_remote_code=trust_remote_code)
        self.model = AutoModelForSequenceClassification.from_pretrained(name, dtype=dtype, trust_remote_code=trust_remote_code)
        self.model.to(device).eval()
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        if self.model.config.pad_token_id is None:  # batches are padded; the score is read at the last real token
            self.model.config.pad_token_id = self.tokenizer.pad_token_id
        self.tokenizer.truncation_side = "left"  # keep the end of the answer, where the score is read
        self.limit = min(getattr(config, "max_position_embeddings", None) or 2048, self.tokenizer.model_max_length)
        self.config, self.dtype_bytes = config, 2 if dtype == torch.bfloat16 else 4
        self.scored = self.truncated = 0
        self.seconds = 0.0

    def text(self, prompt: list[dict], response: str) -> str:
        if self.tokenizer.chat_template:
            return self.tokenizer.apply_chat_template(prompt + [{"role": "assistant", "content": response}], tokenize=False)
        return "\n".join(m["content"] for m in prompt) + "\n" + response

    @torch.no_grad()
    def __call__(self, prompts: list[list[dict]], responses: list[str], where: list[str],
                 sizes: list[int] | None = None) -> list[float]:
        from qsimpo.pairs import judges

        t0 = time.perf_counter()
        special = not self.tokenizer.chat_template  # a template writes its own BOS
        texts = [self.text(p, r) for p, r in zip(prompts, responses)]
        lengths = [len(ids) for ids in self.tokenizer(texts, add_special_tokens=special)["input_ids"]]
        self.truncated += sum(n > self.limit for n in lengths)
        lengths = [min(n, self.limit) for n in lengths]
        cost = lambda n, length: n * judges.activation_bytes(self.config, length, self.dtype_bytes, False)  # noqa: E731
        values = [0.0] * len(texts)
        for part in judges.batches(lengths, cost, judges.budget(self.device), self.max_rows, equal_lengths=self.remote):
            enc = self.tokenizer([texts[i] for i in part], padding=True, truncation=True, max_length=self.limit,
                                 add_special_tokens=special, return_tensors="pt").to(self.device)
            out = self.model(**enc)
            scores = out.score if getattr(out, "score", None) is not None else out.logits[:, 0]  # ArmoRM-style: .score
            for i, v in zip(part, scores.float().reshape(-1).tolist()):
                values[i] = v
        self.seconds += time.perf_counter() - t0
        self.scored += len(texts)
        return check_scores(self.spec, values, prompts, responses, where)

    def cut_line(self) -> str | None:
        """What did not fit, as the end-of-run line says it."""
        if not self.truncated:
            return None
        return (f"{self.truncated} prompt + answer texts were longer than the reward model's {self.limit} tokens: "
                "it judged their last tokens (the beginning of the prompt was cut)")
