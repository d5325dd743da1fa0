"""qsimpo.demo.sides and qsimpo.demo.votes, called directly: batched streaming, exactness, seeds, users at once, log-probs, vote rows."""

from __future__ import annotations

import json
import threading

import pytest
import torch

from conftest import USER, make_config
from qsimpo.demo.sides import Settings, SideBySide, resolve_adapter
from qsimpo.demo.votes import VoteLog, vote_row

def spy_generate(model, calls):
    """Record, at each generate() call, its per-row adapter names and the model's own adapter state."""
    original = model.generate

    def generate(*args, **kwargs):
        lora = next(m for m in model.modules() if hasattr(m, "lora_A"))
        calls.append((kwargs.get("adapter_names"), lora.disable_adapters, model.active_adapter))
        out = original(*args, **kwargs)
        calls[-1] += (out.shape[1] - kwargs["input_ids"].shape[1],)  # + how many tokens it generated
        return out

    return generate


def alone(chat, side: str, messages: list[dict], max_new_tokens: int) -> str:
    """``side``'s greedy answer the plain way: one row, the adapter disabled (SFT) or active, no adapter_names."""
    from qsimpo.generate import answer as generate

    # under the demo's own lock: a stream's last text can arrive while its batch's generate is still returning,
    # and peft's adapter_names hooks live until it has
    with chat.lock:
        adapter = chat.sides[side].adapter
        if adapter == "__base__":
            with chat.model.disable_adapter():
                return generate(chat.model, chat.tokenizer, messages, max_new_tokens=max_new_tokens)
        chat.model.set_adapter(adapter)
        try:
            return generate(chat.model, chat.tokenizer, messages, max_new_tokens=max_new_tokens)
        finally:
            chat.model.set_adapter("default")


def test_stream_yields_growing_text(chat):
    texts = [t["right"] for t in chat.stream({"right": USER}, Settings(temperature=0, max_new_tokens=24))]
    assert len(texts) >= 2 and texts[-1]
    assert all(b.startswith(a) and len(b) > len(a) for a, b in zip(texts, texts[1:]))
    assert chat.respond("right", USER, Settings(temperature=0, max_new_tokens=24)) == texts[-1]


def test_one_batched_generate_answers_both_sides_exactly(chat, monkeypatch):
    """Left is the base (adapter off), right the adapter, in one generate call on the 4-bit layers;
    each column is token for token what that side answers alone, and the model is never switched."""
    import bitsandbytes as bnb

    assert any(isinstance(m, bnb.nn.Linear4bit) for m in chat.model.modules())  # peft's LoRA over bnb NF4 layers
    calls = []
    monkeypatch.setattr(chat.model, "generate", spy_generate(chat.model, calls))
    greedy = Settings(temperature=0, max_new_tokens=16)
    *frames, both = chat.stream({"left": USER, "right": USER}, greedy)
    assert [c[:3] for c in calls] == [(["__base__", "default"], False, "default")]  # one call, two rows
    assert frames and all(set(f) == {"left", "right"} for f in frames)  # the two columns stream together
    monkeypatch.undo()
    assert both == {"left": alone(chat, "left", USER, 16), "right": alone(chat, "right", USER, 16)}
    assert both["left"] != both["right"]


def test_rows_of_different_lengths_match_their_rows_alone(chat):
    """After the first turn each side has its own history: the shorter prompt is left-padded, and still exact."""
    left = [*USER, {"role": "assistant", "content": "Owls hoot."}, {"role": "user", "content": "And bees?"}]
    right = [*USER, {"role": "assistant", "content": "Owls are birds of prey that hunt at night, mostly mice."},
             {"role": "user", "content": "And bees? Tell me more about their hives and honey."}]
    both = list(chat.stream({"left": left, "right": right}, Settings(temperature=0, max_new_tokens=20)))[-1]
    assert both == {"left": alone(chat, "left", left, 20), "right": alone(chat, "right", right, 20)}


def test_same_seed_same_output(chat):
    sampled = Settings(temperature=1.0, top_p=0.95, max_new_tokens=16, seed=7)
    first = chat.respond("right", USER, sampled)
    chat.respond("left", USER, Settings(temperature=1.0, seed=123))  # RNG use in between changes nothing
    torch.rand(5)  # nor does the global RNG: each row samples from its own generator
    assert chat.respond("right", USER, sampled) == first
    others = {chat.respond("right", USER, Settings(temperature=1.0, top_p=0.95, max_new_tokens=16, seed=s)) for s in (8, 9, 10)}
    assert others - {first}, "different seeds should sample differently"
    # a sampled row does not depend on its batch: both columns together = each side alone
    both = list(chat.stream({"left": USER, "right": USER}, sampled))[-1]
    assert both == {"left": chat.respond("left", USER, sampled), "right": first}


def test_users_at_once_are_batched_and_each_gets_its_own_answers(chat):
    """Requests waiting while the model is busy run as one batch, with their own settings; nothing leaks between them."""
    asks = [({"left": USER, "right": USER}, Settings(temperature=0, max_new_tokens=12)),
            ({"left": [{"role": "user", "content": "And bees?"}]}, Settings(temperature=0, max_new_tokens=20)),
            ({"right": [{"role": "user", "content": "Describe the moon, please."}],
              "left": [{"role": "user", "content": "Hello"}]}, Settings(temperature=1.0, top_p=0.9, max_new_tokens=8, seed=4)),
            ({"right": USER}, Settings(temperature=0, max_new_tokens=4))]
    expected = [list(chat.stream(turns, settings))[-1] for turns, settings in asks]
    got, batches = [None] * len(asks), len(chat.batcher.batches)

    def user(i):
        got[i] = list(chat.stream(*asks[i]))[-1]

    threads = [threading.Thread(target=user, args=(i,)) for i in range(len(asks))]
    _wait(lambda: chat.batcher.worker is None)  # the last batch's worker has gone: the next one starts for thread 0
    with chat.lock:  # the model is busy: the first request is taken and waits, the others queue behind it
        threads[0].start()
        _wait(lambda: chat.batcher.worker is not None and not chat.batcher.waiting)
        for t in threads[1:]:
            t.start()
        _wait(lambda: len(chat.batcher.waiting) == len(asks) - 1)
    for t in threads:
        t.join(timeout=120)
    assert chat.batcher.batches[batches:] == [1, len(asks) - 1]  # the three waiting requests ran as one batch
    assert got == expected


def _wait(condition, timeout: float = 30.0) -> None:
    import time

    deadline = time.time() + timeout
    while not condition():
        assert time.time() < deadline, "timed out"
        time.sleep(0.01)


def test_leaving_early_stops_the_rows(chat, monkeypatch):
    calls = []
    monkeypatch.setattr(chat.model, "generate", spy_generate(chat.model, calls))
    # left to run, both rows go on to all 400 tokens at these settings (the tiny model never says EOS here)
    stream = chat.stream({"left": USER, "right": USER}, Settings(temperature=1.0, max_new_tokens=400, seed=1))
    next(stream)  # generation running
    stream.close()  # the reader leaves (the UI cancelled): its rows stop at the next step
    _wait(lambda: chat.batcher.worker is None)
    assert not chat.lock.locked()
    assert len(calls) == 1 and calls[0][3] < 50, calls
    assert not [t for t in threading.enumerate() if t.name.startswith("qsimpo-demo")]


def test_compare_adapter_on_one_base(tiny_adapters, monkeypatch):
    chat2 = SideBySide.load(str(tiny_adapters[0]), compare_adapter=str(tiny_adapters[1]), device="cpu")
    assert set(chat2.model.peft_config) == {"default", "compare"}  # two adapters, one base
    calls = []
    monkeypatch.setattr(chat2.model, "generate", spy_generate(chat2.model, calls))
    both = list(chat2.stream({"left": USER, "right": USER}, Settings(temperature=0, max_new_tokens=12)))[-1]
    assert [c[:3] for c in calls] == [(["compare", "default"], False, "default")]
    monkeypatch.undo()
    assert both == {"left": alone(chat2, "left", USER, 12), "right": alone(chat2, "right", USER, 12)}
    assert both["left"] != both["right"]


def test_avg_logprob_is_the_simpo_average(chat):
    from qsimpo.data import tokenize_pair

    response = chat.respond("left", USER, Settings(temperature=0, max_new_tokens=12))
    avg, n = chat.avg_logprob("right", USER, response)
    enc = tokenize_pair(chat.tokenizer, {"prompt": USER, "chosen": response, "rejected": response}, 512, 256)
    ids = torch.tensor([enc["prompt_ids"] + enc["chosen_ids"]])
    with torch.no_grad():
        logp = torch.log_softmax(chat.model(input_ids=ids).logits[0, :-1].float(), -1)
    p = len(enc["prompt_ids"])
    manual = logp[p - 1:, :].gather(-1, ids[0, p:, None]).mean()  # position t predicts token t+1
    assert n == len(enc["chosen_ids"]) and response  # |y| includes the EOS training appends (the shown count does not)
    assert avg == pytest.approx(float(manual), abs=1e-4)
    # every answer under every side in one (left-padded) pass: the same numbers as one at a time
    long_turn = [{"role": "user", "content": "Tell me all about owls and their nests, please, in detail."}]
    other = chat.respond("right", long_turn, Settings(temperature=0, max_new_tokens=20))
    stats = chat.stats({"left": USER, "right": long_turn}, {"left": response, "right": other})
    assert stats["left"]["tokens"] == n - 1 and stats["left"]["avg_logprob"]["right"] == pytest.approx(avg, abs=1e-4)
    for side, (messages, text) in {"left": (USER, response), "right": (long_turn, other)}.items():
        for scorer in ("left", "right"):
            assert stats[side]["avg_logprob"][scorer] == pytest.approx(chat.avg_logprob(scorer, messages, text)[0], abs=1e-4)
    assert stats["left"]["avg_logprob"]["left"] != stats["left"]["avg_logprob"]["right"]  # the two models score differently


def test_long_history_keeps_the_newest_turns(chat):
    turn = [{"role": "user", "content": "Tell me about owls. " * 8}, {"role": "assistant", "content": "Owls are quiet. " * 8}]
    history = [{"role": "system", "content": "Be kind."}] + turn * 20 + [{"role": "user", "content": "And bees?"}]
    ids = chat.prompt_ids(history, max_new_tokens=64)
    assert len(ids) <= chat.max_context - 64
    text = chat.tokenizer.decode(ids)
    assert "Be kind." in text and "<|assistant|>" in text[-16:] and "And bees?" in text
    assert chat.respond("right", history, Settings(temperature=0, max_new_tokens=8)) is not None


def test_settings_and_system_prompt(chat):
    with pytest.raises(ValueError, match="top_p = 0.0 must be in"):
        Settings(top_p=0.0, temperature=-1).check()
    assert chat.takes_system  # the toy template renders system messages
    assert chat.context(USER, Settings(system_prompt="Be brief."))[0] == {"role": "system", "content": "Be brief."}
    assert chat.context(USER, Settings(system_prompt="  ")) == USER


def _turn(left: str, right: str, left_prompt=USER, right_prompt=USER) -> dict:
    side = lambda name, prompt, text: {"model": name, "prompt": prompt, "response": text, "tokens": 3,  # noqa: E731
                                        "avg_logprob": {"left": -1.0, "right": -2.0}}
    return {"left": side("SFT", left_prompt, left), "right": side("aligned", right_prompt, right),
            "settings": Settings(seed=3).to_dict()}


def test_vote_rows_train(tiny_base, tmp_path):
    """Every kind of vote goes to one file; `qsimpo train` keeps left/right votes and counts ties as no_preference."""
    from qsimpo.data import build_dataset
    from qsimpo.train.model import load_tokenizer
    from qsimpo.train.recipe import train

    log = VoteLog(tmp_path / "votes.jsonl")
    second = [*USER, {"role": "assistant", "content": "Owls hoot."}, {"role": "user", "content": "And bees?"}]
    other = [*USER, {"role": "assistant", "content": "Go away."}, {"role": "user", "content": "And bees?"}]
    for vote, turn in [("left", _turn("Owls hoot.", "Go away.")), ("tie", _turn("A.", "B.")),
                       ("right", _turn("Bees?", "Bees buzz.", other, second)), ("both_bad", _turn("No.", "Nope."))]:
        log.append(vote_row(vote, turn))
    rows = [json.loads(line) for line in log.path.read_text().splitlines()]
    assert [r["vote"] for r in rows] == ["left", "tie", "right", "both_bad"]
    assert rows[0]["chosen"] == [{"role": "assistant", "content": "Owls hoot."}]
    assert rows[0]["rejected"] == [{"role": "assistant", "content": "Go away."}]
    assert rows[0]["settings"]["seed"] == 3 and rows[0]["left"]["avg_logprob"] == {"left": -1.0, "right": -2.0}
    assert "chosen" not in rows[1] and rows[1]["left"]["response"] == "A."
    assert rows[2]["prompt"] == second and rows[2]["left"]["prompt"] == other  # the winner's history is the prompt
    assert log.count() == {"left": 1, "right": 1, "tie": 1, "both_bad": 1}

    cfg = make_config(tiny_base, log.path, tmp_path / "run", "--train.max_steps", "1")
    assert cfg.data.on_bad_row == "error"  # ties are not bad rows: the strict default does not stop on them
    pairs, summary = build_dataset(cfg.data, load_tokenizer(cfg.model))
    assert summary.format == "conversational" and summary.kept == 2 and summary.dropped["no_preference"] == 2
    assert [p["text"]["chosen"] for p in pairs] == ["Owls hoot.", "Bees buzz."]
    assert "no_preference 2" in summary.line()
    run = train(cfg)  # and the recipe itself trains on the file
    assert (run.output_dir / "adapter_model.safetensors").is_file()


def test_vote_row_refuses_what_cannot_train():
    with pytest.raises(ValueError, match="identical"):
        vote_row("left", _turn("Same.", "Same."))
    with pytest.raises(ValueError, match="empty"):
        vote_row("right", _turn("", "Something."))
    with pytest.raises(ValueError, match="must be one of"):
        vote_row("maybe", _turn("A.", "B."))
    assert vote_row("tie", _turn("Same.", "Same."))["vote"] == "tie"


def test_vote_log_survives_a_torn_line(tmp_path):
    path = tmp_path / "votes.jsonl"
    path.write_text('{"prompt": "cut off by a cra')  # the previous process died mid-write
    VoteLog(path).append(vote_row("left", _turn("Yes.", "No.")))
    lines = path.read_text().splitlines()
    assert len(lines) == 2 and json.loads(lines[1])["vote"] == "left"


def test_demo_without_quickstart_says_what_to_run(tmp_path, monkeypatch, capsys):
    from qsimpo.cli import main

    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match="run `qsimpo quickstart`"):
        resolve_adapter(None, None)
    assert resolve_adapter("some/adapter", None) == ("some/adapter", None)
    assert main(["demo"]) == 2
    assert "qsimpo quickstart" in capsys.readouterr().err
