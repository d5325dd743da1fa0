"""`qsimpo push ADAPTER --space OWNER/NAME`: the side-by-side demo as a Hugging Face Space, serving ADAPTER.

    qsimpo push you/llama3-8b-simpo --space you/llama3-8b-simpo-demo --dry-run   # every file and the header
    qsimpo push you/llama3-8b-simpo --space you/llama3-8b-simpo-demo --hardware zero-a10g
    qsimpo push you/l3-simpo --space you/l3-demo --adapter you/l3-dpo --votes-repo you/l3-votes  # two columns + SFT

The Space is the repository's top-level ``demo/`` folder (app.py, requirements.txt, README.md whose
YAML header configures it), plus what push adds: ``space.json`` naming the adapter(s), the base and the
dataset repo votes are committed to (``--votes-repo``), the
header's ``sdk_version`` set to the installed Gradio and ``suggested_hardware`` to ``--hardware``,
and a qsimpo wheel built from this source tree, which app.py installs on start, so the Space needs
no package index entry for qsimpo. The adapter must be one the Space can download: a Hub id (push
the adapter first with ``qsimpo push ADAPTER --repo``).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from qsimpo.console import say
from qsimpo.errors import QsimpoError

SOURCE = Path(__file__).resolve().parents[2]  # the source tree qsimpo runs from (an editable install)
SPACE_FILES = ("app.py", "requirements.txt", "README.md")
HARDWARE = ("cpu-basic", "cpu-upgrade", "zero-a10g", "t4-small", "t4-medium", "l4x1", "a10g-small", "a10g-large")
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class SpaceError(QsimpoError, RuntimeError):
    """A Space push that cannot go ahead; the message says what to do."""


@dataclass
class SpacePlan:
    space_id: str
    adapter: str  # the adapters served, joined by ", "
    files: dict[str, bytes] = field(default_factory=dict)  # path in the Space -> content

    def header(self) -> str:
        return self.files["README.md"].decode().split("---\n")[1]

    def describe(self) -> str:
        lines = [f"Space https://huggingface.co/spaces/{self.space_id} serving {self.adapter}: {len(self.files)} files, "
                 f"{sum(map(len, self.files.values())) / 1e6:.2f} MB"]
        lines += [f"  {name:<40} {len(data):>12,d} bytes" for name, data in sorted(self.files.items())]
        return "\n".join(lines + ["README.md header:", "---", self.header().rstrip(), "---"])


def demo_folder() -> Path:
    folder = SOURCE / "demo"
    if not all((folder / name).is_file() for name in SPACE_FILES):
        raise SpaceError(f"the Space's files (demo/{', demo/'.join(SPACE_FILES)}) are not beside this qsimpo "
                         f"({SOURCE}): --space publishes from a source checkout (git clone, then pip install -e .)")
    return folder


def build_wheel(dest: Path) -> Path:
    """qsimpo as a wheel, built from the source tree without touching it (no build isolation: offline too)."""
    with tempfile.TemporaryDirectory(prefix="qsimpo-wheel-") as tmp:
        import shutil

        source = Path(tmp) / "src"
        top_level = {".git", "build", "dist", "adapters", "tests", "demo", "benchmarks", ".pytest_cache"}
        anywhere = shutil.ignore_patterns("__pycache__", "*.egg-info")

        def ignore(folder, names):  # qsimpo/demo is the package's; only the top-level demo/ stays out
            return set(anywhere(folder, names)) | (top_level & set(names) if Path(folder) == SOURCE else set())

        shutil.copytree(SOURCE, source, ignore=ignore)
        done = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                               str(dest), str(source)], capture_output=True, text=True)
    if done.returncode != 0:
        raise SpaceError(f"building the qsimpo wheel failed: {done.stderr.strip()[-500:]}")
    return next(dest.glob("qsimpo-*.whl"))


def _header(readme: str, title: str, hardware: str) -> str:
    import gradio

    head, body = readme.split("---\n")[1], "---\n".join(readme.split("---\n")[2:])
    values = {"title": title, "sdk_version": gradio.__version__, "suggested_hardware": hardware}
    for key, value in values.items():
        head = re.sub(rf"^{key}:.*$", f"{key}: {value}", head, flags=re.M)
    return f"---\n{head}---\n{body}"


def plan_space(adapter: str, space_id: str, base: str | None = None, hardware: str = "cpu-basic",
               wheel_dir: Path | None = None, more_adapters: list[str] = (), votes_repo: str | None = None) -> SpacePlan:
    """Every file the Space gets, decided locally; ``wheel_dir``: where to build the wheel (a temporary folder if None).
    ``more_adapters``: served beside ``adapter``, a column each; ``votes_repo``: the dataset repo votes go to."""
    from qsimpo.data import looks_local

    if not _REPO_ID.match(space_id):
        raise SpaceError(f"--space {space_id!r} must be OWNER/NAME, e.g. your-name/my-model-demo")
    if hardware not in HARDWARE:
        raise SpaceError(f"--hardware {hardware!r} must be one of {', '.join(HARDWARE)}")
    adapters = list(dict.fromkeys([adapter, *more_adapters]))
    for a in adapters:
        if looks_local(a) or Path(a).exists():
            raise SpaceError(f"{a} is a local folder, which the Space cannot read: push it first with "
                             f"`qsimpo push {a} --repo OWNER/NAME`, then pass that Hub id to --space")
    if votes_repo is not None and not _REPO_ID.match(votes_repo):
        raise SpaceError(f"--votes-repo {votes_repo!r} must be a Hub dataset id, OWNER/NAME, e.g. your-name/demo-votes")
    folder = demo_folder()
    files = {name: (folder / name).read_bytes() for name in ("app.py", "requirements.txt")}
    title = adapter.split("/")[-1] + (f" +{len(adapters) - 1}" if len(adapters) > 1 else "")  # the header's title is short
    files["README.md"] = _header((folder / "README.md").read_text(), f"qsimpo demo: {title}", hardware).encode()
    settings = {"adapter": adapter, "adapters": adapters, "base": base, "votes_repo": votes_repo}
    files["space.json"] = (json.dumps(settings, indent=2) + "\n").encode()
    with tempfile.TemporaryDirectory(prefix="qsimpo-space-") as tmp:
        wheel = build_wheel(Path(wheel_dir or tmp))
        files[wheel.name] = wheel.read_bytes()
    return SpacePlan(space_id, ", ".join(adapters), files)


def upload_space(plan: SpacePlan, token: str, private: bool = False) -> str:
    """Create the Gradio Space and upload its files in one commit."""
    from huggingface_hub import HfApi

    from qsimpo.export.hub import check_write_access

    api = HfApi(token=token)
    check_write_access(api.whoami(), plan.space_id)
    api.create_repo(plan.space_id, repo_type="space", space_sdk="gradio", private=private, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="qsimpo-space-") as tmp:
        for name, data in plan.files.items():
            (Path(tmp) / name).write_bytes(data)
        api.upload_folder(repo_id=plan.space_id, repo_type="space", folder_path=tmp,
                          commit_message=f"qsimpo push --space: the demo of {plan.adapter}")
    return f"https://huggingface.co/spaces/{plan.space_id}"


def push_space(adapter: str, space_id: str, base: str | None = None, hardware: str = "cpu-basic",
               private: bool = False, dry_run: bool = False, log=say, more_adapters: list[str] = (),
               votes_repo: str | None = None) -> SpacePlan:
    from qsimpo.export.hub import find_token

    if not dry_run:
        token = find_token()
    plan = plan_space(adapter, space_id, base, hardware, more_adapters=more_adapters, votes_repo=votes_repo)
    log(plan.describe())
    if dry_run:
        log("dry run: nothing was sent")
        return plan
    log(f"uploaded: {upload_space(plan, token, private)}")
    return plan
