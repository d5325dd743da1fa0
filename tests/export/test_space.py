"""`qsimpo push ADAPTER --space OWNER/NAME`: the demo/ folder as a Gradio Space, listed, then served as a Space runs it.

The serving test writes the planned files into an empty folder, installs their requirements.txt into a
fresh venv (which sees this interpreter's packages, as in tests/demo/test_demo_wheel.py, so nothing is
downloaded), runs app.py there, which installs the wheel it carries, and asks both columns through
gradio_client.
"""

from __future__ import annotations

import contextlib
import io
import os
import site
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import free_port, message_text, wait_for
from qsimpo.cli import main as cli
from qsimpo.export.space import SpaceError, plan_space


@pytest.fixture(scope="module")
def space_plan(tmp_path_factory):
    return plan_space("someone/tiny-simpo", "someone/tiny-simpo-demo", hardware="zero-a10g",
                      wheel_dir=tmp_path_factory.mktemp("wheel"))


def test_dry_run_lists_every_file_and_the_header():
    import gradio

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert cli(["push", "someone/tiny-simpo", "--space", "someone/tiny-simpo-demo", "--hardware", "zero-a10g",
                    "--dry-run"]) == 0
    printed = out.getvalue()
    for name in ("app.py", "requirements.txt", "README.md", "space.json", "qsimpo-0.1.0-py3-none-any.whl"):
        assert f"  {name} " in printed
    for line in ("sdk: gradio", f"sdk_version: {gradio.__version__}", "app_file: app.py",
                 "suggested_hardware: zero-a10g", "title: qsimpo demo: tiny-simpo"):
        assert line in printed, line
    assert "dry run: nothing was sent" in printed


def test_a_local_adapter_folder_is_refused(tmp_path):
    with pytest.raises(SpaceError, match="local folder, which the Space cannot read"):
        plan_space(str(tmp_path), "someone/demo")
    with pytest.raises(SpaceError, match="must be OWNER/NAME"):
        plan_space("someone/tiny", "nodash")


@pytest.mark.slow
def test_the_space_installs_and_serves_from_an_empty_folder(space_plan, tiny_adapters, tmp_path):
    """About 2 minutes on 2 busy cores (building the wheel, installing it, loading gradio twice)."""
    from gradio_client import Client

    assert b'"adapter": "someone/tiny-simpo"' in space_plan.files["space.json"]
    assert "suggested_hardware: zero-a10g" in space_plan.header()

    space, venv = tmp_path / "space", tmp_path / "venv"
    space.mkdir()
    for name, data in space_plan.files.items():
        (space / name).write_bytes(data)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    port = free_port()
    env.update(GRADIO_ANALYTICS_ENABLED="False", PYTHONUNBUFFERED="1", GRADIO_SERVER_PORT=str(port),
               QSIMPO_ADAPTER=str(tiny_adapters[0]), QSIMPO_VOTES=str(tmp_path / "votes.jsonl"))

    def run(*cmd):
        done = subprocess.run([str(c) for c in cmd], cwd=space, env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, f"{cmd}: {done.stdout[-2000:]}\n{done.stderr[-2000:]}"
        return done.stdout

    run(sys.executable, "-m", "venv", "--without-pip", venv)
    python = venv / "bin" / "python"
    own_site = Path(run(python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])").strip())
    (own_site / "outer-site-packages.pth").write_text("".join(f"{d}\n" for d in site.getsitepackages()))
    run(python, "-m", "pip", "install", "--no-index", "-q", "-r", "requirements.txt")  # all met: nothing fetched

    log = tmp_path / "space.log"
    with log.open("w") as out:
        server = subprocess.Popen([str(python), "app.py"], cwd=space, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}/"
        wait_for(url, server, log)
        where = run(python, "-c", "import qsimpo; print(qsimpo.__file__)").strip()
        assert Path(where).resolve().is_relative_to(venv.resolve()), where  # the carried wheel's copy
        client = Client(url, verbose=False, analytics_enabled=False, download_files=False)
        _, left, right, left_stats, right_stats, _ = client.predict("Tell me about owls.", "", 0.0, 1.0, 12, 0,
                                                                    api_name="/send")
        assert message_text(left[-1]) and message_text(right[-1])
        assert message_text(left[-1]) != message_text(right[-1])
        assert "tokens" in left_stats and "under SFT" in right_stats
    finally:
        server.terminate()
        server.wait(timeout=60)


def test_space_settings_carry_several_adapters_and_the_votes_repo(monkeypatch, tmp_path):
    """demo/app.py reads the adapters and votes repo `qsimpo push --space` wrote, and the Space variables over them."""
    import importlib.util
    import json

    from qsimpo.export import space

    monkeypatch.setattr(space, "build_wheel", lambda dest: _fake_wheel(dest))  # the wheel itself: tests/export/test_space.py
    plan = space.plan_space("me/simpo", "me/demo", more_adapters=["me/dpo", "me/simpo"], votes_repo="me/votes",
                            wheel_dir=tmp_path)
    written = json.loads(plan.files["space.json"])
    assert written == {"adapter": "me/simpo", "adapters": ["me/simpo", "me/dpo"], "base": None, "votes_repo": "me/votes"}
    assert "title: qsimpo demo: simpo +1" in plan.header()
    with pytest.raises(space.SpaceError, match="local folder"):
        space.plan_space("me/simpo", "me/demo", more_adapters=[str(tmp_path)])
    with pytest.raises(space.SpaceError, match="--votes-repo 'votes' must be a Hub dataset id"):
        space.plan_space("me/simpo", "me/demo", votes_repo="votes")

    folder = tmp_path / "space"
    folder.mkdir()
    for name, data in plan.files.items():
        (folder / name).write_bytes(data)
    spec = importlib.util.spec_from_file_location("space_app", folder / "app.py")
    space_app = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(space_app)
    for var in ("QSIMPO_ADAPTER", "QSIMPO_BASE", "QSIMPO_VOTES_REPO"):
        monkeypatch.delenv(var, raising=False)
    found = space_app.settings()
    assert found["adapters"] == ["me/simpo", "me/dpo"] and found["votes_repo"] == "me/votes"
    monkeypatch.setenv("QSIMPO_ADAPTER", "you/a, you/b")
    monkeypatch.setenv("QSIMPO_VOTES_REPO", "you/votes")
    found = space_app.settings()
    assert found["adapters"] == ["you/a", "you/b"] and found["votes_repo"] == "you/votes"


def _fake_wheel(dest: Path) -> Path:
    wheel = Path(dest) / "qsimpo-0.1.0-py3-none-any.whl"
    wheel.write_bytes(b"PK")
    return wheel
