"""qsimpo.demo.sides and qsimpo.votes, called directly: streaming, adapter switching, seeds, log-probs, vote rows."""

from __future__ import annotations

import json
import threading

import pytest
import torch

from conftest import make_config
from qsimpo.demo.sides import Settings, SideBySide, resolve_adapter
from qsimpo.votes import VoteLog, vote_row

USER = [{"role": "user", "content": "Tell me about owls."}]


def make_adapter(base, out, seed: int):
    """A LoRA adapter on ``base`` whose B matrices are random (not the zero init), so it visibly changes outputs."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

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
    return SideBySide.load(str(tiny_adapters[0]), device="cpu")


def spy_generate(model, calls):
    """Record, at each generate() call, whether LoRA is disabled and which adapter is active."""
    original = model.generate

    def generate(*args, **kwargs):
        lora = next(m for m in model.modules() if hasattr(m, "lora_A"))
        calls.append((lora.disable_adapters, model.active_adapter))
        return original(*args, **kwargs)

    return generate


def test_stream_yields_growing_text(chat):
    texts = list(chat.stream("right", USER, Settings(temperature=0, max_new_tokens=24)))
    assert len(texts) >= 2 and texts[-1]
    assert all(b.startswith(a) and len(b) > len(a) for a, b in zip(texts, texts[1:]))
    assert chat.respond("right", USER, Settings(temperature=0, max_new_tokens=24)) == texts[-1]


def test_left_is_the_base_right_the_adapter(chat, monkeypatch):
    from qsimpo.generate import generate

    calls = []
    monkeypatch.setattr(chat.model, "generate", spy_generate(chat.model, calls))
    greedy = Settings(temperature=0, max_new_tokens=16)
    left, right = chat.respond("left", USER, greedy), chat.respond("right", USER, greedy)
    assert calls == [(True, "default"), (False, "default")]  # disabled for the SFT side, enabled for the aligned one
    monkeypatch.undo()
    assert not next(m for m in chat.model.modules() if hasattr(m, "lora_A")).disable_adapters  # restored
    # the same text as generating with the adapter off / on by hand
    with chat.model.disable_adapter():
        assert left == generate(chat.model, chat.tokenizer, USER, max_new_tokens=16)
    assert right == generate(chat.model, chat.tokenizer, USER, max_new_tokens=16)
    assert left != right


def test_same_seed_same_output(chat):
    sampled = Settings(temperature=1.0, top_p=0.95, max_new_tokens=16, seed=7)
    first = chat.respond("right", USER, sampled)
    chat.respond("left", USER, Settings(temperature=1.0, seed=123))  # RNG use in between changes nothing
    assert chat.respond("right", USER, sampled) == first
    others = {chat.respond("right", USER, Settings(temperature=1.0, top_p=0.95, max_new_tokens=16, seed=s)) for s in (8, 9, 10)}
    assert others - {first}, "different seeds should sample differently"


def test_lock_is_held_for_the_whole_generation(chat):
    stream = chat.stream("left", USER, Settings(temperature=0, max_new_tokens=24))
    next(stream)  # generation running, adapter disabled, lock held
    assert chat.lock.locked()
    got = []
    waiter = threading.Thread(target=lambda: got.append(chat.lock.acquire(timeout=0.2)))
    waiter.start()
    waiter.join()
    assert got == [False]  # the other side cannot switch adapters now
    stream.close()  # the reader leaves early: generation is stopped and joined, the adapter restored
    assert not chat.lock.locked()
    assert not [t for t in threading.enumerate() if t.name.startswith("qsimpo-generate")]
    assert not next(m for m in chat.model.modules() if hasattr(m, "lora_A")).disable_adapters


def test_compare_adapter_on_one_base(tiny_adapters, monkeypatch):
    from qsimpo.generate import generate

    chat2 = SideBySide.load(str(tiny_adapters[0]), compare_adapter=str(tiny_adapters[1]), device="cpu")
    assert set(chat2.model.peft_config) == {"default", "compare"}  # two adapters, one base
    calls = []
    monkeypatch.setattr(chat2.model, "generate", spy_generate(chat2.model, calls))
    greedy = Settings(temperature=0, max_new_tokens=12)
    left = chat2.respond("left", USER, greedy)
    chat2.respond("right", USER, greedy)
    assert calls == [(False, "compare"), (False, "default")]
    monkeypatch.undo()
    assert chat2.model.active_adapter == "default"
    chat2.model.set_adapter("compare")
    assert left == generate(chat2.model, chat2.tokenizer, USER, max_new_tokens=12)
    chat2.model.set_adapter("default")


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
    assert n == len(enc["chosen_ids"]) and response  # |y| includes the EOS training appends
    assert avg == pytest.approx(float(manual), abs=1e-4)
    stats = chat.stats(USER, response)
    assert stats["tokens"] == n and stats["avg_logprob"]["right"] == pytest.approx(avg, abs=1e-4)
    assert stats["avg_logprob"]["left"] != stats["avg_logprob"]["right"]  # the two models score differently


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
    from qsimpo.model import load_tokenizer
    from qsimpo.train import train

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
