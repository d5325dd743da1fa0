"""The road a new user takes, each step a subprocess exactly as the README and docs/ give it, from a folder of
the user's own outside the checkout, on the real model:

    qsimpo quickstart                          README, first command
    qsimpo demo                                docs/demo.md: both columns answer through the real server and a
                                               real browser; a vote is appended to adapters/quickstart/votes.jsonl
    qsimpo train configs/quickstart.yaml --data.path adapters/quickstart/votes.jsonl      docs/demo.md
    qsimpo eval adapters/quickstart/adapter    docs/evaluate.md: the run's own held-out pairs, no --data
    qsimpo merge ADAPTER --out DIR             docs/merge-and-share.md
    qsimpo push DIR --repo OWNER/NAME --dry-run
    qsimpo quickstart                          once more: the result shown again, not "pass --overwrite"

Set QSIMPO_DEMO_SCREENSHOT=PATH to keep the browser's screenshot of the demo (docs/demo.png is taken so).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT, chat_in_browser, demo_url, message_text
from test_docs import shape, shown_output
from qsimpo.realmodel import HUB_ID

pytestmark = pytest.mark.usefixtures("processes")  # every test here starts processes: integration tier

QUESTION = "What is a lighthouse?"


def qsimpo_command() -> list[str]:
    """`qsimpo` as the install put it on PATH: beside this interpreter (a venv's bin/), else on PATH."""
    beside = Path(sys.executable).parent / "qsimpo"
    found = str(beside) if beside.is_file() else shutil.which("qsimpo")
    assert found, "the qsimpo command is not installed: pip install -e ."
    return [found]


class User:
    """Runs commands in the user's folder, as a person at a shell would, and keeps what each printed."""

    def __init__(self, home: Path):
        self.home = home
        self.env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        self.env.update(GRADIO_ANALYTICS_ENABLED="False", PYTHONUNBUFFERED="1", COLUMNS="120")
        self.took: dict[str, float] = {}

    def run(self, *args: str, expect: int = 0, timeout: float = 1800) -> str:
        t0 = time.perf_counter()
        done = subprocess.run([*qsimpo_command(), *args], cwd=self.home, env=self.env, capture_output=True, text=True,
                              timeout=timeout, stdin=subprocess.DEVNULL)
        self.took[" ".join(args[:2])] = round(time.perf_counter() - t0, 1)
        out = done.stdout + done.stderr
        self.stdout = done.stdout
        assert done.returncode == expect, f"qsimpo {' '.join(args)}: exit {done.returncode}\n{out[-4000:]}"
        assert "Traceback" not in out, f"qsimpo {' '.join(args)} printed a traceback:\n{out[-4000:]}"
        return out


def numbers(pattern: str, text: str) -> tuple[float, ...]:
    found = re.search(pattern, text)
    assert found, f"{pattern!r} not in:\n{text[-3000:]}"
    return tuple(float(g) for g in found.groups())


def test_quickstart_demo_train_eval_merge_push_quickstart(tmp_path, smollm2_gguf):
    from gradio_client import Client

    user = User(tmp_path / "my-project")
    user.home.mkdir()
    run = user.home / "adapters" / "quickstart"

    # 1. the README's first command: SmolLM2 aligned on the shipped pairs, before and after shown
    out = user.run("quickstart")
    sft, aligned = numbers(r"held-out reward accuracy: SFT ([\d.]+) -> aligned ([\d.]+)", out)
    one_sft, one_aligned = numbers(r"one-sentence answers .*: SFT (\d+)% -> aligned (\d+)%", out)
    words_sft, words_aligned = numbers(r"\(mean (\d+) -> (\d+) words\)", out)
    assert aligned >= sft + 0.3 and one_aligned > one_sft and words_aligned < words_sft, out
    assert "chat with both: qsimpo demo\n" in out, out  # the next command, as the user types it
    result = json.loads((run / "quickstart.json").read_text())
    assert result["after"]["reward_accuracy"] == pytest.approx(aligned, abs=5e-4)
    # what the README shows it prints, line for line: the same text, numbers aside (timings, and the last digits
    # another CPU may round differently), and where the model was read from
    def layout(lines):
        return [shape(re.sub(r"^(\[1/4\] [^:]+:).*", r"\1 ...", line)) for line in lines]

    shown = shown_output("README.md", "qsimpo quickstart")
    assert layout(user.stdout.splitlines()) == layout(shown), "the README's quickstart output is stale; it prints:\n" + \
        user.stdout

    # 2. `qsimpo demo` with no arguments serves the quickstart's adapter on its recorded base
    log = tmp_path / "demo.log"
    with log.open("w") as sink:
        server = subprocess.Popen(qsimpo_command() + ["demo"], cwd=user.home, env=user.env, stdout=sink,
                                  stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        url = demo_url(server, log)
        client = Client(url, verbose=False, analytics_enabled=False, download_files=False)
        _, left, right, left_stats, right_stats, _ = client.predict(QUESTION, "", 0.0, 1.0, 40, 0, api_name="/send")
        sft_answer, aligned_answer = message_text(left[-1]), message_text(right[-1])
        assert sft_answer and aligned_answer and sft_answer != aligned_answer
        assert len(aligned_answer.split()) < len(sft_answer.split())  # the habit the quickstart taught
        assert "tokens" in left_stats and "under SFT" in right_stats
        assert client.predict(api_name="/vote_right").startswith("Recorded **right better**")
        screenshot = Path(os.environ.get("QSIMPO_DEMO_SCREENSHOT") or tmp_path / "demo.png")
        shown = chat_in_browser(url, QUESTION, 40, screenshot, timeout_ms=180_000)
        assert shown["user"] == QUESTION and shown["left"] and shown["right"] and screenshot.stat().st_size > 10_000
    finally:
        server.terminate()
        server.wait(timeout=60)
    votes = [json.loads(line) for line in (run / "votes.jsonl").read_text().splitlines()]
    assert [v["vote"] for v in votes] == ["right", "right"] and votes[0]["chosen"][0]["content"] == aligned_answer

    # 3. the votes as training rows, with the shipped config (docs/demo.md), which names the Hub id: the quickstart
    # recorded it too, whichever source the model came from, and the copy qsimpo holds is read without the Hub
    base = json.loads((run / "adapter" / "qsimpo.json").read_text())["base_model"]
    assert base == HUB_ID
    out = user.run("train", str(ROOT / "configs" / "quickstart.yaml"), "--data.path", "adapters/quickstart/votes.jsonl",
                   "--train.max_steps", "2", "--train.progress", "false")
    assert "2 rows read, 2 kept, 0 dropped" in out, out
    assert (user.home / "adapters" / "quickstart-again" / "adapter_model.safetensors").is_file()

    # 4. eval with no --data: the quickstart's held-out pairs are the run's data.eval
    out = user.run("eval", "adapters/quickstart/adapter")
    assert f"held-out pairs: {result['held_out_pairs']} (adapters/quickstart/data/heldout.jsonl)" in out, out
    report = json.loads((run / "adapter" / "eval" / "eval.json").read_text())
    assert f"wrote {Path('adapters/quickstart/adapter/eval/eval.json')}" in out
    # the same pairs, the same model: the quickstart's own scoring agrees with eval's
    assert report["models"]["aligned"]["reward_accuracy"] == pytest.approx(result["after"]["reward_accuracy"], abs=1e-3)
    assert report["models"]["sft"]["reward_accuracy"] == pytest.approx(result["before"]["reward_accuracy"], abs=1e-3)

    # 5. merge, verified against the adapter
    out = user.run("merge", "adapters/quickstart/adapter", "--out", "adapters/quickstart-merged")
    assert (user.home / "adapters" / "quickstart-merged" / "config.json").is_file() and "verif" in out.lower(), out

    # 6. push --dry-run of the merged model and of the adapter: what would go, and the card naming the Hub id
    out = user.run("push", "adapters/quickstart-merged", "--repo", "me/smollm2-135m-simpo", "--dry-run")
    assert "me/smollm2-135m-simpo" in out and "model.safetensors" in out and "README.md" in out, out
    out = user.run("push", "adapters/quickstart/adapter", "--repo", "me/smollm2-135m-simpo-lora", "--dry-run")
    assert f"base_model: {HUB_ID}" in out and "adapter_model.safetensors" in out, out

    # 7. the README's first command again: the same result shown, nothing retrained
    out = user.run("quickstart")
    assert numbers(r"held-out reward accuracy: SFT ([\d.]+) -> aligned ([\d.]+)", out) == (sft, aligned)
    assert "its result again" in out and "[2/4]" not in out and "nothing was run again" in out, out
    print("seconds per step:", json.dumps(user.took))
