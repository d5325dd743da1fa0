"""DPO's reference log-probs: the base with the adapter off, scored once and stored beside the tokenized data.

The reference of a LoRA run is its own base model, which training never changes, so the reference
log-probs of every pair are fixed before the first step. They are computed once, with the training
collator and the chunked head (``pair_sequence_logps``) under peft's ``disable_adapter()`` (no
second model is loaded), and stored in a safetensors file next to the tokenized table in the
datasets cache. Its name and its metadata hold a key of everything the numbers depend on (base
model, revision, quantization, compute dtype, attention kernel, the tokenized data and its max
lengths), so a rerun or a resume reads them back, and any change computes them again: a file whose
key or size does not match is never used. After the pass a DPO step costs what a SimPO step costs.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch

from qsimpo.response_logps import pair_sequence_logps

FILE_PREFIX = "qsimpo-reference-"


@dataclass
class Reference:
    chosen: list[float]  # summed log-prob of each pair's chosen response under the base, in the data's order
    rejected: list[float]
    path: Path
    computed: bool  # False: read back from path
    seconds: float  # of the pass (0 when read back)


def data_fingerprint(pairs) -> str:
    """The tokenized pairs' identity: the datasets table's fingerprint (source, tokenizer, max lengths, code,
    the rows selected), or for a plain list a hash of every pair's ids."""
    table = getattr(pairs, "table", None)
    if table is not None and getattr(table, "_fingerprint", None):
        return f"datasets:{table._fingerprint}:{len(pairs)}"
    h = hashlib.sha256()
    for p in pairs:
        h.update(json.dumps([p["prompt_ids"], p["chosen_ids"], p["rejected_ids"]]).encode())
    return f"ids:{h.hexdigest()}"


def _weights_stamp(name_or_path: str) -> list | None:
    """A local model folder's weight files (name, size, mtime): a model rewritten in place is a new reference."""
    folder = Path(name_or_path).expanduser()
    if not folder.exists():
        return None
    files = [folder] if folder.is_file() else sorted(f for f in folder.iterdir() if f.suffix in (".safetensors", ".bin", ".gguf"))
    return [(f.name, f.stat().st_size, int(f.stat().st_mtime)) for f in files]


def reference_key(cfg, model, pairs, split: str, compute_dtype=None) -> dict:
    m, d = cfg.model, cfg.data
    return {"dtype": str(compute_dtype),  # model.compute_dtype as resolved on this device (auto: bf16 or fp32)
        "base_model": m.name_or_path, "revision": m.revision, "gguf_file": m.gguf_file,
        "commit": getattr(getattr(model, "config", None), "_commit_hash", None), "weights": _weights_stamp(m.name_or_path),
        "quantization": m.quantization, "compute_dtype": m.compute_dtype, "attn_implementation": m.attn_implementation,
        "data": data_fingerprint(pairs), "split": split, "max_length": d.max_length, "max_prompt_length": d.prompt_limit,
        "pairs": len(pairs),
    }


def cache_path(pairs, key: dict, fallback_dir: Path) -> Path:
    """Beside the tokenized table in the datasets cache; for data held in memory only, in ``fallback_dir``."""
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]
    files = getattr(getattr(pairs, "table", None), "cache_files", None)
    folder = Path(files[0]["filename"]).parent if files else Path(fallback_dir)
    return folder / f"{FILE_PREFIX}{digest}.safetensors"


def read_cached(path: Path, key: dict) -> tuple[list[float], list[float]] | None:
    """The stored log-probs if ``path`` holds them for exactly ``key``; None otherwise (missing, damaged, other key)."""
    from safetensors import safe_open

    if not path.is_file():
        return None
    try:
        with safe_open(str(path), "pt") as f:
            if json.loads((f.metadata() or {}).get("key", "null")) != json.loads(json.dumps(key)):
                return None
            chosen, rejected = f.get_tensor("chosen"), f.get_tensor("rejected")
    except Exception:  # a file cut short or not safetensors at all is computed again, never trusted
        return None
    if chosen.shape != (key["pairs"],) or rejected.shape != (key["pairs"],):
        return None
    return chosen.tolist(), rejected.tolist()


def write_cached(path: Path, key: dict, chosen: torch.Tensor, rejected: torch.Tensor) -> None:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(f".{os.getpid()}.partial")  # one per writer: two runs on the same data never share it
    save_file({"chosen": chosen.contiguous(), "rejected": rejected.contiguous()}, str(partial),
              metadata={"key": json.dumps(key, sort_keys=True)})
    partial.replace(path)  # readers see the whole file or none


@torch.no_grad()
def reference_logps(model, pairs, collate, batch_size: int, head_chunk_size: int, compute_dtype,
                    autocast_dtype=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed response log-probs [N] of chosen and rejected under ``model`` with its adapter off, in eval mode."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    chosen, rejected = [], []
    amp = torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype is not None else nullcontext()
    try:
        with model.disable_adapter(), amp:
            for start in range(0, len(pairs), batch_size):
                rows = [pairs[i] for i in range(start, min(start + batch_size, len(pairs)))]
                batch = {k: v.to(device) for k, v in collate(rows).items()}
                c, r = pair_sequence_logps(model, batch, head_chunk_size, compute_dtype)
                chosen.append(c.sum.float().cpu())
                rejected.append(r.sum.float().cpu())
    finally:
        model.train(was_training)
    return torch.cat(chosen), torch.cat(rejected)


def load_or_compute(cfg, model, pairs, split: str, collate, head_chunk_size: int, compute_dtype, fallback_dir: Path,
                    autocast_dtype=None, say=print, resuming: bool = False) -> Reference:
    """The reference log-probs of ``pairs``: read from the cache when its key matches, else computed and stored."""
    key = reference_key(cfg, model, pairs, split, compute_dtype)
    path = cache_path(pairs, key, fallback_dir)
    cached = read_cached(path, key)
    if cached is not None:
        return Reference(*cached, path, computed=False, seconds=0.0)
    if resuming:
        say(f"dpo: resuming, but the reference log-probs of the {split} pairs are not in {path} (deleted, damaged, or "
            "the model or data changed): computing them again")
    elif path.exists():
        say(f"dpo: {path} does not hold the reference log-probs of this model and data: computing them again")
    start = time.perf_counter()
    chosen, rejected = reference_logps(model, pairs, collate, cfg.train.batch_size, head_chunk_size, compute_dtype,
                                       autocast_dtype)
    seconds = time.perf_counter() - start
    write_cached(path, key, chosen, rejected)
    return Reference(chosen.tolist(), rejected.tolist(), path, computed=True, seconds=seconds)


def summary_line(refs: dict[str, Reference]) -> str:
    """One line for the run's summary: how the reference log-probs were obtained."""
    parts = []
    for split, ref in refs.items():
        how = (f"computed once in {ref.seconds:.1f}s (base with the adapter off)" if ref.computed
               else "read back (computed by an earlier run on the same model and data)")
        parts.append(f"{len(ref.chosen)} {split} pairs {how}")
    where = ", ".join(sorted({str(r.path) for r in refs.values()}))
    return f"dpo reference log-probs: {'; '.join(parts)}; stored in {where}"


def provenance(refs: dict[str, Reference]) -> dict:
    return {split: {"pairs": len(r.chosen), "computed": r.computed, "seconds": round(r.seconds, 3), "file": r.path.name}
            for split, r in refs.items()}
