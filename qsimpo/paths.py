"""What the arguments alone show about the paths a command is given, checked before anything heavy imports.

A name is a local path when it cannot be a Hub id: it ends in a file suffix qsimpo reads, starts
with ``/``, ``.`` or ``~``, has more than one ``/``, or its first part is a folder here
(``adapters/nope`` while ``adapters/`` exists: the user meant the folder, which is missing). Anything
else may be a Hub id and is left to the command, which reaches the Hub only for such names. A local
name that is missing, a file where a folder belongs or the reverse is one message, at once.

Outputs (``--out``) are folders a command writes its files into. A folder is refused when it holds
files the command does not write (``--overwrite`` lets it replace them); a file where the folder
belongs is refused always. `qsimpo pairs` is the one exception: its ``--out`` is the JSONL file it
appends to and resumes from.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from qsimpo.errors import InputNotFound, OutputExists, UsageError

LOCAL_SUFFIXES = (".jsonl", ".json", ".parquet", ".yaml", ".yml", ".gguf", ".py", ".safetensors", ".bin", ".csv", ".txt")
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")  # "name" (a canonical model) or "owner/name"
HUB_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")  # what an adapter pushed by someone is: "owner/name"


def names_local(name: str) -> bool:
    """Whether ``name`` can only be a local path (never a Hub id), so a missing one is reported without the Hub."""
    if (name.lower().endswith(LOCAL_SUFFIXES) or name.startswith(("/", ".", "~")) or name.count("/") > 1
            or "\\" in name or not HUB_ID.match(name)):
        return True
    head, slash, _ = name.partition("/")
    return bool(slash) and Path(head).is_dir()


def named(flag: str, value) -> str:
    """How a message names what was given: ``--adapter x``, ``data.path = 'x'`` (a config key), or ``x`` (no flag)."""
    return f"{flag} {value!r}" if flag.endswith("=") else f"{flag} {value}".strip()


def check_folder_arg(value: str, flag: str, fix: str, hub: re.Pattern | None = HUB_REPO_ID) -> None:
    """``value`` is an existing folder, or (``hub`` given) a name that may be a Hub id; else one message ending in ``fix``."""
    p = Path(value).expanduser()
    if p.is_dir():
        return
    if p.exists():
        raise UsageError(f"{named(flag, value)} is a file, not a folder; {fix}")
    if names_local(value) or hub is None or not hub.match(value):
        hub_note = "" if hub is None or names_local(value) else " (nor a Hub id, which reads OWNER/NAME)"
        raise InputNotFound(f"{named(flag, value)}: no such folder{hub_note}; {fix}")


def check_adapter_arg(value: str, flag: str) -> None:
    check_folder_arg(value, flag, "pass the train.output_dir of a `qsimpo train` run or a Hub adapter id")


def check_model_arg(value: str, flag: str) -> None:
    """A base model: a folder, a .gguf file, or a Hub id (a canonical one may have no owner)."""
    p = Path(value).expanduser()
    if p.is_dir() or (p.is_file() and p.suffix.lower() == ".gguf"):
        return
    if p.exists():
        raise UsageError(f"{named(flag, value)} is a file that is not .gguf; a model is a folder, a .gguf file or a Hub id")
    if names_local(value):
        raise InputNotFound(f"{named(flag, value)}: no such file or folder; pass a model folder, a .gguf file or a Hub id")


def check_source_arg(value: str, flag: str) -> None:
    """Data: a .jsonl/.json/.parquet file, a datasets folder, or a Hub dataset id."""
    p = Path(value).expanduser()
    if p.exists():
        return
    if names_local(value):  # the words of the data pipeline's own check (qsimpo.data.sources), said sooner
        raise InputNotFound(f"{value}: file not found (working directory {os.getcwd()}); check "
                            f"{flag.removesuffix('=').strip() or 'the path'} (a JSONL/JSON/parquet file, a datasets "
                            "folder or a Hub dataset id)")


def check_out_folder(out: str | Path, flag: str, own: frozenset[str] | set[str] | None, overwrite: bool,
                     what: str) -> None:
    """``out`` may be written: missing, empty, or holding only names in ``own`` (None: must not exist); see the module."""
    out = Path(out)
    if not out.exists():
        return
    if not out.is_dir():
        raise OutputExists(f"{flag} {out} is a file; {flag} names the folder {what} is written to: choose another {flag}")
    if overwrite:
        return
    if own is None:
        raise OutputExists(f"{out} already exists: choose another {flag}, or pass --overwrite to replace it")
    foreign = sorted(p.name for p in out.iterdir() if p.name not in own)
    if foreign:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise OutputExists(f"{flag} {out} holds files qsimpo does not write there ({shown}): choose another {flag}, or "
                           "pass --overwrite to write into it anyway")
