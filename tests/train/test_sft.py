"""`qsimpo sft` on the tiny NF4 model: the assistant-only mask, packing that changes no number, the run folder."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT, make_config, trained_spans
from qsimpo.data.conversations import normalise_conversation, tokenize_conversation
from qsimpo.data.formats import _Bad
from qsimpo.train.sft import ConversationCollator, assistant_logps, pack_rows, sft


def conversations(rows, n=64):
    return [{"prompt": r["prompt"], "prompt_id": str(i),
             "messages": [{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["chosen"]},
                          {"role": "user", "content": "Say it again."}, {"role": "assistant", "content": r["rejected"]}]}
            for i, r in enumerate(rows[:n])]


@pytest.fixture(scope="module")
def sft_jsonl(tmp_path_factory, pref_rows):
    path = tmp_path_factory.mktemp("sft") / "chat.jsonl"
    path.write_text("".join(json.dumps(c) + "\n" for c in conversations(pref_rows)))
    return path


@pytest.fixture(scope="module")
def tok(tiny_base):
    from qsimpo.config import ModelConfig
    from qsimpo.train.model import load_tokenizer

    return load_tokenizer(ModelConfig(name_or_path=str(tiny_base)))


def test_mask_covers_every_assistant_turn_and_nothing_else(tok, pref_rows):
    conv = normalise_conversation(conversations(pref_rows, 1)[0])
    enc = tokenize_conversation(tok, conv, 1024)
    ids, mask = enc["input_ids"], enc["assistant_mask"]
    assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1
    # the whole sequence is the template's rendering of the conversation, each turn closed by EOS
    whole = tok.apply_chat_template(conv["messages"], tokenize=False)
    assert tok.decode(ids, skip_special_tokens=False).replace("</s>", "") == whole
    spans = trained_spans(ids, mask)
    r = pref_rows[0]
    assert [tok.decode(s, skip_special_tokens=False) for s in spans] == [f"{r['chosen']}\n</s>", f"{r['rejected']}\n</s>"]
    assert all(s[-1] == tok.eos_token_id for s in spans)  # each turn ends at the end-of-turn token


def test_prompt_completion_rows_and_bad_rows():
    got = normalise_conversation({"prompt": "Hi", "completion": "Hello!"})
    assert got["messages"] == [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]
    got = normalise_conversation({"q": [{"role": "user", "content": "Hi"}], "a": "Yo", "sys": "Be brief."},
                                 {"prompt": "q", "completion": "a", "system": "sys"})
    assert [m["role"] for m in got["messages"]] == ["system", "user", "assistant"]
    for row, reason in (({"messages": [{"role": "user", "content": "Hi"}]}, "no_assistant_turn"),
                        ({"text": "Hi"}, "missing_key"),
                        ({"messages": [{"role": "human", "content": "Hi"}]}, "unknown_role")):
        with pytest.raises(_Bad) as e:
            normalise_conversation(row)
        assert e.value.reason == reason


def test_pack_rows_best_fit_decreasing():
    lengths = [5, 3, 4, 2, 6, 9]
    rows = pack_rows(lengths, 8)
    assert sorted(sum(rows, [])) == list(range(6))  # every index once
    # 9 alone (over capacity), 6 + 2, 5 + 3 (the fullest row 3 fits), 4
    assert [sorted(lengths[i] for i in r) for r in rows] == [[9], [2, 6], [3, 5], [4]]
    many = [(i * 7919) % 1000 + 1 for i in range(20000)]  # fast at data-set size, and every row within capacity
    rows = pack_rows(many, 2048)
    assert sorted(sum(rows, [])) == list(range(20000))
    assert all(sum(many[i] for i in r) <= 2048 for r in rows) and len(rows) <= sum(many) / 2048 * 1.01 + 1


def test_packed_rows_hold_every_conversation_once(tok, pref_rows):
    from qsimpo.train.sft import PackedRows

    feats = [tokenize_conversation(tok, normalise_conversation(c), 256) for c in conversations(pref_rows, 24)]
    rows = PackedRows(feats, 256)
    assert len(rows) < len(feats)
    seen = [c["input_ids"] for i in range(len(rows)) for c in rows[i]["pack"]]
    assert sorted(map(tuple, seen)) == sorted(tuple(f["input_ids"]) for f in feats)
    assert all(sum(len(c["input_ids"]) for c in rows[i]["pack"]) <= 256 for i in range(len(rows)))
    assert f"24 conversations ({sum(len(f['input_ids']) for f in feats)} tokens) in {len(rows)} rows" in rows.summary(256)
    # two packed rows collate as two rows, each conversation scored as when the collator packs them itself
    batch = ConversationCollator(tok.pad_token_id, pack_to=256)([rows[0], rows[1]])
    assert batch["input_ids"].shape[0] == 2 and int(batch["num_convs"]) == len(rows[0]["pack"]) + len(rows[1]["pack"])
    own = ConversationCollator(tok.pad_token_id, pack_to=256)(rows[0]["pack"] + rows[1]["pack"])
    assert batch["score_labels"].sort().values.tolist() == own["score_labels"].sort().values.tolist()
    flex = ConversationCollator(tok.pad_token_id, pack_to=0)([rows[0], rows[1]])
    assert flex["input_ids"].shape[0] == 1 and len(flex["score_index"]) == len(batch["score_index"])


@pytest.mark.parametrize("head_chunk", [0, 16])
def test_packed_loss_equals_unpacked_loss(tiny_base, tok, pref_rows, head_chunk, one_thread):
    """Several conversations in one row (block-diagonal mask, positions restarting) score every token as alone."""
    from qsimpo.config import ModelConfig
    from qsimpo.train.model import load_base

    model = load_base(ModelConfig(name_or_path=str(tiny_base)), "cpu")
    feats = [tokenize_conversation(tok, normalise_conversation(c), 256) for c in conversations(pref_rows, 6)]
    plain = ConversationCollator(tok.pad_token_id)(feats)
    packed = ConversationCollator(tok.pad_token_id, pack_to=256)(feats)
    assert packed["input_ids"].shape[0] < plain["input_ids"].shape[0]  # packing did put conversations together
    with torch.no_grad():
        a = assistant_logps(model, plain, head_chunk)
        b = assistant_logps(model, packed, head_chunk)
    # the same tokens, in another order: compare per conversation, then the loss
    for i in range(len(feats)):
        x, y = a[plain["score_seq"] == i], b[packed["score_seq"] == i]
        assert len(x) == sum(feats[i]["assistant_mask"][1:]) and torch.allclose(x, y, atol=1e-5)
    assert torch.allclose(-a.mean(), -b.mean(), atol=1e-6)
    # one padding-free row (the FlexAttention layout) scores the same too
    one = ConversationCollator(tok.pad_token_id, pack_to=0)(feats)
    assert one["input_ids"].shape[0] == 1
    with torch.no_grad():
        assert torch.allclose(-assistant_logps(model, one, head_chunk).mean(), -a.mean(), atol=1e-6)


def test_turn_end_check_is_the_full_vocabulary_rank_at_each_turn_end(tiny_base, tok, pref_rows, one_thread):
    """The end-of-turn check `qsimpo sft` prints: log p and rank of the template's end token right after each
    assistant turn, adapter off and on, as full logits at every position give them by hand."""
    from qsimpo.data.tokenize import turn_end_token
    from qsimpo.train.model import add_lora, load_base
    from qsimpo.train.turn_end import head_row_norm, turn_end_check, turn_end_report

    cfg = make_config(tiny_base, "unused.jsonl", "unused")
    model = add_lora(load_base(cfg.model, "cpu"), cfg.lora, True, False, 0)
    torch.manual_seed(0)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.5)  # an adapter that moves the logits, so "sft" differs from "base"
    items = [tokenize_conversation(tok, normalise_conversation(c), 256) for c in conversations(pref_rows, 5)]
    end = turn_end_token(tok)  # this template has no end-of-turn token: the EOS training appends
    whole = tokenize_conversation(tok, normalise_conversation(conversations(pref_rows, 6)[5]), 256)
    cut = whole["input_ids"].index(end)  # as max_length cuts a turn before its end token: nothing to check there
    items.append({"input_ids": whole["input_ids"][:cut], "assistant_mask": whole["assistant_mask"][:cut]})
    other_stop = 7  # a second stop token, as a tokenizer's EOS is beside a template's end of turn
    got = turn_end_check(model, items, end, "cpu", stops=[other_stop])
    want = {"base": [], "sft": []}
    model.eval()
    for item in items:
        ids, mask = item["input_ids"], item["assistant_mask"]
        for side in want:
            with torch.no_grad(), (model.disable_adapter() if side == "base" else contextlib.nullcontext()):
                logp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].float(), -1)
            want[side] += [(float(logp[t - 1, end]), int((logp[t - 1] > logp[t - 1, end]).sum()),
                            int(logp[t - 1].argmax()) in (end, other_stop))
                           for t in range(1, len(ids)) if ids[t] == end and mask[t]]
    assert got["turns"] == len(want["sft"]) == 10  # two assistant turns in each of the five whole conversations
    for side, rows in want.items():
        ranks = sorted(r for _, r, _ in rows)
        assert got[side]["mean_logprob"] == pytest.approx(sum(lp for lp, _, _ in rows) / len(rows), abs=1e-4)
        assert got[side]["median_rank"] == ranks[len(ranks) // 2]
        assert got[side]["first"] == sum(r == 0 for r in ranks)
        assert got[side]["stops"] == sum(stop for _, _, stop in rows) >= got[side]["first"]
    assert got["base"] != got["sft"] and got["vocab"] == model.config.vocab_size
    # qsimpo sft reads the base before training and the SFT model after it: the same numbers as both at once
    split = turn_end_check(model, items, end, "cpu", stops=[other_stop], sides=("base",))
    assert set(split) == {"turns", "vocab", "base"}
    split.update(turn_end_check(model, items, end, "cpu", stops=[other_stop], sides=("sft",)))
    assert split == got
    norms = model.get_output_embeddings().weight.norm(dim=-1)
    assert head_row_norm(model, end) == pytest.approx(float(norms[end] / norms.median()), rel=1e-5)
    line = turn_end_report(got, tok.convert_ids_to_tokens(end))
    assert line.startswith(f"end of turn on 10 held-out assistant turns ({tok.convert_ids_to_tokens(end)} right after")
    assert f"greedy decoding would stop there in {got['sft']['stops']}/10" in line
    assert ("answers will run on" in line) == (got["sft"]["stops"] * 2 < 10)
    # the warning follows the stops, whichever stop token comes first
    assert "answers will run on" in turn_end_report({**got, "sft": {**got["sft"], "stops": 4}}, "</s>")
    assert "answers will run on" not in turn_end_report({**got, "sft": {**got["sft"], "stops": 5}}, "</s>")
    assert turn_end_check(model, items[-1:], end, "cpu") is None  # no turn end survived the cut


def test_the_warnings_say_what_to_do_when_the_base_never_learnt_the_turn_end():
    """gemma-3-270m's numbers (benchmarks/RESULTS.md): 260,362 of its 262,144 tokens score above <end_of_turn> where
    turns end, 27 above its <eos>; after the same LoRA SFT no greedy answer stopped with the gemma template (60
    steps), all did with zephyr (66 steps)."""
    from qsimpo.train.turn_end import turn_end_report, untrained_turn_end

    side = {"mean_logprob": -26.69, "median_rank": 260_362, "first": 0, "stops": 0}
    gemma = {"turns": 32, "vocab": 262_144, "base": side}
    warning = untrained_turn_end(gemma, 1.0, "<end_of_turn>", "<eos>")
    assert warning.startswith("<end_of_turn> looks untrained in this base: right after the 32 held-out answers 260,362 "
                              "of its 262,144 tokens score above it (median; log p -26.7). LoRA trains no embedding row")
    assert "the base's EOS (<eos>)" in warning and "--model.chat_template zephyr" in warning
    assert untrained_turn_end({**gemma, "base": {**side, "median_rank": 131_071}}, 1.0, "<end_of_turn>", "<eos>") is None
    assert untrained_turn_end({**gemma, "base": {**side, "median_rank": 131_072}}, 1.0, "<end_of_turn>", "<eos>")
    assert untrained_turn_end(gemma, 1.0, "<eos>", "<eos>") is None  # nothing else to end a turn with
    assert untrained_turn_end(None, None, "<end_of_turn>", "<eos>") is None  # nothing read: nothing to say
    # a row of the output layer that is all but zero is never trained, wherever the token ranks, held-out data or not
    top = {**gemma, "base": {**side, "median_rank": 100}}
    assert untrained_turn_end(top, 0.5, "<|eot_id|>", "<|end_of_text|>") is None
    assert "its row of the output layer is all but zero (0.0e+00 of a median row's norm); right after the 32" in \
        untrained_turn_end(top, 0.0, "<|eot_id|>", "<|end_of_text|>")
    alone = untrained_turn_end(None, 0.004, "<|eot_id|>", "<|end_of_text|>")
    assert alone.startswith("<|eot_id|> looks untrained in this base: its row of the output layer is all but zero "
                            "(4.0e-03 of a median row's norm). LoRA") and "right after" not in alone
    assert "zephyr" not in untrained_turn_end(None, 0.0, "<|eot_id|>", None)  # no EOS to end turns with instead
    after = {**gemma, "sft": {"mean_logprob": -8.64, "median_rank": 2, "first": 3, "stops": 0}}
    assert "instead of <end_of_turn>: --model.chat_template zephyr" in turn_end_report(after, "<end_of_turn>", "<eos>")
    assert "zephyr" not in turn_end_report(after, "<eos>", "<eos>")
    assert "zephyr" not in turn_end_report({**after, "sft": {**after["sft"], "stops": 16}}, "<end_of_turn>", "<eos>")


@pytest.fixture(scope="module", params=["bottom", "zero"])
def unlearnt_turn_end_base(request, tmp_path_factory, pref_rows):
    """The tiny base with Gemma's turn tokens in its vocabulary, whose <end_of_turn> row of the output layer is
    untrained in one of two ways: "bottom", it scores at the bottom wherever an answer ends, as gemma-3-270m's
    row does (it points away from the hidden states' common direction); "zero", it is all zeros, as Llama 3's
    template tokens' rows are reported to be in its base models (its logit 0 ranks wherever it happens to)."""
    from qsimpo.quickstart.toy import build_model, build_tokenizer, save_base

    tok = build_tokenizer([r[k] for r in pref_rows for k in ("prompt", "chosen", "rejected")], vocab_size=320)
    tok.add_special_tokens({"additional_special_tokens": ["<start_of_turn>", "<end_of_turn>"]})
    model = build_model(tok, hidden_size=64, num_layers=2, num_heads=4, max_positions=512)
    with torch.no_grad():
        hidden = torch.cat([model.model(input_ids=torch.tensor([tok(r["chosen"])["input_ids"]])).last_hidden_state[0]
                            for r in pref_rows[:16]]).mean(0)
        head = model.lm_head.weight
        head[tok.convert_tokens_to_ids("<end_of_turn>")] = (
            -hidden / hidden.norm() * head.norm(dim=1).mean() if request.param == "bottom" else 0.0)
    return request.param, save_base(model, tok, tmp_path_factory.mktemp("unlearnt") / "base")


def test_sft_warns_before_training_when_the_base_never_learnt_the_turn_end(unlearnt_turn_end_base, sft_jsonl, tmp_path,
                                                                           one_thread, capsys, monkeypatch):
    from qsimpo.train import sft as recipe

    how, unlearnt_turn_end_base = unlearnt_turn_end_base

    said = []
    real_train = recipe.SFTTrainer.train

    def train(self, *args, **kwargs):  # what a user has read when training starts
        said.append(capsys.readouterr().err)
        return real_train(self, *args, **kwargs)

    monkeypatch.setattr(recipe.SFTTrainer, "train", train)
    common = ("--train.max_steps", "1", "--data.max_length", "256", "--data.eval", "0.125")
    run = sft(make_config(unlearnt_turn_end_base, sft_jsonl, tmp_path / "gemma", "--model.chat_template", "gemma",
                          *common))
    assert "<end_of_turn> looks untrained in this base: " in said[0]
    assert "right after the 16 held-out answers" in said[0] and "of its 322 tokens score above it (median" in said[0]
    assert "the base's EOS (</s>)" in said[0]
    check = json.loads((run.output_dir / "qsimpo.json").read_text())["data"]["turn_end"]
    assert check["token"] == "<end_of_turn>" and check["vocab"] == 322
    if how == "bottom":
        assert check["base"]["median_rank"] >= 161 and check["head_row_norm"] > 0.5
        assert "all but zero" not in said[0]
    else:
        assert check["head_row_norm"] == 0.0
        assert check["base"]["median_rank"] * 2 < check["vocab"], "the zero row's rank alone should not warn here"
        assert "its row of the output layer is all but zero (0.0e+00 of a median row's norm)" in said[0]
    assert "zephyr" in capsys.readouterr().out  # one training step: the end check still finds no stop
    # what the warning says to do: the same base, each turn ended by its EOS (never warned of), is not warned of
    sft(make_config(unlearnt_turn_end_base, sft_jsonl, tmp_path / "zephyr", "--model.chat_template", "zephyr", *common))
    assert "looks untrained" not in said[1] + capsys.readouterr().err
    # no held-out conversations: nothing to rank, but a zero row needs no data
    sft(make_config(unlearnt_turn_end_base, sft_jsonl, tmp_path / "no-eval", "--model.chat_template", "gemma",
                    *common[:4]))
    assert ("its row of the output layer is all but zero" in said[2]) == (how == "zero")
    assert "right after" not in said[2]


@pytest.mark.usefixtures("processes")  # starts qsimpo as a process, as a user does: integration tier
@pytest.mark.parametrize("unlearnt_turn_end_base", ["bottom"], indirect=True)
def test_the_untrained_turn_end_warning_as_a_user_reads_it(unlearnt_turn_end_base, sft_jsonl, tmp_path):
    """`qsimpo sft` typed as a user types it: the warning is on the terminal before training, the run goes on."""
    _, base = unlearnt_turn_end_base
    config = tmp_path / "sft.yaml"
    config.write_text(f"model: {{name_or_path: {base}, chat_template: gemma}}\n"
                      f"data: {{path: {sft_jsonl}, max_length: 256, eval: 0.125}}\n"
                      f"train: {{output_dir: {tmp_path / 'o'}, max_steps: 1, progress: false}}\n")
    done = subprocess.run([sys.executable, "-m", "qsimpo", "sft", str(config)], stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, cwd=tmp_path,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"})  # the two streams in the order written
    out = done.stdout
    assert done.returncode == 0, out[-2000:]
    warned = out.index("<end_of_turn> looks untrained in this base: right after the 16 held-out answers")
    assert "--model.chat_template zephyr" in out[warned:].splitlines()[0]
    assert warned < out.index("'loss'") < out.index("end of turn on 16 held-out assistant turns") < out.index(
        "SFT adapter written to")
    assert "Traceback" not in out


def test_sft_run_folder(tiny_base, sft_jsonl, tmp_path, one_thread, capsys):
    from qsimpo.train.model import add_lora, load_base

    cfg = make_config(tiny_base, sft_jsonl, tmp_path / "sft", "--train.max_steps", "3", "--train.save_steps", "2",
                      "--data.max_length", "256", "--model.chat_template", "chatml", "--data.eval", "0.125")
    from peft import get_peft_model_state_dict

    init = get_peft_model_state_dict(add_lora(load_base(cfg.model, "cpu"), cfg.lora, True, False, cfg.train.seed))
    run = sft(cfg)
    out = run.output_dir
    files = {p.name for p in out.iterdir()}
    assert {"adapter_model.safetensors", "config.yaml", "qsimpo.json", "metrics.jsonl", "checkpoint-2", "checkpoint-3",
            "tokenizer_config.json"} <= files
    trained = load_file(out / "adapter_model.safetensors")
    assert trained.keys() == init.keys() and not [k for k in trained if torch.equal(trained[k], init[k])]
    meta = json.loads((out / "qsimpo.json").read_text())
    chatml = (ROOT / "qsimpo" / "templates" / "chatml.jinja").read_text()
    assert meta["kind"] == "sft" and meta["chat_template"] == chatml and meta["data"]["train"]["kept"] == 64
    # the end-of-turn check on the 8 held-out conversations, two turns each; <|im_end|> is no token of this tiny
    # tokenizer, so training ends each turn with its EOS, and the check reads that
    turn_end = meta["data"]["turn_end"]
    assert turn_end["token"] == "</s>" and turn_end["turns"] == 16
    assert set(turn_end) == {"token", "turns", "vocab", "head_row_norm", "base", "sft"}
    assert set(turn_end["sft"]) == {"mean_logprob", "median_rank", "first", "stops"}
    assert "end of turn on 16 held-out assistant turns (</s> right after each answer" in capsys.readouterr().out
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(out).chat_template == chatml  # written into the adapter's tokenizer files
    steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in steps if "loss" in r] == [1, 2, 3] and all(r["tokens"] > 0 for r in steps if "loss" in r)


@pytest.mark.usefixtures("processes")  # starts qsimpo as a process, as a user does: integration tier
def test_no_template_is_a_clear_error(tmp_path, pref_rows, sft_jsonl):
    from conftest import build_tiny_base

    base = build_tiny_base(tmp_path / "base", pref_rows[:8], num_layers=1)
    cfg = json.loads((base / "tokenizer_config.json").read_text())
    cfg.pop("chat_template", None)
    (base / "tokenizer_config.json").write_text(json.dumps(cfg))
    (base / "chat_template.jinja").unlink(missing_ok=True)
    config = tmp_path / "sft.yaml"
    config.write_text(f"model: {{name_or_path: {base}}}\ndata: {{path: {sft_jsonl}}}\ntrain: {{output_dir: {tmp_path / 'o'}}}\n")
    out = subprocess.run([sys.executable, "-m", "qsimpo", "sft", str(config)],
                         capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode != 0 and "Traceback" not in out.stderr
    assert "has no chat template" in out.stderr and "--model.chat_template" in out.stderr


def test_inspect_data_sft_shows_what_is_trained_and_how_it_packs(tiny_base, sft_jsonl, tok, pref_rows, tmp_path, capsys):
    import re

    from qsimpo.cli import main

    config = tmp_path / "sft.yaml"
    config.write_text(f"model: {{name_or_path: {tiny_base}}}\ndata: {{path: {sft_jsonl}, max_length: 256}}\n"
                      f"train: {{batch_size: 4}}\n")
    assert main(["inspect-data", str(config), "--sft", "--rows", "1"]) == 0
    out = capsys.readouterr().out
    enc = tokenize_conversation(tok, normalise_conversation(conversations(pref_rows, 1)[0]), 256)
    n, trained = map(int, re.search(r"(\d+) tokens, (\d+) trained ═══", out).groups())
    assert (n, trained) == (len(enc["input_ids"]), sum(enc["assistant_mask"]))
    # four runs: context, first answer, the next user turn, second answer; the answers are what is trained
    runs = re.findall(r"──── (trained \(assistant\)|masked-out \(context\)), (\d+) tokens ────\n(.*?)\n(?=──── |  boundary|═══|packing)",
                      out, re.S)
    assert [r[0].split()[0] for r in runs] == ["masked-out", "trained", "masked-out", "trained"]
    assert pref_rows[0]["chosen"] in runs[1][2] and pref_rows[0]["rejected"] in runs[3][2]
    assert pref_rows[0]["chosen"] not in runs[0][2] + runs[2][2] and "Say it again." in runs[2][2]
    # packing: 64 conversations in rows of up to 256 tokens, 4 rows a micro-batch; the whole-epoch line adds up
    lengths = [len(tokenize_conversation(tok, normalise_conversation(c), 256)["input_ids"]) for c in conversations(pref_rows)]
    rows = pack_rows(lengths, 256)
    assert f"64 conversations ({sum(lengths)} tokens) packed into {len(rows)} rows of up to 256 tokens" in out
    assert f"row 1: {sum(lengths[i] for i in rows[0])} = " in out and "a micro-batch is 4 rows" in out
    assert f"positions laid out for {sum(lengths)} tokens" in out
    assert f"one conversation per padded row (4 a micro-batch, file order): {sum(4 * max(lengths[i:i + 4]) for i in range(0, 64, 4))}" in out
    assert "64 kept" in out and "conversations cut to data.max_length" in out and "responses truncated" not in out


def test_plan_sft_sizes_conversations(tiny_base, sft_jsonl, tmp_path, capsys):
    from transformers import LlamaConfig

    from qsimpo.cli import main
    from qsimpo.config import load_config
    from qsimpo.train.plan import estimate, shape_of, worst_sft_batch

    cfg = load_config(None, ["--model.name_or_path", "m", "--data.path", "d", "--data.max_length", "100",
                             "--train.batch_size", "3"])
    lengths = [(90, 40), (30, 10), (60, 50), (20, 5), (10, 9)]  # (tokens, assistant tokens)
    # the data packs best-fit decreasing into rows [90 + 10], [60 + 30], [20]: the 3 fullest, padded to 100
    packed = worst_sft_batch(cfg, lengths)
    assert (packed.tokens, packed.mask_cells, packed.scored) == (3 * 100, 3 * 100**2, 49 + 60 + 5)
    plain = worst_sft_batch(load_config(None, ["--model.name_or_path", "m", "--data.path", "d", "--train.batch_size", "3",
                                               "--train.packing", "none"]), lengths)
    assert (plain.tokens, plain.mask_cells) == (3 * 90, 0)
    assert worst_sft_batch(cfg).tokens == 3 * 100  # every row filled to max_length
    shape = shape_of(LlamaConfig(hidden_size=64, num_hidden_layers=2, intermediate_size=128, vocab_size=1000,
                                 num_attention_heads=4, num_key_value_heads=2))
    fewer = worst_sft_batch(cfg, lengths[1:])  # rows [60 + 30], [20 + 10]: 2 rows
    assert sum(estimate(cfg, shape, fewer).values()) < sum(estimate(cfg, shape, worst_sft_batch(cfg)).values())

    config = tmp_path / "sft.yaml"
    config.write_text(f"model: {{name_or_path: {tiny_base}}}\ndata: {{path: {sft_jsonl}, max_length: 256}}\n")
    assert main(["plan", str(config), "--sft", "--gpu-memory", "1GiB"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("qsimpo sft memory plan") and "every conversation at max_length 256" in out
    assert "qsimpo eval" not in out and out.rstrip().endswith("fits")
    assert main(["plan", str(config), "--sft", "--gpu-memory", "1GiB", "--data"]) == 0
    out = capsys.readouterr().out
    assert "64 kept" in out and "the fullest of the rows 64 conversations in the data pack into" in out


def test_plan_counts_the_frozen_sft_adapter(tmp_path):
    from transformers import LlamaConfig

    from qsimpo.config import load_config
    from qsimpo.train.plan import estimate, shape_of

    (tmp_path / "adapter_config.json").write_text(json.dumps({"r": 8}))
    shape = shape_of(LlamaConfig(hidden_size=64, num_hidden_layers=2, intermediate_size=128, vocab_size=1000,
                                 num_attention_heads=4, num_key_value_heads=2))
    base = ["--model.name_or_path", "m", "--data.path", "d", "--lora.r", "16"]
    plain = estimate(load_config(None, base), shape)
    stacked = estimate(load_config(None, base + ["--model.sft_adapter", str(tmp_path)]), shape)
    # r 8 (the SFT adapter's own rank), fp32 weights only: a quarter of 16 B/param at half the rank
    assert stacked["SFT adapter (frozen)"] == pytest.approx(plain["LoRA weights + grads + AdamW"] / 4 / 2)
    assert "SFT adapter (frozen)" not in plain


def test_a_step_averages_its_tokens_however_it_is_split(tiny_base, pref_rows, tmp_path, one_thread):
    """The SFT loss is the mean over every assistant token of an optimizer step: 8 conversations a step as one
    micro-batch of 8 or four of 2 (gradient accumulation) give the same losses, gradient norms and adapter; a mean
    per micro-batch would weigh a short micro-batch's tokens above a long one's."""
    data = tmp_path / "mixed.jsonl"  # short one-turn conversations and long three-turn ones: micro-batches of unequal size
    data.write_text("".join(json.dumps({"messages": [{"role": "user", "content": r["prompt"]},
                                                     {"role": "assistant", "content": r["chosen"]}]
                                        + ([{"role": "user", "content": "More, please."},
                                            {"role": "assistant", "content": r["rejected"] + " " + r["chosen"]}] * 2
                                           if i % 2 else [])}) + "\n" for i, r in enumerate(pref_rows)))
    common = ("--data.max_rows", "32", "--train.max_steps", "2", "--train.save_steps", "1000", "--data.max_length", "256",
              "--train.packing", "none", "--train.head_chunk_size", "0")
    runs = {}
    for name, batch, accumulation in (("one", "8", "1"), ("four", "2", "4")):
        runs[name] = sft(make_config(tiny_base, data, tmp_path / name, *common, "--train.batch_size", batch,
                                     "--train.gradient_accumulation_steps", accumulation)).output_dir
    logged = {k: [json.loads(r) for r in (v / "metrics.jsonl").read_text().splitlines() if '"loss"' in r]
              for k, v in runs.items()}
    assert [r["step"] for r in logged["one"]] == [r["step"] for r in logged["four"]] == [1, 2]
    for a, b in zip(logged["one"], logged["four"]):
        for key in ("loss", "grad_norm"):
            assert a[key] == pytest.approx(b[key], rel=2e-5), (key, a, b)
    one, four = (load_file(v / "adapter_model.safetensors") for v in runs.values())
    for k in one:
        torch.testing.assert_close(one[k], four[k], rtol=1e-4, atol=1e-6, msg=k)
