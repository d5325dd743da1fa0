"""`qsimpo plan CONFIG.yaml [--gpu-memory 24GiB]`: will this training config fit on the GPU?

An estimate of peak GPU memory from the model's config alone (nothing is loaded), by part:

- base weights: NF4 linears at 4 bits + double-quantized absmax (≈ 4.127 bits/param), int8 at 1 byte
  (+ fp32 row scales), none at the compute dtype; embeddings, norms and the output head stay in
  the compute dtype (bitsandbytes does not quantize them);
- the one linear dequantized at a time: bitsandbytes turns a 4-bit/8-bit weight back into the
  compute dtype for each training matmul (forward and backward), the largest is the transient;
- LoRA: r·(in + out) params per adapted linear, fp32 weight + grad + two AdamW moments (16 B/param);
- activations per micro-batch of T tokens: the worst micro-batch, either the longest rows the
  layout allows at data.max_length, or (``--data``) the longest pairs of the config's own data
  as the layout would lay them out (padded rows, or one padding-free row under flex_attention):
  a recomputed (checkpointed) layer keeps one saved hidden state, plus one layer's intermediates and
  their gradients while its backward runs; any other layer keeps all its intermediates.
  ``train.gradient_checkpointing: auto`` recomputes the fewest layers that fit the budget
  (``train.memory_budget``, else ``--gpu-memory``), and the plan prints the split;
- the packed layout's dense 4-D attention mask (batch × row² in the compute dtype, plus the
  boolean it is built from) under SDPA/eager; nothing under flex_attention (a block mask);
- the output head: one fp32 [chunk, vocab] block plus its compute-dtype matmul output (×1.5;
  ×2.5 with a logit soft-cap, whose tanh the backward keeps) when ``train.head_chunk_size`` > 0
  (``qsimpo.train.logprobs._ChunkedHead`` works in place), else
  the full [T, vocab] logits in compute dtype plus fp32 copies;
- the CUDA context and allocator slack (a fixed 0.75 GiB).

``qsimpo eval`` scores on one device without gradients, in the same packed rows and chunked head:
base weights, the LoRA weights alone, one layer's activations for ``--batch-size`` pairs, the mask
and one head block. The plan gives its peak at eval's default batch, and the largest batch that
fits when that one does not.

With ``train.fsdp`` and ``--processes N`` the figures are per process: base weights and the LoRA
state are split N ways, and FSDP gathers whole units back while it uses them (the largest of a
decoder layer and the embedding/head, twice: the one in use and the one prefetched). Every
process still loads the whole 4-bit base before FSDP splits it, so that load is checked too.
Without FSDP (DDP) every process holds everything, as one GPU does.

``--sft`` plans a `qsimpo sft` run instead: the worst micro-batch is ``train.batch_size`` conversations
(qsimpo.train.sft's layout: packed into rows of up to data.max_length, or one per padded row), the head
runs on their assistant tokens, and there is no eval or reference pass to add.

It is an estimate: compare it with a measured peak (benchmarks/RESULTS.md) before trusting it
to the last GiB.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from qsimpo.config import Config, parse_size
from qsimpo.errors import UsageError
from qsimpo.train.logprobs import head_chunk_rows
from qsimpo.console import say

GiB = 2**30
NF4_BITS = 4.127  # 4-bit codes + 8-bit absmax per 64 + fp32 second-level absmax per 256 blocks
CONTEXT = 0.75 * GiB


@dataclass
class Shape:
    hidden: int
    layers: int
    intermediate: int
    vocab: int
    heads: int
    kv_heads: int
    softcap: bool = False  # Gemma-2's final logit soft-cap: the chunked head's backward keeps a second block

    @property
    def linears(self) -> list[tuple[int, int]]:
        """(in, out) of every linear in one decoder layer (Llama-style attention + gated MLP)."""
        h, i, kv = self.hidden, self.intermediate, self.hidden * self.kv_heads // self.heads
        return [(h, h), (h, kv), (h, kv), (h, h), (h, i), (h, i), (i, h)]


def shape_of(model_config) -> Shape:
    c = model_config
    return Shape(c.hidden_size, c.num_hidden_layers, c.intermediate_size, c.vocab_size, c.num_attention_heads,
                 getattr(c, "num_key_value_heads", None) or c.num_attention_heads,
                 bool(getattr(c, "final_logit_softcapping", None)))


@dataclass
class Batch:
    """The worst micro-batch's geometry: tokens laid out (padding included), mask cells, scored positions."""

    tokens: int
    mask_cells: int  # entries of the dense 4-D mask (0: no dense mask)
    scored: int  # response positions the output head runs on
    source: str  # where the lengths came from, for the report


def worst_batch(cfg: Config, lengths: list[tuple[int, int, int]] | None = None) -> Batch:
    """The micro-batch that needs the most memory, from (prompt, chosen, rejected) token counts.

    Without ``lengths``: every row at data.max_length (prompt + two responses ≤ 2·max_length).
    With them: the worst batch any ``batch_size`` of them can form in the configured layout (for
    padded rows, any batch holding the widest pair is padded to it).
    """
    t, b = cfg.train, cfg.train.batch_size
    if lengths is None:
        lengths, source = [(0, cfg.data.max_length, cfg.data.max_length)] * b, f"every row at max_length {cfg.data.max_length}"
    else:
        source = f"the longest of {len(lengths)} pairs in the data"
    worst = sorted(lengths, key=sum, reverse=True)[:b]
    scored = sum(sorted((c + r for _, c, r in lengths), reverse=True)[:b])
    if t.packing != "shared_prompt":  # chosen rows + rejected rows, padded to the longest sequence of any pair in it
        width = max(p + max(c, r) for p, c, r in lengths)
        return Batch(2 * min(b, len(lengths)) * width, 0, scored, source)
    if cfg.model.attn_implementation == "flex_attention":  # one padding-free row, block mask
        return Batch(sum(map(sum, worst)), 0, scored, source)
    width = max(map(sum, worst))
    return Batch(len(worst) * width, len(worst) * width * width, scored, source)


def worst_sft_batch(cfg: Config, lengths: list[tuple[int, int]] | None = None) -> Batch:
    """`qsimpo sft`'s micro-batch that needs the most memory, from (tokens, assistant tokens) per conversation, in
    qsimpo.train.sft's layout: with packing, the ``batch_size`` fullest of the rows qsimpo.train.sft.PackedRows packs
    the data into (a dense mask per row of up to data.max_length), or those rows end to end in one padding-free row
    (flex_attention); with train.packing none, the ``batch_size`` longest conversations, one per padded row.
    Without ``lengths``: every row (or conversation) fills data.max_length, all trained."""
    from qsimpo.train.sft import pack_rows

    b, cap = cfg.train.batch_size, cfg.data.max_length
    if lengths is None:
        lengths, source = [(cap, cap)] * b, f"every conversation at max_length {cap}"
    else:
        source = f"the longest of {len(lengths)} conversations in the data"
    if cfg.train.packing == "none":
        worst = [n for n, _ in sorted(lengths, reverse=True)[:b]]
        scored = sum(sorted((a for _, a in lengths), reverse=True)[:b])
        return Batch(len(worst) * worst[0], 0, scored, source)
    if source.startswith("the longest"):
        source = f"the fullest of the rows {len(lengths)} conversations in the data pack into"
    rows = pack_rows([n for n, _ in lengths], cap)
    fill = sorted(((sum(lengths[i][0] for i in row), sum(lengths[i][1] for i in row)) for row in rows), reverse=True)
    worst = [n for n, _ in fill[:b]]
    scored = sum(sorted((a for _, a in fill), reverse=True)[:b])
    if cfg.model.attn_implementation == "flex_attention":
        return Batch(sum(worst), 0, scored, source)
    return Batch(len(worst) * worst[0], len(worst) * worst[0] * worst[0], scored, source)


def activations(cfg: Config, shape: Shape, batch: Batch, checkpointed: int) -> float:
    """Activations kept for the backward pass with ``checkpointed`` of the decoder layers recomputed: such a layer
    keeps only its input hidden state, every other layer all its intermediates; while a recomputed layer's backward
    runs, its intermediates and their gradients are alive too (two layers' worth)."""
    layer = _layer_acts(cfg, shape, batch)
    saved = batch.tokens * shape.hidden * _act_bytes(cfg)
    return checkpointed * saved + (shape.layers - checkpointed) * layer + (2 * layer if checkpointed else 0)


def checkpointed_layers(cfg: Config, shape: Shape, batch: Batch, budget: int | None, processes: int = 1) -> int:
    """How many decoder layers train.gradient_checkpointing recomputes: all (true), none (false), or for auto the
    fewest that keep the estimated peak within ``budget`` (all when even that does not fit). Every layer that is
    not recomputed saves its forward pass in the backward: the memory a budget leaves unused is spent on speed."""
    setting = cfg.train.gradient_checkpointing
    if setting != "auto":
        return shape.layers if setting else 0
    if budget is None:
        raise UsageError("train.gradient_checkpointing: auto needs a memory budget to size it by: set "
                         "train.memory_budget (e.g. --train.memory_budget 16GiB), or run on a GPU (its free memory)")
    rest = sum(estimate(cfg, shape, batch, processes, checkpointed=0).values()) - activations(cfg, shape, batch, 0)
    return next((k for k in range(shape.layers + 1) if rest + activations(cfg, shape, batch, k) <= budget), shape.layers)


def estimate(cfg: Config, shape: Shape, batch: Batch | None = None, processes: int = 1,
             checkpointed: int | None = None) -> dict[str, float]:
    """Bytes by part, per process, for ``cfg`` on a model of ``shape`` (see the module docstring), with
    ``checkpointed`` decoder layers recomputed (None: as train.gradient_checkpointing says, auto sized to
    train.memory_budget)."""
    act, bits = _act_bytes(cfg), _weight_bits(cfg, shape)
    per_layer = sum(i * o for i, o in shape.linears)
    lora_params = _lora_params(cfg, shape)

    t = cfg.train
    batch = batch or worst_batch(cfg)
    if checkpointed is None:
        budget = parse_size(t.memory_budget) if t.memory_budget else None
        checkpointed = checkpointed_layers(cfg, shape, batch, budget, processes)
    acts = activations(cfg, shape, batch, checkpointed)
    shards = processes if t.fsdp else 1
    parts = {
        "base weights": base_weights(cfg, shape) / shards,
        "dequantized linear (transient)": _dequantized_linear(cfg, shape),
        "LoRA weights + grads + AdamW": lora_params * 16 / shards,
        **({"SFT adapter (frozen)": _sft_adapter_params(cfg, shape) * 4 / shards} if cfg.model.sft_adapter else {}),
        "activations": acts,
        "attention mask": _mask_bytes(cfg, batch),
        "output head": _head_bytes(cfg, shape, batch, grad=True),
        "CUDA context": CONTEXT,
    }
    if shards > 1:  # one unit in use + the next prefetched, each gathered whole
        layer = per_layer * bits / 8 + lora_params / shape.layers * 4
        parts["FSDP gathered units"] = 2 * max(layer, shape.vocab * shape.hidden * act) * (1 - 1 / shards)
    return parts


def eval_estimate(cfg: Config, shape: Shape, batch_size: int, lengths: list[tuple[int, int, int]] | None = None) -> float:
    """Peak bytes of ``qsimpo eval --batch-size batch_size`` on this model: no gradients, nothing kept for a backward.

    Eval loads the base as the adapter records it, with the defaults for the rest (SDPA, automatic compute
    dtype) and the head chunk sized by the vocabulary, whatever the training run chose for those."""
    model = dataclasses.replace(cfg.model, attn_implementation="sdpa", compute_dtype="auto")
    train = dataclasses.replace(cfg.train, batch_size=batch_size, packing="shared_prompt", head_chunk_size=None)
    cfg = dataclasses.replace(cfg, model=model, train=train)
    batch = worst_batch(cfg, lengths)
    return (base_weights(cfg, shape) + _dequantized_linear(cfg, shape) + _lora_params(cfg, shape) * 4
            + _layer_acts(cfg, shape, batch) + _mask_bytes(cfg, batch) + _head_bytes(cfg, shape, batch, grad=False)
            + CONTEXT)


def _lora_params(cfg: Config, shape: Shape) -> int:
    """r·(in + out) per adapted linear, every layer."""
    return shape.layers * sum(cfg.lora.r * (i + o) for i, o in shape.linears)


def _sft_adapter_params(cfg: Config, shape: Shape) -> int:
    """The frozen SFT adapter under a `qsimpo train --model.sft_adapter` run: its weights only (fp32, no grads or
    moments), at the rank its adapter_config.json records (lora.r when the folder cannot be read here)."""
    import json
    from pathlib import Path

    try:
        r = json.loads((Path(cfg.model.sft_adapter) / "adapter_config.json").read_text())["r"]
    except (OSError, ValueError, KeyError):
        r = cfg.lora.r
    return shape.layers * sum(r * (i + o) for i, o in shape.linears)


def _layer_acts(cfg: Config, shape: Shape, batch: Batch) -> float:
    """One decoder layer's intermediates: q, k, v, o, norms, residual + gate, up, act, product."""
    return batch.tokens * (6 * shape.hidden + 4 * shape.intermediate) * _act_bytes(cfg)


def _dequantized_linear(cfg: Config, shape: Shape) -> float:
    """The largest linear bitsandbytes turns back into the compute dtype for a matmul (none unquantized)."""
    return max(i * o for i, o in shape.linears) * _act_bytes(cfg) if cfg.model.quantization != "none" else 0


def _mask_bytes(cfg: Config, batch: Batch) -> float:
    """The dense 4-D mask in the compute dtype plus the boolean it is built from."""
    return batch.mask_cells * (_act_bytes(cfg) + 1)


def _head_bytes(cfg: Config, shape: Shape, batch: Batch, grad: bool) -> float:
    """The output head's peak: one fp32 [chunk, vocab] block and its matmul output (a second fp32 block in a
    soft-capped backward), or the full [T, vocab] logits with their fp32 copies (two with a backward)."""
    chunk = head_chunk_rows(cfg.train.head_chunk_size, shape.vocab)
    if chunk:
        return (2.5 if shape.softcap and grad else 1.5) * min(chunk, batch.scored) * shape.vocab * 4
    return batch.tokens * shape.vocab * (_act_bytes(cfg) + (2 if grad else 1) * 4)


def base_weights(cfg: Config, shape: Shape) -> float:
    """Bytes of the whole base as loaded: quantized linears, embeddings, norms and head in the compute dtype."""
    other_params = 2 * shape.vocab * shape.hidden + (2 * shape.layers + 1) * shape.hidden
    return sum(i * o for i, o in shape.linears) * shape.layers * _weight_bits(cfg, shape) / 8 + other_params * _act_bytes(cfg)


def _act_bytes(cfg: Config) -> int:
    return 2 if cfg.model.compute_dtype in ("auto", "bfloat16", "float16") else 4


def _weight_bits(cfg: Config, shape: Shape) -> float:
    """Bits per parameter of a base linear as stored."""
    return {"nf4": NF4_BITS, "int8": 8 + 32 / shape.hidden, "none": 8 * _act_bytes(cfg)}[cfg.model.quantization]


def advice(cfg: Config, parts: dict[str, float], budget: int) -> str:
    """Which knob to turn first: the biggest part that a config field controls."""
    t = cfg.train
    if parts["output head"] > 0.25 * budget and t.head_chunk_size == 0:
        return "set --train.head_chunk_size null (response-only, chunked output head sized by the vocabulary)"
    if t.gradient_checkpointing is False:
        return "set --train.gradient_checkpointing true (or auto: only the layers the budget needs)"
    if t.batch_size > 1:
        return (f"lower --train.batch_size to {max(1, t.batch_size // 2)} and raise "
                f"--train.gradient_accumulation_steps to {t.gradient_accumulation_steps * 2} (same effective batch)")
    if cfg.model.quantization != "nf4":
        return "set --model.quantization nf4"
    return f"lower --data.max_length (now {cfg.data.max_length}) or use a smaller model"


def data_lengths(cfg: Config, sft: bool = False) -> list[tuple[int, ...]]:
    """(prompt, chosen, rejected) token counts of every pair the config's data yields, as training would tokenize it;
    with ``sft``, (tokens, assistant tokens) of every conversation, as `qsimpo sft` would."""
    from qsimpo.data import build_dataset
    from qsimpo.train.model import load_tokenizer

    if sft:
        from qsimpo.data import read_source
        from qsimpo.data.conversations import sft_report, tokenize_conversations
        from qsimpo.templates import require_template

        tok = load_tokenizer(cfg.model)
        require_template(tok, cfg.model.name_or_path, "qsimpo plan --sft --data")
        convs, summary = tokenize_conversations(cfg.data, read_source(cfg.data, conversations=True), tok)
        say(sft_report(summary).splitlines()[0])
        return [(len(c["input_ids"]), sum(c["assistant_mask"])) for c in convs]
    pairs, summary = build_dataset(cfg.data, load_tokenizer(cfg.model))
    say(summary.line())
    return [(len(p["prompt_ids"]), len(p["chosen_ids"]), len(p["rejected_ids"])) for p in pairs]


def plan(cfg: Config, gpu_memory: int, model_config=None, lengths: list[tuple[int, ...]] | None = None,
         processes: int = 1, sft: bool = False) -> tuple[str, bool]:
    """(report text, fits). ``lengths``: the data's pair lengths (data_lengths) instead of the max_length worst case;
    ``processes``: how many processes the run is launched with (each has ``gpu_memory``); ``sft``: the config is
    `qsimpo sft`'s (conversations; no eval or reference pass to plan)."""
    if processes < 1:
        raise UsageError(f"--processes {processes}: give the number of processes the run is launched with (1 or more)")
    if model_config is None:
        from qsimpo.train.model import load_model_config

        model_config = load_model_config(cfg.model)
    batch = worst_sft_batch(cfg, lengths) if sft else worst_batch(cfg, lengths)
    shape = shape_of(model_config)
    budget = parse_size(cfg.train.memory_budget) if cfg.train.memory_budget else gpu_memory
    checkpointed = checkpointed_layers(cfg, shape, batch, budget, processes)
    parts = estimate(cfg, shape, batch, processes, checkpointed)
    total = sum(parts.values())
    loading = base_weights(cfg, shape) + CONTEXT  # every process loads the whole base before FSDP splits it
    lines = [f"{'qsimpo sft ' if sft else ''}memory plan for {cfg.model.name_or_path} ({cfg.model.quantization}, batch {cfg.train.batch_size}, "
             f"max_length {cfg.data.max_length}, packing {cfg.train.packing}, {cfg.model.attn_implementation}, "
             f"head_chunk_size {head_chunk_rows(cfg.train.head_chunk_size, model_config.vocab_size)})",
             f"  worst micro-batch: {batch.tokens} tokens laid out ({batch.source})",
             f"  activation checkpointing: {split_text(cfg, checkpointed, shape.layers, budget)}"]
    if processes > 1:
        lines.append(f"  per process, {processes} processes: " + (
            f"FSDP splits the base and the LoRA state {processes} ways" if cfg.train.fsdp
            else "DDP, each holds a whole copy (--train.fsdp true splits the weights)"))
    elif cfg.train.fsdp:
        lines.append("  train.fsdp splits across processes: pass --processes N, the number you launch")
    lines += [f"  {name:<30} {value / GiB:8.2f} GiB" for name, value in parts.items()]
    lines.append(f"  {'estimated peak':<30} {total / GiB:8.2f} GiB of {gpu_memory / GiB:.1f} GiB")
    if cfg.train.fsdp and processes > 1:
        lines.append(f"  {'while loading (whole base)':<30} {loading / GiB:8.2f} GiB")
    if cfg.loss.type == "dpo" and not sft:
        lines.append(reference_line(cfg, shape, total, lengths))
    if not sft:  # `qsimpo eval` scores preference pairs: the SimPO run's plan says whether it fits
        lines.append(eval_line(cfg, shape, gpu_memory, lengths))
    fits = max(total, loading) <= gpu_memory
    if fits:
        lines.append("fits")
    elif loading > gpu_memory:
        lines.append("does not fit: every process loads the whole base before FSDP splits it; "
                     "use a device with more memory or a smaller model")
    else:
        lines.append(f"does not fit: {advice(cfg, parts, gpu_memory)}")
    return "\n".join(lines), fits


def split_text(cfg: Config, checkpointed: int, layers: int, budget: int) -> str:
    """How many layers are recomputed, and for auto the budget that decided it."""
    text = f"{checkpointed} of {layers} decoder layers recomputed in the backward pass"
    if cfg.train.gradient_checkpointing == "auto":
        source = "train.memory_budget" if cfg.train.memory_budget else "the GPU's memory"
        text += f" (auto: the fewest that fit {budget / GiB:.1f} GiB, {source})"
    return text


def reference_line(cfg: Config, shape: Shape, train_peak: float, lengths: list[tuple[int, int, int]] | None = None) -> str:
    """DPO's one-time pass: the reference log-probs of every pair (adapter off), a forward without gradients at the
    training batch size, before the first step; afterwards a DPO step costs what a SimPO step costs."""
    need = eval_estimate(cfg, shape, cfg.train.batch_size, lengths)
    pairs = f"{len(lengths)} pairs" if lengths is not None else "every pair (--data counts them)"
    return (f"  dpo reference pass, once before the first step: {pairs}, forward only (about a third of one epoch's "
            f"compute), {need / GiB:.2f} GiB peak ({'within' if need <= train_peak else 'above'} the training peak); "
            "stored beside the tokenized data and reused by reruns and resumes")


EVAL_BATCH = 8  # qsimpo eval's default --batch-size


def eval_line(cfg: Config, shape: Shape, gpu_memory: int, lengths: list[tuple[int, int, int]] | None = None) -> str:
    """What `qsimpo eval` needs on one device of ``gpu_memory``, and the largest --batch-size that fits if 8 does not."""
    need = eval_estimate(cfg, shape, EVAL_BATCH, lengths)
    head = f"  qsimpo eval, --batch-size {EVAL_BATCH}: {need / GiB:.2f} GiB on one device: "
    if need <= gpu_memory:
        return head + "fits"
    fitting = [b for b in range(EVAL_BATCH - 1, 0, -1) if eval_estimate(cfg, shape, b, lengths) <= gpu_memory]
    return head + (f"pass --batch-size {fitting[0]}" if fitting else "does not fit at --batch-size 1")
