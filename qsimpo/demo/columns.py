"""The demo's columns: what each is called (the adapter's name and the loss it was trained with), the base they
share (by the name users know it by), and what the SFT column is when several adapters are served.

    qsimpo demo --adapter adapters/simpo --adapter adapters/dpo      # columns: SFT | simpo (simpo …) | dpo (dpo β 0.1)

Every adapter must sit on the one base loaded (the demo holds one copy), and all must agree on the SFT
model: the base with no adapter, or, for runs trained on top of `qsimpo sft` (qsimpo.train.stack), the
base plus the same SFT adapter. Which rows run under which adapter is decided per row in one batched
generate (sides.py); nothing here loads a model.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from qsimpo.errors import UsageError

BASE = "__base__"  # peft's adapter name, in adapter_names, for "no adapter": the SFT model
# the parameters a column's label shows for each loss (all of them are in the adapter's qsimpo.json and card)
SHOWN = {"simpo": ("beta", "gamma_resolved"), "dpo": ("beta",), "orpo": ("lam",), "cpo": ("beta", "alpha"),
         "arpo": ("beta", "alpha")}
SYMBOLS = {"beta": "β", "gamma_resolved": "γ", "gamma": "γ", "lam": "λ", "alpha": "α"}


@dataclass(frozen=True)
class Side:
    name: str  # short name: "SFT", "compare", "aligned", or the adapter's name
    label: str  # what the column is called in the UI and in vote rows
    adapter: str  # the peft adapter this side runs under; BASE: none (the SFT model)
    loss: str = ""  # the loss the adapter was trained with, as recorded ("" for the SFT column)


def loss_text(loss: dict | None) -> str:
    """``{"type": "dpo", "beta": 0.1, ...}`` -> "dpo β 0.1"; "loss not recorded" for None."""
    if not loss:
        return "loss not recorded"
    kind = loss.get("type", "simpo")
    params = [f"{SYMBOLS.get(k, k)} {loss[k]:g}" for k in SHOWN.get(kind, ()) if isinstance(loss.get(k), (int, float))]
    return " ".join([kind, ", ".join(params)]).strip()


def recorded(adapter: str, meta: dict) -> dict | None:
    """The loss ``adapter`` was trained with (qsimpo.run_dir.recorded_loss, from its qsimpo.json or config.yaml)."""
    from qsimpo.run_dir import record_dir, recorded_loss

    return recorded_loss(record_dir(adapter), meta)


def short_names(adapters: list[str]) -> list[str]:
    """A name per adapter that tells them apart: the folder's name (with its parent's for a quickstart-style
    ``.../adapter`` or a ``checkpoint-N``) or the Hub id; the whole argument where two would be the same."""
    names = []
    for a in adapters:
        p = Path(a)
        generic = p.name in ("adapter", "") or p.name.startswith("checkpoint-")
        names.append(f"{p.parent.name}/{p.name}" if generic and p.parent.name else (p.name or a))
    return [a if names.count(n) > 1 else n for a, n in zip(adapters, names)]


def base_label(base: str, meta: dict) -> str:
    """The base as users know it: its Hub id (not qsimpo's copy of it), with the GGUF file it was read from when the
    adapter records one; a folder of qsimpo's GGUF cache (named by a hash) by the GGUF file it was converted from.
    For showing only: `qsimpo push` needs a Hub id and refuses a local base (qsimpo.export.hub)."""
    import json

    from qsimpo.gguf_in import SOURCE_RECORD
    from qsimpo.load import hub_name, is_local

    name = hub_name(base)
    if name == base and is_local(base):
        try:
            record = json.loads((Path(base).expanduser() / SOURCE_RECORD).read_text())
            name = f"{record.get('gguf_file') or base} (converted by qsimpo)"
        except (OSError, ValueError):  # no record: a model folder of the user's own, named by its path
            pass
    gguf = meta.get("base_model_gguf_file") if base == meta.get("base_model") else None
    return f"{name} ({gguf})" if gguf else name


def check_one_base(adapters: list[str], metas: list[dict], base: str | None) -> None:
    """Every adapter records the same base (by the name users know it by) and quantization; with --base given, that
    base serves all."""
    from qsimpo.load import hub_name

    quantized = {m.get("quantization", "nf4") for m in metas}
    if len(quantized) > 1:  # one base in memory is quantized one way
        listed = "; ".join(f"{a}: {m.get('quantization', 'nf4')}" for a, m in zip(adapters, metas))
        raise UsageError(f"the adapters were trained on bases quantized differently ({listed}), and the demo holds one "
                         "base: serve adapters trained with the same model.quantization together")
    if base:
        return
    recorded = [hub_name(str(m["base_model"])) if m.get("base_model") else None for m in metas]
    known = {r for r in recorded if r}
    if len(known) > 1:
        listed = "; ".join(f"{a}: {r or 'none recorded'}" for a, r in zip(adapters, recorded))
        raise UsageError(f"the adapters were trained on different bases ({listed}), and the demo holds one base: serve "
                         "adapters of one base together, or pass --base MODEL to load them all on that one")


def sft_adapter_of(adapters: list[str], metas: list[dict]) -> bool:
    """Whether the SFT column is base + an SFT adapter (runs on top of `qsimpo sft`) rather than the bare base.
    All adapters must agree: all on the bare base, or all on one SFT adapter (the same weights)."""
    stacked = [bool(m.get("sft_adapter")) for m in metas]
    if not any(stacked):
        return False
    if not all(stacked):
        on = [a for a, s in zip(adapters, stacked) if s]
        bare = [a for a, s in zip(adapters, stacked) if not s]
        raise UsageError(f"{', '.join(on)} {'was' if len(on) == 1 else 'were'} trained on top of an SFT adapter (their "
                         f"SFT column is base + that adapter) and {', '.join(bare)} on the bare base: the demo has one "
                         "SFT column, so serve them in separate demos")
    first = _sft_weights(adapters[0], metas[0])
    for adapter, meta in zip(adapters[1:], metas[1:]):
        other = _sft_weights(adapter, meta)
        if other.keys() != first.keys() or any(not other[k].equal(first[k]) for k in first):
            raise UsageError(f"{adapters[0]} and {adapter} were trained on top of different SFT adapters "
                             f"({_sft_source(metas[0])} and {_sft_source(meta)}): the demo has one SFT column, so "
                             "serve adapters trained on the same SFT adapter together")
    return True


def _sft_source(meta: dict) -> str:
    return str((meta.get("sft_adapter") or {}).get("source", "?"))


def _sft_weights(adapter: str, meta: dict) -> dict:
    """The SFT adapter's weights saved inside a stacked run's folder (its sft/ subfolder; qsimpo.train.stack)."""
    from safetensors.torch import load_file

    from qsimpo.errors import InputNotFound
    from qsimpo.load import is_local
    from qsimpo.run_dir import fetch
    from qsimpo.train.stack import SFT

    sub = (meta.get("sft_adapter") or {}).get("subfolder", SFT)
    name = f"{sub}/adapter_model.safetensors"
    found = fetch(adapter, name)
    if found is None and is_local(adapter):  # a checkpoint-N folder: sft/ beside it in the run folder
        found = fetch(Path(adapter).parent, name)
    if found is None:
        raise InputNotFound(f"--adapter {adapter} records an SFT adapter in {sub}/, but holds no {name}: copy or "
                            "download the whole adapter folder again")
    return load_file(found)
