"""The tokenizer of a GGUF file: which of llama.cpp's tokenizers runs it, and its vocabulary in llama.cpp's keys.

Two kinds of fast tokenizer are written, each as llama.cpp re-implements it:

    byte-level BPE    tokenizer.ggml.model "gpt2": tokens, merges and the pre-tokenizer's name
                      (tokenizer.ggml.pre), for Llama 3, Qwen2 and SmolLM; llama.cpp re-implements each
                      pre-tokenizer by name, so one it has no name for is refused
    sentencepiece     tokenizer.ggml.model "llama": tokens with scores and types (the byte tokens
                      <0x00>..<0xFF> typed BYTE), for BPE tokenizers with byte fallback whose spaces
                      are "▁" (Mistral, Llama 2, Gemma). llama.cpp merges the adjacent pair whose
                      token scores highest, so a token's score is minus the rank of the first merge
                      that makes it; the merges are written too, which transformers' GGUF reader
                      takes over its own reconstruction from scores. tokenizer.ggml.add_space_prefix
                      says whether "▁" is put before the text and after every special token (Metaspace
                      "always", Llama 2's Prepend normalizer) or nowhere (Gemma's Replace normalizer;
                      Metaspace "first", which prefixes the start of the input only: a chat prompt
                      starts with BOS, so it gets no prefix from transformers either, but plain text
                      given to llama.cpp without a chat template lacks the "▁" before its first word).

Anything else (WordPiece, Unigram, a pre-tokenizer of neither kind) is refused before anything is written.
"""

from __future__ import annotations

import json
import re

from qsimpo.export.gguf_errors import GGUFError

# Byte-level pre-tokenizers llama.cpp implements by name, recognised from tokenizer.json's pre_tokenizer.
SPLIT_NAMES = ("llama-bpe", "qwen2")  # their regexes are the ones transformers' GGUF reader rebuilds by these names
SPM = "sentencepiece"  # Plan.pre of a sentencepiece-style tokenizer (llama.cpp's "llama" vocabulary reads no pre name)
SPACE = "\u2581"


def tokenizer_json(tokenizer) -> dict:
    if not getattr(tokenizer, "is_fast", False):
        raise GGUFError("GGUF export needs a fast (tokenizer.json) tokenizer; this model has a slow one")
    return json.loads(tokenizer.backend_tokenizer.to_str())


def _steps(part: dict | None) -> list[dict]:
    part = part or {}
    if part.get("type") == "Sequence":
        return part.get("pretokenizers") or part.get("normalizers") or part.get("decoders") or []
    return [part] if part else []


def sentencepiece_prefix(tj: dict) -> bool | None:
    """For a BPE with byte fallback whose spaces become "▁": whether a "▁" goes before the text (llama.cpp's
    add_space_prefix); None when the tokenizer is not of that kind."""
    model, decoder = tj.get("model") or {}, tj.get("decoder") or {}
    if model.get("type") != "BPE" or not model.get("byte_fallback"):
        return None
    if not any(d.get("type") == "ByteFallback" for d in _steps(decoder)):
        return None
    pre = [s for s in _steps(tj.get("pre_tokenizer")) if s.get("type")]
    norm = [s for s in _steps(tj.get("normalizer")) if s.get("type")]
    kinds = [s["type"] for s in norm]
    replaces_spaces = any(s["type"] == "Replace" and (s.get("pattern") or {}).get("String") == " "
                          and s.get("content") == SPACE for s in norm)
    if not norm and len(pre) == 1 and pre[0]["type"] == "Metaspace" and pre[0].get("replacement", SPACE) == SPACE:
        # "first" (Mistral, Llama 2 in transformers 5) prefixes only text at the very start of the input, never text
        # after a special token; llama.cpp prefixes the start and every text after a special token, or nothing. A chat
        # prompt starts with a special token (BOS), so "first" is written as nothing: chat prompts tokenize the same
        return pre[0].get("prepend_scheme", "always") == "always"
    if kinds == ["Prepend", "Replace"] and norm[0].get("prepend") == SPACE and replaces_spaces and not pre:
        return True  # Llama 2's tokenizer.json
    if kinds == ["Replace"] and replaces_spaces and all(
            s["type"] == "Split" and (s.get("pattern") or {}).get("String") == " " for s in pre):
        return False  # Gemma's
    return None


def pre_tokenizer(tokenizer) -> str:
    """llama.cpp's name for how this tokenizer splits text before merging (tokenizer.ggml.pre), or SPM for a
    sentencepiece-style one."""
    from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_PRE_TOKENIZER_SPLITS

    tj = tokenizer_json(tokenizer)
    if sentencepiece_prefix(tj) is not None:
        return SPM
    model, decoder = tj.get("model") or {}, tj.get("decoder") or {}
    if model.get("type") != "BPE" or decoder.get("type") != "ByteLevel":
        raise GGUFError("GGUF export supports byte-level BPE tokenizers (Llama 3, Qwen2, SmolLM) and sentencepiece-style "
                        "BPE with byte fallback (Mistral, Llama 2, Gemma); this one is "
                        f"{model.get('type')} with a {decoder.get('type')} decoder: not supported")
    pre = tj.get("pre_tokenizer") or {}
    steps = _steps(pre)
    kinds = [s.get("type") for s in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"  # llama.cpp's name (with the hyphen: it refuses "gpt2"); transformers reads it as plain ByteLevel
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and steps[1].get("use_regex", True):
        return "smollm"
    if kinds == ["Split", "ByteLevel"] and not steps[1].get("use_regex", True):
        regex = (steps[0].get("pattern") or {}).get("Regex")
        for name in SPLIT_NAMES:
            if GGUF_PRE_TOKENIZER_SPLITS.get(name) == regex:
                return name
    raise GGUFError(f"the tokenizer's pre-tokenizer ({' + '.join(map(str, kinds)) or 'none'}) is not one llama.cpp "
                    "knows by name, so llama.cpp would tokenize differently; GGUF export is not supported for it")


def vocab(tokenizer, vocab_size: int, spm: bool = False) -> tuple[list[str], list[int], list[str], list[float]]:
    """(tokens in id order, their llama.cpp token types, merges as "a b", scores) padded to the model's vocab_size;
    the scores are for a sentencepiece-style vocabulary (``spm``), else empty."""
    from gguf import TokenType

    tj = tokenizer_json(tokenizer)
    by_id = {i: t for t, i in tj["model"]["vocab"].items()}
    kind = {i: TokenType.NORMAL for i in by_id}
    if spm:
        kind.update({i: TokenType.BYTE for i, t in by_id.items() if re.fullmatch(r"<0x[0-9A-F]{2}>", t)})
    for added in tj.get("added_tokens") or []:
        by_id[added["id"]] = added["content"]
        kind[added["id"]] = TokenType.CONTROL if added.get("special") else TokenType.USER_DEFINED
    unk = tj["model"].get("unk_token")
    if spm and unk in tj["model"]["vocab"]:
        kind[tj["model"]["vocab"][unk]] = TokenType.UNKNOWN
    if max(by_id) >= vocab_size:
        raise GGUFError(f"the tokenizer has ids up to {max(by_id)}, beyond the model's vocab_size {vocab_size}")
    tokens = [by_id.get(i, f"[PAD{i}]") for i in range(vocab_size)]  # llama.cpp's name for rows no token uses
    types = [int(kind.get(i, TokenType.UNUSED)) for i in range(vocab_size)]
    merges = [m if isinstance(m, str) else " ".join(m) for m in tj["model"].get("merges") or []]
    scores: list[float] = []
    if spm:  # llama.cpp merges the pair whose token scores highest: minus the rank of the first merge making it
        made: dict[str, int] = {}
        for rank, m in enumerate(merges):
            made.setdefault(m.replace(" ", ""), rank)
        scores = [-float(made[t]) if t in made and types[i] == TokenType.NORMAL else 0.0 for i, t in enumerate(tokens)]
    return tokens, types, merges, scores


def adds(tokenizer, token_id) -> tuple[bool, bool]:
    """Whether the tokenizer itself puts BOS first / EOS last (llama.cpp must do the same, no more)."""
    ids = tokenizer("hello").input_ids
    return (token_id(tokenizer.bos_token) is not None and ids[:1] == [token_id(tokenizer.bos_token)],
            token_id(tokenizer.eos_token) is not None and ids[-1:] == [token_id(tokenizer.eos_token)])


def write_vocab(writer, tokenizer, vocab_size: int, pre: str, generation: dict) -> None:
    """The tokenizer.ggml.* keys and the chat template."""
    spm = pre == SPM
    tokens, types, merges, scores = vocab(tokenizer, vocab_size, spm)
    writer.add_tokenizer_model("llama" if spm else "gpt2")
    if not spm:
        writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    if spm:
        writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    ids = tokenizer.get_vocab()

    def token_id(token):
        return ids.get(token) if token else None

    for token, add in ((tokenizer.bos_token, writer.add_bos_token_id), (tokenizer.eos_token, writer.add_eos_token_id),
                       (tokenizer.unk_token, writer.add_unk_token_id), (tokenizer.pad_token, writer.add_pad_token_id)):
        if token_id(token) is not None:
            add(token_id(token))
    eos = generation.get("eos_token_id")
    extra = [i for i in (eos if isinstance(eos, list) else [eos]) if i is not None and i != token_id(tokenizer.eos_token)]
    if extra:  # e.g. Llama 3 Instruct ends a turn with <|eot_id|> besides its EOS
        writer.add_eot_token_id(extra[0])
    add_bos, add_eos = adds(tokenizer, token_id)
    writer.add_add_bos_token(add_bos)
    writer.add_add_eos_token(add_eos)
    writer.add_add_space_prefix(bool(spm and sentencepiece_prefix(tokenizer_json(tokenizer))))
    if tokenizer.chat_template:
        writer.add_chat_template(tokenizer.chat_template)
