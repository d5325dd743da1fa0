"""A whole source -> training pairs, through `datasets`: Arrow-backed, memory-mapped, parallel, cached.

    read_source      rows -> normalised texts (no tokenizer needed), every bad row recorded and judged at once
    tokenize_source  texts -> token ids (the chat template rendered), too_long counted
    build_dataset    both, for callers that have the tokenizer already
    Pairs            the kept pairs: a read-only sequence of dicts over the memory-mapped table
    split_eval       a seeded held-out fraction

Each step is a `datasets` map (parallel across cores on large sources) whose result is cached by a
fingerprint of everything that shapes it: the source (a file's size and modification time), the
settings, the tokenizer and its chat template, and this package's data code. A rerun on the same
data reads the cached table in seconds, and memory does not grow with the data set: rows are read
from the memory-mapped table when a batch needs them.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import sys
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from qsimpo.config import DataConfig
from qsimpo.data.diagnose import diagnose
from qsimpo.data.formats import (FORMATS, DataError, DataSummary, _Bad, check_columns, check_policy, detect_format,
                                 normalise_prompt, normalise_row)
from qsimpo.data.sources import source_table
from qsimpo.data.tokenize import tokenize_pair

PARALLEL_FROM = 4000  # rows; below this one process is faster than starting workers
_CODE = Path(__file__).parent


def _code_version() -> str:
    """A hash of the data code, so a change to rendering or tokenization never reads a stale cache."""
    h = hashlib.sha256()
    for f in sorted(_CODE.glob("*.py")):
        h.update(f.read_bytes())
    return h.hexdigest()[:16]


def _fingerprint(*parts) -> str:
    return hashlib.sha256("|".join(map(str, parts)).encode()).hexdigest()[:32]


def tokenizer_fingerprint(tokenizer) -> str:
    """What the token ids depend on: the vocabulary and merges, the special tokens and the chat template."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    body = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    return _fingerprint(type(tokenizer).__name__, hashlib.sha256(body.encode()).hexdigest(), tokenizer.chat_template,
                        sorted(tokenizer.special_tokens_map.items()), tokenizer.bos_token_id, tokenizer.eos_token_id)


@contextmanager
def _progress(n_rows: int):
    """datasets' progress bars (with throughput) only for sources big enough to wait for, on a terminal."""
    import datasets

    was_enabled = datasets.is_progress_bar_enabled()
    if n_rows < PARALLEL_FROM or not sys.stderr.isatty():
        datasets.disable_progress_bars()
    try:
        yield
    finally:
        if was_enabled:
            datasets.enable_progress_bars()


def _workers(n_rows: int) -> int | None:
    """Processes for a map over ``n_rows``: one per core, each with at least PARALLEL_FROM rows; None: no workers."""
    n = min(os.cpu_count() or 1, n_rows // PARALLEL_FROM)
    return n if n >= 2 else None


# ------------------------------------------------------------------------------------------ the steps
def _normalise_batch(batch: dict, fmt: str | None, columns: dict | None, prompts: bool = False,
                     conversations: bool = False) -> dict:
    out = {"reason": [], "detail": [], "text": []}
    for location, raw, reason, detail in zip(batch["location"], batch["raw"], batch["reason"], batch["detail"]):
        text = None
        if reason is None:
            try:
                row = json.loads(raw)
                if conversations:  # `qsimpo sft`: a conversation, not a pair
                    from qsimpo.data.conversations import normalise_conversation

                    triple = normalise_conversation(row, columns)
                else:
                    triple = normalise_prompt(row, fmt, columns) if prompts else normalise_row(row, fmt, columns)
            except _Bad as bad:
                reason, detail = bad.reason, DataError.bad_row(location, bad.reason, bad.detail).detail_line
            else:
                if triple is None:
                    reason, detail = "no_preference", ""
                else:
                    text = json.dumps(triple)
        out["reason"].append(reason or "")
        out["detail"].append(detail or "")
        out["text"].append(text)
    return out


def encode_row(encode, location: str, text: str, reason: str, detail: str) -> tuple[dict | None, str, str]:
    """(encoding or None, reason, detail) of one row: a row judged bad stays bad; ``encode`` (the row's dict ->
    its token ids, or None when it cannot fit) raising a DataError with a reason makes it bad; None is too_long."""
    if reason:
        return None, reason, detail
    try:
        enc = encode({**json.loads(text), "location": location})
    except DataError as e:
        if e.reason is None:
            raise
        return None, e.reason, e.detail_line
    return (enc, reason, detail) if enc is not None else (None, "too_long", "")


def _tokenize_batch(batch: dict, tokenizer, max_length: int, max_prompt_length: int, system_prompt: str | None) -> dict:
    keys = ("prompt_ids", "chosen_ids", "rejected_ids", "prompt_truncated", "response_truncated", "length")
    out = {k: [] for k in (*keys, "reason", "detail")}
    for location, text, reason, detail in zip(batch["location"], batch["text"], batch["reason"], batch["detail"]):
        enc, reason, detail = encode_row(lambda row: tokenize_pair(tokenizer, row, max_length, max_prompt_length,
                                                                   system_prompt), location, text, reason, detail)
        enc = enc or {"prompt_ids": [], "chosen_ids": [], "rejected_ids": [], "prompt_truncated": False,
                      "response_truncated": False}
        enc["length"] = len(enc["prompt_ids"]) + len(enc["chosen_ids"]) + len(enc["rejected_ids"])
        for k in keys:
            out[k].append(enc[k])
        out["reason"].append(reason)
        out["detail"].append(detail)
    return out


def _record_reasons(table, summary: DataSummary) -> list[int]:
    """Count every dropped row of ``table`` in ``summary`` (DataSummary.record); return the indices of the kept rows."""
    kept = []
    for i, (reason, detail) in enumerate(zip(table["reason"], table["detail"])):
        if reason:
            summary.record(reason, detail)
        else:
            kept.append(i)
    return kept


@dataclass
class Source:
    """One source's normalised rows (an Arrow table, not yet tokenized) and what happened to every row read."""

    table: object  # datasets.Dataset: location, raw, reason, detail, text
    summary: DataSummary

    def texts(self) -> list[dict]:
        """The normalised prompt/chosen/rejected/format of every kept row, with its "location" (no tokenizer needed)."""
        rows = self.table.select_columns(["location", "reason", "text"])
        return [{**json.loads(text), "location": location}
                for location, reason, text in zip(rows["location"], rows["reason"], rows["text"]) if not reason]


def read_source(cfg: DataConfig, path: str | None = None, prompts: bool = False, conversations: bool = False) -> Source:
    """Read and normalise ``path`` (default cfg.path), judging every row; no tokenizer needed.

    ``prompts=True`` reads prompts to answer (`qsimpo pairs`), not pairs: each kept text is
    {"prompt", "format"}, from a prompt column or a preference row's conversation (formats.normalise_prompt).

    Bad rows are recorded at every stage; under ``on_bad_row: error`` one DataError lists them all,
    so a run stops on bad data before any model or tokenizer loads.
    """
    check_policy(cfg.on_bad_row)
    if conversations:  # `qsimpo sft` (qsimpo.data.conversations): rows are conversations, with roles of their own
        from qsimpo.data.conversations import check_sft_columns

        check_sft_columns(cfg.columns)
    else:
        check_columns(cfg.columns)
    if cfg.format not in FORMATS:
        raise ValueError(f"data.format = {cfg.format!r} is not one of {', '.join(FORMATS)}")
    source = str(path or cfg.path)
    summary = DataSummary(source)
    local = Path(source).expanduser()
    guess = local.stat().st_size // 500 if local.is_file() else PARALLEL_FROM  # rows, roughly: bars only for big sources
    with _progress(guess):
        table = source_table(source, cfg.split, cfg.max_rows, cfg.subset, cfg.data_dir, fingerprint_salt=_code_version())
    summary.rows_read = len(table)
    if not summary.rows_read:
        raise DataError(f"{source}: no rows: the source is empty; point data.path at a file with one preference pair "
                        "per row (the formats are in docs/data.md)")
    fmt, columns = cfg.format, cfg.columns or None
    if fmt == "auto" and not conversations:
        fmt = detect_format(_raw_rows(table), columns)
    with _progress(len(table)):
        table = table.map(_normalise_batch, batched=True, fn_kwargs={"fmt": fmt, "columns": columns, "prompts": prompts,
                                                                      "conversations": conversations},
                          num_proc=_workers(len(table)), desc=f"checking {source}",
                          new_fingerprint=_fingerprint(table._fingerprint, "sft" if conversations else "prompts" if prompts else
                                                       "normalise", fmt,
                                                       json.dumps(columns, sort_keys=True), _code_version()))
    summary.format = "conversation" if conversations else fmt or ""
    if not _record_reasons(table, summary):  # no row survived: say what the rows look like and what to set
        if summary.bad_rows and not prompts and not conversations:  # (the rows' own lines say what a prompt row lacks)
            summary.diagnosis = diagnose(_raw_rows(table), cfg.format, fmt, columns)
        summary.check(cfg.on_bad_row)
        raise summary.no_pairs()
    summary.check(cfg.on_bad_row)
    return Source(table, summary)


def _raw_rows(table):
    """The rows of a source table that parsed, as Python objects, in order."""
    return (json.loads(row["raw"]) for row in table.select_columns(["raw"]) if row["raw"] is not None)


def tokenize_source(cfg: DataConfig, source: Source, tokenizer) -> tuple["Pairs", DataSummary]:
    """Tokenize a read source; return its kept pairs and its summary (now with kept, truncation and too_long counts)."""
    table, summary = source.table, source.summary
    fingerprint = _fingerprint(table._fingerprint, "tokenize", tokenizer_fingerprint(tokenizer), cfg.max_length,
                               cfg.prompt_limit, cfg.system_prompt, _code_version())
    with _progress(len(table)):
        table = table.map(_tokenize_batch, batched=True, num_proc=_workers(len(table)), new_fingerprint=fingerprint,
                          fn_kwargs={"tokenizer": tokenizer, "max_length": cfg.max_length,
                                     "max_prompt_length": cfg.prompt_limit, "system_prompt": cfg.system_prompt},
                          remove_columns=["raw", "reason", "detail"], desc=f"tokenizing {summary.source}")
    counted = DataSummary(summary.source)  # the reasons of both steps, counted once from the final table
    kept = _record_reasons(table, counted)
    summary.dropped, summary.examples = counted.dropped, counted.examples
    pairs = Pairs(table.select(kept))
    summary.kept = len(pairs)
    flags = pairs.table.select_columns(["prompt_truncated", "response_truncated"])
    summary.truncated_prompt = sum(flags["prompt_truncated"])
    summary.truncated_response = sum(flags["response_truncated"])
    summary.check(cfg.on_bad_row)
    if not pairs:
        raise summary.no_pairs()
    return pairs, summary


def build_dataset(cfg: DataConfig, tokenizer, path: str | None = None) -> tuple["Pairs", DataSummary]:
    """Read, normalise and tokenize ``path`` (default cfg.path): ``tokenize_source(read_source(...))``."""
    return tokenize_source(cfg, read_source(cfg, path), tokenizer)


# ------------------------------------------------------------------------------------------- the pairs
class TableRows(Sequence):
    """The kept rows of a source as a read-only sequence of dicts of ``COLUMNS``, read from the memory-mapped
    table on access; ``select`` keeps them on disk (pairs for `qsimpo train`, conversations for `qsimpo sft`)."""

    COLUMNS: list[str] = []

    def __init__(self, table):
        self.table = table

    def __len__(self) -> int:
        return len(self.table)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        row = self.table[i]
        return self._row({k: row[k] for k in self.COLUMNS})

    def _row(self, row: dict) -> dict:
        return row

    @property
    def lengths(self) -> list[int]:
        """Tokens of each row (for batching rows of similar length)."""
        return list(self.table["length"])

    def select(self, indices):
        return type(self)(self.table.select(list(indices)))


class Pairs(TableRows):
    """The kept pairs: ``pairs[i]`` holds prompt_ids, chosen_ids, rejected_ids, the truncation flags, "location",
    and under "text" the normalised prompt/chosen/rejected/format (for inspect-data and eval); ``lengths`` counts
    prompt + chosen + rejected."""

    COLUMNS = ["location", "text", "prompt_ids", "chosen_ids", "rejected_ids", "prompt_truncated", "response_truncated"]

    def _row(self, pair: dict) -> dict:
        pair["text"] = json.loads(pair["text"])
        return pair


def split_eval(pairs: Sequence, fraction: float, seed: int) -> tuple[Sequence, Sequence]:
    """(train, eval): a seeded random ``fraction`` of the pairs held out (at least 1), both kept in file order."""
    if len(pairs) < 2:
        raise DataError(f"cannot hold out an eval fraction from {len(pairs)} pair(s): need at least 2; give data.eval a file instead")
    n_eval = min(len(pairs) - 1, max(1, round(fraction * len(pairs))))
    held = set(random.Random(seed).sample(range(len(pairs)), n_eval))
    train, held_out = [i for i in range(len(pairs)) if i not in held], sorted(held)
    if isinstance(pairs, TableRows):
        return pairs.select(train), pairs.select(held_out)
    return [pairs[i] for i in train], [pairs[i] for i in held_out]
