"""The one record of how an output was made: the command, its resolved settings and the versions.

Every command that writes an output leaves ``command.json`` in it (pairs: ``FILE.jsonl.settings.json``
beside its file), so the run can be read back and replayed (litgpt's ``save_hyperparameters``):

    {"command": ["qsimpo", "eval", "adapters/run", "--scorer", "..."],   # as typed
     "settings": {"adapter": "adapters/run", "batch_size": 8, ...},      # every setting, defaults included
     "versions": {"qsimpo": "0.1.0", "python": ..., "torch": ..., ...}}

``versions()`` is the one versions dict every record holds (qsimpo.json, eval.json, GGUF records);
qsimpo's own version is ``versions["qsimpo"]``. Files written by older versions named it
``qsimpo_version`` or wrote ``"merged_by"/"written_by"/"converted_by": "qsimpo X"``: ``qsimpo_version``
reads all of them.
"""

from __future__ import annotations

import json
import platform
from pathlib import Path

COMMAND_RECORD = "command.json"
# What an answer, a trained adapter or a merged model depends on, besides qsimpo itself.
PACKAGES = ("torch", "transformers", "peft", "bitsandbytes", "datasets")


def versions(*extra: str) -> dict:
    """qsimpo's version, python's and those of PACKAGES (+ ``extra``), read without importing them (None: not installed)."""
    from importlib.metadata import PackageNotFoundError, version

    from qsimpo import __version__

    found = {"qsimpo": __version__, "python": platform.python_version()}
    for name in (*PACKAGES, *extra):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = None
    return found


def write_settings(path: str | Path, settings: dict, command: list[str] | None = None) -> Path:
    """Write ``{"command", "settings", "versions"}`` to ``path`` (a folder: its command.json); returns the file."""
    path = Path(path)
    if path.is_dir():
        path = path / COMMAND_RECORD
    record = {"command": command, "settings": settings, "versions": versions()}
    path.write_text(json.dumps(record, indent=2, default=str) + "\n")
    return path


def read_settings(path: str | Path) -> dict:
    """The settings a record holds; a flat dict of settings (pairs before the record had a shape) as it is."""
    record = json.loads(Path(path).read_text())
    return record["settings"] if isinstance(record, dict) and "settings" in record and "versions" in record else record


def qsimpo_version(record: dict) -> str:
    """The qsimpo version a record was written by: ``versions.qsimpo``, or an older file's key for it ('' if none)."""
    found = (record.get("versions") or {}).get("qsimpo") or record.get("qsimpo_version")
    if found:
        return str(found)
    for key in ("merged_by", "written_by", "converted_by"):  # "qsimpo 0.1.0"
        if str(record.get(key, "")).startswith("qsimpo "):
            return str(record[key]).removeprefix("qsimpo ")
    return ""
