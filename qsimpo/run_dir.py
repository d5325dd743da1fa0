"""What a run folder holds, and how every command reads it back, from disk or from the Hub.

    train.output_dir/
        adapter_config.json, adapter_model.safetensors   the adapter (ADAPTER_FILES)
        config.yaml          the resolved config (CONFIG), written when the run starts
        qsimpo.json          provenance (META): base model, quantization, SimPO settings, data summary, versions
        metrics.jsonl        one row per logged step (METRICS)
        checkpoint-N/        resumable checkpoints; complete ones hold CHECKPOINT_MARKER, written last
        eval/                `qsimpo eval`'s eval.json and report.html

`qsimpo merge` writes a model folder with its own qsimpo.json (``merged_from``); `qsimpo push`
uploads either kind with these files. Readers take a local folder or a Hub repo id alike.
"""

from __future__ import annotations

import json
from pathlib import Path


ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin")
CONFIG = "config.yaml"
META = "qsimpo.json"
METRICS = "metrics.jsonl"
CHECKPOINT_MARKER = "qsimpo_complete.json"


def fetch(run: str | Path, name: str) -> Path | None:
    """The file ``name`` of a run: from the folder, or from the Hub repo ``run``; None when it has none."""
    from qsimpo.load import hub_file, is_local  # the one rule for "a path, not a Hub id", and the Hub's errors

    if is_local(run):
        local = Path(run).expanduser()
        return local / name if (local / name).is_file() else None
    return hub_file(str(run), name)  # None when the repo lacks it; a missing repo or an unreachable Hub: a message


def read_meta(run: str | Path) -> dict:
    """The run's qsimpo.json; {} when it has none."""
    path = fetch(run, META)
    return json.loads(path.read_text()) if path else {}


def write_meta(folder: str | Path, meta: dict) -> None:
    """Write ``folder``'s qsimpo.json."""
    write_json(folder, META, meta)


def update_meta(folder: str | Path, **fields) -> None:
    """Add ``fields`` to the qsimpo.json ``folder`` already holds."""
    write_meta(folder, {**read_meta(folder), **fields})


def read_config(run: str | Path):
    """The run's resolved Config from its config.yaml; None without one. A config.yaml that no longer loads
    is a ConfigError naming the file."""
    from .config import ConfigError, load_config

    path = fetch(run, CONFIG)
    if path is None:
        return None
    try:
        return load_config(path)
    except ConfigError as e:
        raise ConfigError([f"{path} (the run's resolved config) does not load: {e}"]) from None


def read_config_yaml(run: str | Path) -> dict:
    """The run's config.yaml as written, not validated; {} without one. For what only describes a run (the model
    card), which a config an older qsimpo wrote must not stop."""
    import yaml

    path = fetch(run, CONFIG)
    return (yaml.safe_load(path.read_text()) or {}) if path else {}


def recorded_loss(run: str | Path, meta: dict | None = None) -> dict | None:
    """The loss a run trained with and its parameters, {"type": ..., parameter: value}: qsimpo.json's "loss", else
    its config.yaml's loss section (a config from before the losses: SimPO, under "simpo"); None when neither says."""
    meta = read_meta(run) if meta is None else meta
    if meta.get("loss"):
        return dict(meta["loss"])
    if meta.get("simpo"):  # a run from before qsimpo recorded "loss": SimPO was the only loss
        return {"type": "simpo", **meta["simpo"]}
    config = read_config_yaml(run)
    if not config:
        return None
    kind = (config.get("loss") or {}).get("type", "simpo")
    return {"type": kind, **(config.get(kind) or {})}


def write_config(folder: str | Path, cfg) -> None:
    """Write the resolved Config ``cfg`` as ``folder``'s config.yaml."""
    from .config import dump_yaml

    (Path(folder) / CONFIG).write_text(dump_yaml(cfg))


def copy_config(run: str | Path, folder: str | Path) -> None:
    """Copy the run's config.yaml, as written, into ``folder`` (nothing when the run has none)."""
    import shutil

    path = fetch(run, CONFIG)
    if path is not None:
        shutil.copy2(path, Path(folder) / CONFIG)


def read_metrics(run: str | Path) -> list[dict]:
    """The rows of the run's metrics.jsonl; [] without one."""
    path = fetch(run, METRICS)
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path else []


def record_dir(adapter: str) -> str:
    """Where a run's qsimpo.json, config.yaml and metrics.jsonl are: the adapter, or for checkpoint-N its run folder."""
    p = Path(adapter)
    if p.is_dir() and p.name.startswith("checkpoint-") and not (p / META).exists() and (p.parent / META).exists():
        return str(p.parent)
    return adapter


def has_adapter(folder: str | Path) -> bool:
    """Whether a local folder holds a finished adapter: its weights are written last, by the final save."""
    return any((Path(folder) / f).is_file() for f in ADAPTER_FILES[1:])


def is_complete(checkpoint: str | Path) -> bool:
    """Whether a checkpoint-N folder was saved whole (its marker is written last)."""
    return (Path(checkpoint) / CHECKPOINT_MARKER).is_file()


def json_text(data: dict) -> str:
    """How a run's JSON files are written (qsimpo.json, checkpoint markers): indented, anything else as str."""
    return json.dumps(data, indent=2, default=str) + "\n"


def write_json(folder: str | Path, name: str, data: dict) -> None:
    (Path(folder) / name).write_text(json_text(data))
