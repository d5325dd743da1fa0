"""`qsimpo demo --adapter A --adapter B`: the SFT column and one column per adapter on one base, labelled by name and
loss, every column from one mixed-adapter generate (exactly each column's answer alone); bases and SFT models that do
not agree; the base named as users know it; votes naming the compared columns, committed to a Hub dataset repo; the
served page in a real Chromium."""

from __future__ import annotations

import json
import shutil
from concurrent.futures import Future
from pathlib import Path

import pytest

from conftest import USER, columns_in_browser, make_config, serve_demo
from qsimpo.demo.sides import Settings, SideBySide
from test_sides import alone, spy_generate


def _copy(adapter: Path, to: Path, **meta) -> Path:
    shutil.copytree(adapter, to)
    record = json.loads((to / "qsimpo.json").read_text())
    (to / "qsimpo.json").write_text(json.dumps({**record, **meta}))
    return to


@pytest.fixture(scope="module")
def runs(tiny_adapters, tmp_path_factory):
    """Two runs on the tiny base: a SimPO one (as recorded before qsimpo.json had "loss") and a DPO one."""
    root = tmp_path_factory.mktemp("runs")
    return (_copy(tiny_adapters[0], root / "simpo-run"),
            _copy(tiny_adapters[1], root / "dpo-run", loss={"type": "dpo", "beta": 0.1, "label_smoothing": 0.0}))


@pytest.fixture(scope="module")
def multi(runs):
    return SideBySide.load([str(r) for r in runs], device="cpu")


def test_columns_are_sft_and_each_adapter_by_name_and_loss(multi, runs):
    assert multi.columns == ("sft", "a1", "a2") and set(multi.model.peft_config) == {"default", "a2"}  # one base
    assert [(s.name, s.label, s.adapter) for s in multi.sides.values()] == [
        ("SFT", "SFT (adapter off)", "__base__"), ("simpo-run", "simpo-run (simpo β 2)", "default"),
        ("dpo-run", "dpo-run (dpo β 0.1)", "a2")]
    assert multi.beta is None  # no one SimPO β for every column: no reward row
    assert str(runs[0].parent) not in multi.description


def test_every_column_in_one_batched_generate_equals_each_alone(multi, monkeypatch):
    calls = []
    monkeypatch.setattr(multi.model, "generate", spy_generate(multi.model, calls))
    greedy = Settings(temperature=0, max_new_tokens=12)
    *_, last = multi.stream({c: USER for c in multi.columns}, greedy)
    assert [c[:3] for c in calls] == [(["__base__", "default", "a2"], False, "default")]  # one call, three rows
    monkeypatch.undo()
    assert last == {c: alone(multi, c, USER, 12) for c in multi.columns}
    assert len(set(last.values())) == 3  # three different models
    sampled = Settings(temperature=1.0, top_p=0.9, max_new_tokens=10, seed=3)  # sampled rows do not depend on the batch
    *_, together = multi.stream({c: USER for c in multi.columns}, sampled)
    assert together == {c: multi.respond(c, USER, sampled) for c in multi.columns}
    stats = multi.stats({c: USER for c in multi.columns}, last)
    assert set(stats) == set(multi.columns) and all(set(s["avg_logprob"]) == set(multi.columns) for s in stats.values())


def test_bases_and_sft_models_must_agree(runs, tiny_adapters, tmp_path):
    from qsimpo.errors import UsageError

    elsewhere = _copy(runs[1], tmp_path / "elsewhere", base_model="org/another-base")
    with pytest.raises(UsageError, match="trained on different bases .* pass --base MODEL"):
        SideBySide.load([str(runs[0]), str(elsewhere)], device="cpu")
    int8 = _copy(runs[1], tmp_path / "int8", quantization="int8")
    with pytest.raises(UsageError, match="quantized differently .*int8: int8"):
        SideBySide.load([str(runs[0]), str(int8)], device="cpu")
    with pytest.raises(UsageError, match="--compare-adapter goes with one --adapter"):
        SideBySide.load([str(runs[0]), str(runs[1])], compare_adapter=str(runs[1]), device="cpu")

    def stacked(name: str, sft: Path) -> Path:  # a run on top of `qsimpo sft`: its SFT adapter in sft/ (qsimpo.train.stack)
        run = _copy(runs[0] if name != "b" else runs[1], tmp_path / name, sft_adapter={"subfolder": "sft", "source": str(sft)})
        shutil.copytree(sft, run / "sft")
        return run

    a, b, c = stacked("a", tiny_adapters[1]), stacked("b", tiny_adapters[1]), stacked("c", tiny_adapters[0])
    with pytest.raises(UsageError, match="trained on top of an SFT adapter .* on the bare base"):
        SideBySide.load([str(a), str(runs[1])], device="cpu")
    with pytest.raises(UsageError, match="trained on top of different SFT adapters"):
        SideBySide.load([str(a), str(c)], device="cpu")
    chat = SideBySide.load([str(a), str(b)], device="cpu")  # the same SFT adapter: the SFT column is base + it
    assert chat.sides["sft"].adapter == "sft" and chat.sides["sft"].label == "SFT (base + SFT adapter)"
    last = list(chat.stream({col: USER for col in chat.columns}, Settings(temperature=0, max_new_tokens=8)))[-1]
    assert last == {col: alone(chat, col, USER, 8) for col in chat.columns}


def test_the_base_is_named_as_users_know_it(tiny_adapters, tiny_base, tmp_path, monkeypatch):
    """A base read from qsimpo's GGUF cache is named by the GGUF file it was converted from, not the hashed folder."""
    from qsimpo.demo.columns import base_label

    monkeypatch.setenv("QSIMPO_CACHE", str(tmp_path / "cache"))
    converted = tmp_path / "cache" / "gguf" / "0123456789abcdef"
    shutil.copytree(tiny_base, converted)
    (converted / "gguf_source.json").write_text(json.dumps({"gguf_file": "tiny-Q4_1.gguf", "sha256": "0123"}))
    assert base_label(str(converted), {}) == "tiny-Q4_1.gguf (converted by qsimpo)"
    assert base_label(str(tiny_base), {}) == str(tiny_base) and base_label("org/model", {}) == "org/model"
    assert base_label("org/gguf-repo", {"base_model": "org/gguf-repo", "base_model_gguf_file": "m.Q8_0.gguf"}) == \
        "org/gguf-repo (m.Q8_0.gguf)"
    run = _copy(tiny_adapters[0], tmp_path / "run", base_model=str(converted))
    chat = SideBySide.load(str(run), device="cpu")
    assert "base tiny-Q4_1.gguf (converted by qsimpo) (nf4)" in chat.description and "0123456789abcdef" not in chat.description
    assert chat.sides["right"].loss == "simpo β 2"


# ------------------------------------------------------------------------------------------------ votes
class FakeHub:
    """huggingface_hub's HfApi, as CommitScheduler uses it, on a local folder laid out like the Hub's
    (ROOT/datasets/OWNER/NAME/<path in repo>): create_repo, create_commit and run_as_future (run at once)."""

    def __init__(self, root: Path):
        self.root, self.commits = root, []

    def create_repo(self, repo_id, private=None, repo_type=None, exist_ok=False):
        (self.root / f"{repo_type}s" / repo_id).mkdir(parents=True, exist_ok=True)
        return type("RepoUrl", (), {"repo_id": repo_id})()

    def create_commit(self, repo_id, repo_type, operations, commit_message, revision=None):
        for op in operations:
            dest = self.root / f"{repo_type}s" / repo_id / op.path_in_repo
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_bytes(op.path_or_fileobj.read())
        self.commits.append([op.path_in_repo for op in operations])

    def run_as_future(self, fn, *args, **kwargs):
        future = Future()
        future.set_result(fn(*args, **kwargs))
        return future


def _turn(left: str, right: str) -> dict:
    def side(column, name, loss, text):
        return {"model": f"{name} ({loss})", "name": name, "loss": loss, "column": column, "prompt": USER,
                "response": text, "tokens": 3, "avg_logprob": {"sft": -1.0, "a1": -2.0, "a2": -1.5}}

    return {"left": side("sft", "SFT", "", left), "right": side("a2", "dpo-run", "dpo β 0.1", right),
            "settings": Settings(seed=3).to_dict()}


def test_votes_committed_to_a_hub_dataset_outlive_a_restart(tiny_base, tmp_path):
    from qsimpo.data import build_dataset
    from qsimpo.demo.votes import HUB_FOLDER, hub_votes, vote_row
    from qsimpo.train.model import load_tokenizer

    hub = FakeHub(tmp_path / "hub")
    first = hub_votes("me/demo-votes", tmp_path / "space-disk-1", every=60, api=hub)
    first.append(vote_row("left", _turn("Owls hoot.", "Go away.")))
    first.append(vote_row("tie", _turn("A.", "B.")))
    first.scheduler.trigger().result()  # what the scheduler does every `every` minutes and at exit
    first.scheduler.stop()
    # the Space restarts on a fresh disk: a new process, a new file; the first one's votes are in the repo
    second = hub_votes("me/demo-votes", tmp_path / "space-disk-2", every=60, api=hub)
    second.append(vote_row("right", _turn("Bees?", "Bees buzz.")))
    second.scheduler.trigger().result()
    second.scheduler.trigger().result()  # nothing new: no empty commit
    second.scheduler.stop()
    repo = tmp_path / "hub" / "datasets" / "me" / "demo-votes"
    files = sorted((repo / HUB_FOLDER).glob("votes-*.jsonl"))
    assert len(files) == 2 and len(hub.commits) == 2 and first.path.name != second.path.name
    rows = [json.loads(line) for f in files for line in f.read_text().splitlines()]
    assert sorted(r["vote"] for r in rows) == ["left", "right", "tie"]
    right = next(r for r in rows if r["vote"] == "right")
    assert right["left"]["column"] == "sft" and (right["right"]["name"], right["right"]["loss"]) == ("dpo-run", "dpo β 0.1")
    # the repo, as `qsimpo train --data.path OWNER/NAME` reads it (here: the folder laid out like it)
    cfg = make_config(tiny_base, repo, tmp_path / "run")
    pairs, summary = build_dataset(cfg.data, load_tokenizer(cfg.model))
    assert summary.kept == 2 and summary.dropped["no_preference"] == 1
    assert sorted(p["text"]["chosen"] for p in pairs) == ["Bees buzz.", "Owls hoot."]


def test_old_vote_rows_still_train_beside_new_ones(tiny_base, tmp_path):
    """A votes file from before the columns were named (left/right without name, loss, column) reads as before."""
    from qsimpo.data import build_dataset
    from qsimpo.demo.votes import VoteLog, vote_row
    from qsimpo.train.model import load_tokenizer

    log = VoteLog(tmp_path / "votes.jsonl")
    old = vote_row("left", _turn("Owls hoot.", "Go away."))
    for side in ("left", "right"):
        old[side] = {k: v for k, v in old[side].items() if k in ("model", "response", "tokens", "avg_logprob")}
    log.append(old)
    log.append(vote_row("right", _turn("Bees?", "Bees buzz.")))
    cfg = make_config(tiny_base, log.path, tmp_path / "run")
    pairs, summary = build_dataset(cfg.data, load_tokenizer(cfg.model))
    assert summary.kept == 2 and [p["text"]["chosen"] for p in pairs] == ["Owls hoot.", "Bees buzz."]


# -------------------------------------------------------------------------------------------------- the app
def test_app_serves_every_column_and_votes_name_the_compared_pair(multi, tmp_path):
    from gradio_client import Client

    from conftest import free_port, message_text
    from qsimpo.demo import app

    demo = app.build_app(multi, tmp_path / "votes.jsonl")
    _, url, _ = demo.queue().launch(server_name="127.0.0.1", server_port=free_port(), prevent_thread_lock=True,
                                     quiet=True, theme=app.THEME, css=app.CSS, ssr_mode=False)
    try:
        client = Client(url, verbose=False, analytics_enabled=False, download_files=False)
        _, *shown, status = client.predict("Tell me about owls.", "", 0.0, 0.95, 10, 0, api_name="/send")
        bots, stats = shown[:3], shown[3:]
        answers = {c: message_text(bot[-1]) for c, bot in zip(multi.columns, bots)}
        assert answers == {c: alone(multi, c, USER, 10) for c in multi.columns}
        assert all("under SFT" in s and "under dpo-run" in s for s in stats)
        assert "Pick two different" in client.predict("a1", "a1", api_name="/vote_left")
        assert "(SFT vs dpo-run)" in client.predict("sft", "a2", api_name="/vote_right")
    finally:
        demo.close()
    row = json.loads((tmp_path / "votes.jsonl").read_text())
    assert row["vote"] == "right" and row["chosen"][0]["content"] == answers["a2"]
    assert (row["left"]["column"], row["left"]["name"]) == ("sft", "SFT")
    assert (row["right"]["column"], row["right"]["name"], row["right"]["loss"]) == ("a2", "dpo-run", "dpo β 0.1")
    assert set(row["right"]["avg_logprob"]) == {"sft", "a1", "a2"}


@pytest.fixture
def served(multi, tmp_path):
    """(url, votes file) of the demo app over ``multi`` (SFT | simpo-run | dpo-run), closed afterwards."""
    with serve_demo(multi, tmp_path / "votes.jsonl") as served:
        yield served


def test_browser_every_column_answers_and_a_vote_names_the_picked_pair(served, multi, tmp_path):
    """In a real Chromium: the SFT column and each adapter's, labelled by name and loss; one message answered in every
    column; the two columns picked in the vote dropdowns (neither the default pair) are the row's left and right."""
    url, votes = served
    labels = {"sft": "SFT (adapter off)", "a1": "simpo-run (simpo β 2)", "a2": "dpo-run (dpo β 0.1)"}
    assert {c: multi.sides[c].label for c in multi.columns} == labels
    shown = columns_in_browser(url, USER[0]["content"], list(multi.columns), 8, ("a2", "a1"), labels, "left",
                               tmp_path / "columns.png")
    for c, label in labels.items():
        assert label in shown[c]["label"] and shown[c]["answer"], (c, shown[c])
        assert shown["user"][c] == USER[0]["content"]
    assert "left better" in shown["status"] and "(dpo-run vs simpo-run)" in shown["status"]
    assert (tmp_path / "columns.png").stat().st_size > 10_000
    rows = [json.loads(line) for line in votes.read_text().splitlines()]
    assert len(rows) == 1 and rows[0]["vote"] == "left"
    left, right = rows[0]["left"], rows[0]["right"]
    assert (left["column"], left["name"], left["loss"]) == ("a2", "dpo-run", "dpo β 0.1")
    assert (right["column"], right["name"], right["loss"]) == ("a1", "simpo-run", "simpo β 2")
    assert rows[0]["chosen"][0]["content"] == left["response"] and rows[0]["rejected"][0]["content"] == right["response"]
    assert rows[0]["prompt"] == USER
    assert rows[0]["settings"]["max_new_tokens"] == 8
    # each picked column's answer is its own model's (sampled rows do not depend on the batch)
    settings = Settings(**rows[0]["settings"])
    assert (left["response"], right["response"]) == (multi.respond("a2", USER, settings), multi.respond("a1", USER, settings))


def test_cli_says_what_to_fix_for_adapters_that_do_not_go_together(runs, tmp_path, capsys):
    from qsimpo.cli import main

    elsewhere = _copy(runs[1], tmp_path / "elsewhere", base_model="org/another-base")
    assert main(["demo", "--adapter", str(runs[0]), "--adapter", str(elsewhere)]) == 2
    err = capsys.readouterr().err
    assert "trained on different bases" in err and "org/another-base" in err and "Traceback" not in err
    assert main(["demo", "--adapter", str(runs[0]), "--adapter", str(runs[1]), "--compare-adapter", str(runs[1])]) == 2
    assert "--compare-adapter goes with one --adapter" in capsys.readouterr().err
