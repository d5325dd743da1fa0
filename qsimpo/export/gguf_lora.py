"""The adapter alone as a GGUF file for llama.cpp's ``--lora`` (and Ollama's ADAPTER), laid out as llama.cpp's
convert_lora_to_gguf.py writes it.

    qsimpo merge adapters/run --out merged/run --gguf lora     # merged/run/gguf/run-LoRA-F32.gguf
    llama-cli -m base-F16.gguf --lora merged/run/gguf/run-LoRA-F32.gguf

The file holds no vocabulary and no hyperparameters: ``general.type = "adapter"``, ``adapter.type = "lora"``,
``adapter.lora.alpha`` (float32) and the base's ``general.architecture``, which llama.cpp compares with the
model it is applied to. Each adapted weight W, under llama.cpp's name for it (``blk.0.attn_q.weight``: the map
qsimpo.export.gguf_out uses for the merged model), becomes two F32 tensors: ``W.lora_a`` = A (rank × in, ggml
shape [in, rank]) and ``W.lora_b`` = B (out × rank, ggml shape [rank, out]), B's rows in llama.cpp's order where
the base weight's are permuted (Llama's Q and K). llama.cpp computes W·x + s · B·(A·x) with s = alpha / rank,
the rank read from lora_b, times the adapter's scale (``--lora-scaled FILE:S``; 1 for ``--lora``).

That formula has one alpha for the whole file, so a per-module scaling is written only where it comes out as
one number: rsLoRA's alpha / sqrt(r) is alpha · sqrt(r) / r, so a rsLoRA adapter is written with alpha · sqrt(r)
when all its modules share a rank. DoRA (a learned magnitude per column), trained copies of whole modules
(modules_to_save, trainable tokens), LoRA biases, LoRA on embeddings and architectures qsimpo has no tensor
names for are refused before anything is written: merge with ``--gguf TYPE`` instead.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from qsimpo.export.gguf_out import ARCHITECTURES, GGUFError, llama_rows, tensor_names

LORA = "lora"  # the --gguf value
SUFFIX = "LoRA-F32"  # NAME-LoRA-F32.gguf: F32 like convert_lora_to_gguf.py's default, so nothing is rounded
PAIR = (".lora_A.weight", ".lora_B.weight")
# adapter_config.json settings whose adapters llama.cpp's W·x + s·B·A·x cannot run: key -> what it is
REFUSED = {
    "use_dora": "DoRA rescales each column of W + s·BA by a learned magnitude",
    "modules_to_save": "it trains full copies of these modules, not LoRA pairs",
    "trainable_token_indices": "it trains rows of the embedding, not LoRA pairs",
    "lora_bias": "its lora_B carries a bias",
    "use_qalora": "QALoRA pools the input before A",
    "layer_replication": "it repeats base layers the base GGUF does not have",
    "alora_invocation_tokens": "an activated LoRA (aLoRA) is not written by qsimpo",
    "target_parameters": "it adapts raw parameters (MoE experts), not linear layers",
    "fan_in_fan_out": "its weights are stored transposed (Conv1D)",
}
INSTEAD = "merge it with --gguf f16 (or another TYPE) instead: the merged GGUF runs the same adapter"


@dataclass
class LoraPlan:
    """What the adapter GGUF will hold, decided before anything is written."""
    arch: str  # GGUF architecture name (the base's)
    permute_qk: bool
    alpha: float  # adapter.lora.alpha: s = alpha / rank for every module
    # HF weight name -> (GGUF name, rank, s, the pair's key in adapter_model.safetensors without .lora_A.weight)
    modules: dict[str, tuple[str, int, float, str]] = field(default_factory=dict)
    rslora: bool = False


def _base_shapes(config) -> dict:
    """{weight name: shape} of the base model ``config`` describes, from a model on the meta device (nothing allocated)."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return {k: tuple(v.shape) for k, v in AutoModelForCausalLM.from_config(config).state_dict().items()}


def _adapter_files(adapter: str) -> tuple[dict, Path]:
    from qsimpo.run_dir import ADAPTER_FILES, fetch

    config, weights = fetch(adapter, ADAPTER_FILES[0]), fetch(adapter, ADAPTER_FILES[1])
    if config is None:
        raise GGUFError(f"{adapter} holds no {ADAPTER_FILES[0]}: pass the folder `qsimpo train` wrote")
    if weights is None:
        raise GGUFError(f"{adapter} holds no {ADAPTER_FILES[1]} (a .bin adapter?): the adapter GGUF is written from "
                        "safetensors; load it with peft and save_pretrained it again")
    return json.loads(config.read_text()), weights


def lora_plan(adapter: str, config) -> LoraPlan:
    """Refuse an adapter llama.cpp's --lora cannot run as trained, or a base without llama.cpp tensor names; else
    the name, rank and scale of every adapted weight. ``config``: the base model's transformers config."""
    from peft.utils.other import get_pattern_key
    from safetensors import safe_open

    lcfg, weights = _adapter_files(adapter)
    where = f"{adapter}/adapter_config.json"
    if lcfg.get("peft_type", "LORA") != "LORA":
        raise GGUFError(f"{where}: peft_type {lcfg.get('peft_type')!r} is not LoRA; llama.cpp's --lora runs LoRA "
                        f"adapters only: {INSTEAD}")
    for key, why in REFUSED.items():
        if lcfg.get(key):
            raise GGUFError(f"{where}: {key} = {lcfg[key]!r}: llama.cpp's --lora cannot apply this adapter ({why}); "
                            f"{INSTEAD}")
    if lcfg.get("bias", "none") != "none":
        raise GGUFError(f"{where}: bias = {lcfg['bias']!r} trains base biases, which an adapter GGUF cannot carry; "
                        f"{INSTEAD}")
    model_type = getattr(config, "model_type", None)
    if model_type not in ARCHITECTURES:
        raise GGUFError(f"an adapter GGUF for {model_type!r} models is not supported (qsimpo maps the tensor names "
                        f"of {', '.join(ARCHITECTURES)}): use llama.cpp's convert_lora_to_gguf.py, or {INSTEAD}")
    arch, permute = ARCHITECTURES[model_type]
    gguf_name = tensor_names(config, arch)

    with safe_open(weights, framework="pt") as f:
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    base_shapes = _base_shapes(config)
    modules: dict[str, tuple[str, int, float, str]] = {}
    for key in sorted(shapes):
        if not key.endswith(PAIR):
            what = "LoRA on an embedding" if "lora_embedding" in key else "a tensor that is not a LoRA A or B"
            raise GGUFError(f"{weights.name}: {key} is {what}, which qsimpo does not write as an adapter GGUF; {INSTEAD}")
        if not key.endswith(PAIR[0]):
            continue
        stem = key[: -len(PAIR[0])]
        hf, b = stem.removeprefix("base_model.model."), stem + PAIR[1]
        if b not in shapes or shapes[b][1] != shapes[key][0]:
            raise GGUFError(f"{weights.name}: {key} has no matching {PAIR[1]} of rank {shapes[key][0]}: the adapter is "
                            "damaged; save it again")
        if hf == "lm_head" and getattr(config, "tie_word_embeddings", False):
            raise GGUFError(f"{weights.name}: the adapter trains lm_head, which this base ties to its embedding; llama.cpp "
                            f"keeps one tensor for both and cannot apply it: {INSTEAD}")
        name = gguf_name(hf + ".weight")
        if name is None:
            raise GGUFError(f"{weights.name}: no llama.cpp name for {hf}.weight ({arch}): {INSTEAD}")
        want = base_shapes.get(hf + ".weight")
        if want is None or (shapes[b][0], shapes[key][1]) != tuple(want):
            raise GGUFError(f"{weights.name}: {hf} is {shapes[b][0]}×{shapes[key][1]} in the adapter but "
                            f"{'absent' if want is None else '×'.join(map(str, want))} in the base: the adapter was not "
                            "trained on this base; pass the right one with --base")
        rank = shapes[key][0]
        alpha = lcfg.get("alpha_pattern", {}).get(get_pattern_key(lcfg.get("alpha_pattern", {}).keys(), hf),
                                                  lcfg.get("lora_alpha", 8))  # peft's default
        scale = alpha / math.sqrt(rank) if lcfg.get("use_rslora") else alpha / rank
        modules[hf + ".weight"] = (name, rank, scale, stem)
    if not modules:
        raise GGUFError(f"{weights.name} holds no LoRA pairs: nothing to write")

    # llama.cpp: s = alpha / rank with one alpha per file. The alpha each module needs is s · rank.
    needed = {hf: s * r for hf, (_, r, s, _) in modules.items()}
    first = next(iter(needed.values()))
    odd = [hf for hf, a in needed.items() if not math.isclose(a, first, rel_tol=1e-6)]
    if odd:
        why = "rsLoRA (alpha / sqrt(r)) with ranks that differ" if lcfg.get("use_rslora") else "alpha_pattern"
        raise GGUFError(f"{where}: {why} gives {odd[0]} the scale of alpha {needed[odd[0]]:g} and "
                        f"{next(iter(needed))} of alpha {first:g}, but llama.cpp's adapter GGUF has one alpha for all "
                        f"modules; {INSTEAD}")
    return LoraPlan(arch, permute, float(first), modules, bool(lcfg.get("use_rslora")))


def _pairs(weights: Path, lp: LoraPlan):
    """(HF weight name, A (rank × in), B (out × rank)) as the adapter holds them, float32 numpy, one pair at a time."""
    from safetensors import safe_open

    with safe_open(weights, framework="pt") as f:
        for hf, (_, _, _, stem) in lp.modules.items():
            yield hf, f.get_tensor(stem + PAIR[0]).float().numpy(), f.get_tensor(stem + PAIR[1]).float().numpy()


def write_lora(adapter: str, out: str | Path, lp: LoraPlan, config, name: str, base: str | None = None) -> Path:
    """Write ``adapter`` as the llama.cpp LoRA GGUF file ``out`` (metadata and tensors as in the module docstring)."""
    import gguf
    import numpy as np

    _, weights = _adapter_files(adapter)
    out = Path(out)
    writer = gguf.GGUFWriter(out, lp.arch)
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_name(name)
    if base:  # a Hub id as it is; a local folder by its name alone (no paths of this machine in a shared file)
        from qsimpo.data.sources import looks_local

        writer.add_base_model_count(1)
        writer.add_base_model_name(0, Path(base).name if looks_local(base) or Path(base).exists() else base)
    writer.add_string(gguf.Keys.Adapter.TYPE, LORA)
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, lp.alpha)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    for hf, a, b in _pairs(weights, lp):
        gname = lp.modules[hf][0]
        writer.add_tensor(gname + ".lora_a", np.ascontiguousarray(a))
        writer.add_tensor(gname + ".lora_b", np.ascontiguousarray(llama_rows(hf, b, config, lp.permute_qk)))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out


def read_lora(path: str | Path) -> tuple[dict, dict]:
    """(metadata, {GGUF weight name: (A, B)}) of an adapter GGUF, read with gguf-py's reader: A (rank × in) and
    B (out × rank) as numpy arrays, B in llama.cpp's row order."""
    from gguf import GGUFReader

    reader = GGUFReader(path)
    meta = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    pairs: dict[str, dict[str, object]] = {}
    for t in reader.tensors:
        stem, _, part = t.name.rpartition(".")
        if part not in ("lora_a", "lora_b"):
            raise GGUFError(f"{path}: tensor {t.name} is neither .lora_a nor .lora_b")
        pairs.setdefault(stem, {})[part] = t.data  # numpy, shape reversed from ggml's ne: (rank, in) / (out, rank)
    return meta, {k: (v.get("lora_a"), v.get("lora_b")) for k, v in pairs.items()}


def updates(path: str | Path, config) -> dict:
    """{transformers weight name: s · B·A} of an adapter GGUF, float64 numpy in transformers' layout, s = alpha /
    rank with the rank read from lora_b: what llama.cpp adds to each weight of the base GGUF it is applied to
    (``--lora``), so base weights + updates is the model it runs. ``config``: the base's transformers config."""
    import numpy as np

    meta, pairs = read_lora(path)
    if config.model_type not in ARCHITECTURES:
        raise GGUFError(f"{config.model_type!r} has no llama.cpp tensor names in qsimpo ({', '.join(ARCHITECTURES)})")
    arch, permute = ARCHITECTURES[config.model_type]
    gguf_name = tensor_names(config, arch)
    hf_of = {gguf_name(k): k for k in _base_shapes(config)}
    alpha = float(meta.get("adapter.lora.alpha", 0.0))
    out = {}
    for gname, (a, b) in pairs.items():
        if a is None or b is None or gname not in hf_of or a.shape[0] != b.shape[1]:
            what = ("has no lora_a or no lora_b" if a is None or b is None else "is no weight of this base"
                    if gname not in hf_of else f"has lora_a {a.shape} and lora_b {b.shape} of different ranks")
            raise GGUFError(f"{Path(path).name}: {gname} {what}")
        hf = hf_of[gname]
        s = alpha / b.shape[1] if alpha else 1.0  # llama.cpp: alpha / b->ne[0] (the rank); no alpha, no scaling
        out[hf] = s * llama_rows(hf, b.astype(np.float64), config, permute, inverse=True) @ a.astype(np.float64)
    return out


def check_lora(path: str | Path, adapter: str, lp: LoraPlan, config) -> dict:
    """Read the written file back and compare it with the adapter: the metadata llama.cpp checks, and what llama.cpp
    adds to each weight (``updates``: the file's pairs, scaled by its alpha over the rank of its lora_b, in
    transformers' row order) equal to the adapter's own s · B·A, for every adapted weight and no other."""
    import numpy as np

    meta = read_lora(path)[0]
    problems = []
    for key, want in (("general.type", "adapter"), ("adapter.type", LORA), ("general.architecture", lp.arch)):
        if meta.get(key) != want:
            problems.append(f"{key} is {meta.get(key)!r}, not {want!r}")
    try:
        got = updates(path, config)
    except GGUFError as e:
        problems.append(str(e))
        got = {}
    _, weights = _adapter_files(adapter)
    worst = 0.0
    for hf, a, b in _pairs(weights, lp):
        want = lp.modules[hf][2] * b.astype(np.float64) @ a
        if hf not in got or got[hf].shape != want.shape:
            problems.append(f"{lp.modules[hf][0]}: {'missing' if hf not in got else f'shape {got[hf].shape}'}, "
                            f"expected an update of shape {want.shape}")
            continue
        worst = max(worst, float(np.abs(got.pop(hf) - want).max() / max(np.abs(want).max(), 1e-12)))
    if got:
        problems.append(f"weights the adapter does not adapt: {', '.join(sorted(got))}")
    if not worst <= 1e-5:
        problems.append(f"s·B·A read back differs from the adapter's by up to {worst:.3g} of its largest entry")
    return {"passed": not problems, "problems": problems, "alpha": float(meta.get("adapter.lora.alpha", 0.0)),
            "pairs": len(lp.modules), "max_relative_error": worst}


def export_lora(adapter: str, out_dir: str | Path, lp: LoraPlan, config, name: str, base: str | None = None,
                log=print) -> dict:
    """Write ``out_dir/NAME-LoRA-F32.gguf`` with its JSON record, read it back and check it; GGUFError (after
    removing both) when the file does not hold the adapter."""
    import time

    from qsimpo.gguf_in import sha256
    from qsimpo.record import versions

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}-{SUFFIX}.gguf"
    ranks = sorted({m[1] for m in lp.modules.values()})
    log(f"writing {path.name} (the adapter alone for llama.cpp's --lora: {len(lp.modules)} LoRA pairs, rank "
        f"{'/'.join(map(str, ranks))}, alpha {lp.alpha:g}{' (rsLoRA)' if lp.rslora else ''}, {lp.arch})")
    start = time.time()
    try:
        write_lora(adapter, path, lp, config, name, base)
        report = check_lora(path, adapter, lp, config)
        if not report["passed"]:
            raise GGUFError(f"{path.name} does not hold the adapter ({'; '.join(report['problems'])}); nothing was kept")
        record = {"gguf_file": path.name, "type": SUFFIX, "bytes": path.stat().st_size, "sha256": sha256(path),
                  "architecture": lp.arch, "adapter.lora.alpha": lp.alpha, "ranks": ranks, "rslora": lp.rslora,
                  "from": name, "base_model": base, "apply": f"llama-cli -m BASE.gguf --lora {path.name}",
                  "seconds": round(time.time() - start, 1), "check": report, "versions": versions("gguf")}
        (out_dir / f"{path.stem}.json").write_text(json.dumps(record, indent=2) + "\n")
    except BaseException:
        path.unlink(missing_ok=True)
        (out_dir / f"{path.stem}.json").unlink(missing_ok=True)
        raise
    log(f"  {path.stat().st_size / 1e6:.2f} MB; read back: s·B·A equals the adapter's (max relative error "
        f"{report['max_relative_error']:.1e}); apply with: llama-cli -m BASE.gguf --lora {path.name}")
    return record
