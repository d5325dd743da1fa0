"""`qsimpo eval`: did alignment work, and did it exploit length?

One base model in memory, scored twice on held-out preference pairs: adapter off (the SFT
model) and adapter on (the aligned model). Writes ``eval.json`` (every number, see the README's
"Evaluate" section) and ``report.html`` (training curves, margin histogram, length scatter).

    qsimpo eval adapters/quickstart/adapter                      # data: the run's data.eval
    qsimpo eval adapters/run --data heldout.jsonl --generate 20 --judge OpenAssistant/reward-model-deberta-v3-large-v2

The pairs are tokenized with the run's own data settings (config.yaml), so the numbers are the
ones the trainer logs as ``eval_*`` in metrics.jsonl, computed the same way (qsimpo.eval.metrics).
"""

from __future__ import annotations

import dataclasses
import json
import platform
import time
from pathlib import Path

import torch

from qsimpo import __version__
from qsimpo.eval import metrics as M
from qsimpo.errors import UsageError
from qsimpo.data import DataError, looks_local, read_source, split_eval, tokenize_source
from qsimpo.scoring import PairScores, score_pairs

SCHEMA_VERSION = 1


class EvalError(UsageError):
    """A problem with what ``qsimpo eval`` was asked to do; the message says what to pass instead."""


# ------------------------------------------------------------------------------------- the run's record
def simpo_settings(meta: dict, cfg, beta: float | None, gamma: float | None) -> dict:
    """β, γ and the loss options the run trained with: --beta/--gamma, else qsimpo.json, else config.yaml, else defaults."""
    from qsimpo.config import SimPOConfig

    if meta.get("simpo"):
        s, source = dict(meta["simpo"]), "qsimpo.json"
        known = {k: s[k] for k in ("beta", "gamma", "gamma_beta_ratio") if k in s}
        s["gamma"] = s.get("gamma_resolved", SimPOConfig(**known).resolved_gamma)
    elif cfg is not None:
        s, source = {**dataclasses.asdict(cfg.simpo), "gamma": cfg.simpo.resolved_gamma}, "config.yaml"
    else:
        d = SimPOConfig()
        s, source = {**dataclasses.asdict(d), "gamma": d.resolved_gamma}, "defaults"
    if beta is not None or gamma is not None:
        source = "command line"
    out = {"beta": float(beta if beta is not None else s["beta"]), "gamma": float(gamma if gamma is not None else s["gamma"]),
           "loss_type": s.get("loss_type", "sigmoid"), "label_smoothing": float(s.get("label_smoothing", 0.0)),
           "sft_weight": float(s.get("sft_weight", 0.0)), "source": source}
    return out


def load(adapter: str, base: str):
    from qsimpo.train.model import load_trained

    try:
        return load_trained(adapter, base=base)
    except (OSError, ValueError) as e:  # a Hub id that does not resolve, offline without a cached copy, no adapter files
        raise EvalError(f"could not load the adapter {adapter} on the base {base}: {e}\n"
                        "pass the base the adapter was trained on with --base PATH_OR_HUB_ID") from None


# ---------------------------------------------------------------------------------------------- data
def resolve_data(data: str | None, cfg, adapter: str) -> tuple[str, str | float]:
    """("path", where) or ("fraction", f): --data, else the run's own data.eval. Checked before any model loads."""
    label = "--data"
    if data is None:
        held = cfg.data.eval if cfg is not None else None
        if held is None:
            raise EvalError(f"--data is required: {adapter} has no config.yaml with data.eval; pass held-out pairs, e.g. "
                            "--data heldout.jsonl (a JSONL/JSON/parquet file, a datasets folder or a Hub dataset id)")
        if cfg.data.eval_fraction is not None:
            return "fraction", cfg.data.eval_fraction
        data, label = held, f"data.eval in {adapter}/config.yaml"
    if looks_local(data) and not Path(data).expanduser().exists():
        raise EvalError(f"{label} = {data}: no such file or folder; pass held-out pairs with --data: a JSONL/JSON/parquet "
                        "file, a datasets folder or a Hub dataset id")
    return "path", data


def read_held_out(kind: str, where, split: str | None, max_rows: int | None, cfg):
    """The held-out source read and judged with the run's data settings, before any model loads: (settings, source)."""
    from qsimpo.config import DataConfig

    dc = dataclasses.replace(cfg.data, eval=None) if cfg is not None else DataConfig(max_prompt_length=512)
    if split is not None:
        dc.split = split
    if kind == "path":
        dc = dataclasses.replace(dc, path=str(where), max_rows=max_rows)
    try:
        return dc, read_source(dc)
    except DataError as e:
        raise EvalError(f"held-out data {dc.path}: {e}") from None


def held_out_pairs(kind: str, where, max_rows: int | None, cfg, dc, source, tokenizer):
    """(pairs, description, data summary): ``source`` tokenized as training tokenizes (max_length, template, ...)."""
    try:
        pairs, summary = tokenize_source(dc, source, tokenizer)
    except DataError as e:
        raise EvalError(f"held-out data {dc.path}: {e}") from None
    if kind == "fraction":  # the same seeded split as `qsimpo train`: pairs the adapter never trained on
        _, pairs = split_eval(pairs, where, cfg.train.seed)
        desc = f"{where:g} of {dc.path} held out by the run (data.eval, seed {cfg.train.seed})"
        return (pairs[:max_rows] if max_rows else pairs), desc, summary.to_dict()
    return pairs, str(where), summary.to_dict()


# ---------------------------------------------------------------------------------- scoring, answers
def score(model, pairs: list[dict], pad_token_id: int, batch_size: int, desc: str) -> PairScores:
    """score_pairs in chunks, under a progress bar counting pairs (with pairs/s)."""
    from tqdm.auto import tqdm

    parts = []
    with tqdm(total=len(pairs), desc=desc, unit="pair", dynamic_ncols=True) as bar:
        for i in range(0, len(pairs), batch_size):
            parts.append(score_pairs(model, pairs[i:i + batch_size], pad_token_id, batch_size))
            bar.update(len(pairs[i:i + batch_size]))
    return PairScores(*(torch.cat([getattr(p, k) for p in parts]) for k in PairScores._fields))


def answer(model, tokenizer, prompt_ids: list[int], max_new_tokens: int, temperature: float, top_p: float, seed: int):
    """(text, new token count, stopped at EOS) for a prompt already tokenized exactly as in training."""
    from qsimpo.eval.generate import new_tokens

    # the same seed for both models: differences come from the weights, not the dice
    new = new_tokens(model, tokenizer, prompt_ids, max_new_tokens, temperature, top_p, seed)
    stopped = tokenizer.eos_token_id in new
    if stopped:
        new = new[:new.index(tokenizer.eos_token_id)]
    return tokenizer.decode(new, skip_special_tokens=True).strip(), len(new), stopped


def prompt_messages(text: dict):
    """The prompt as chat messages; an implicit transcript as its turns, as training renders it (qsimpo.data.render)."""
    if text.get("format") == "implicit":
        from qsimpo.data.render import transcript_messages

        return transcript_messages(text["prompt"])
    return [{"role": "user", "content": text["prompt"]}] if isinstance(text["prompt"], str) else list(text["prompt"])


def prompt_display(text: dict) -> str:
    p = prompt_messages(text)
    return p if isinstance(p, str) else "\n".join(f"{m['role']}: {m['content']}" for m in p) if len(p) > 1 else p[0]["content"]


def generations(model, tokenizer, pairs, n: int, max_new_tokens: int, temperature: float, top_p: float, seed: int) -> dict:
    from tqdm.auto import tqdm

    seen, chosen = set(), []
    for p in pairs:  # the first n distinct prompts, in file order
        if tuple(p["prompt_ids"]) not in seen:
            seen.add(tuple(p["prompt_ids"]))
            chosen.append(p)
        if len(chosen) == n:
            break
    answers = {"sft": [], "aligned": []}
    t0, tokens = time.perf_counter(), 0
    with tqdm(total=2 * len(chosen), desc="generating", unit="answer", dynamic_ncols=True) as bar:
        for name in ("sft", "aligned"):
            for i, p in enumerate(chosen):
                if name == "sft":
                    with model.disable_adapter():
                        a = answer(model, tokenizer, p["prompt_ids"], max_new_tokens, temperature, top_p, seed + i)
                else:
                    a = answer(model, tokenizer, p["prompt_ids"], max_new_tokens, temperature, top_p, seed + i)
                answers[name].append(a)
                tokens += a[1]
                bar.update()
                bar.set_postfix({"tok/s": f"{tokens / max(time.perf_counter() - t0, 1e-9):.1f}"})
    result = {"n": len(chosen), "max_new_tokens": max_new_tokens, "temperature": temperature, "top_p": top_p, "seed": seed}
    for name, got in answers.items():
        result[name] = M.generation_metrics([a[0] for a in got], [a[1] for a in got], [a[2] for a in got])
    result["samples"] = [{"location": p["location"], "prompt": prompt_display(p["text"]), "sft": s[0], "aligned": a[0]}
                         for p, s, a in zip(chosen, answers["sft"], answers["aligned"])]
    result["_prompts"] = [prompt_messages(p["text"]) for p in chosen]  # for the judge; not written
    return result


@torch.no_grad()
def judge(judge_id: str, prompts: list, responses: list[str], device) -> list[float]:
    """Scores of a sequence-classification reward model (one output) for each prompt + response."""
    from tqdm.auto import tqdm
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(judge_id)
        dtype = torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
        rm = AutoModelForSequenceClassification.from_pretrained(judge_id, dtype=dtype).to(device).eval()
    except (OSError, ValueError) as e:
        raise EvalError(f"--judge {judge_id}: could not load a sequence-classification reward model: {e}") from None
    if rm.config.num_labels != 1:
        raise EvalError(f"--judge {judge_id} has {rm.config.num_labels} outputs: a reward model has one (num_labels=1)")
    tok.truncation_side = "left"  # keep the end of the answer, which the score is read at
    limit = getattr(rm.config, "max_position_embeddings", None) or 2048
    scores = []
    for prompt, response in tqdm(list(zip(prompts, responses)), desc="judging", unit="answer", dynamic_ncols=True):
        if isinstance(prompt, list) and tok.chat_template:
            text = tok.apply_chat_template(prompt + [{"role": "assistant", "content": response}], tokenize=False)
            enc = tok(text, add_special_tokens=False, truncation=True, max_length=limit, return_tensors="pt")
        else:
            text = prompt if isinstance(prompt, str) else "\n".join(m["content"] for m in prompt)
            enc = tok(f"{text}\n{response}", truncation=True, max_length=limit, return_tensors="pt")
        scores.append(float(rm(**{k: v.to(device) for k, v in enc.items()}).logits[0, 0]))
    return scores


# ---------------------------------------------------------------------------------------- the command
def evaluate(adapter: str, data: str | None = None, split: str | None = None, max_rows: int | None = None,
             generate: int = 0, out: str | None = None, judge_model: str | None = None, base: str | None = None,
             batch_size: int = 8, max_new_tokens: int = 64, temperature: float = 0.7, top_p: float = 0.95, seed: int = 0,
             beta: float | None = None, gamma: float | None = None) -> dict:
    """Score held-out pairs with the SFT and aligned models; write eval.json and report.html; return eval.json's dict."""
    from qsimpo.run_dir import base_model, check_adapter, read_config, read_meta, read_metrics, record_dir
    from qsimpo.eval.report import summary_lines, write_report

    t0 = time.perf_counter()
    if judge_model and generate <= 0:
        raise EvalError("--judge compares generated answers: also pass --generate N (e.g. --generate 50)")
    for flag, value in (("--max-rows", max_rows), ("--batch-size", batch_size)):
        if value is not None and value < 1:
            raise EvalError(f"{flag} {value}: give a number of pairs >= 1")
    check_adapter(adapter)
    record = record_dir(adapter)
    meta = read_meta(record)
    base = base_model(adapter, base, meta)
    cfg = read_config(record)
    kind, where = resolve_data(data, cfg, adapter)  # fail before loading a model
    simpo = simpo_settings(meta, cfg, beta, gamma)
    out_dir = Path(out) if out else (Path(adapter) / "eval" if Path(adapter).is_dir() else Path("eval") / adapter.replace("/", "--"))

    dc, held_out = read_held_out(kind, where, split, max_rows, cfg)  # bad data stops here, before the model loads
    model, tokenizer = load(adapter, base)
    pairs, source, summary = held_out_pairs(kind, where, max_rows, cfg, dc, held_out, tokenizer)
    with model.disable_adapter():
        sft = score(model, pairs, tokenizer.pad_token_id, batch_size, "scoring SFT (adapter off)")
    aligned = score(model, pairs, tokenizer.pad_token_id, batch_size, "scoring aligned (adapter on)")
    loss_kw = {k: simpo[k] for k in ("beta", "gamma", "label_smoothing", "loss_type", "sft_weight")}
    result = {
        "schema_version": SCHEMA_VERSION,
        "adapter": str(adapter),
        "base_model": base,
        "data": {"source": source, "pairs": len(pairs), "summary": summary},
        "simpo": simpo,
        "models": {name: M.preference_metrics(s.chosen, s.rejected, s.chosen_len, s.rejected_len, **loss_kw)
                   for name, s in (("sft", sft), ("aligned", aligned))},
        "generation": None,
        "judge": None,
        "training": None,
    }
    if generate > 0:
        gen = generations(model, tokenizer, pairs, generate, max_new_tokens, temperature, top_p, seed)
        prompts = gen.pop("_prompts")
        if judge_model:
            samples = gen["samples"]
            scores = judge(judge_model, prompts * 2, [s["sft"] for s in samples] + [s["aligned"] for s in samples],
                           next(model.parameters()).device)
            sft_scores, aligned_scores = scores[:len(samples)], scores[len(samples):]
            for s, a, b in zip(samples, sft_scores, aligned_scores):
                s["judge_sft"], s["judge_aligned"] = a, b
            result["judge"] = {"model": judge_model, **M.win_rate(aligned_scores, sft_scores),
                               "mean_score_sft": sum(sft_scores) / len(sft_scores),
                               "mean_score_aligned": sum(aligned_scores) / len(aligned_scores)}
        result["generation"] = gen
    rows = read_metrics(record)
    if rows:
        evals = [r for r in rows if "eval_rewards/accuracies" in r]
        result["training"] = {"logged_rows": len(rows), "last_step": max(r.get("step", 0) for r in rows),
                              "last_eval": evals[-1] if evals else None}
    result["per_pair"] = {
        "location": [p["location"] for p in pairs],
        "chosen_len": sft.chosen_len.tolist(), "rejected_len": sft.rejected_len.tolist(),
        **{f"{name}_logp_{side}": [round(float(v), 6) for v in getattr(s, side)]
           for name, s in (("sft", sft), ("aligned", aligned)) for side in ("chosen", "rejected")},
    }
    import bitsandbytes
    import peft
    import transformers

    result["versions"] = {"qsimpo": __version__, "python": platform.python_version(), "torch": torch.__version__,
                          "transformers": transformers.__version__, "peft": peft.__version__,
                          "bitsandbytes": bitsandbytes.__version__}
    result["seconds"] = round(time.perf_counter() - t0, 1)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "eval.json").write_text(json.dumps(result, indent=2, allow_nan=False) + "\n")
    write_report(result, rows, out_dir / "report.html")
    print("\n".join(summary_lines(result)))
    print(f"wrote {out_dir / 'eval.json'} and {out_dir / 'report.html'}")
    return result
