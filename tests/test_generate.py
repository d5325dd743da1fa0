"""qsimpo.generate, the one way qsimpo answers a prompt, seen through every command that answers.

(a) On models whose turn ends with a token that is not the tokenizer's EOS (a Gemma-style template, whose
    turns end in <end_of_turn>, and a Llama-3-style one, <|eot_id|> with EOS <|end_of_text|>), eval, the
    demo, pairs, the quickstart and merge's and the GGUF export's checks all stop at the end of the turn; the
    tiny random models are made to say three tokens, then the end of turn, and never their EOS.
(b) For every data format, with and without a chat template, with and without a system prompt, the prompt
    ids each command feeds the model are training's prompt ids for that row, token for token.
(c) The demo and pairs draw the same answer from the same prompt, seed, temperature and top-p.
Also: training ends a response once, at the template's end of turn (no newline, no EOS after it).
"""

from __future__ import annotations

import pytest
import torch

import qsimpo.generate as G
from qsimpo.quickstart.toy import build_model, build_tokenizer

GEMMA = ("{{ bos_token }}{% for m in messages %}<start_of_turn>{{ 'model' if m['role'] == 'assistant' else m['role'] }}\n"
         "{{ m['content'] | trim }}<end_of_turn>\n{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}")
LLAMA3 = ("{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
          "{{ m['content'] | trim }}<|eot_id|>{% endfor %}"
          "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")
TEXTS = ["Tell me about owls.", "Owls are quiet birds that hunt at night.", "What is rain?", "Rain is water.",
         "Hi", "Hello there, how can I help?", "Be brief.", "Yes.", "No."] * 4
USER = [{"role": "user", "content": "Tell me about owls."}]
SAID = 3  # the forced answers' tokens before the end of turn


def chat_tokenizer(style: str):
    """The toy BPE tokenizer with a Gemma-style or Llama-3-style chat template and its special tokens."""
    tok = build_tokenizer(TEXTS, vocab_size=300)
    if style == "gemma":
        tok.add_special_tokens({"additional_special_tokens": ["<start_of_turn>", "<end_of_turn>"]})
        tok.chat_template, turn_end = GEMMA, "<end_of_turn>"
    elif style == "llama3":
        tok.add_special_tokens({"additional_special_tokens": ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
                                                              "<|end_of_text|>"]})
        tok.eos_token, tok.chat_template, turn_end = "<|end_of_text|>", LLAMA3, "<|eot_id|>"
    else:  # the toy template, whose turns end in a newline: EOS ends them
        return tok, tok.eos_token_id
    return tok, tok.convert_tokens_to_ids(turn_end)


class SaysThreeTokens:
    """Forward hook on the head: after a prompt, the model says ``said`` ordinary tokens, then the end of turn, and
    never its EOS. Only the last position's logits change (the next token), so scoring a whole sequence is untouched."""

    def __init__(self, model, tokenizer, end: int, said: int = SAID):
        self.end, self.said, self.step = end, said, 0
        self.specials = sorted(set(tokenizer.all_special_ids) | {end})
        model.get_input_embeddings().register_forward_hook(self.read)
        model.get_output_embeddings().register_forward_hook(self)

    def read(self, module, inputs, output):
        # a prompt (a forward over several tokens) restarts the count; the head may see its last position only
        self.step = -1 if inputs[0].shape[1] > 1 else self.step

    def __call__(self, module, inputs, logits):
        if logits.dim() != 3:  # qsimpo.response_logps's response-only head: scoring, not generating
            return logits
        self.step += 1
        logits = logits.clone()
        logits[:, -1, self.specials] = float("-inf")
        if self.step == self.said:
            logits[:, -1, self.end] = 1e4
        return logits


@pytest.fixture(scope="module", params=["gemma", "llama3"])
def turn_model(request):
    """(a PeftModel with an untrained LoRA "default" adapter over a forced tiny model, its tokenizer, the turn end)."""
    from peft import LoraConfig, get_peft_model

    tok, end = chat_tokenizer(request.param)
    assert end != tok.eos_token_id
    model = build_model(tok, hidden_size=32, num_layers=1, num_heads=2, max_positions=256)
    hook = SaysThreeTokens(model, tok, end)
    peft = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj", "v_proj"])).eval()
    peft.says = hook
    return peft, tok, end


def test_the_stop_rule(turn_model):
    from transformers import GenerationConfig

    from qsimpo.generate import stop_ids

    _, tok, end = turn_model
    assert stop_ids(tok) == sorted({tok.eos_token_id, end})
    assert stop_ids(tok, GenerationConfig(eos_token_id=[7, 8])) == sorted({7, 8, tok.eos_token_id, end})
    assert stop_ids(tok, GenerationConfig(eos_token_id=9)) == sorted({9, tok.eos_token_id, end})


@torch.no_grad()
def said(model, tok, prompt) -> str:
    """What the model says before its turn ends, the plain way: transformers' greedy generate of SAID tokens."""
    from qsimpo.generate import prompt_ids

    ids = torch.tensor([prompt if isinstance(prompt, list) and isinstance(prompt[0], int) else prompt_ids(tok, prompt)])
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=SAID, do_sample=False,
                         temperature=None, top_p=None, top_k=None, pad_token_id=tok.pad_token_id)
    return tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()


def test_eval_stops_at_the_turn_end(turn_model):
    from qsimpo.data import tokenize_pair
    from qsimpo.eval.evaluate import generations

    model, tok, _ = turn_model
    pairs = [{**tokenize_pair(tok, {"prompt": q, "chosen": "Yes.", "rejected": "No."}, 256, 128), "location": f"q{i}",
              "text": {"prompt": q, "format": "explicit"}} for i, q in enumerate(["Tell me about owls.", "What is rain?"])]
    gen = generations(model, tok, pairs, None, 16, 0.0, 1.0, seed=0)
    for s, p in zip(gen["samples"], pairs):
        assert s["sft"] == s["aligned"] == said(model, tok, p["prompt_ids"])  # (the untrained adapter changes nothing)
        assert s["sft_tokens"] == s["aligned_tokens"] == SAID  # the tokens generated, the end of turn not counted
    assert gen["aligned"]["unfinished_rate"] == 0


def test_the_demo_stops_at_the_turn_end(turn_model):
    from qsimpo.demo.sides import BASE, Settings, Side, SideBySide

    model, tok, _ = turn_model
    chat = SideBySide(model, tok, {"left": Side("SFT", "SFT", BASE), "right": Side("aligned", "aligned", "default")})
    answers = list(chat.stream({"left": USER, "right": USER}, Settings(temperature=0, max_new_tokens=16)))[-1]
    stats = chat.stats({"left": USER, "right": USER}, answers)
    for side in ("left", "right"):
        assert answers[side] == said(model, tok, USER)
        assert stats[side]["tokens"] == len(tok(answers[side], add_special_tokens=False).input_ids)  # no end of turn


def test_pairs_stop_at_the_turn_end(turn_model):
    from qsimpo.pairs.sample import sample

    model, tok, _ = turn_model
    answers, tokens, cut = sample(model, tok, [USER, [{"role": "user", "content": "What is rain?"}]], ["a", "b"], 3, 1.0,
                                  1.0, 16, seed=0)
    assert cut == 0 and tokens == 2 * 3 * SAID and all(len(a) == 3 for a in answers)


def test_the_quickstarts_answers_stop_at_the_turn_end(turn_model):
    from qsimpo.data import tokenize_pair
    from qsimpo.quickstart.tiny import probe

    model, tok, _ = turn_model
    pairs = [tokenize_pair(tok, {"prompt": "Hi", "chosen": "Yes.", "rejected": "No."}, 256, 128)]
    for g in probe(model, tok, pairs, ["Tell me about owls.", "Hi"], beta=2.0)["generations"]:
        assert g["response"] == said(model, tok, g["prompt"])


def test_merge_and_gguf_checks_stop_at_the_turn_end(turn_model):
    from qsimpo.export.gguf_check import _greedy
    from qsimpo.export.verify import BUILTIN_PROMPTS, _builtin_probes
    from qsimpo.generate import prompt_ids

    model, tok, end = turn_model
    for prompt, probe in zip(BUILTIN_PROMPTS, _builtin_probes(model, tok, 3, max_new_tokens=16)):
        ids = prompt_ids(tok, prompt)
        assert probe[:len(ids)] == ids and len(probe) == len(ids) + SAID + 1 and probe[-1] == end
    assert _greedy(model, tok, "Tell me about owls.") == said(model, tok, "Tell me about owls.")


# ------------------------------------------------------------------------------------- training's end of turn
@pytest.mark.parametrize("style", ["gemma", "llama3", "toy"])
def test_a_response_ends_once_where_the_turn_ends(style):
    from qsimpo.data import tokenize_pair, turn_end_id

    tok, end = chat_tokenizer(style)
    assert turn_end_id(tok) == (None if style == "toy" else end)
    enc = tokenize_pair(tok, {"prompt": "Hi", "chosen": "Yes.", "rejected": "No."}, 256, 128)
    for key, text in (("chosen_ids", "Yes."), ("rejected_ids", "No.")):
        ids = enc[key]
        assert ids[-1] == end and ids.count(end) == 1 and tok.eos_token_id not in ids[:-1]  # no newline, no EOS after
        assert tok.decode(ids, skip_special_tokens=True).strip() == text


# ------------------------------------------------------------------------------------- (b) prompts, as trained
HH = {"chosen": "\n\nHuman: Tell me about owls.\n\nAssistant: Quiet.\n\nHuman: And rain?\n\nAssistant: Water.",
      "rejected": "\n\nHuman: Tell me about owls.\n\nAssistant: Quiet.\n\nHuman: And rain?\n\nAssistant: No."}
ROWS = {"implicit": HH,
        "explicit": {"prompt": "Tell me about owls.", "chosen": "Yes.", "rejected": "No."},
        "conversational": {"chosen": USER + [{"role": "assistant", "content": "Yes."}],
                           "rejected": USER + [{"role": "assistant", "content": "No."}]}}


@pytest.mark.parametrize("fmt", list(ROWS))
@pytest.mark.parametrize("template", ["toy", "gemma", "none"])
@pytest.mark.parametrize("system", [None, "Be brief."])
def test_every_command_asks_what_training_showed(fmt, template, system, tmp_path, monkeypatch):
    import json

    from qsimpo.config import DataConfig
    from qsimpo.data import prompt_messages, read_source, tokenize_pair
    from qsimpo.data.formats import normalise_prompt, normalise_row
    from qsimpo.eval.judged import prompt_items
    from qsimpo.demo.sides import Settings, SideBySide, template_takes_system
    from qsimpo.pairs import sample
    from qsimpo.pairs.write import pair_row

    tok, _ = chat_tokenizer("gemma" if template == "gemma" else "toy")
    if template == "none":
        tok.chat_template = None
    row = ROWS[fmt]
    triple = normalise_row(row, fmt)
    trained = tokenize_pair(tok, triple, 512, 256, system)["prompt_ids"]

    # eval (greedy answers come from tokenize_pair itself) and eval --scorer on a source of prompts
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps(row) + "\n")
    dc = DataConfig(path=str(prompts), system_prompt=system, max_prompt_length=256)
    items, _ = prompt_items(dc, read_source(dc, prompts=True), tok)
    assert items[0]["prompt_ids"] == trained
    # the quickstart's and merge's prompts: a row's prompt, as the row is
    assert G.prompt_ids(tok, {"prompt": triple["prompt"], "format": fmt}, system) == trained
    if fmt == "explicit":
        assert G.prompt_ids(tok, row["prompt"], system) == trained

    # pairs: the prompt it answers is the prompt of the row it writes, as training will read that row
    messages = prompt_messages(normalise_prompt(row, fmt))
    fed = []
    monkeypatch.setattr(G, "generate", lambda model, tok_, rows, *a, **k: fed.extend(rows) or
                        [G.Answer([], "x", 0) for _ in rows])
    sample.sample(None, tok, [messages], ["k"], 1, 1.0, 1.0, 8, 0, system_prompt=system)
    written, _ = pair_row(messages, ["Yes.", "No."], [1.0, 0.0])
    assert fed == [tokenize_pair(tok, normalise_row(written, "conversational"), 512, 256, system)["prompt_ids"]]
    if template != "none":  # without a template a conversation renders as "role: content" lines, a string raw
        assert fed == [trained]

    # the demo: a conversation, after the system prompt it was trained with (a template renders it)
    chat = SideBySide.__new__(SideBySide)
    chat.tokenizer, chat.max_context, chat.takes_system = tok, 512, template_takes_system(tok)
    conversation = chat.context(messages, Settings(system_prompt=system or ""))
    assert chat.prompt_ids(conversation, 16) == tokenize_pair(tok, normalise_row(written, "conversational"), 512, 256,
                                                              system)["prompt_ids"]


# ------------------------------------------------------------------------------------- (c) one sampler
def test_the_demo_and_pairs_draw_the_same_answer(turn_model, one_thread):
    from qsimpo.demo.sides import BASE, Settings, Side, SideBySide
    from qsimpo.pairs.sample import sample, sample_seed

    model, tok, _ = turn_model
    model.says.said = 12  # twelve sampled tokens before the end of turn
    try:
        chat = SideBySide(model, tok, {"left": Side("SFT", "SFT", BASE), "right": Side("aligned", "aligned", "default")})
        for temperature, top_p in ((1.0, 1.0), (0.8, 0.9)):
            (drawn,), _, _ = sample(model, tok, [USER], ["owls"], 1, temperature, top_p, 16, seed=5)
            said = chat.respond("right", USER, Settings(temperature=temperature, top_p=top_p, max_new_tokens=16,
                                                        seed=sample_seed(5, "owls", 0)))
            assert said == drawn[0] and said
        other = chat.respond("right", USER, Settings(temperature=1.0, top_p=1.0, max_new_tokens=16, seed=1))
        assert other != said  # the seed matters: a real comparison
    finally:
        model.says.said = SAID


def test_batched_greedy_answers_equal_one_at_a_time(tiny_base, one_thread):
    """The quickstart answers its questions in one left-padded batch: each answer is the one it gets alone (the
    padding is masked out; prompts of different lengths, so rows carry different padding)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_base).eval()
    tok = AutoTokenizer.from_pretrained(tiny_base)
    prompts = ["Tell me about owls.", "What do you know about the old quiet rivers in the north?", "Describe bees.",
               [{"role": "user", "content": "Can you explain maps?"}]]
    together = G.greedy_answers(model, tok, prompts, 24, "Be brief.")
    alone = [G.answer(model, tok, p, 24, "Be brief.") for p in prompts]
    assert together == alone and len(set(map(len, (G.prompt_ids(tok, p, "Be brief.") for p in prompts)))) > 1
    assert all(together)
