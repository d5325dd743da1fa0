"""`qsimpo merge`: fold a LoRA adapter into its base and save a standalone, verified transformers model.

    qsimpo merge adapters/run --out merged/run                       # into the dequantized NF4 weights, float32
    qsimpo merge adapters/run --out merged/run --base-weights original
    qsimpo merge adapters/run --out merged/run --dtype bfloat16     # half the size, if it still keeps the adapter

An adapter trained on an NF4 base learned to correct the *quantized* weights. Merging it back
into 4-bit weights re-quantizes W + BA and changes the model; merging it into the original
16-bit weights adds the quantization error W - dequant(NF4(W)) that the adapter never saw. The
default therefore dequantizes the very NF4 weights the adapter was trained against (loaded exactly
as training loaded them) and merges into those. ``original`` is there for bases
trained unquantized, or to measure the difference.

The weights are saved in float32 by default. A LoRA update B·A is small next to the weight W it is
added to, and rounding W + B·A to bfloat16 (8 significant bits) rounds away much of it: on
SmolLM2-135M the bf16 merge of an adapter trained 6 steps was as far from the adapter as the
adapter is from its base (benchmarks/RESULTS.md). float32 keeps it exactly; bfloat16/float16
halve the size and are verified like any merge.

Every merge is written to a hidden sibling folder, reloaded from disk and compared with the
adapter (qsimpo.export.verify): its KL to the adapter must be a small fraction of the adapter's own
effect. Only a merge that passes is moved to ``--out``; a failure of any kind leaves no output
folder behind.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from qsimpo.console import say
from qsimpo.errors import CheckFailed, QsimpoError

BASE_WEIGHTS = ("dequantized", "original")
DTYPES = ("bfloat16", "float16", "float32")
DEFAULT_DTYPE = "float32"
# A merge must keep the adapter: its mean KL to the unmerged adapter at most DEFAULT_MAX_RATIO × the
# adapter's own KL (adapter on vs off). A merge that lost the adapter sits at ~1×; on SmolLM2-135M
# float32 merges measured 2e-7× or less, float16 4e-4× or less (benchmarks/RESULTS.md).
DEFAULT_MAX_RATIO = 0.1
# Whatever the adapter's effect, a merge further than this (mean KL, nats/token) from the adapter on
# its 4-bit base is refused: a float32 merge of SmolLM2-135M measured 3e-8 to 4e-8, float16 1e-4,
# bfloat16 5e-3 to 3e-2.
DEFAULT_MAX_KL = 0.01


class MergeError(QsimpoError, RuntimeError):
    """A merge that cannot or must not go ahead; the message says what to do instead."""


class VerifyError(MergeError):
    """The merged model does not behave like the adapter; ``report`` holds the measurements."""

    exit_code = CheckFailed.exit_code  # a check that ran and failed (1), not a refusal (2)

    def __init__(self, message: str, report=None):
        super().__init__(message)
        self.report = report


@dataclass
class MergeResult:
    out: Path
    report: object | None  # qsimpo.export.verify.VerifyReport, or None with --no-verify


def check_request(adapter: str, out: Path, base: str | None, overwrite: bool) -> tuple[dict, str]:
    """The adapter's metadata and the base to merge into, once every reason to refuse has been ruled out."""
    from qsimpo.load import base_model, check_adapter
    from qsimpo.run_dir import read_meta

    check_adapter(adapter)
    local = Path(adapter)
    meta = read_meta(adapter)
    if meta.get("merged_from"):
        raise MergeError(f"{adapter} is already a merge of {meta['merged_from']}: merge the adapter itself, not its merge")
    base = base_model(adapter, base, meta)
    a, o = local.resolve(), out.resolve()
    if local.exists() and (a == o or a in o.parents or o in a.parents):
        raise MergeError(f"--out {out} would overwrite the adapter {adapter}: choose a folder outside it")
    if out.exists() and not overwrite:
        what = "already holds a merged model" if out.is_dir() and "merged_from" in read_meta(out) else "already exists"
        raise MergeError(f"{out} {what}: choose another --out, or pass --overwrite to replace it")
    return meta, base


def merge(adapter: str, out: str | Path, base_weights: str = "dequantized", dtype: str = DEFAULT_DTYPE, verify: bool = True,
          max_kl: float = DEFAULT_MAX_KL, overwrite: bool = False, base: str | None = None, max_shard_size: str = "5GB",
          n_probes: int = 8, device: str | None = None, log=say, max_ratio: float = DEFAULT_MAX_RATIO,
          gguf: list[str] | None = None) -> MergeResult:
    """Merge ``adapter`` (a folder or Hub id) into its base and write a transformers model to ``out``.

    ``gguf``: GGUF types (qsimpo.export.gguf_out.TYPES) to also write under ``out/gguf/``, each read back and
    checked against the merged model, and/or "lora": the adapter alone for llama.cpp's --lora
    (qsimpo.export.gguf_lora); an architecture, tokenizer, adapter or type it cannot write is refused first.
    """
    import torch

    from qsimpo.train.model import device_for_rank, load_trained
    from qsimpo.export.verify import VerifyReport, agreement, next_token_logprobs, probe_sequences
    from qsimpo.run_dir import update_meta

    if base_weights not in BASE_WEIGHTS:
        raise MergeError(f"--base-weights {base_weights!r} must be one of {', '.join(BASE_WEIGHTS)}")
    if dtype not in DTYPES:
        raise MergeError(f"--dtype {dtype!r} must be one of {', '.join(DTYPES)}")
    adapter, out = str(adapter), Path(out)
    meta, base = check_request(adapter, out, base, overwrite)
    gguf_plan, lora_plan = _gguf_plan(adapter, base, meta, gguf) if gguf else (None, None)
    device = device or device_for_rank()
    torch_dtype = getattr(torch, dtype)

    ref4 = probes = None
    if verify:
        log(f"loading {adapter} on its {meta.get('quantization', 'nf4')} base {base} (the reference)")
        model4, tokenizer = load_trained(adapter, base, device=device)  # on training's kernel (keep_training_layout)
        probes, source = probe_sequences(adapter, tokenizer, model4, n_probes)
        ref4 = next_token_logprobs(model4, probes)
        with model4.disable_adapter():
            effect = agreement(ref4, next_token_logprobs(model4, probes))
        del model4

    if meta.get("quantization") == "none":
        log("the adapter was trained on an unquantized base: dequantized and original are the same weights")
    log(f"merging into the {base_weights} base weights in {dtype}")
    merged, ref_deq = _merge_in_memory(adapter, base, meta, base_weights, dtype, device, probes)
    staging = out.parent / f".{out.name}.partial-{os.getpid()}"
    try:
        _save(merged, staging, adapter, base, meta, base_weights, dtype, max_shard_size)
        del merged
        report = None
        if verify:
            from transformers import AutoModelForCausalLM

            reloaded = AutoModelForCausalLM.from_pretrained(staging, dtype=torch_dtype, device_map={"": device})
            mine = next_token_logprobs(reloaded.eval(), probes)
            report = VerifyReport(agreement(ref4, mine), agreement(ref_deq, mine), effect, max_ratio, max_kl, source)
            update_meta(staging, verify=report.to_dict())
            for line in report.lines():
                log(line)
            if not report.passed:
                raise VerifyError(_failure_message(report, base_weights, dtype, out), report)
        if gguf_plan:
            from qsimpo.export.gguf_out import export

            records = export(staging, gguf_plan, name=out.name, merged=reloaded if verify and dtype == "float32" else None,
                             log=log)
            update_meta(staging, gguf=[r["gguf_file"] for r in records])
        if lora_plan:
            from qsimpo.export.gguf_lora import export_lora

            record = export_lora(adapter, staging / "gguf", lora_plan[0], lora_plan[1], out.name, base, log=log)
            update_meta(staging, gguf_lora=record["gguf_file"])
        if out.is_dir():  # --overwrite: the old output goes only once the new one is complete and verified
            shutil.rmtree(out)
        elif out.exists():
            out.unlink()
        staging.rename(out)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    log(f"merged model written to {out}")
    return MergeResult(out, report)


def _gguf_plan(adapter: str, base: str, meta: dict, types):
    """(the merged model's GGUF plan or None, (the adapter GGUF's plan, the base config) or None), or the reason
    either cannot be written, before anything is loaded."""
    from transformers import AutoConfig, AutoTokenizer

    from qsimpo.export.gguf_lora import LORA, lora_plan
    from qsimpo.export.gguf_out import parse_types, plan
    from qsimpo.train.model import base_config, pretrained_source

    merged_types = parse_types([t for t in types if t.lower() != LORA])  # a wrong type is reported before the base is read
    resolved = pretrained_source(base_config(base, meta))
    config = AutoConfig.from_pretrained(resolved.name_or_path, revision=resolved.revision)
    lora = (lora_plan(adapter, config), config) if any(t.lower() == LORA for t in types) else None
    if not merged_types:
        return None, lora
    tokenizer = AutoTokenizer.from_pretrained(resolved.name_or_path, revision=resolved.revision)
    return plan(config, tokenizer, merged_types), lora


def _merge_in_memory(adapter, base, meta, base_weights, dtype, device, probes):
    """(merged model, log-probs of the unmerged adapter on the dequantized base, or None without probes)."""
    import torch
    from peft import PeftModel

    from qsimpo.export.verify import next_token_logprobs
    from qsimpo.train.model import base_config, dequantize_base, load_base

    quantization = meta.get("quantization", "nf4")
    wants_original = base_weights == "original" and quantization != "none"
    model = ref_deq = None
    if probes is not None or not wants_original:
        # The base exactly as training loaded it (same quantization, same compute dtype), then dequantized.
        trained = base_config(base, meta, quantization=quantization)
        model = PeftModel.from_pretrained(dequantize_base(load_base(trained, device), getattr(torch, dtype)), adapter)
        if probes is not None:
            ref_deq = next_token_logprobs(model.eval(), probes)
    if wants_original:
        model = None  # free the dequantized copy first
        original = base_config(base, meta, quantization="none", compute_dtype=dtype)
        model = PeftModel.from_pretrained(load_base(original, device), adapter)
    try:
        merged = model.merge_and_unload(safe_merge=True)  # raises on NaN/inf before touching the weights
    except ValueError as e:
        raise MergeError(f"merging {adapter} gives non-finite weights ({e}); the adapter is broken: check its "
                         "training log (metrics.jsonl) for NaN losses and merge an earlier checkpoint-N instead") from e
    merged.config.use_cache = True  # load_base turns the KV cache off for training; a shipped model wants it
    return merged, ref_deq


def _save(merged, folder: Path, adapter: str, base: str, meta: dict, base_weights: str, dtype: str, max_shard_size: str) -> None:
    """Model (sharded safetensors) + generation config, the base's own tokenizer and chat template, provenance."""
    from transformers import AutoTokenizer

    from qsimpo.export.hub import final_metrics
    from qsimpo.record import versions
    from qsimpo.run_dir import copy_config, write_meta
    from qsimpo.train.model import base_config, pretrained_source

    merged.save_pretrained(folder, max_shard_size=max_shard_size)
    # The base's tokenizer as published (not the training copy, which may have gained a pad token).
    source = base_config(base, meta)
    resolved = pretrained_source(source)
    tokenizer = AutoTokenizer.from_pretrained(resolved.name_or_path, revision=resolved.revision)
    if source.chat_template:  # the template the adapter was trained with (qsimpo.templates), e.g. a base's first one
        from qsimpo.templates import template_text

        tokenizer.chat_template = template_text(source.chat_template)
    tokenizer.save_pretrained(folder)
    copy_config(adapter, folder)
    local = Path(adapter)
    record = {**meta, "base_model": base, "base_model_gguf_file": source.gguf_file,
              "merged_from": str(local.resolve()) if local.is_dir() else adapter,
              "base_weights": base_weights, "dtype": dtype, "merged_with": versions(),  # "versions": the training's
              "final_metrics": final_metrics(adapter, meta)}
    write_meta(folder, record)


def _failure_message(report, base_weights: str, dtype: str, out: Path) -> str:
    deq, four, effect = report.dequantized, report.four_bit, report.adapter_effect
    found = []
    if not report.keeps_adapter:
        found.append(f"mean KL {deq.kl:.3g} nats/token to the unmerged adapter (top-1 agreement {deq.top1:.1%}) is "
                     f"{report.ratio:.1%} of the adapter's own effect ({effect.kl:.3g}), above --max-ratio {report.max_ratio:g}")
    if not four.kl <= report.max_kl:
        found.append(f"mean KL {four.kl:.3g} nats/token to the adapter on its 4-bit base (top-1 agreement "
                     f"{four.top1:.1%}) is above --max-kl {report.max_kl:g}")
    if base_weights == "original":
        why = ("Merging into the original weights adds the quantization error the adapter never saw: merge with "
               "--base-weights dequantized (the default).")
    elif dtype != "float32":
        overflow = " (and float16 overflows where activations pass 65504)" if dtype == "float16" else ""
        why = (f"Rounding the merged weights to {dtype} loses the LoRA update, small next to the base weight it is "
               f"added to{overflow}: merge with --dtype float32 (the default), or accept the loss with a larger --max-ratio.")
    else:
        why = ("A merge into the dequantized weights differs from the adapter only by rounding, so a weight or the "
               "save is broken: check the adapter's training log (metrics.jsonl) or merge an earlier checkpoint-N.")
    return (f"the merged model does not keep the adapter: {'; '.join(found) or 'its KL is not finite'}. {why} "
            f"Nothing was written to {out}; --no-verify writes it without this check.")
