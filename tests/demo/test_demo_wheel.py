"""`qsimpo demo` from a regular install: build the wheel, install it into a fresh venv, serve, answer.

The venv sees the system's site-packages (torch and the rest are not installed again), but
qsimpo itself must come from the wheel: every command runs from an empty folder without
PYTHONPATH, and the test checks where `import qsimpo` resolves.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
import urllib.request
import zipfile
from pathlib import Path

import pytest

pytest.importorskip("gradio", reason="gradio is not installed: pip install -e .")

from conftest import ROOT  # noqa: E402
from test_app import _text, free_port  # noqa: E402

SKIP = shutil.ignore_patterns(".git", "__pycache__", "*.egg-info", "build", "dist", "adapters", ".pytest_cache")


def run(cmd: list, cwd: Path, env: dict, timeout: float = 600) -> str:
    done = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{cmd}: exit {done.returncode}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout


def wait_for(url: str, server: subprocess.Popen, log: Path, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert server.poll() is None, f"the demo exited with {server.returncode}:\n{log.read_text()[-3000:]}"
        try:
            urllib.request.urlopen(url, timeout=5)
            return
        except OSError:
            time.sleep(0.5)
    raise AssertionError(f"the demo did not answer at {url} within {timeout:.0f} s:\n{log.read_text()[-3000:]}")


def test_wheel_installs_and_serves_the_demo(tmp_path, tiny_adapters):
    from gradio_client import Client

    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(GRADIO_ANALYTICS_ENABLED="False", PYTHONUNBUFFERED="1")  # the server's log is read after it is stopped
    # build from a copy of the source tree, so the build leaves nothing in the checkout
    source, wheels, venv, cwd = tmp_path / "src", tmp_path / "wheels", tmp_path / "venv", tmp_path / "elsewhere"
    shutil.copytree(ROOT, source, ignore=SKIP)
    cwd.mkdir()
    run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", wheels, source], cwd, env)
    wheel = next(wheels.glob("qsimpo-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {"qsimpo/demo/__init__.py", "qsimpo/demo/__main__.py", "qsimpo/demo/app.py", "qsimpo/demo/sides.py",
            "qsimpo/demo/batcher.py", "qsimpo/demo/stream.py", "qsimpo/demo/votes.py", "qsimpo/quickstart/tiny.yaml"} <= names
    assert not [n for n in names if n.startswith(("demo/", "tests/"))]

    # --without-pip: the system pip (visible through --system-site-packages) installs into the venv
    run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", venv], cwd, env)
    python, qsimpo = venv / "bin" / "python", venv / "bin" / "qsimpo"
    run([python, "-m", "pip", "install", "--no-deps", "--no-index", "-q", wheel], cwd, env)
    where = run([python, "-c", "import qsimpo.demo.sides, qsimpo.demo.votes; print(qsimpo.__file__)"], cwd, env).strip()
    assert Path(where).resolve().is_relative_to(venv.resolve()), where  # the wheel's copy, not the source tree
    assert "usage: qsimpo demo" in run([python, "-m", "qsimpo.demo", "--help"], cwd, env)

    port, log = free_port(), tmp_path / "demo.log"
    with log.open("w") as out:
        server = subprocess.Popen([str(qsimpo), "demo", "--adapter", str(tiny_adapters[0]), "--port", str(port),
                                   "--votes", str(tmp_path / "votes.jsonl")], cwd=cwd, env=env, stdout=out,
                                  stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}/"
        wait_for(url, server, log)
        client = Client(url, verbose=False, analytics_enabled=False, download_files=False)
        _, left, right, left_stats, right_stats, _ = client.predict("Tell me about owls.", "", 0.0, 1.0, 12, 0,
                                                                    api_name="/send")
        assert _text(left[-1]) and _text(right[-1]) and _text(left[-1]) != _text(right[-1])
        assert "tokens" in left_stats and "under SFT" in right_stats
        assert client.predict(api_name="/vote_right").startswith("Recorded **right better**")
    finally:
        server.terminate()
        server.wait(timeout=60)
    assert f"votes are appended to {tmp_path / 'votes.jsonl'}" in log.read_text()
