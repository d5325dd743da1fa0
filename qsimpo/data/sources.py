"""Where preference rows come from: a .jsonl/.json/.parquet file, a datasets folder or a Hub dataset id.

``source_table`` turns any of them into one Arrow table with every row's location
("file.jsonl:line 12", "file.parquet row 5", "Anthropic/hh-rlhf/harmless-base[test] row 0"), so every
later message can name the row. Lines that are not JSON or not UTF-8 are bad rows (their reason is
in the table), counted by qsimpo.data.dataset with every other bad row of the source.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterator

from qsimpo.data.formats import DataError
from qsimpo.paths import names_local as looks_local  # the one rule for "a path, never a Hub id"

FILE_SUFFIXES = (".jsonl", ".json", ".parquet")


def _iter_file(path: str) -> Iterator[tuple[str, Any]]:
    """(location, row or DataError) of every row of a .jsonl or .json file."""
    p = Path(path).expanduser()
    return _iter_jsonl(p, path) if p.suffix.lower() == ".jsonl" else _iter_json(p, path)


def _iter_jsonl(p: Path, name: str) -> Iterator[tuple[str, Any]]:
    with p.open("rb") as f:  # bytes: a line that is not UTF-8 is one bad row, not the end of the file
        yield from _iter_lines(f, name)


def _iter_lines(lines, name: str) -> Iterator[tuple[str, Any]]:
    for n, line in enumerate(lines, 1):
        location = f"{name}:line {n}"
        if isinstance(line, bytes):
            try:
                line = line.decode("utf-8")
            except UnicodeDecodeError as e:
                yield location, DataError.bad_row(location, "not_utf8", f"byte 0x{line[e.start]:02x} at column {e.start + 1} "
                                                  "is not UTF-8")
                continue
        if not line.strip():
            continue  # blank lines (often a trailing newline) are not rows
        try:
            yield location, json.loads(line)
        except json.JSONDecodeError as e:
            yield location, DataError.bad_row(location, "malformed_json", f"invalid JSON ({e.msg} at column {e.colno})")


def _iter_json(p: Path, name: str) -> Iterator[tuple[str, Any]]:
    raw = p.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:  # one JSON document: no row can be read around the bad byte
        line = raw.count(b"\n", 0, e.start) + 1
        column = e.start - (raw.rfind(b"\n", 0, e.start) + 1) + 1
        raise DataError(f"{name}:line {line}: byte 0x{raw[e.start]:02x} at column {column} is not UTF-8; re-save the file "
                        "as UTF-8 (e.g. iconv -f latin1 -t utf-8 IN > OUT)") from None
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


def _where(name: str, subset: str | None, data_dir: str | None, split: str) -> str:
    """How rows of a datasets source are named: "Anthropic/hh-rlhf/harmless-base[test]"."""
    return f"{name}{f':{subset}' if subset else ''}{f'/{data_dir}' if data_dir else ''}[{split}]"


def _open_folder(p: Path, name: str, split: str, subset: str | None, data_dir: str | None):
    """(datasets.Dataset, name its rows are called by) for a folder saved by datasets or a folder of data files."""
    import datasets

    try:
        if subset or data_dir:  # a subset of a repo of data files: load_dataset, never save_to_disk output
            raise FileNotFoundError
        ds = datasets.load_from_disk(str(p))
    except FileNotFoundError:  # not save_to_disk output; maybe a folder of data files (a cloned Hub repo)
        try:
            return datasets.load_dataset(str(p), subset, data_dir=data_dir, split=split), _where(name, subset, data_dir, split)
        except Exception as e:
            raise DataError(f"{name}: a folder that is neither saved by datasets.save_to_disk nor readable by "
                            f"datasets.load_dataset ({type(e).__name__}: {e}); point data.path at such a folder or at "
                            "a .jsonl/.json/.parquet file") from e
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise DataError(f"{name}: no split {split!r}; available splits: {', '.join(ds)}; set data.split to one of them")
        return ds[split], f"{name}[{split}]"
    return ds, name


def _open_hub(path: str, split: str, subset: str | None, data_dir: str | None):
    import datasets

    try:
        ds = datasets.load_dataset(path, subset, data_dir=data_dir, split=split)
    except Exception as e:
        raise DataError(f"could not load {path!r} as a local file or a Hub dataset: {type(e).__name__}: {e}. "
                        f"If it is a local file, check the path (working directory {os.getcwd()}); if it is a Hub id, "
                        f"check the name, data.split ({split!r}), data.subset ({subset!r}), data.data_dir ({data_dir!r}), "
                        "the network and HF_TOKEN") from e
    return ds, _where(path, subset, data_dir, split)


# ------------------------------------------------------------------------------------ as an Arrow table
# Every row of a source, whatever its shape, as one string column: Arrow needs one schema, and rows
# of the wrong shape are exactly the bad rows a user must hear about.
RAW_COLUMNS = ("location", "raw", "reason", "detail")


def _raw_features():
    import datasets

    return datasets.Features({k: datasets.Value("string") for k in RAW_COLUMNS})


def _file_rows(path: str, max_rows: int | None, stamp: str):
    """Generator behind source_table for .jsonl/.json files (``stamp`` only keys the cache)."""
    for n, (location, row) in enumerate(_iter_file(path)):
        if max_rows is not None and n >= max_rows:
            return
        if isinstance(row, DataError):
            yield {"location": location, "raw": None, "reason": row.reason, "detail": row.detail_line}
        else:
            yield {"location": location, "raw": json.dumps(row), "reason": None, "detail": None}


def _dataset_rows(batch: dict, indices: list[int], name: str) -> dict:
    rows = [dict(zip(batch, values)) for values in zip(*batch.values())]
    return {"location": [f"{name} row {i}" for i in indices], "raw": [json.dumps(r, default=str) for r in rows],
            "reason": [None] * len(rows), "detail": [None] * len(rows)}


def source_table(path: str, split: str = "train", max_rows: int | None = None, subset: str | None = None,
                 data_dir: str | None = None, fingerprint_salt: str = ""):
    """The source as a memory-mapped ``datasets.Dataset`` with columns location, raw (the row as JSON text)
    and, for lines that are not rows (malformed JSON, not UTF-8), reason and detail.

    Cached: a local file by its path, size and modification time; a datasets source by datasets'
    own fingerprint. ``fingerprint_salt`` is mixed into the file's cache key (the code version).
    Problems with the whole source (not found, unsupported type, not one JSON list) raise DataError.
    """
    import hashlib

    import datasets

    p = Path(path).expanduser()
    if p.is_file() and p.suffix.lower() in (".jsonl", ".json"):
        empty = datasets.Dataset.from_dict({k: [] for k in RAW_COLUMNS}, features=_raw_features())
        if max_rows == 0:
            return empty
        st = p.stat()
        stamp = f"{p.resolve()}|{st.st_size}|{st.st_mtime_ns}|{max_rows}|{fingerprint_salt}"
        try:  # the file is parsed once, by the generator, and not at all on a cached rerun
            return datasets.Dataset.from_generator(
                _file_rows, features=_raw_features(), fingerprint=hashlib.sha256(stamp.encode()).hexdigest()[:32],
                gen_kwargs={"path": str(path), "max_rows": max_rows, "stamp": stamp})
        except Exception as e:  # datasets wraps what the generator raised
            cause = e
            while cause is not None and not isinstance(cause, DataError):
                cause = cause.__cause__ or cause.__context__
            if cause is None and next(iter(_iter_file(str(path))), None) is None:
                return empty  # datasets builds no table from a generator of no rows
            raise (cause or e) from None
    if p.is_file() and p.suffix.lower() == ".parquet":
        ds, name = datasets.Dataset.from_parquet(str(p)), str(path)
    elif p.is_file():
        raise DataError(f"{path}: unsupported file type {p.suffix.lower() or '(no suffix)'!r}: use .jsonl, .json or .parquet, "
                        "a folder saved by datasets, or a Hub dataset id")
    elif p.is_dir():
        ds, name = _open_folder(p, str(path), split, subset, data_dir)
    elif looks_local(str(path)):
        raise DataError(f"{path}: file not found (working directory {os.getcwd()}); check data.path")
    else:
        ds, name = _open_hub(str(path), split, subset, data_dir)
    if max_rows is not None and max_rows < len(ds):
        ds = ds.select(range(max_rows))
    return ds.map(_dataset_rows, with_indices=True, batched=True, fn_kwargs={"name": name}, remove_columns=ds.column_names,
                  features=_raw_features(), desc=f"reading {name}")
