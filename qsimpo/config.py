"""The ``qsimpo train`` configuration: schema, field docs, YAML + CLI overrides, validation.

One pydantic dataclass per YAML section. Each field carries its type, its bounds (``gt``, ``ge``,
``lt``) and its one-line ``description``, shown by ``qsimpo train --help`` and docs/config.md.
pydantic checks types, choices, bounds and unknown keys; ``validate`` adds the checks that involve
several fields. ``load_config`` collects every problem and raises them together in one
``ConfigError``, each naming the key, the value and the fix.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import ConfigDict, Field, Strict, TypeAdapter, ValidationError
from pydantic.dataclasses import dataclass

from qsimpo.errors import UsageError


class ConfigError(UsageError):
    """All problems found in a config, one per line."""

    def __init__(self, problems: list[str], source: str | None = None):
        self.problems = problems
        head = f"invalid config{f' {source}' if source else ''} ({len(problems)} problem{'s' * (len(problems) != 1)}):"
        super().__init__("\n".join([head] + [f"  - {p}" for p in problems]))


SECTION = ConfigDict(extra="forbid")  # an unknown key is an error
# Values are taken as written, never converted: `true` is no number, 1 or "yes" no boolean, 20240101
# no text (quote it in YAML; on the command line text fields keep the text as typed).
Int, Float, Bool, Text = (Annotated[t, Strict()] for t in (int, float, bool, str))


def _f(default: Any, doc: str, hint: str | None = None, **bounds):
    """A field: its default, its one-line doc, bounds (gt/ge/lt) and a hint that follows a bound's error."""
    extra = {"hint": hint} if hint else None
    if isinstance(default, (list, dict)):
        return Field(default_factory=lambda d=default: type(d)(d), description=doc, json_schema_extra=extra, **bounds)
    return Field(default, description=doc, json_schema_extra=extra, **bounds)


@dataclass(config=SECTION)
class ModelConfig:
    name_or_path: Text = _f("", "Hub id or local folder of the base (SFT) model, or a .gguf file (converted once into a cached transformers folder).")
    gguf_file: Text | None = _f(None, "Name of the .gguf file inside the folder or Hub repo name_or_path (None: name_or_path is itself the model or the .gguf file).")
    revision: Text | None = _f(None, "Hub revision (branch, tag or commit) of the base model.")
    quantization: Literal["nf4", "int8", "none"] = _f("nf4", "Base weights: nf4 (4-bit NormalFloat, double quant), int8, or none.")
    compute_dtype: Literal["auto", "bfloat16", "float16", "float32"] = _f("auto", "Compute dtype: auto (bf16 where supported, else fp32 on CPU / fp16 on GPU), bfloat16, float16, float32.")
    attn_implementation: Text = _f("sdpa", "Attention kernel passed to from_pretrained: sdpa, eager, flex_attention (CUDA training: block-sparse mask, pairs packed with no padding), flash_attention_2 (needs train.packing none).")
    trust_remote_code: Bool = _f(False, "Run custom modelling code shipped with the model (off: only trusted code).")
    chat_template: Text | None = _f(None, "Chat template for a base model that has none (or to replace its own): a shipped name (chatml, gemma, llama3, zephyr), a .jinja file, or the Jinja text; kept in the adapter for every later command (None: the tokenizer's own, or the SFT adapter's).")
    sft_adapter: Text | None = _f(None, "`qsimpo train` only: the adapter folder of a `qsimpo sft` run to start from; SimPO trains a new adapter on top of it, frozen, and the SFT model everywhere is the base plus this adapter.")


@dataclass(config=SECTION)
class LoraConfig:
    r: Int = _f(16, "LoRA rank.", "8 to 64 is typical", gt=0)
    alpha: Float = _f(32, "LoRA scaling numerator (scale = alpha / r).", "often 2 × r", gt=0)
    dropout: Float = _f(0.05, "Dropout on the LoRA input.", ge=0, lt=1)
    target_modules: list[Text] | Text = _f("all-linear", "Modules to adapt: 'all-linear' (every linear layer but the output head) or a list of names.")


@dataclass(config=SECTION)
class DataConfig:
    path: Text = _f("", "Training data: a JSONL/JSON/parquet file, a folder saved by datasets, or a Hub dataset id.")
    split: Text = _f("train", "Split to read when `path` is a Hub dataset or a DatasetDict folder.")
    subset: Text | None = _f(None, "Configuration (subset) name of a Hub dataset with several, as datasets.load_dataset's `name`.")
    data_dir: Text | None = _f(None, "Folder inside a Hub dataset repo to read, e.g. harmless-base for Anthropic/hh-rlhf.")
    format: Literal["auto", "explicit", "conversational", "implicit"] = _f("auto", "Row format: auto (detected), explicit (prompt/chosen/rejected strings), conversational (message lists), implicit (full transcripts, HH-RLHF).")
    columns: dict[Text, Text] | None = _f(None, "Columns of other names, as role: column with roles prompt, chosen, rejected, system, e.g. {prompt: question, system: system} (Intel/orca_dpo_pairs); unmapped prompt/chosen/rejected are read from columns of their own name, a system column becomes a system message before the prompt.")
    max_length: Int = _f(1024, "Max tokens of prompt + response; longer pairs are truncated (prompt first, from the left).", gt=1)
    max_prompt_length: Int | None = _f(None, "Max prompt tokens kept when a pair must be truncated (must be < max_length; None: max_length // 2).", gt=0)
    max_rows: Int | None = _f(None, "Read at most this many rows (None: all).", "or null for all rows", gt=0)
    on_bad_row: Literal["error", "skip"] = _f("error", "What a malformed row does: error (stop, naming file and row) or skip (count and report).")
    eval: Float | Text | None = _f(None, "Held-out pairs for in-training evaluation: a path like `path`, or a fraction like 0.05 of the training rows.")
    system_prompt: Text | None = _f(None, "System message prepended to conversational/explicit prompts when the chat template supports it.")

    @property
    def eval_fraction(self) -> float | None:
        """``eval`` as a fraction of the training rows to hold out; None when it names a source (or is unset)."""
        try:
            return float(self.eval)
        except (TypeError, ValueError):
            return None

    @property
    def prompt_limit(self) -> int:
        """The prompt tokens kept when a pair must be cut: ``max_prompt_length``, else ``max_length // 2``.

        Derived here, read by tokenization, so a config is never filled in by validation."""
        return self.max_prompt_length if self.max_prompt_length is not None else self.max_length // 2


@dataclass(config=SECTION)
class SimPOConfig:
    beta: Float = _f(2.0, "β: reward scale applied to the length-normalized log-likelihood.", "the paper uses 2.0 to 10", gt=0)
    gamma: Float | None = _f(None, "γ: absolute target reward margin (TRL's `simpo_gamma`). Give this or gamma_beta_ratio, not both.", "a target margin", ge=0)
    gamma_beta_ratio: Float | None = _f(None, "γ/β as in the paper's configs (γ = ratio × β). Default 0.5 when neither is given.", ge=0)
    label_smoothing: Float = _f(0.0, "Conservative smoothing ε in [0, 0.5): mixes in ε of the flipped-preference loss (off by default).", ge=0, lt=0.5)
    loss_type: Literal["sigmoid", "hinge"] = _f("sigmoid", "sigmoid (the paper's SimPO) or hinge (max(0, 1 - β·Δ + γ)).")
    sft_weight: Float = _f(0.0, "λ: weight of an NLL term on the chosen responses (CPO-SimPO; TRL's `cpo_alpha`); 0 is pure SimPO.", "0 disables the NLL term", ge=0)
    sft_reduction: Literal["tokens", "pairs"] = _f("tokens", "How the NLL term averages: tokens (over every chosen token of the micro-batch, as the paper's code and TRL's cpo_alpha) or pairs (each pair's average log-prob, averaged over pairs).")

    @property
    def resolved_gamma(self) -> float:
        """γ in absolute units, whichever way it was given."""
        if self.gamma is not None:
            return float(self.gamma)
        ratio = 0.5 if self.gamma_beta_ratio is None else self.gamma_beta_ratio
        return float(ratio) * float(self.beta)


LOSSES = ("simpo", "dpo", "orpo", "cpo", "arpo")


@dataclass(config=SECTION)
class LossConfig:
    type: Literal["simpo", "dpo", "orpo", "cpo", "arpo"] = _f("simpo", "The preference loss: simpo (default), dpo, orpo, cpo or arpo; its parameters go in the section of its name (docs/losses.md).")


@dataclass(config=SECTION)
class DPOConfig:
    beta: Float = _f(0.1, "β: scale of the implicit reward β·(log π − log π_ref) on summed log-probs (the reference is the base with the adapter off).", "the paper uses 0.1 to 0.5", gt=0)
    label_smoothing: Float = _f(0.0, "Conservative smoothing ε in [0, 0.5) (cDPO); off by default.", ge=0, lt=0.5)


@dataclass(config=SECTION)
class ORPOConfig:
    lam: Float = _f(0.1, "λ: weight of the odds-ratio term added to the NLL of the chosen response (TRL's ORPOConfig `beta`).", "the paper uses 0.1 to 1.0", gt=0)


@dataclass(config=SECTION)
class CPOConfig:
    beta: Float = _f(0.1, "β: scale of the reward β·log π(y|x) on summed log-probs.", gt=0)
    alpha: Float = _f(1.0, "Weight of the NLL term on the chosen responses, a mean over chosen tokens (TRL's `cpo_alpha`).", ge=0)


@dataclass(config=SECTION)
class ARPOConfig:
    beta: Float = _f(0.1, "β: scale of the reward β·log π(y|x) on summed log-probs, as CPO.", gt=0)
    alpha: Float = _f(1.0, "Weight of the NLL term on the chosen responses, a mean over chosen tokens (X-ALMA's `cpo_alpha`).", ge=0)
    relax_coefficient_1: Float = _f(0.9, "c₁ of the rejection weight min(c₁·exp(c₂·|avg_w − avg_l|) − 1, 1) (X-ALMA's relax_cofficient_1).", gt=0)
    relax_coefficient_2: Float = _f(0.4, "c₂ of the rejection weight (X-ALMA's relax_cofficient_2).", ge=0)


@dataclass(config=SECTION)
class TrainConfig:
    output_dir: Text = _f("adapters/run", "Where the adapter, checkpoints, metrics.jsonl and qsimpo.json are written.")
    learning_rate: Float = _f(1e-5, "Peak learning rate of the LoRA weights.", "LoRA SimPO: 1e-6 to 1e-4", gt=0)
    num_epochs: Float = _f(1.0, "Passes over the training pairs (ignored when max_steps > 0).")
    max_steps: Int = _f(-1, "Stop after this many optimizer steps (-1: use num_epochs).", "or -1 to use num_epochs", ge=-1)
    batch_size: Int = _f(2, "Preference pairs per device per micro-batch (`qsimpo sft`: packed rows of up to data.max_length tokens, or conversations with train.packing none).", ge=1)
    gradient_accumulation_steps: Int = _f(8, "Micro-batches per optimizer step.", ge=1)
    lr_scheduler: Text = _f("cosine", "Learning-rate schedule (any transformers SchedulerType: cosine, linear, constant, ...).")
    warmup_ratio: Float = _f(0.1, "Fraction of steps spent warming the learning rate up from 0.", ge=0, lt=1)
    weight_decay: Float = _f(0.0, "AdamW weight decay.", ge=0)
    max_grad_norm: Float = _f(1.0, "Gradient clipping norm.", gt=0)
    optim: Text = _f("adamw_torch", "Optimizer name understood by transformers (adamw_torch, paged_adamw_8bit, ...).")
    gradient_checkpointing: Bool | Literal["auto"] = _f(True, "Recompute activations in the backward pass to save memory: true (every decoder layer), false (none), or auto (only as many layers as train.memory_budget needs; qsimpo plan prints the split).")
    memory_budget: Text | None = _f(None, "Memory the run may use, like 20GiB, that gradient_checkpointing: auto fits into (null: the GPU's free memory at the start; required on the CPU).")
    packing: Literal["shared_prompt", "none"] = _f("shared_prompt", "Batch layout: shared_prompt (prompt once, then chosen, then rejected, in one row) or none (separate chosen/rejected rows).")
    head_chunk_size: Int | None = _f(None, "Apply the output head only at response positions, this many at a time, recomputed in backward (null: sized by the vocabulary so the fp32 block stays within 256 MiB; 0: full logits).", "0 computes full logits", ge=0)
    group_by_length: Bool = _f(True, "Batch pairs of similar length together so little compute goes to padding.")
    fsdp: Bool = _f(False, "Shard the base and LoRA weights, gradients and optimizer state across processes with FSDP2 (full shard; launch with torchrun or accelerate launch).")
    logging_steps: Int = _f(1, "Log metrics every N optimizer steps.", ge=1)
    save_steps: Int = _f(100, "Save a resumable checkpoint every N optimizer steps.", ge=1)
    save_total_limit: Int | None = _f(2, "Keep at most this many checkpoints (None: all).", "or null to keep all", ge=1)
    eval_every: Int = _f(0, "Evaluate reward accuracy on data.eval every N steps (0: only at the end, if data.eval is set).", ge=0)
    resume_from: Text | None = _f(None, "Resume from a checkpoint: 'auto' (latest in output_dir) or a checkpoint folder.")
    seed: Int = _f(42, "Random seed for LoRA init, shuffling and dropout.")
    report_to: list[Text] | Text = _f("none", "Loggers besides metrics.jsonl: none, tensorboard, wandb, or a list.")
    overwrite: Bool = _f(False, "Allow writing into an output_dir that already holds a finished adapter.")
    progress: Bool = _f(True, "Show a progress bar with loss, reward accuracy and throughput.")


@dataclass(config=SECTION)
class Config:
    model: ModelConfig = Field(default_factory=ModelConfig)
    lora: LoraConfig = Field(default_factory=LoraConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    loss: LossConfig = Field(default_factory=LossConfig)
    simpo: SimPOConfig = Field(default_factory=SimPOConfig)
    dpo: DPOConfig = Field(default_factory=DPOConfig)
    orpo: ORPOConfig = Field(default_factory=ORPOConfig)
    cpo: CPOConfig = Field(default_factory=CPOConfig)
    arpo: ARPOConfig = Field(default_factory=ARPOConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


SECTIONS: dict[str, type] = {"model": ModelConfig, "lora": LoraConfig, "data": DataConfig, "loss": LossConfig,
                             "simpo": SimPOConfig, "dpo": DPOConfig, "orpo": ORPOConfig, "cpo": CPOConfig, "arpo": ARPOConfig,
                             "train": TrainConfig}
_CONFIG = TypeAdapter(Config)
# A bound by its name: the Field argument, the attribute of its annotated_types marker and the key of
# pydantic's error context are all "gt", "ge", "lt" or "le".
_BOUNDS = {"gt": ">", "ge": ">=", "lt": "<", "le": "<="}


def _type_name(tp) -> str:
    args = typing.get_args(tp)
    if typing.get_origin(tp) is Annotated:
        return _type_name(args[0])
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in args)
    if typing.get_origin(tp) is Literal:
        return " | ".join(map(str, args))
    if typing.get_origin(tp) is list:
        return f"list[{_type_name(args[0])}]"
    return "null" if tp is type(None) else tp.__name__


def _problem(loc: tuple, errors: list[dict], raw: dict) -> str:
    """One line for everything pydantic found wrong at ``loc`` (a section, or a section's key)."""
    first = errors[0]
    if len(loc) == 1:
        if first["type"] == "unexpected_keyword_argument":
            return _unknown_section(loc[0])
        return f"section {loc[0]!r} must be a mapping of key: value, got {first['input']!r}"
    section, key = loc
    fields = SECTIONS[section].__pydantic_fields__
    if first["type"] == "unexpected_keyword_argument":
        owners = [other for other in LOSSES if other != section and key in SECTIONS[other].__pydantic_fields__]
        if section in (*LOSSES, "loss") and owners:
            where = ", ".join(f"{o}.{key}" for o in owners)
            return (f"{section}.{key} is not a parameter of {'any loss here' if section == 'loss' else 'the ' + section + ' loss'}: "
                    f"{key} belongs to the {', '.join(owners[:-1]) + ' and ' if len(owners) > 1 else ''}{owners[-1]} "
                    f"loss{'es' * (len(owners) > 1)} ({where}); each loss's "
                    f"parameters go in the section of its name, chosen by loss.type")
        close = difflib.get_close_matches(str(key), list(fields), n=1)
        hint = f" (did you mean {section}.{close[0]}?)" if close else ""
        return f"unknown key {section}.{key}{hint}; valid keys: {', '.join(fields)}"
    info, value = fields[key], raw[section][key]
    bounds = [(name, v) for name, v in (first.get("ctx") or {}).items() if name in _BOUNDS]
    if len(errors) == 1 and bounds:
        (name, bound), = bounds
        hint = (info.json_schema_extra or {}).get("hint")
        return f"{section}.{key} = {value!r} must be {_BOUNDS[name]} {bound:g}" + (f" ({hint})" if hint else "")
    if len(errors) == 1 and first["type"] == "literal_error":
        return f"{section}.{key} = {value!r} is not one of {', '.join(map(str, typing.get_args(info.annotation)))}"
    expected = _type_name(info.annotation)
    quote = " (quote it to keep it as text)" if isinstance(value, (int, float)) and "str" in expected.split(" | ") else ""
    return f"{section}.{key} = {value!r} has the wrong type: expected {expected}{quote}"


class _Loader(yaml.SafeLoader):
    """YAML as configs are written: ``1e-5`` is a number (YAML 1.1 wants ``1.0e-5``, PyYAML reads text)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?(?:\d[\d_]*)?\.?\d*[eE][-+]?\d+$"), list("-+0123456789."))


def load_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)


def _text_only(section: str, key: str) -> bool:
    """Whether the field takes text and no number (name_or_path, revision, output_dir, ...)."""
    info = getattr(SECTIONS.get(section), "__pydantic_fields__", {}).get(key)
    names = set(_type_name(info.annotation).split(" | ")) if info else set()
    return "str" in names and not names & {"int", "float", "bool"}


def parse_overrides(args: list[str]) -> tuple[dict[str, dict[str, Any]], list[str]]:
    """``['--data.max_length', '256', '--train.output_dir=x']`` -> nested dict of YAML-parsed values.

    A text field keeps a number as typed (``--model.revision 0123`` stays "0123")."""
    nested: dict[str, dict[str, Any]] = {}
    problems = []
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or "." not in arg:
            problems.append(f"unexpected argument {arg!r}: overrides look like --section.key VALUE (e.g. --data.max_length 256)")
            i += 1
            continue
        key, eq, raw = arg[2:].partition("=")
        if not eq:
            if i + 1 >= len(args):
                problems.append(f"--{key} needs a value (e.g. --{key} VALUE)")
                break
            raw = args[i + 1]
            i += 1
        i += 1
        section, _, name = key.partition(".")
        try:
            value = load_yaml(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        if isinstance(value, (int, float)) and not isinstance(value, bool) and _text_only(section, name):
            value = raw
        nested.setdefault(section, {})[name] = value
    return nested, problems


def merge(base: dict, override: dict) -> dict:
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in base.items()}
    for section, values in override.items():
        if isinstance(values, dict) and isinstance(out.get(section), dict):
            out[section].update(values)
        else:
            out[section] = values
    return out


def build(raw: dict, source: str | None = None) -> Config:
    """Turn a nested dict into a validated Config; raise ConfigError listing every problem.

    pydantic judges every key at once; the keys it rejects are dropped and the rest validated
    again, so the checks across fields (``validate``) still run and report in the same error.
    """
    if not isinstance(raw, dict):
        raise ConfigError([f"the top level must be a mapping with sections {', '.join(SECTIONS)}, got {type(raw).__name__}"], source)
    raw = {section: {} if values is None else values for section, values in raw.items()}
    problems, raw = _string_keys(raw)
    problems += _other_loss_settings(raw)
    try:
        return _checked(_CONFIG.validate_python(raw), problems, source)
    except ValidationError as e:
        found: dict[tuple, list[dict]] = {}
        for err in e.errors():
            found.setdefault(tuple(err["loc"][:2]), []).append(err)
    problems += [_problem(loc, errors, raw) for loc, errors in found.items()]
    kept = {section: dict(values) for section, values in raw.items() if (section,) not in found}
    for section, key in (loc for loc in found if len(loc) == 2):
        kept[section].pop(key, None)
    return _checked(_CONFIG.validate_python(kept), problems, source)


def _other_loss_settings(raw: dict) -> list[str]:
    """A parameter set (to other than its default) in the section of a loss that loss.type does not choose.

    Defaults are allowed so a run's saved config.yaml, which lists every section, loads again."""
    loss = raw.get("loss")
    kind = loss.get("type", "simpo") if isinstance(loss, dict) else "simpo"
    if kind not in LOSSES:
        return []  # pydantic names the bad type
    problems = []
    for other in LOSSES:
        if other == kind or not isinstance(raw.get(other), dict):
            continue
        fields = SECTIONS[other].__pydantic_fields__
        for key, value in raw[other].items():
            if key in fields and value != fields[key].get_default(call_default_factory=True):
                problems.append(f"{other}.{key} = {value!r} belongs to the {other} loss, and loss.type is {kind}: set "
                                f"--loss.type {other} to train with it, or remove {other}.{key} from the config")
    return problems


def _unknown_section(name) -> str:
    return f"unknown section {name!r}: valid sections are {', '.join(SECTIONS)}"


def _string_keys(raw: dict) -> tuple[list[str], dict]:
    """Problems for keys that are not text (YAML reads `1:` or `null:` as a number or None), and raw without them."""
    problems, kept = [], {}
    for section, values in raw.items():
        if not isinstance(section, str):
            problems.append(_unknown_section(section))
            continue
        if section in SECTIONS and isinstance(values, dict):
            for key in [k for k in values if not isinstance(k, str)]:
                problems.append(f"unknown key {section}.{key!r}: keys are field names (qsimpo train --help lists them)")
            values = {k: v for k, v in values.items() if isinstance(k, str)}
        kept[section] = values
    return problems, kept


def _checked(cfg: Config, problems: list[str], source: str | None) -> Config:
    problems = problems + validate(cfg)
    if problems:
        raise ConfigError(problems, source)
    return cfg


PACKED_ATTENTION = ("sdpa", "eager", "flex_attention")  # the kernels that take qsimpo.train.packing's mask


def parse_size(text: str, what: str = "--gpu-memory") -> int:
    """Bytes of a size written like 24GiB, 80GB or 16384MiB (GiB when no unit is given)."""
    m = re.fullmatch(r"\s*([\d.]+)\s*(GiB|GB|MiB|MB)?\s*", str(text), re.IGNORECASE)
    if not m:
        raise ValueError(f"{what} = {text!r}: write a size like 24GiB, 80GB or 16384MiB")
    unit = (m.group(2) or "GiB").lower()
    return int(float(m.group(1)) * {"gib": 2**30, "gb": 10**9, "mib": 2**20, "mb": 10**6}[unit])


def validate(cfg: Config) -> list[str]:
    """The checks that involve several fields (or none fits a bound); each message names key, value and fix."""
    p: list[str] = []
    m, d, s, t = cfg.model, cfg.data, cfg.simpo, cfg.train
    if m.sft_adapter and cfg.loss.type == "dpo":
        # DPO's reference must then be base + SFT adapter; the reference pass turns every adapter off
        p.append(f"model.sft_adapter = {m.sft_adapter!r} with loss.type dpo: DPO's reference would be the base without the "
                 "SFT adapter, not the SFT model. Merge the SFT adapter first (qsimpo merge) and train DPO on the merged "
                 "model, or use a loss with no reference (simpo, orpo, cpo, arpo) on top of the SFT adapter")
    if not m.name_or_path:
        p.append("model.name_or_path is empty: set it to a Hub id (e.g. meta-llama/Meta-Llama-3-8B-Instruct) or a local model folder")
    if m.gguf_file is not None and (not m.gguf_file.lower().endswith(".gguf") or m.name_or_path.lower().endswith(".gguf")):
        p.append(f"model.gguf_file = {m.gguf_file!r} names the .gguf file inside the folder or Hub repo model.name_or_path: "
                 "give a file name ending in .gguf, or leave gguf_file unset and point name_or_path at the .gguf file itself")
    if not d.path:
        p.append("data.path is empty: set it to a JSONL/JSON/parquet file, a datasets folder or a Hub dataset id")
    if s.gamma is not None and s.gamma_beta_ratio is not None:
        p.append(f"simpo.gamma = {s.gamma} and simpo.gamma_beta_ratio = {s.gamma_beta_ratio} are both set: choose one (gamma = gamma_beta_ratio × beta)")
    if s.loss_type == "hinge" and s.label_smoothing:
        p.append("simpo.label_smoothing applies to the sigmoid loss only: set it to 0 with loss_type hinge")
    if d.prompt_limit >= d.max_length:
        p.append(f"data.max_prompt_length = {d.prompt_limit} must be < data.max_length = {d.max_length}, or responses get no tokens: lower it or raise max_length")
    if d.eval_fraction is not None and not 0 < d.eval_fraction < 1:
        p.append(f"data.eval = {d.eval!r} as a fraction must be in (0, 1)")
    if t.max_steps == 0:
        p.append("train.max_steps = 0 must be > 0, or -1 to use num_epochs")
    if t.max_steps == -1 and t.num_epochs <= 0:
        p.append(f"train.num_epochs = {t.num_epochs} must be > 0 (or set train.max_steps)")
    if t.memory_budget is not None:
        try:
            parse_size(t.memory_budget, "train.memory_budget")
        except ValueError as e:
            p.append(str(e))
    if t.packing == "shared_prompt" and m.attn_implementation not in PACKED_ATTENTION:
        p.append(f"model.attn_implementation = {m.attn_implementation!r} cannot take the shared-prompt mask (rejected tokens "
                 f"must not see chosen ones): use one of {', '.join(PACKED_ATTENTION)}, or set train.packing none")
    return p


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> Config:
    """Read a YAML config, apply ``--section.key VALUE`` overrides, validate."""
    raw: dict = {}
    source = str(path) if path else None
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError([f"config file {p} does not exist: pass the path of a YAML file (see configs/)"])
        try:
            raw = load_yaml(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError([f"{p} is not valid YAML: {e}"]) from None
    over, problems = parse_overrides(overrides or [])
    if problems:
        raise ConfigError(problems, source)
    return build(merge(raw, over) if isinstance(raw, dict) else raw, source)


def dump_yaml(cfg: Config) -> str:
    """The config as YAML, with the parameters of the chosen loss only (the other losses' sections would be noise)."""
    data = {k: v for k, v in cfg.to_dict().items() if k not in LOSSES or k == cfg.loss.type}
    return yaml.safe_dump(data, sort_keys=False)
