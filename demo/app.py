"""qsimpo's side-by-side demo as a Hugging Face Space: the SFT model and the aligned model(s), one base in memory.

    qsimpo push ADAPTER --space OWNER/NAME [--adapter OTHER ...] [--votes-repo OWNER/VOTES] [--dry-run]
    python app.py                                         # the same app on this machine

space.json (written by push) names the adapter(s) to serve, the base and the dataset repo votes are
committed to; the Space variables QSIMPO_ADAPTER (several: separated by commas), QSIMPO_BASE and
QSIMPO_VOTES_REPO override them. With a votes repo (and a write token in the Space secret HF_TOKEN)
the votes outlive a restart: huggingface_hub's CommitScheduler commits them every few minutes. The Space carries qsimpo as a wheel beside this file and installs it on
start, so no package index needs to know qsimpo; requirements.txt holds qsimpo's dependencies. On
ZeroGPU hardware the generation runs under @spaces.GPU; elsewhere on the CPU.
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")


def ensure_qsimpo() -> None:
    """Install the wheel this folder carries, unless qsimpo is importable already."""
    try:
        import qsimpo  # noqa: F401
        return
    except ImportError:
        pass
    wheels = sorted(HERE.glob("qsimpo-*.whl"))
    if not wheels:
        raise SystemExit("qsimpo is not installed and no qsimpo-*.whl is beside app.py: publish the Space with "
                         "`qsimpo push ADAPTER --space OWNER/NAME`, which puts one here")
    subprocess.check_call([sys.executable, "-m", "pip", "install", "--no-deps", "--quiet", str(wheels[-1])])
    importlib.invalidate_caches()  # the import system listed site-packages before the install


def settings() -> dict:
    path = HERE / "space.json"
    found = json.loads(path.read_text()) if path.is_file() else {}
    given = [a.strip() for a in os.environ.get("QSIMPO_ADAPTER", "").split(",") if a.strip()]
    found["adapters"] = given or found.get("adapters") or ([found["adapter"]] if found.get("adapter") else [])
    found["base"] = os.environ.get("QSIMPO_BASE") or found.get("base")
    found["votes_repo"] = os.environ.get("QSIMPO_VOTES_REPO") or found.get("votes_repo")
    if not found["adapters"]:
        raise SystemExit("no adapter to serve: set QSIMPO_ADAPTER, or publish with `qsimpo push ADAPTER --space OWNER/NAME`")
    return found


def main() -> None:
    ensure_qsimpo()
    from qsimpo.demo.app import CSS, THEME, build_app
    from qsimpo.demo.sides import SideBySide
    from qsimpo.demo.votes import hub_votes

    try:
        import spaces  # on Hugging Face Spaces; present on ZeroGPU hardware
    except ImportError:
        spaces = None
    zero_gpu = spaces is not None and os.environ.get("SPACES_ZERO_GPU", "") not in ("", "0", "false")
    found = settings()
    chat = SideBySide.load(found["adapters"], found.get("base"), device="cuda" if zero_gpu else None)
    if zero_gpu:  # ZeroGPU attaches a GPU only inside @spaces.GPU calls: generation, and scoring for the stats
        chat.stream = spaces.GPU(duration=120)(chat.stream)
        chat.score = spaces.GPU(duration=60)(chat.score)
    votes = Path(os.environ.get("QSIMPO_VOTES", "votes.jsonl"))
    demo = build_app(chat, hub_votes(found["votes_repo"], votes.parent) if found["votes_repo"] else votes)
    demo.queue().launch(theme=THEME, css=CSS, ssr_mode=False, show_error=True)  # host/port: GRADIO_SERVER_NAME/PORT


if __name__ == "__main__":
    main()
