"""Tiny models of the other architectures the GGUF export writes (Mistral, Gemma 2, Gemma 3), with random weights,
and a sentencepiece-style tokenizer (BPE with byte fallback, as Mistral's, Llama 2's and Gemma's tokenizer.json
are) trained on a few hundred sentences: built offline, for tests/export/test_gguf_archs.py and test_gguf_llamacpp.py."""

from __future__ import annotations

import json
from pathlib import Path

MISTRAL_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}[INST] {{ m['content'] }} [/INST]"
    "{% else %}{{ m['content'] }}{{ eos_token }}{% endif %}{% endfor %}"
)
GEMMA_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<start_of_turn>{{ 'model' if m['role'] == 'assistant' else m['role'] }}\n"
    "{{ m['content'] }}<end_of_turn>\n{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)
WORDS = ("owl river bicycle capital France Paris mountain forest light night garden answer question explain tell "
         "about works wheel pedal chain bird feather hunt mouse quiet fly water cold warm city people north south "
         "the a of and is in to it that with for on as are by this be").split()


def sentences(n: int = 400) -> list[str]:
    import random

    rng = random.Random(0)
    out = []
    for i in range(n):
        words = [rng.choice(WORDS) for _ in range(rng.randint(4, 12))]
        out.append(" ".join(words).capitalize() + rng.choice([".", "?", "!", f" {i}.", ", 42 times."]))
    return out


def spm_tokenizer(gemma: bool = False, vocab_size: int = 600):
    """A LlamaTokenizerFast (GemmaTokenizerFast with ``gemma``) over a BPE with byte fallback: <unk>, <s>, </s> (Gemma:
    <pad>, <eos>, <bos>, <unk> and its turn markers) and the 256 byte tokens <0x00>..<0xFF>, with a chat template."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import GemmaTokenizerFast, LlamaTokenizerFast

    specials = ["<pad>", "<eos>", "<bos>", "<unk>"] if gemma else ["<unk>", "<s>", "</s>"]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - 256, special_tokens=specials, show_progress=False)
    words = Tokenizer(models.BPE(unk_token="<unk>"))  # words learned as sentencepiece learns them: "▁word"
    words.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always", split=True)
    words.train_from_iterator(sentences(), trainer)
    learned = json.loads(words.to_str())["model"]
    # the ids of a sentencepiece vocabulary: specials, the 256 byte tokens, then the learned pieces
    order = specials + [f"<0x{b:02X}>" for b in range(256)]
    order += [t for t, _ in sorted(learned["vocab"].items(), key=lambda kv: kv[1]) if t not in specials]
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(order)}, merges=[tuple(m) for m in learned["merges"]],
                               unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    if gemma:  # Gemma's tokenizer.json: spaces become ▁, no prefix space
        tok.normalizer = normalizers.Replace(" ", "\u2581")
        tok.pre_tokenizer = pre_tokenizers.Split(" ", "merged_with_previous")
        tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()])
    else:  # Mistral v0.3's: Metaspace with a prefix space on the first word only
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first", split=False)
        tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
                                         decoders.Strip(" ", 1, 0)])
    tok.add_special_tokens(specials)
    if gemma:
        tok.add_special_tokens(["<start_of_turn>", "<end_of_turn>"])
        hf = GemmaTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                                unk_token="<unk>", add_bos_token=True, add_eos_token=False)
        hf.chat_template = GEMMA_TEMPLATE
    else:
        hf = LlamaTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                add_bos_token=True, add_eos_token=False)
        hf.chat_template = MISTRAL_TEMPLATE
    return hf


def save(model, tokenizer, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


KINDS = ("mistral", "gemma2", "gemma3_text")


def tiny_base_of(kind: str, folder: Path) -> Path:
    """A saved tiny ``kind`` model (random weights, norms away from their init so Gemma's 1 + w matters) with the
    sentencepiece-style tokenizer. Gemma's sliding window is 8 tokens, shorter than every chat prompt of the tests,
    so the sliding layers really slide; head_dim 256 is the query_pre_attn_scalar transformers' GGUF reader assumes."""
    import torch
    from transformers import (Gemma2Config, Gemma2ForCausalLM, Gemma3ForCausalLM, Gemma3TextConfig, MistralConfig,
                              MistralForCausalLM)

    torch.manual_seed(0)
    tok = spm_tokenizer(gemma=kind.startswith("gemma"))
    ids = dict(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    if kind == "llama31":  # Llama 3.1's rope scaling, with an original context short enough to change every prompt
        from transformers import LlamaConfig, LlamaForCausalLM

        model = LlamaForCausalLM(LlamaConfig(
            vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=512, initializer_range=0.1, **ids, rope_parameters={
                "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64, "rope_theta": 10000.0}))
    elif kind == "mistral":
        model = MistralForCausalLM(MistralConfig(
            vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=512, sliding_window=None, initializer_range=0.1, **ids))
    else:
        gemma = dict(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_attention_heads=2,
                     num_key_value_heads=1, head_dim=256, query_pre_attn_scalar=256, max_position_embeddings=512,
                     sliding_window=8, initializer_range=0.1, **ids)
        model = (Gemma2ForCausalLM(Gemma2Config(num_hidden_layers=4, **gemma)) if kind == "gemma2" else
                 Gemma3ForCausalLM(Gemma3TextConfig(num_hidden_layers=6, **gemma)))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(torch.randn(p.shape) * 0.5)
    return save(model, tok, folder)
