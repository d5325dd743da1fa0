"""`qsimpo demo` from a regular install: build the wheel, install it into a fresh venv, serve, answer.

The new venv sees the packages of the interpreter running the tests, whether that is a system
install or itself a virtual environment (torch and the rest are not installed again), but qsimpo
itself must come from the wheel: every command runs from an empty folder without PYTHONPATH, and
the test checks where `import qsimpo` resolves.
"""

from __future__ import annotations

import os
import site
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from conftest import ROOT, free_port, message_text as _text, wait_for

pytestmark = pytest.mark.usefixtures("processes")  # every test here starts processes: integration tier

SKIP = shutil.ignore_patterns(".git", "__pycache__", "*.egg-info", "build", "dist", "adapters", ".pytest_cache")


def run(cmd: list, cwd: Path, env: dict, timeout: float = 600) -> str:
    done = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{cmd}: exit {done.returncode}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout


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
            "qsimpo/demo/batcher.py", "qsimpo/generate.py", "qsimpo/demo/votes.py", "qsimpo/quickstart/tiny.yaml"} <= names
    assert not [n for n in names if n.startswith(("demo/", "tests/"))]

    # The venv sees this interpreter's site-packages through a .pth file: `--system-site-packages` would
    # show the base interpreter's, which lack torch and the rest when the tests run inside a venv. Paths
    # listed in a .pth are added after the venv's own site-packages, and .pth files inside them are not
    # run, so an editable install of qsimpo there cannot shadow the wheel's copy.
    # --without-pip: this interpreter's pip, seen the same way, installs into the venv.
    run([sys.executable, "-m", "venv", "--without-pip", venv], cwd, env)
    python, qsimpo = venv / "bin" / "python", venv / "bin" / "qsimpo"
    own_site = Path(run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], cwd, env).strip())
    (own_site / "outer-site-packages.pth").write_text("".join(f"{d}\n" for d in site.getsitepackages()))
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
