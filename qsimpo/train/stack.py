"""SimPO on top of an SFT adapter (`qsimpo train --model.sft_adapter PATH`): what "SFT" means for such a run.

The paper's Base setting aligns an SFT model. Here the SFT model is the 4-bit base plus the adapter of
`qsimpo sft`, exactly as trained. SimPO trains a new LoRA adapter ("default") on top of it while the SFT
adapter ("sft") stays loaded, frozen and active, so every forward pass is base + SFT + SimPO.

When the run ends the adapter folder is written so that the tools that only know one adapter need no change:

    OUTPUT_DIR/                the aligned model as one LoRA adapter: the SFT and SimPO adapters concatenated
                               (rank r_sft + r; A stacked, B scaled and side by side), which computes
                               base + ΔSFT + ΔSimPO (merge, GGUF, pairs and push read it as any adapter)
    OUTPUT_DIR/sft/            the SFT adapter itself: the SFT side of eval and of the demo
    qsimpo.json                "sft_adapter": {"subfolder": "sft", "source": PATH} says so

Checkpoints hold the SimPO adapter alone, with sft/ beside it, for resuming.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import torch

SFT = "sft"  # the SFT adapter's peft name, and its subfolder in an adapter folder


def stack_on_sft(model, sft_adapter: str):
    """Load the SFT adapter into the PeftModel ``model`` (which holds the new trainable "default"), frozen, both active."""
    from qsimpo.load import check_adapter

    check_adapter(sft_adapter, "model.sft_adapter")
    model.load_adapter(sft_adapter, adapter_name=SFT, is_trainable=False)
    activate_both(model)
    return model


def activate_both(model) -> None:
    """Both adapters in the forward pass; only "default" trains (peft's set_adapter marks every active one trainable)."""
    model.base_model.set_adapter(["default", SFT])
    for name, p in model.named_parameters():
        if f".{SFT}." in name:
            p.requires_grad_(False)


def keep_sft_active():
    """A callback: resuming reloads the adapters through peft's set_adapter, which leaves only "default" active."""
    from transformers import TrainerCallback

    class KeepSFTActive(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kwargs):
            while hasattr(model, "module"):  # DDP: the PeftModel inside holds the adapters
                model = model.module
            if SFT in getattr(model, "peft_config", {}):
                activate_both(model)

    return KeepSFTActive()


def check_sft_base(cfg) -> None:
    """The SFT adapter must sit on the same base, quantized the same way, as the SimPO run."""
    from qsimpo.config import ConfigError
    from qsimpo.run_dir import read_meta

    meta = read_meta(cfg.model.sft_adapter)
    problems = []
    if meta.get("base_model") and meta["base_model"] != cfg.model.name_or_path:
        problems.append(f"model.sft_adapter {cfg.model.sft_adapter} was trained on {meta['base_model']}, and "
                        f"model.name_or_path is {cfg.model.name_or_path}: set --model.name_or_path {meta['base_model']}")
    if meta.get("quantization") and meta["quantization"] != cfg.model.quantization:
        problems.append(f"model.sft_adapter {cfg.model.sft_adapter} was trained on a {meta['quantization']} base, and "
                        f"model.quantization is {cfg.model.quantization}: set --model.quantization {meta['quantization']}")
    if problems:
        raise ConfigError(problems)


def _scale(config: dict) -> float:
    r, alpha = config["r"], config["lora_alpha"]
    return alpha / r ** 0.5 if config.get("use_rslora") else alpha / r


def concatenated(first: tuple[dict, dict], second: tuple[dict, dict]) -> tuple[dict, dict]:
    """(config, weights) of one LoRA adapter computing both adapters' sum: A = [A1; A2], B = [s1·B1, s2·B2], scale 1.

    A module only one of them adapts gets zeros for the other's rank, so every module has rank r1 + r2."""
    (c1, w1), (c2, w2) = first, second
    for c in (c1, c2):
        if c.get("use_dora") or c.get("rank_pattern") or c.get("alpha_pattern"):
            raise ValueError("only plain LoRA adapters (no DoRA, no per-module ranks) can be concatenated")
    r1, r2, s1, s2 = c1["r"], c2["r"], _scale(c1), _scale(c2)
    modules = sorted({k.rsplit(".lora_", 1)[0] for k in (*w1, *w2) if ".lora_" in k})
    out = {}
    for m in modules:
        a1, b1 = w1.get(f"{m}.lora_A.weight"), w1.get(f"{m}.lora_B.weight")
        a2, b2 = w2.get(f"{m}.lora_A.weight"), w2.get(f"{m}.lora_B.weight")
        ref_a, ref_b = (a1, b1) if a1 is not None else (a2, b2)
        a1 = a1 if a1 is not None else ref_a.new_zeros(r1, ref_a.shape[1])
        b1 = b1 if b1 is not None else ref_b.new_zeros(ref_b.shape[0], r1)
        a2 = a2 if a2 is not None else ref_a.new_zeros(r2, ref_a.shape[1])
        b2 = b2 if b2 is not None else ref_b.new_zeros(ref_b.shape[0], r2)
        out[f"{m}.lora_A.weight"] = torch.cat([a1, a2], 0)
        out[f"{m}.lora_B.weight"] = torch.cat([b1.float() * s1, b2.float() * s2], 1).to(b1.dtype)
    names = sorted({m.rsplit(".", 1)[-1] for m in modules})
    config = {**c2, "r": r1 + r2, "lora_alpha": r1 + r2, "use_rslora": False, "target_modules": names,
              "lora_dropout": 0.0, "inference_mode": True}
    return config, out


def read_adapter(folder: Path) -> tuple[dict, dict]:
    from safetensors.torch import load_file

    return json.loads((folder / "adapter_config.json").read_text()), load_file(folder / "adapter_model.safetensors")


def write_aligned(output_dir: Path, sft_adapter: str) -> None:
    """Turn a finished stacked run's folder into OUTPUT_DIR (SFT + SimPO as one adapter) and OUTPUT_DIR/sft."""
    from safetensors.torch import save_file

    from qsimpo.run_dir import update_meta

    output_dir = Path(output_dir)
    if not (output_dir / SFT / "adapter_config.json").is_file():
        raise FileNotFoundError(f"{output_dir / SFT} was not written by the final save")
    config, weights = concatenated(read_adapter(output_dir / SFT), read_adapter(output_dir))
    (output_dir / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
    save_file({k: v.contiguous() for k, v in weights.items()}, output_dir / "adapter_model.safetensors",
              metadata={"format": "pt"})
    update_meta(output_dir, sft_adapter={"subfolder": SFT, "source": str(sft_adapter)})


def sft_location(adapter: str, meta: dict) -> tuple[str, str | None] | None:
    """Where a stacked run's SFT adapter is, as (folder, None) or (Hub id, subfolder); None for a run on the bare base."""
    record = meta.get("sft_adapter")
    if not record:
        return None
    local = Path(adapter)
    sub = record.get("subfolder", SFT)
    if local.is_dir():
        folder = local / sub
        if not folder.is_dir() and (local.parent / sub).is_dir():  # a checkpoint-N folder: sft/ is in the run's
            folder = local.parent / sub
        return str(folder), None
    return adapter, sub


def sft_fingerprint(adapter: str, meta: dict) -> str | None:
    """A digest of the SFT side's weights (None: the bare base), so adapters can be checked to share one SFT model."""
    import hashlib

    from qsimpo.run_dir import fetch

    where = sft_location(adapter, meta)
    if where is None:
        return None
    folder, sub = where
    path = fetch(folder, f"{sub}/adapter_model.safetensors" if sub else "adapter_model.safetensors")
    if path is None:
        raise FileNotFoundError(f"{adapter}: its SFT adapter ({folder}{'/' + sub if sub else ''}) has no adapter_model.safetensors")
    return hashlib.sha256(path.read_bytes()).hexdigest()


def load_sft_side(model, adapter: str, meta: dict) -> None:
    """For an adapter of a stacked run (qsimpo.json records sft_adapter): its SFT adapter loaded beside it as "sft"."""
    where = sft_location(adapter, meta)
    if where is None:
        return
    folder, sub = where
    model.load_adapter(folder, adapter_name=SFT, **({"subfolder": sub} if sub else {}))
    model.set_adapter("default")


@contextlib.contextmanager
def sft_side(model):
    """The SFT model for the block inside: the SFT adapter alone for a stacked run, else the base (adapter off)."""
    if SFT not in getattr(model, "peft_config", {}):
        with model.disable_adapter():
            yield
        return
    model.set_adapter(SFT)
    try:
        yield
    finally:
        model.set_adapter("default")
