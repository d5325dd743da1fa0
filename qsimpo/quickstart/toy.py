"""Tiny, locally built models and tokenizers.

Nothing here touches the network: the quickstart and the tests build a byte-level BPE
tokenizer trained on the fly (with a chat template and a BOS post-processor, like Llama's)
and a few-layer Llama-style model, save them as ordinary Hugging Face folders, and then
load them back through the same ``from_pretrained`` calls a real model goes through.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>", "<|system|>", "<|user|>", "<|assistant|>"]

# The prompt is rendered by the same template with add_generation_prompt=True, so the
# prompt text is always a prefix of the prompt+response text (checked in qsimpo.data).
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def build_tokenizer(texts: Iterable[str], vocab_size: int = 512, chat_template: bool = True):
    """Train a byte-level BPE tokenizer on ``texts``; return a transformers tokenizer.

    The tokenizer adds BOS by itself (as Llama's does), so callers must take care not to
    add a second one when a chat template already starts with it.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(texts), trainer)
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", bos)]
    )
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )
    if chat_template:
        hf.chat_template = CHAT_TEMPLATE
    return hf


def build_model(tokenizer, hidden_size: int = 64, num_layers: int = 2, num_heads: int = 4,
                intermediate_size: int | None = None, max_positions: int = 1024, seed: int = 0,
                vocab_size: int | None = None, num_kv_heads: int | None = None, device: str = "cpu"):
    """A randomly initialised Llama-style causal LM sized to ``tokenizer`` (or to ``vocab_size``).

    ``device="cuda"`` initialises the weights on the GPU (an 8B model in seconds rather than minutes).
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=max(vocab_size or 0, len(tokenizer)),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size or 2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads or max(1, num_heads // 2),
        max_position_embeddings=max_positions,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    with torch.device(device):
        return LlamaForCausalLM(config)


def save_base(model, tokenizer, path: str | Path) -> Path:
    """Save model + tokenizer as a standard folder that ``from_pretrained`` loads."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
