"""The paper's Base setting as a user types it (docs/sft.md), each step a subprocess in the user's own folder, from a
base model that has never chatted (no chat template):

    qsimpo sft sft.yaml                                   refused: the base has no template and none is named
    qsimpo sft sft.yaml --model.chat_template chatml      the SFT adapter, chatml kept in it
    qsimpo train simpo.yaml                               refused: conversations need a template
    qsimpo train simpo.yaml --model.sft_adapter adapters/sft
    qsimpo eval adapters/simpo --generate 2               the SFT side is the SFT model (base + SFT adapter)
    qsimpo demo --adapter adapters/simpo --port P        the left column answers as base + SFT adapter, the right as
                                                          the aligned stack (asked through the served app's API)
    qsimpo merge adapters/simpo --out merged              the aligned model, chatml in its tokenizer
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import build_tiny_base, free_port, demo_url, message_text

pytestmark = pytest.mark.usefixtures("processes")  # every test here starts processes: integration tier


def qsimpo(home, *args, expect=0):
    done = subprocess.run([sys.executable, "-m", "qsimpo", *args], cwd=home, capture_output=True, text=True,
                          timeout=1800, stdin=subprocess.DEVNULL)
    out = done.stdout + done.stderr
    assert done.returncode == expect, f"qsimpo {' '.join(args)}: exit {done.returncode}\n{out[-4000:]}"
    assert "Traceback" not in out, out[-4000:]
    return out


def test_sft_train_eval_demo_merge_from_a_base_without_template(tmp_path, pref_rows):
    from qsimpo.templates import template_text

    home = tmp_path / "project"
    home.mkdir()
    base = build_tiny_base(home / "base", pref_rows)
    tok_cfg = json.loads((base / "tokenizer_config.json").read_text())
    tok_cfg.pop("chat_template", None)
    (base / "tokenizer_config.json").write_text(json.dumps(tok_cfg))
    (base / "chat_template.jinja").unlink(missing_ok=True)
    chat = [{"messages": [{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["chosen"]}]}
            for r in pref_rows]
    pairs = [{"prompt": [{"role": "user", "content": r["prompt"]}], "chosen": [{"role": "assistant", "content": r["chosen"]}],
              "rejected": [{"role": "assistant", "content": r["rejected"]}]} for r in pref_rows]
    (home / "chat.jsonl").write_text("".join(json.dumps(c) + "\n" for c in chat))
    (home / "pairs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))
    small = ("lora: {r: 4, alpha: 8, dropout: 0.0}\n"
             "train: {batch_size: 2, gradient_accumulation_steps: 1, learning_rate: 3.0e-2, warmup_ratio: 0, max_steps: 3, "
             "progress: false, output_dir: OUT}\n")
    # sft packs several conversations into each 256-token row: a gentler rate than SimPO's 3e-2 keeps the tiny
    # model answering (at 3e-2 both columns gave the same empty answer, and the comparison below meant nothing)
    (home / "sft.yaml").write_text("model: {name_or_path: base}\ndata: {path: chat.jsonl, max_length: 256}\n"
                                   + small.replace("OUT", "adapters/sft").replace("3.0e-2", "1.0e-2"))
    (home / "simpo.yaml").write_text("model: {name_or_path: base}\ndata: {path: pairs.jsonl, max_length: 256, eval: 0.1}\n"
                                     + small.replace("OUT", "adapters/simpo").replace("3.0e-2", "1.0e-2"))

    out = qsimpo(home, "sft", "sft.yaml", expect=2)
    assert "has no chat template" in out and "--model.chat_template" in out
    out = qsimpo(home, "sft", "sft.yaml", "--model.chat_template", "chatml")
    assert "--model.sft_adapter adapters/sft" in out  # the next step is said
    out = qsimpo(home, "train", "simpo.yaml", expect=2)
    assert "has no chat template" in out
    qsimpo(home, "train", "simpo.yaml", "--model.sft_adapter", "adapters/sft")
    qsimpo(home, "eval", "adapters/simpo", "--generate", "2", "--max-new-tokens", "8")

    # eval's SFT side is base + SFT adapter, on prompts rendered with chatml: score the held-out pairs so by hand
    from peft import PeftModel

    from qsimpo.config import ModelConfig
    from qsimpo.data import build_dataset, split_eval
    from qsimpo.run_dir import read_config
    from qsimpo.response_logps import score_pairs
    from qsimpo.train.model import load_base, load_tokenizer

    result = json.loads((home / "adapters" / "simpo" / "eval" / "eval.json").read_text())
    cfg = read_config(home / "adapters" / "simpo")
    tok = load_tokenizer(ModelConfig(name_or_path=str(base), chat_template="chatml"))
    assert tok.chat_template == template_text("chatml")
    pairs, _ = build_dataset(cfg.data.__class__(**{**cfg.data.__dict__, "path": str(home / "pairs.jsonl")}), tok)
    _, held = split_eval(pairs, 0.1, cfg.train.seed)
    sft_model = PeftModel.from_pretrained(load_base(ModelConfig(name_or_path=str(base)), "cpu"), str(home / "adapters" / "sft"))
    want = score_pairs(sft_model, held, tok.pad_token_id)
    assert result["per_pair"]["sft_logp_chosen"] == pytest.approx(want.chosen.tolist(), abs=1e-5)
    assert result["per_pair"]["aligned_logp_chosen"] != pytest.approx(want.chosen.tolist(), abs=1e-5)

    # the demo as a user starts it; greedy answers of each column against the models loaded here by hand
    from qsimpo.generate import answer
    from qsimpo.train.model import load_trained

    question = pref_rows[0]["prompt"]
    port = free_port()
    log = tmp_path / "demo.log"
    with log.open("w") as sink:
        server = subprocess.Popen([sys.executable, "-m", "qsimpo", "demo", "--adapter", "adapters/simpo", "--port", str(port)], cwd=home,
                                  stdout=sink, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        url = demo_url(server, log)
        from gradio_client import Client

        client = Client(url, verbose=False, analytics_enabled=False, download_files=False)
        _, left, right, *_ = client.predict(question, "", 0.0, 1.0, 8, 0, api_name="/send")
    finally:
        server.terminate()
        server.wait(timeout=60)
    shown_sft, shown_aligned = message_text(left[-1]), message_text(right[-1])
    base_alone = load_base(ModelConfig(name_or_path=str(base)), "cpu")
    assert shown_sft and shown_aligned, (shown_sft, shown_aligned)  # both columns answer: the comparison below means something
    assert shown_sft == answer(sft_model, tok, question, max_new_tokens=8)  # base + SFT adapter, chatml
    assert shown_sft != answer(base_alone, tok, question, max_new_tokens=8)  # not the base the SFT started from
    aligned, aligned_tok = load_trained(str(home / "adapters" / "simpo"), base=str(base))  # recorded as "base": home-relative
    assert shown_aligned == answer(aligned, aligned_tok, question, max_new_tokens=8) != shown_sft

    qsimpo(home, "merge", "adapters/simpo", "--out", "merged")
    merged = json.loads((home / "merged" / "tokenizer_config.json").read_text())
    template = merged.get("chat_template") or (home / "merged" / "chat_template.jinja").read_text()
    assert template == template_text("chatml")
