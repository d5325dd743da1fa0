"""The embedded default, `qsimpo quickstart`: the whole path offline on a CPU.

    real.py     SmolLM2-135M-Instruct, a real pretrained chat model, with the preference pairs shipped
                in data/pairs.jsonl (smollm2.yaml): what `qsimpo quickstart` runs
    tiny.py     a tiny Llama-style model and tokenizer built on the spot with synthetic pairs (tiny.yaml):
                `qsimpo quickstart --tiny`, seconds, for tests and machines that reach no model source
    toy.py      the tiny model and tokenizer builders (test fixtures use them too)
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

from qsimpo.errors import OutputExists
from qsimpo.run_dir import has_adapter
from qsimpo.console import say


DEFAULT_OUT = "adapters/quickstart"  # `qsimpo demo` with no --adapter serves what this holds
OWN = frozenset({"data", "base", "adapter", "quickstart.json", "command.json"})  # all a quickstart writes into its --out


def fingerprint(*files: Path, **settings) -> dict:
    """What a quickstart's result depends on: the shipped files it reads (by sha256), its settings, qsimpo's version."""
    from qsimpo import __version__

    return {"qsimpo": __version__, **settings,
            **{f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in files}}


RECORD = "quickstart.json"  # written when a run starts (its inputs), rewritten with the result when it ends
NEW, SHOW, RESUME, REPORT = "new", "show", "resume", "report"


def prepare_output(out: str | Path, overwrite: bool, inputs: dict) -> tuple[Path, str, dict | None]:
    """``(out, what to do, the earlier record)`` for a quickstart of ``inputs`` into ``out``:

        new      nothing of an earlier run to keep (``out`` is then cleared of a quickstart's own files)
        show     a finished run of the same inputs: its result again, nothing retrained
        report   the same inputs, its training finished (resumed with `qsimpo train ... --train.resume_from
                 auto`, or stopped before the report): the held-out comparison, then the result
        resume   the same inputs, its training interrupted: training resumes from its last checkpoint

    Training is never removed without a word: a folder whose training came from other inputs (another
    qsimpo, --max-steps, --tiny) or says nothing of its inputs is refused, naming what would be removed,
    unless ``overwrite`` (which replaces the whole folder). The votes `qsimpo demo` appends beside the
    adapter are the user's and are kept; a folder holding anything else a quickstart does not write is
    not ours to touch, and is refused unless ``overwrite``.
    """
    from qsimpo.demo.votes import VOTES_FILE

    out = Path(out)
    if not out.exists():
        return out, NEW, None
    if overwrite:
        shutil.rmtree(out)
        return out, NEW, None
    if not out.is_dir():
        raise OutputExists(f"{out} exists and is not a folder: choose another --out")
    foreign = sorted(p.name for p in out.iterdir() if p.name not in OWN and p.name != VOTES_FILE)
    if foreign:
        raise OutputExists(f"{out} exists and holds what a quickstart does not write ({', '.join(foreign)}): choose "
                           "another --out, or pass --overwrite to replace the folder")
    try:
        record = json.loads((out / RECORD).read_text())
    except (OSError, ValueError):
        record = None
    record = record if isinstance(record, dict) else None
    adapter = out / "adapter"
    if record is not None and record.get("inputs") == inputs and adapter.is_dir():
        if has_adapter(adapter):
            return out, (SHOW if "after" in record else REPORT), record
        return out, RESUME, record
    work = training_in(adapter)
    if work:
        if record is None or not isinstance(record.get("inputs"), dict):
            why = f"has no {RECORD} saying what it was made from"
        else:
            old = record["inputs"]
            changed = [f"{k} {old.get(k)!r} -> {inputs.get(k)!r}" for k in sorted(set(old) | set(inputs))
                       if old.get(k) != inputs.get(k)]
            why = f"was made from other inputs ({'; '.join(changed)})"
        raise OutputExists(f"{out} holds an earlier quickstart's training ({', '.join(work)}), which {why}: a new run "
                           "would remove it. Keep it and choose another --out, or pass --overwrite to remove it and "
                           "train anew")
    for name in OWN:  # data, a base and a record, but no training: rebuilt exactly
        path = out / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
    return out, NEW, None


def training_in(adapter: Path) -> list[str]:
    """What training a quickstart's adapter folder holds: a finished adapter, checkpoints, a training log."""
    from qsimpo.run_dir import METRICS

    if not adapter.is_dir():
        return []
    found = [f"{adapter} (a finished adapter)"] if has_adapter(adapter) else []
    found += [str(p) for p in sorted(adapter.glob("checkpoint-*")) if p.is_dir()]
    if not found and (adapter / METRICS).is_file():
        found.append(str(adapter / METRICS))
    return found


def record_start(out: Path, inputs: dict) -> None:
    """Say what the run in ``out`` is made from before it trains: what a later quickstart resumes by."""
    out.mkdir(parents=True, exist_ok=True)
    (out / RECORD).write_text(json.dumps({"inputs": inputs}, indent=2) + "\n")


def say_earlier(out: Path, state: str) -> None:
    """One line saying what a quickstart does with the earlier run in ``out``."""
    say({SHOW: f"{out} holds this quickstart's finished run: its result again (--overwrite trains anew)",
           REPORT: f"{out / 'adapter'} holds this quickstart's finished training: comparing it on the held-out "
                   "questions (--overwrite trains anew)",
           RESUME: f"{out / 'adapter'} holds this quickstart's interrupted training: resuming it from its last "
                   "checkpoint (--overwrite trains anew)"}[state])


def show_footer(result: dict, out: Path, state: str) -> str:
    """The last line of a quickstart's summary: what was written (nothing, when a result is shown again)."""
    took = f"in {result['seconds']} s" if "seconds" in result else ""
    if state == SHOW:
        return f"{out / RECORD} (written earlier{', ' + took if took else ''}); nothing was run again"
    return f"wrote {out / RECORD} {took}".rstrip()


def train_resumably(cfg, again: str):
    """Run `qsimpo train` for a quickstart; interrupted, its message also names the rerun that resumes (``again``)."""
    from qsimpo.errors import Interrupted
    from qsimpo.train.recipe import train

    try:
        return train(cfg)
    except Interrupted as e:
        raise Interrupted(f"{e}\nor run the quickstart again, which resumes it:\n  {again}") from None


def indent(text: str, prefix: str) -> str:
    """``text`` with its later lines indented under its first (a multi-line answer keeps its column; blank lines stay
    blank)."""
    first, *rest = text.split("\n")
    return "\n".join([first] + [prefix + line if line.strip() else "" for line in rest])


def run_quickstart(out: str | Path = DEFAULT_OUT, overwrite: bool = False, tiny: bool = False,
                   max_steps: int | None = None) -> dict:
    """Run the quickstart into ``out``; the real model unless ``tiny``. Returns what quickstart.json holds."""
    if tiny:
        from qsimpo.quickstart.tiny import run_quickstart as run_tiny

        return run_tiny(out, overwrite=overwrite)
    from qsimpo.quickstart.real import run

    return run(out, overwrite=overwrite, max_steps=max_steps)
