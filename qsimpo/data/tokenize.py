"""Texts -> token ids with an exact prompt/response boundary; a whole source -> pairs and their summary."""

from __future__ import annotations

import random
import sys
from dataclasses import dataclass

from ..config import DataConfig
from .formats import DataError, DataSummary, handle_bad_row, to_triples
from .render import render_pair
from .sources import read_rows

def _encode(tokenizer, text: str) -> list[int]:
    # add_special_tokens=False: the post-processor would add a BOS here and in front of every response.
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _response_ids(tokenizer, text: str) -> list[int]:
    eos = tokenizer.eos_token_id
    if eos is not None and tokenizer.eos_token and text.rstrip().endswith(tokenizer.eos_token):
        # The template already closed the turn (e.g. "<|im_end|>\n"): end at EOS, not at EOS + newline.
        return _encode(tokenizer, text.rstrip())
    ids = _encode(tokenizer, text)
    return ids + [eos] if eos is not None and (not ids or ids[-1] != eos) else ids


def tokenize_pair(tokenizer, triple: dict, max_length: int, max_prompt_length: int,
                  system_prompt: str | None = None) -> dict | None:
    """Token ids of one pair; None if it cannot fit in max_length (the caller counts it as too_long).

    The prompt starts with exactly one BOS (when the tokenizer has one: the template may have
    rendered it, the post-processor is not asked to add another); each response ends with one EOS.
    Truncation only when prompt + longest response > max_length: the prompt is cut from the left
    to max_prompt_length (keeping the BOS), then responses from the right to the room left (a cut
    response loses its EOS). A response is never left empty.
    """
    prompt_text, chosen_text, rejected_text = render_pair(tokenizer, triple, system_prompt)
    prompt = _encode(tokenizer, prompt_text)
    bos = tokenizer.bos_token_id
    if bos is not None:
        while prompt and prompt[0] == bos:
            prompt = prompt[1:]
        prompt = [bos] + prompt
    if not prompt:
        raise DataError.bad_row(triple.get("location", "row"), "empty_text", "the prompt is empty and the tokenizer has no "
                                "BOS, so the first response token has nothing to be predicted from")
    chosen, rejected = _response_ids(tokenizer, chosen_text), _response_ids(tokenizer, rejected_text)
    prompt_truncated = response_truncated = False
    if len(prompt) + max(len(chosen), len(rejected)) > max_length:
        if len(prompt) > max_prompt_length:
            head = prompt[:1] if bos is not None else []
            keep = max_prompt_length - len(head)
            prompt = head + (prompt[len(prompt) - keep:] if keep > 0 else [])
            prompt_truncated = True
        room = max_length - len(prompt)
        if room < 1:
            return None
        response_truncated = len(chosen) > room or len(rejected) > room
        chosen, rejected = chosen[:room], rejected[:room]
    return {"prompt_ids": prompt, "chosen_ids": chosen, "rejected_ids": rejected,
            "prompt_truncated": prompt_truncated, "response_truncated": response_truncated}


@dataclass
class Source:
    """One source's normalised rows, before tokenization, and what happened to every row read."""

    triples: list[dict]
    summary: DataSummary


def read_source(cfg: DataConfig, path: str | None = None) -> Source:
    """Read and normalise ``path`` (default cfg.path), judging every row; no tokenizer needed.

    Bad rows are recorded at every stage; under ``on_bad_row: error`` one DataError lists them all,
    so a run stops on bad data before any model or tokenizer loads.
    """
    source = path or cfg.path
    summary = DataSummary(str(source))
    rows = read_rows(source, cfg.split, cfg.max_rows, "skip", summary, cfg.subset, cfg.data_dir)
    if not summary.rows_read:
        raise DataError(f"{source}: no rows: the source is empty; point data.path at a file with one preference pair "
                        "per row (see the README's data formats)")
    triples = to_triples(rows, cfg.format, "skip", summary)
    summary.check(cfg.on_bad_row)
    return Source(triples, summary)


def tokenize_source(cfg: DataConfig, source: Source, tokenizer) -> tuple[list[dict], DataSummary]:
    """Tokenize a read source; return the pairs and its summary (now with kept, truncation and too_long counts).

    Each pair holds prompt_ids, chosen_ids, rejected_ids, the truncation flags, "location", and
    under "text" the normalised prompt/chosen/rejected (for inspect-data and eval).
    """
    from tqdm.auto import tqdm

    summary, triples = source.summary, source.triples
    bar = tqdm(triples, desc=f"tokenizing {summary.source}", unit="pair", disable=len(triples) <= 1000 or not sys.stderr.isatty())
    pairs = []
    for triple in bar:
        try:
            enc = tokenize_pair(tokenizer, triple, cfg.max_length, cfg.max_prompt_length, cfg.system_prompt)
        except DataError as e:
            handle_bad_row(e, summary)
            continue
        if enc is None:
            summary.dropped["too_long"] += 1
            continue
        summary.truncated_prompt += enc["prompt_truncated"]
        summary.truncated_response += enc["response_truncated"]
        text = {k: triple[k] for k in ("prompt", "chosen", "rejected", "format")}
        pairs.append({**enc, "location": triple["location"], "text": text})
    summary.kept = len(pairs)
    summary.check(cfg.on_bad_row)
    if not pairs:
        raise DataError(f"no usable pairs: {summary.line()}; see the reasons above (too_long: raise data.max_length or "
                        "lower data.max_prompt_length)")
    return pairs, summary


def build_dataset(cfg: DataConfig, tokenizer, path: str | None = None) -> tuple[list[dict], DataSummary]:
    """Read, normalise and tokenize ``path`` (default cfg.path): ``tokenize_source(read_source(...))``."""
    return tokenize_source(cfg, read_source(cfg, path), tokenizer)


def split_eval(pairs: list[dict], fraction: float, seed: int) -> tuple[list, list]:
    """(train, eval): a seeded random ``fraction`` of the pairs held out (at least 1), both kept in file order."""
    if len(pairs) < 2:
        raise DataError(f"cannot hold out an eval fraction from {len(pairs)} pair(s): need at least 2; give data.eval a file instead")
    n_eval = min(len(pairs) - 1, max(1, round(fraction * len(pairs))))
    held = set(random.Random(seed).sample(range(len(pairs)), n_eval))
    return [p for i, p in enumerate(pairs) if i not in held], [p for i, p in enumerate(pairs) if i in held]


def format_pair(tokenizer, pair: dict) -> str:
    """A readable view of one tokenized pair, special tokens shown, with the prompt/response boundary marked."""
    def show(ids):
        return tokenizer.decode(ids, skip_special_tokens=False)

    def pieces(ids):
        return " ".join(repr(show([i])) for i in ids)

    p = pair["prompt_ids"]
    cut = [w for w, flag in (("prompt cut from the left", pair.get("prompt_truncated")),
                             ("responses cut to fit max_length", pair.get("response_truncated"))) if flag]
    lines = [f"═══ {pair.get('location', 'pair')}{' (' + '; '.join(cut) + ')' if cut else ''} ═══",
             f"──── prompt ({len(p)} tokens, masked-out) ────", show(p)]
    for key in ("chosen", "rejected"):
        ids = pair[f"{key}_ids"]
        lines += [f"──── {key} response ({len(ids)} tokens, masked-in) ────", show(ids),
                  f"  boundary: … {pieces(p[-3:])} ┃ {pieces(ids[:3])} …   last: {pieces(ids[-2:])}"]
    return "\n".join(lines)
