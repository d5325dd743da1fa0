"""The embedded default, `qsimpo quickstart`: the whole path offline on a CPU.

    real.py     SmolLM2-135M-Instruct, a real pretrained chat model, with the preference pairs shipped
                in data/pairs.jsonl (smollm2.yaml): what `qsimpo quickstart` runs
    tiny.py     a tiny Llama-style model and tokenizer built on the spot with synthetic pairs (tiny.yaml):
                `qsimpo quickstart --tiny`, seconds, for tests and machines that reach no model source
    toy.py      the tiny model and tokenizer builders (test fixtures use them too)
"""

from __future__ import annotations

import shutil
from pathlib import Path

from qsimpo.errors import OutputExists


def fresh_output(out: str | Path, overwrite: bool) -> Path:
    """``out`` as a Path, emptied for a new run when ``overwrite``; an existing one is refused otherwise."""
    out = Path(out)
    if out.exists():
        if not overwrite:
            raise OutputExists(f"{out} exists: pass --overwrite to rebuild it, or choose another --out")
        shutil.rmtree(out)
    return out


def run_quickstart(out: str | Path = "adapters/quickstart", overwrite: bool = False, tiny: bool = False,
                   max_steps: int | None = None) -> dict:
    """Run the quickstart into ``out``; the real model unless ``tiny``. Returns what quickstart.json holds."""
    if tiny:
        from qsimpo.quickstart.tiny import run_quickstart as run_tiny

        return run_tiny(out, overwrite=overwrite)
    from qsimpo.quickstart.real import run

    return run(out, overwrite=overwrite, max_steps=max_steps)
