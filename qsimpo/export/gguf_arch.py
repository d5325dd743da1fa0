"""The architectures the GGUF export writes, and the hyperparameters llama.cpp reads for each.

    transformers      GGUF arch   as llama.cpp's convert_hf_to_gguf.py writes it
    llama, mistral    llama       Q and K rows permuted per head; Mistral is llama.cpp's "llama" (its
                                  converter writes no sliding window for it; see arch_notes)
    qwen2             qwen2       Q/K/V biases, rows as transformers keeps them
    gemma2            gemma2      RMSNorm weights stored as 1 + w (transformers' Gemma norm multiplies by
                                  1 + w, llama.cpp's by w; transformers' GGUF reader subtracts the 1 again),
                                  four norms a layer (attn_norm, post_attention_norm, ffn_norm, post_ffw_norm),
                                  attention and final logit soft-capping, the sliding window (llama.cpp slides
                                  on every other layer, starting with the first), tied embeddings
    gemma3_text       gemma3      as Gemma 2 plus Q/K norms, no soft-capping, llama.cpp's fixed layout of five
                                  sliding layers then one global (rope base 10000 on the sliding layers, the
                                  config's on the global ones)

llama.cpp multiplies Gemma's embeddings by sqrt(hidden) itself and scales attention by 1/sqrt(head_dim) (for
every size but the 27B ones), so a config that asks for anything else is refused, as is any setting llama.cpp
cannot run (a sliding-window layout other than its fixed one, rope scaling other than Llama 3.1's, which is
written as llama.cpp's rope_freqs tensor, an activation other than Gemma's).
"""

from __future__ import annotations

from qsimpo.export.gguf_errors import GGUFError

# transformers model_type -> (GGUF architecture, permute Q/K rows as llama.cpp's Llama attention expects)
ARCHITECTURES = {"llama": ("llama", True), "mistral": ("llama", True), "qwen2": ("qwen2", False),
                 "gemma2": ("gemma2", False), "gemma3_text": ("gemma3", False)}
NOT_YET = {
    "gemma3": "the multimodal Gemma 3 is not written (its vision tower would need a separate mmproj file); a "
              "text-only Gemma 3 (model_type gemma3_text, Gemma3ForCausalLM) is",
}
SWA_PATTERN = {"gemma2": 2, "gemma3": 6}  # llama.cpp: layer i slides when i % n < n - 1
GEMMA_ACTIVATIONS = ("gelu_pytorch_tanh",)  # llama.cpp's Gemma feed-forward: GELU, tanh approximation


def _rope(config, layer_type: str | None = None) -> dict:
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    if layer_type and isinstance(rope.get(layer_type), dict):
        rope = rope[layer_type]
    return rope


def _theta(config, layer_type: str | None = None) -> float:
    return float(_rope(config, layer_type).get("rope_theta", getattr(config, "rope_theta", None) or 10000.0))


def _refuse(what: str) -> GGUFError:
    return GGUFError(f"{what}: merge without --gguf and convert the merged folder with llama.cpp's convert_hf_to_gguf.py")


def arch_notes(config) -> list[str]:
    """Raise GGUFError for a config llama.cpp would run otherwise than transformers does; else notes on what the
    file does differently (empty when nothing)."""
    model_type = config.model_type
    arch = ARCHITECTURES[model_type][0]
    for layer_type in (None, "full_attention", "sliding_attention"):
        rope = _rope(config, layer_type)
        kind = rope.get("rope_type", rope.get("type", "default"))
        if kind == "llama3" and model_type == "llama":
            continue  # Llama 3.1/3.2: written as llama.cpp's rope_freqs tensor (rope_factors)
        if kind not in ("default", None):
            raise _refuse(f"GGUF export of a model with {kind!r} rope scaling is not supported yet")
    notes = []
    window = getattr(config, "sliding_window", None)
    if model_type == "mistral" and window and window < config.max_position_embeddings:
        notes.append(f"sliding_window {window}: written as llama.cpp's converter writes Mistral (architecture llama, "
                     f"no sliding window), so the file attends to all earlier tokens; it answers as the model does "
                     f"on prompts and answers up to {window} tokens")
    if not arch.startswith("gemma"):
        return notes
    head_dim = config.head_dim
    if getattr(config, "hidden_activation", None) not in GEMMA_ACTIVATIONS:
        raise _refuse(f"{model_type} with hidden_activation {config.hidden_activation!r}: llama.cpp's Gemma runs "
                      f"{GEMMA_ACTIVATIONS[0]} only")
    if config.query_pre_attn_scalar != head_dim:
        raise _refuse(f"{model_type} with query_pre_attn_scalar {config.query_pre_attn_scalar} (head_dim {head_dim}): "
                      "llama.cpp scales attention by 1/sqrt(head_dim) except for the 27B sizes it recognises by "
                      "layer count, and transformers' GGUF reader assumes 256; not supported")
    n = SWA_PATTERN[arch]
    want = ["sliding_attention" if i % n < n - 1 else "full_attention" for i in range(config.num_hidden_layers)]
    if not window or list(getattr(config, "layer_types", None) or want) != want:
        raise _refuse(f"{model_type} with layer_types {getattr(config, 'layer_types', None)} and sliding_window "
                      f"{window}: llama.cpp's {arch} slides on layer i when i % {n} < {n - 1}, nothing else")
    if arch == "gemma2":
        if config.attn_logit_softcapping is None or config.final_logit_softcapping is None:
            raise _refuse("gemma2 without soft-capping: llama.cpp's Gemma 2 always soft-caps attention logits")
    else:
        if config.attn_logit_softcapping is not None or config.final_logit_softcapping is not None:
            raise _refuse("gemma3 with soft-capping: llama.cpp's Gemma 3 soft-caps nothing")
        if _theta(config, "sliding_attention") != 10000.0 or getattr(config, "rope_local_base_freq", None) not in (
                None, 10000.0):
            raise _refuse("gemma3 with a sliding-layer rope base other than 10000, llama.cpp's fixed one")
    return notes


def rope_factors(config):
    """Llama 3.1/3.2's rope scaling as llama.cpp's ``rope_freqs.weight``: one float32 factor per rotary pair, by which
    llama.cpp divides that pair's frequency (computed as llama.cpp's converter computes it); None for other models."""
    import math

    import numpy as np

    rope = _rope(config)
    if rope.get("rope_type", rope.get("type")) != "llama3":
        return None
    dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    factor, low, high = float(rope["factor"]), float(rope.get("low_freq_factor", 1.0)), float(rope.get("high_freq_factor", 4.0))
    old = float(rope.get("original_max_position_embeddings", 8192))
    out = []
    for i in range(0, dim, 2):
        wavelen = 2 * math.pi * _theta(config) ** (i / dim)
        if wavelen < old / high:
            out.append(1.0)
        elif wavelen > old / low:
            out.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.asarray(out, dtype=np.float32)


def arch_metadata(writer, config, arch: str) -> None:
    """The ``{arch}.*`` hyperparameter keys llama.cpp reads for this model."""
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(getattr(config, "num_key_value_heads", None) or heads)
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    if arch.startswith("gemma"):
        writer.add_rope_freq_base(_theta(config, "full_attention"))
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
        writer.add_sliding_window(int(config.sliding_window))
        if arch == "gemma2":
            writer.add_attn_logit_softcapping(float(config.attn_logit_softcapping))
            writer.add_final_logit_softcapping(float(config.final_logit_softcapping))
        return
    writer.add_rope_freq_base(_theta(config))
    writer.add_rope_dimension_count(head_dim)
    if head_dim != config.hidden_size // heads:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
