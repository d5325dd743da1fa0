"""Scorers: what judges the sampled answers of `qsimpo pairs`, given as --scorer SPEC.

    module:function           a Python callable, imported (the current folder is on the path)
    path/to/file.py:function  a Python callable in a file
    FOLDER_OR_HUB_ID          a reward model: an AutoModelForSequenceClassification with one output

A callable is called once per answer as ``fn(prompt, response) -> float``: ``prompt`` is the chat
messages before the answer ([{"role": "user", "content": ...}, ...]), ``response`` the answer's text.
A callable with the attribute ``batched = True`` is called once per batch instead, as
``fn(prompts, responses) -> list of floats`` (equal-length lists, one prompt per answer). Higher is
better. A score that is not a real number, or is NaN or infinite, stops the run naming the prompt.

A reward model scores prompt + answer rendered with its own tokenizer's chat template (plain
"prompt\\nanswer" without one), in batches, reading its single output logit.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import numbers
import os
import sys
from pathlib import Path

import torch

from qsimpo.errors import InputNotFound, UsageError

SPEC_HELP = ("module:function or path/to/file.py:function (a Python scorer), or a folder or Hub id of a reward model "
             "(a sequence classifier with one output)")


def load_scorer(spec: str, device: str | None = None, batch_size: int = 16, trust_remote_code: bool = False):
    """The scorer ``spec`` names: a CallableScorer or a RewardModel. Bad specs are UsageError/InputNotFound."""
    target, sep, name = spec.rpartition(":")
    if sep and target and name and not (len(target) == 1 and name.startswith(("\\", "/"))):  # not C:\ or C:/
        return CallableScorer(spec, _import_callable(spec, target, name))
    return RewardModel(spec, device or "cpu", batch_size, trust_remote_code)


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

    def __init__(self, spec: str, fn):
        self.spec, self.fn = spec, fn
        self.batched = bool(getattr(fn, "batched", False))

    def __call__(self, prompts: list[list[dict]], responses: list[str], where: list[str]) -> list[float]:
        if self.batched:
            values = self.fn(prompts, responses)
        else:
            values = [self.fn(prompt, response) for prompt, response in zip(prompts, responses)]
        return check_scores(self.spec, values, prompts, responses, where)


class RewardModel:
    """A sequence-classification reward model, applied with its own tokenizer and chat template, in batches."""

    def __init__(self, name: str, device: str, batch_size: int = 16, trust_remote_code: bool = False):
        from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

        from qsimpo.data import looks_local

        self.spec, self.device, self.batch_size = name, device, batch_size
        if looks_local(name) and not Path(name).expanduser().exists():
            raise InputNotFound(f"--scorer {name}: no such folder; give {SPEC_HELP}")
        try:
            config = AutoConfig.from_pretrained(name, trust_remote_code=trust_remote_code)
        except (OSError, ValueError) as e:
            raise InputNotFound(f"--scorer {name}: not a Python scorer (no ':') and not a model that loads ({e}); give "
                                f"{SPEC_HELP}") from None
        architectures = config.architectures or []
        remote = "AutoModelForSequenceClassification" in (getattr(config, "auto_map", None) or {})
        if not remote and not any(a.endswith("ForSequenceClassification") for a in architectures):
            raise UsageError(f"--scorer {name} is not a sequence classifier (its architectures: "
                             f"{', '.join(architectures) or 'none recorded'}); a reward model is an "
                             "AutoModelForSequenceClassification with one output, or give a Python scorer as module:function")
        if not remote and config.num_labels != 1:
            raise UsageError(f"--scorer {name} has {config.num_labels} outputs: a reward model has one (num_labels=1)")
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

    def text(self, prompt: list[dict], response: str) -> str:
        if self.tokenizer.chat_template:
            return self.tokenizer.apply_chat_template(prompt + [{"role": "assistant", "content": response}], tokenize=False)
        return "\n".join(m["content"] for m in prompt) + "\n" + response

    @torch.no_grad()
    def __call__(self, prompts: list[list[dict]], responses: list[str], where: list[str]) -> list[float]:
        special = not self.tokenizer.chat_template  # a template writes its own BOS
        values = []
        for i in range(0, len(responses), self.batch_size):
            texts = [self.text(p, r) for p, r in zip(prompts[i:i + self.batch_size], responses[i:i + self.batch_size])]
            enc = self.tokenizer(texts, padding=True, truncation=True, max_length=self.limit, add_special_tokens=special,
                                 return_tensors="pt").to(self.device)
            out = self.model(**enc)
            scores = out.score if getattr(out, "score", None) is not None else out.logits[:, 0]  # ArmoRM-style: .score
            values += scores.float().reshape(-1).tolist()
        return check_scores(self.spec, values, prompts, responses, where)
