"""The Gradio demo, served on a free local port: driven with gradio_client, then in a real headless Chromium."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading

import pytest

from conftest import chat_in_browser, make_config, message_text as _text, serve_demo

PROMPT = "Tell me about owls."

@pytest.fixture
def served(chat, tmp_path):
    """(url, votes file) of the demo app over ``chat``, launched without blocking and closed afterwards."""
    with serve_demo(chat, tmp_path / "votes.jsonl") as served:
        yield served


def test_client_both_columns_answer_and_votes_become_training_rows(served, tiny_base, tmp_path):
    from gradio_client import Client

    from qsimpo.data import build_dataset
    from qsimpo.train.model import load_tokenizer

    url, votes = served
    client = Client(url, verbose=False, analytics_enabled=False, download_files=False)
    assert {"/send", "/vote_left", "/vote_right", "/vote_tie", "/vote_both_bad", "/clear"} <= set(
        client.view_api(print_info=False, return_format="dict")["named_endpoints"])
    job = client.submit(PROMPT, "", 0.8, 0.95, 16, 5, api_name="/send")
    _, left, right, left_stats, right_stats, status = job.result(timeout=120)
    frames = job.outputs()
    assert len(frames) > 3  # streamed: one update per token, not one at the end
    assert [m["role"] for m in left] == [m["role"] for m in right] == ["user", "assistant"]
    answers = _text(left[-1]), _text(right[-1])
    assert all(answers) and answers[0] != answers[1]
    assert "tokens" in left_stats and "under SFT" in right_stats and "β = 2" in right_stats

    assert client.predict(api_name="/vote_left").startswith("Recorded **left better**")
    assert "already has a vote" in client.predict(api_name="/vote_right")  # one vote per turn
    rows = [json.loads(line) for line in votes.read_text().splitlines()]
    assert len(rows) == 1 and rows[0]["vote"] == "left"
    assert rows[0]["prompt"] == [{"role": "user", "content": PROMPT}]
    assert rows[0]["chosen"][0]["content"] == answers[0] and rows[0]["rejected"][0]["content"] == answers[1]
    assert rows[0]["settings"] == {"temperature": 0.8, "top_p": 0.95, "max_new_tokens": 16, "seed": 5, "system_prompt": ""}

    # a second turn continues each column's own history; a tie is recorded but is no training pair
    _, left, right, *_ = client.predict("And bees?", "", 0.8, 0.95, 8, 5, api_name="/send")
    assert len(left) == len(right) == 4
    assert client.predict(api_name="/vote_tie").startswith("Recorded **tie**")
    cfg = make_config(tiny_base, votes, tmp_path / "run")
    pairs, summary = build_dataset(cfg.data, load_tokenizer(cfg.model))
    assert summary.kept == 1 and summary.dropped["no_preference"] == 1
    assert pairs[0]["text"]["chosen"] == answers[0]


def test_users_at_once_each_get_their_own_answers(served, chat):
    """Several browser sessions at once: their messages are generated together, and every user gets
    exactly the answers their own conversation gets alone, each column from its own side."""
    from gradio_client import Client

    from qsimpo.demo.sides import SIDES, Settings
    from test_sides import _wait

    url, _ = served
    users = [("Tell me about owls.", 0.0, 12, 0), ("And bees?", 0.0, 16, 0), ("Describe the moon.", 0.9, 10, 5),
             ("What do foxes eat?", 0.0, 6, 0)]
    clients = [Client(url, verbose=False, analytics_enabled=False, download_files=False) for _ in users]
    before = len(chat.batcher.batches)
    _wait(lambda: chat.batcher.worker is None)
    with chat.lock:  # the model is busy: the first message is taken and waits, the next three queue behind it
        jobs = [clients[0].submit(users[0][0], "", users[0][1], 0.9, users[0][2], users[0][3], api_name="/send")]
        _wait(lambda: chat.batcher.worker is not None and not chat.batcher.waiting)
        jobs += [c.submit(m, "", t, 0.9, n, seed, api_name="/send") for c, (m, t, n, seed) in zip(clients[1:], users[1:])]
        _wait(lambda: len(chat.batcher.waiting) == len(users) - 1)
    first = [job.result(timeout=120) for job in jobs]
    assert chat.batcher.batches[before:] == [1, len(users) - 1]  # three users' six rows in one generate

    def alone(history, temperature, max_new, seed):
        return {s: list(chat.stream({s: history[s]}, Settings(temperature, 0.9, max_new, seed)))[-1][s] for s in SIDES}

    for (message, *settings), (_, left, right, *_) in zip(users, first):
        history = {s: [{"role": "user", "content": message}] for s in SIDES}
        assert {"left": _text(left[-1]), "right": _text(right[-1])} == alone(history, *settings)
        assert _text(left[-1]) != _text(right[-1])

    # a second turn for everyone at the same moment (threads), each side now on its own history
    second = [None] * len(users)

    def turn(i):
        second[i] = clients[i].predict("Why?", "", 0.0, 0.9, 8, 0, api_name="/send")

    threads = [threading.Thread(target=turn, args=(i,)) for i in range(len(users))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    for (message, *_), (_, left1, right1, *_), (_, left, right, *_) in zip(users, first, second):
        history = {s: [{"role": "user", "content": message}, {"role": "assistant", "content": _text(m[-1])},
                       {"role": "user", "content": "Why?"}] for s, m in (("left", left1), ("right", right1))}
        assert len(left) == len(right) == 4
        assert {"left": _text(left[-1]), "right": _text(right[-1])} == alone(history, 0.0, 8, 0)


def test_browser_chat_and_vote(served, tmp_path):
    url, votes = served
    shown = chat_in_browser(url, PROMPT, 12, tmp_path / "demo.png")
    assert shown["left"] and shown["right"] and shown["user"] == PROMPT
    assert (tmp_path / "demo.png").stat().st_size > 10_000
    row = json.loads(votes.read_text().splitlines()[-1])
    # (the page shows the answers rendered as markdown, so the raw text is compared on the server side)
    assert row["vote"] == "right" and row["chosen"][0]["content"] == row["right"]["response"]
    assert row["prompt"] == [{"role": "user", "content": PROMPT}]
    assert row["settings"]["max_new_tokens"] == 12


@pytest.mark.usefixtures("processes")  # starts qsimpo as a process, as a user does: integration tier
def test_demo_errors_are_messages_not_tracebacks(tmp_path, tiny_adapters):
    """What `qsimpo demo` prints for inputs a user gets wrong: exit 2, one line saying what to pass, no traceback."""
    not_adapter = tmp_path / "empty"
    not_adapter.mkdir()
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    cases = [([], "run `qsimpo quickstart` first"),
             (["--adapter", str(tmp_path / "missing")], "missing: no such folder"),
             (["--adapter", str(not_adapter)], "holds no adapter_config.json"),
             (["--adapter", str(tiny_adapters[0]), "--compare-adapter", "./nope"], "--compare-adapter ./nope: no such folder"),
             (["--adapter", str(tiny_adapters[0]), "--base", str(tmp_path / "no-base")], "--base " + str(tmp_path / "no-base") + ": no such file or folder"),
             (["--adapter", str(tiny_adapters[0]), "--port", str(busy.getsockname()[1])], "is in use: pass another --port")]
    try:
        for args, expected in cases:
            done = subprocess.run([sys.executable, "-m", "qsimpo", "demo", *args], cwd=tmp_path, capture_output=True,
                                  text=True, timeout=300)
            assert done.returncode == 2, (args, done.stderr[-2000:])
            assert expected in done.stderr and "Traceback" not in done.stderr, (args, done.stderr[-2000:])
    finally:
        busy.close()
