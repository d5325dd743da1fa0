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


DEFAULT_OUT = "adapters/quickstart"  # `qsimpo demo` with no --adapter serves what this holds
OWN = frozenset({"data", "base", "adapter", "quickstart.json", "command.json"})  # all a quickstart writes into its --out


def fingerprint(*files: Path, **settings) -> dict:
    """What a quickstart's result depends on: the shipped files it reads (by sha256), its settings, qsimpo's version."""
    from qsimpo import __version__

    return {"qsimpo": __version__, **settings,
            **{f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in files}}


def prepare_output(out: str | Path, overwrite: bool, inputs: dict) -> tuple[Path, dict | None]:
    """``(out, earlier result)``: the result of an earlier quickstart in ``out`` made from the same ``inputs``,
    to show again, or None when there is a run to make, ``out`` then cleared of a quickstart's own files.

    Running the quickstart twice shows its result twice: a finished run of the same inputs is
    reused; an unfinished one, or one made from other inputs (another qsimpo, --max-steps, --tiny),
    is rebuilt. The votes `qsimpo demo` appends beside the adapter are the user's and are kept. A
    folder holding anything else a quickstart does not write is not ours to touch, and is refused
    unless ``overwrite`` (which replaces the whole folder).
    """
    from qsimpo.demo.votes import VOTES_FILE

    out = Path(out)
    if not out.exists():
        return out, None
    if overwrite:
        shutil.rmtree(out)
        return out, None
    if not out.is_dir():
        raise OutputExists(f"{out} exists and is not a folder: choose another --out")
    foreign = sorted(p.name for p in out.iterdir() if p.name not in OWN and p.name != VOTES_FILE)
    if foreign:
        raise OutputExists(f"{out} exists and holds what a quickstart does not write ({', '.join(foreign)}): choose "
                           "another --out, or pass --overwrite to replace the folder")
    try:
        earlier = json.loads((out / "quickstart.json").read_text())
    except (OSError, ValueError):
        earlier = None
    if isinstance(earlier, dict) and earlier.get("inputs") == inputs and has_adapter(out / "adapter"):
        return out, earlier
    for name in OWN:
        path = out / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
    return out, None


def run_quickstart(out: str | Path = DEFAULT_OUT, overwrite: bool = False, tiny: bool = False,
                   max_steps: int | None = None) -> dict:
    """Run the quickstart into ``out``; the real model unless ``tiny``. Returns what quickstart.json holds."""
    if tiny:
        from qsimpo.quickstart.tiny import run_quickstart as run_tiny

        return run_tiny(out, overwrite=overwrite)
    from qsimpo.quickstart.real import run

    return run(out, overwrite=overwrite, max_steps=max_steps)
