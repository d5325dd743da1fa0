"""Preference data: rows on disk -> (prompt, chosen, rejected) -> token ids -> padded batches.

    read_rows      a .jsonl/.json/.parquet file, a datasets folder or a Hub id -> (location, row)
    to_triples     rows -> normalised texts, bad rows raised or counted     (qsimpo.formats)
    tokenize_pair  texts -> prompt ids + response ids, exact boundary, one BOS, one EOS, truncation
    build_dataset  the three above for a DataConfig, filling a DataSummary
    PairCollator   pairs -> input_ids / attention_mask / response_mask, chosen rows then rejected rows

The prompt and each response are tokenized separately, so the boundary between them is exact:
the response mask covers precisely the tokens the model is scored on.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import sys
from pathlib import Path
from typing import Any, Iterator

import torch

from qsimpo.config import DataConfig
from qsimpo.formats import REASONS, DataError, DataSummary, check_policy, handle_bad_row, to_triples

__all__ = ["DataError", "DataSummary", "REASONS", "read_rows", "to_triples", "render_pair", "tokenize_pair",
           "build_dataset", "split_eval", "PairCollator", "format_pair"]

log = logging.getLogger(__name__)
FILE_SUFFIXES = (".jsonl", ".json", ".parquet")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")  # "name" or "owner/name"


# ---------------------------------------------------------------------------------------------- sources
def read_rows(path: str, split: str = "train", max_rows: int | None = None, on_bad_row: str = "error",
              summary: DataSummary | None = None) -> list[tuple[str, dict]]:
    """Read raw rows as ``(location, row)``.

    Locations are "file.jsonl:line 12" (1-based, as an editor counts) for JSON lines, and
    "file.parquet row 5" / "folder[train] row 5" (0-based, as ``ds[5]`` indexes) for tabular sources.
    Unparseable lines and non-object rows are bad rows (malformed_json, not_an_object).
    A path that looks local (a data suffix, a leading / . ~, or more than one "/") and does not exist
    is "file not found"; any other string is tried as a Hub dataset id.
    """
    check_policy(on_bad_row)
    own_summary = summary is None
    if summary is None:
        summary = DataSummary(str(path))
    rows = []
    for location, row in _iter_source(str(path), split):
        if max_rows is not None and summary.rows_read >= max_rows:
            break
        summary.rows_read += 1
        if not isinstance(row, (DataError, dict)):
            row = DataError.bad_row(location, "not_an_object", f"the row is a {type(row).__name__}, expected an object "
                                    '{"chosen": ..., "rejected": ...}')
        if isinstance(row, DataError):
            handle_bad_row(row, on_bad_row, summary)
            continue
        rows.append((location, row))
    if own_summary and any(summary.dropped.values()):  # nobody will see the counts: say so here
        log.warning("%s: skipped bad rows: %s", path, {k: n for k, n in summary.dropped.items() if n})
    return rows


def looks_local(path: str) -> bool:
    # A Hub id is "name" or "owner/name", so a single "/" is not enough to call a path local.
    return (path.lower().endswith(FILE_SUFFIXES) or path.startswith(("/", ".", "~")) or path.count("/") > 1
            or (os.sep != "/" and os.sep in path) or not _HUB_ID.match(path))


def _iter_source(path: str, split: str) -> Iterator[tuple[str, Any]]:
    p = Path(path).expanduser()
    if p.is_file():
        suffix = p.suffix.lower()
        if suffix == ".jsonl":
            return _iter_jsonl(p, path)
        if suffix == ".json":
            return _iter_json(p, path)
        if suffix == ".parquet":
            return _iter_parquet(p, path)
        raise DataError(f"{path}: unsupported file type {suffix or '(no suffix)'!r}: use .jsonl, .json or .parquet, "
                        "a folder saved by datasets, or a Hub dataset id")
    if p.is_dir():
        return _iter_folder(p, path, split)
    if looks_local(path):
        raise DataError(f"{path}: file not found (working directory {os.getcwd()}); check data.path")
    return _iter_hub(path, split)


def _iter_jsonl(p: Path, name: str) -> Iterator[tuple[str, Any]]:
    with p.open(encoding="utf-8") as f:
        yield from _iter_lines(f, name)


def _iter_lines(lines, name: str) -> Iterator[tuple[str, Any]]:
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue  # blank lines (often a trailing newline) are not rows
        location = f"{name}:line {n}"
        try:
            yield location, json.loads(line)
        except json.JSONDecodeError as e:
            yield location, DataError.bad_row(location, "malformed_json", f"invalid JSON ({e.msg} at column {e.colno})")


def _iter_json(p: Path, name: str) -> Iterator[tuple[str, Any]]:
    text = p.read_text(encoding="utf-8")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        if e.msg == "Extra data":  # several top-level values: the file is JSON lines despite its suffix
            yield from _iter_lines(text.splitlines(), name)
            return
        raise DataError(f"{name}:line {e.lineno}: invalid JSON ({e.msg} at column {e.colno}); a .json file must be one "
                        "list of row objects (or JSON lines, one object per line)") from None
    if not isinstance(data, list):
        keys = f" with keys {', '.join(map(str, data))}" if isinstance(data, dict) else ""
        raise DataError(f"{name}: expected a JSON list of row objects (or JSON lines), got a {type(data).__name__}{keys}; "
                        "if the rows sit under one key, save that list on its own")
    for i, row in enumerate(data):
        yield f"{name} row {i}", row


def _iter_parquet(p: Path, name: str) -> Iterator[tuple[str, Any]]:
    import pyarrow.parquet as pq  # a dependency of datasets

    i = 0
    for batch in pq.ParquetFile(p).iter_batches(batch_size=1024):
        for row in batch.to_pylist():
            yield f"{name} row {i}", row
            i += 1


def _iter_dataset(ds, name: str) -> Iterator[tuple[str, Any]]:
    for i, row in enumerate(ds):
        yield f"{name} row {i}", row


def _iter_folder(p: Path, name: str, split: str) -> Iterator[tuple[str, Any]]:
    import datasets

    try:
        ds = datasets.load_from_disk(str(p))
    except FileNotFoundError:  # not save_to_disk output; maybe a folder of data files (a cloned Hub repo)
        try:
            return _iter_dataset(datasets.load_dataset(str(p), split=split), f"{name}[{split}]")
        except Exception as e:
            raise DataError(f"{name}: a folder that is neither saved by datasets.save_to_disk nor readable by "
                            f"datasets.load_dataset ({type(e).__name__}: {e}); point data.path at such a folder or at "
                            "a .jsonl/.json/.parquet file") from e
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise DataError(f"{name}: no split {split!r}; available splits: {', '.join(ds)}; set data.split to one of them")
        return _iter_dataset(ds[split], f"{name}[{split}]")
    return _iter_dataset(ds, name)


def _iter_hub(path: str, split: str) -> Iterator[tuple[str, Any]]:
    import datasets

    try:
        ds = datasets.load_dataset(path, split=split)
    except Exception as e:
        raise DataError(f"could not load {path!r} as a local file or a Hub dataset: {type(e).__name__}: {e}. "
                        f"If it is a local file, check the path (working directory {os.getcwd()}); if it is a Hub id, "
                        f"check the name, data.split ({split!r}), the network and HF_TOKEN") from e
    return _iter_dataset(ds, f"{path}[{split}]")


# ------------------------------------------------------------------------------------------- rendering
def _chat(tokenizer, messages: list[dict], generation_prompt: bool, location: str) -> str:
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    except Exception as e:
        hint = " (does the template reject system messages? set data.system_prompt: null)" if messages[0]["role"] == "system" else ""
        raise DataError(f"{location}: the tokenizer's chat template failed: {type(e).__name__}: {e}{hint}") from e


def render_pair(tokenizer, triple: dict, system_prompt: str | None = None) -> tuple[str, str, str]:
    """The prompt text and the two response texts, such that prompt + response is the full text.

    With a chat template: conversational prompts, and explicit string prompts as one user message,
    are rendered with add_generation_prompt=True; each response is what the template adds for the
    assistant message. Implicit (HH-RLHF) transcripts are raw text, never templated. Without a
    template, conversational rows become plain "role: content" lines ending in "assistant:" and the
    response " content"; explicit rows are raw prompt text. system_prompt is used only with a
    template, and only if the conversation has no system message of its own.
    """
    location = triple.get("location", "row")
    fmt = triple.get("format") or ("conversational" if isinstance(triple["prompt"], list) else "explicit")
    prompt, chosen, rejected = triple["prompt"], triple["chosen"], triple["rejected"]
    if fmt == "implicit" or (fmt == "explicit" and not tokenizer.chat_template):
        return prompt, chosen, rejected
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    if not tokenizer.chat_template:
        lines = "".join(f"{m['role']}: {m['content']}\n" for m in messages)
        return lines + "assistant:", " " + chosen, " " + rejected
    if system_prompt and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": system_prompt}] + messages
    prompt_text = _chat(tokenizer, messages, True, location)
    responses = []
    for response in (chosen, rejected):
        full = _chat(tokenizer, messages + [{"role": "assistant", "content": response}], False, location)
        if not full.startswith(prompt_text):
            k = next((i for i, (a, b) in enumerate(zip(prompt_text, full)) if a != b), min(len(prompt_text), len(full)))
            raise DataError(f"{location}: the chat template is not prefix-stable: the prompt rendered with "
                            f"add_generation_prompt=True is not a prefix of prompt + response (they differ at character {k}: "
                            f"{prompt_text[k:k + 30]!r} vs {full[k:k + 30]!r}), so the prompt/response boundary would be wrong; "
                            "use a tokenizer whose template renders the prompt as a prefix, or set tokenizer.chat_template")
        responses.append(full[len(prompt_text):])
    return prompt_text, responses[0], responses[1]


# -------------------------------------------------------------------------------------------- token ids
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


def build_dataset(cfg: DataConfig, tokenizer, path: str | None = None) -> tuple[list[dict], DataSummary]:
    """Read, normalise and tokenize ``path`` (default cfg.path); return the pairs and what happened to every row.

    Each pair holds prompt_ids, chosen_ids, rejected_ids, the truncation flags, "location", and
    under "text" the normalised prompt/chosen/rejected (for inspect-data and eval).
    """
    source = path or cfg.path
    summary = DataSummary(str(source))
    rows = read_rows(source, cfg.split, cfg.max_rows, cfg.on_bad_row, summary)
    triples = to_triples(rows, cfg.format, cfg.on_bad_row, summary)
    from tqdm.auto import tqdm

    bar = tqdm(triples, desc=f"tokenizing {source}", unit="pair", disable=len(triples) <= 1000 or not sys.stderr.isatty())
    pairs = []
    for triple in bar:
        try:
            enc = tokenize_pair(tokenizer, triple, cfg.max_length, cfg.max_prompt_length, cfg.system_prompt)
        except DataError as e:
            handle_bad_row(e, cfg.on_bad_row, summary)
            continue
        if enc is None:
            summary.dropped["too_long"] += 1
            continue
        summary.truncated_prompt += enc["prompt_truncated"]
        summary.truncated_response += enc["response_truncated"]
        text = {k: triple[k] for k in ("prompt", "chosen", "rejected", "format")}
        pairs.append({**enc, "location": triple["location"], "text": text})
    summary.kept = len(pairs)
    if not pairs:
        raise DataError(f"no usable pairs: {summary.line()}; see the reasons above (too_long: raise data.max_length or "
                        "lower data.max_prompt_length)")
    return pairs, summary


def split_eval(pairs: list[dict], fraction: float, seed: int) -> tuple[list, list]:
    """(train, eval): a seeded random ``fraction`` of the pairs held out (at least 1), both kept in file order."""
    if len(pairs) < 2:
        raise DataError(f"cannot hold out an eval fraction from {len(pairs)} pair(s): need at least 2; give data.eval a file instead")
    n_eval = min(len(pairs) - 1, max(1, round(fraction * len(pairs))))
    held = set(random.Random(seed).sample(range(len(pairs)), n_eval))
    return [p for i, p in enumerate(pairs) if i not in held], [p for i, p in enumerate(pairs) if i in held]


# -------------------------------------------------------------------------------------------- batching
class PairCollator:
    """Pairs -> the plain batch: rows 0..B-1 are prompt+chosen, rows B..2B-1 prompt+rejected, right-padded.

    response_mask is 1 exactly on response tokens (what SimPO scores), 0 on prompt and padding.
    """

    def __init__(self, pad_token_id: int, pad_to_multiple_of: int | None = None):
        if pad_token_id is None:
            raise ValueError("pad_token_id is None: the tokenizer has no pad token; set tokenizer.pad_token = tokenizer.eos_token")
        self.pad_token_id, self.pad_to_multiple_of = pad_token_id, pad_to_multiple_of

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        seqs = [(f["prompt_ids"], f[key]) for key in ("chosen_ids", "rejected_ids") for f in features]
        length = max(len(p) + len(r) for p, r in seqs)
        if self.pad_to_multiple_of:
            length = -(-length // self.pad_to_multiple_of) * self.pad_to_multiple_of
        input_ids = torch.full((len(seqs), length), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(seqs), length), dtype=torch.long)
        response_mask = torch.zeros((len(seqs), length), dtype=torch.long)
        for i, (prompt, response) in enumerate(seqs):
            n, m = len(prompt), len(response)
            input_ids[i, : n + m] = torch.tensor(list(prompt) + list(response), dtype=torch.long)
            attention_mask[i, : n + m] = 1
            response_mask[i, n: n + m] = 1
        return {"input_ids": input_ids, "attention_mask": attention_mask, "response_mask": response_mask}


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
