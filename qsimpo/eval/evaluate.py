"""`qsimpo eval`: did alignment work, and did it exploit length?

One base model in memory, scored twice on held-out preference pairs: adapter off (the SFT
model) and adapter on (the aligned model). Writes ``eval.json`` (every number, see
docs/evaluate.md) and ``report.html`` (training curves, margin histogram, length scatter).

    qsimpo eval adapters/quickstart/adapter                      # data: the run's data.eval
    qsimpo eval adapters/run --data heldout.jsonl --scorer my_scorers:helpful   # + both models' answers, judged

With ``--scorer`` both models answer the held-out prompts (greedy by default) and the scorer of
`qsimpo pairs` judges them (qsimpo.eval.judged); a source of prompts alone works then too.

The pairs are tokenized with the run's own data settings (config.yaml), so the numbers are the
ones the trainer logs as ``eval_*`` in metrics.jsonl, computed the same way (qsimpo.eval.metrics).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import time
from pathlib import Path

import torch

from qsimpo.console import say
from qsimpo.eval import metrics as M
from qsimpo.errors import UsageError
from qsimpo.data import DataError, looks_local, prompt_messages, read_source, split_eval, tokenize_source
from qsimpo.response_logps import PairScores, score_pairs
from qsimpo.train.stack import sft_side

SCHEMA_VERSION = 2  # 2: "judge" became "scorer"; data.kind, preference_skipped; samples carry token counts


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
    if out["sft_weight"]:  # a run from before sft_reduction existed averaged its NLL term per pair
        out["sft_reduction"] = s.get("sft_reduction", "pairs")
    return out


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
    """(settings, source, prompts only): the held-out source read and judged with the run's data settings, before any
    model loads. A file of prompts alone (no row with chosen or rejected) is read as prompts (qsimpo.eval.judged)."""
    from qsimpo.config import DataConfig
    from qsimpo.eval.judged import prompt_source

    dc = dataclasses.replace(cfg.data, eval=None) if cfg is not None else DataConfig(max_prompt_length=512)
    if split is not None:
        dc.split = split
    if kind == "path":
        dc = dataclasses.replace(dc, path=str(where), max_rows=max_rows)
    try:
        return dc, read_source(dc), False
    except DataError as e:
        pairs_error = e
    try:
        if kind != "path":  # a fraction of the training data: pairs
            raise pairs_error
        return dc, prompt_source(dc, pairs_error), True
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


def answers_of(model, tokenizer, prompts: list[list[int]], max_new_tokens: int, temperature: float, top_p: float,
               seeds: list[int]) -> list[tuple[str, int, bool]]:
    """(text, new token count, stopped at a stop token) for prompts already tokenized exactly as in training, in one
    batch (qsimpo.generate: greedy answers are those of one prompt at a time, a sampled one depends on its seed only).
    """
    from qsimpo.generate import generate

    return [(a.text, len(a.ids), a.stopped)
            for a in generate(model, tokenizer, prompts, max_new_tokens, temperature, top_p, seeds)]


def prompt_display(text: dict) -> str:
    p = prompt_messages(text)
    return p if isinstance(p, str) else "\n".join(f"{m['role']}: {m['content']}" for m in p) if len(p) > 1 else p[0]["content"]


def distinct_prompts(pairs, n: int | None) -> list[dict]:
    """The first ``n`` items of ``pairs`` with distinct prompts, in file order (None: all)."""
    seen, chosen = set(), []
    for p in pairs:
        if tuple(p["prompt_ids"]) not in seen:
            seen.add(tuple(p["prompt_ids"]))
            chosen.append(p)
        if len(chosen) == n:
            break
    return chosen


def answer_all(model, tokenizer, chosen: list[dict], sides: dict, max_new_tokens: int, temperature: float, top_p: float,
               seed: int, batch_size: int = 8) -> dict[str, list[tuple[str, int, bool]]]:
    """Each side's answers to ``chosen``: ``sides`` maps a name to a context manager factory that makes ``model`` that
    model (the SFT side, an adapter); ``batch_size`` prompts per ``generate`` call, prompt i seeded ``seed + i`` by all."""
    from tqdm.auto import tqdm

    answers = {name: [] for name in sides}
    t0, tokens = time.perf_counter(), 0
    with tqdm(total=len(sides) * len(chosen), desc="generating", unit="answer", dynamic_ncols=True) as bar:
        for name, side in sides.items():
            for i in range(0, len(chosen), batch_size):
                batch = [p["prompt_ids"] for p in chosen[i:i + batch_size]]
                seeds = [seed + j for j in range(i, i + len(batch))]  # the same seed for every model
                with side():
                    got = answers_of(model, tokenizer, batch, max_new_tokens, temperature, top_p, seeds)
                answers[name].extend(got)
                tokens += sum(a[1] for a in got)
                bar.update(len(got))
                bar.set_postfix({"tok/s": f"{tokens / max(time.perf_counter() - t0, 1e-9):.1f}"})
    return answers


def generations(model, tokenizer, pairs, n: int | None, max_new_tokens: int, temperature: float, top_p: float,
                seed: int, batch_size: int = 8) -> dict:
    """Both models' answers to the first ``n`` distinct prompts of ``pairs`` (None: all), with their token counts,
    ``batch_size`` prompts per ``generate`` call; prompt i is answered with seed ``seed + i`` by both models."""
    chosen = distinct_prompts(pairs, n)
    answers = answer_all(model, tokenizer, chosen, {"sft": lambda: sft_side(model), "aligned": contextlib.nullcontext},
                         max_new_tokens, temperature, top_p, seed, batch_size)
    result = {"n": len(chosen), "max_new_tokens": max_new_tokens, "temperature": temperature, "top_p": top_p, "seed": seed}
    for name, got in answers.items():
        result[name] = M.generation_metrics([a[0] for a in got], [a[1] for a in got], [a[2] for a in got])
    result["samples"] = [{"location": p["location"], "prompt": prompt_display(p["text"]), "sft": s[0], "aligned": a[0],
                          "sft_tokens": s[1], "aligned_tokens": a[1]}
                         for p, s, a in zip(chosen, answers["sft"], answers["aligned"])]
    result["_prompts"] = [prompt_messages(p["text"]) for p in chosen]  # for the scorer; not written
    return result


# ---------------------------------------------------------------------------------------- the command
def check_args(generate: int | None, scorer: str | None, max_rows: int | None, batch_size: int, max_new_tokens: int,
               temperature: float | None, top_p: float) -> None:
    problems = []
    if generate is not None and generate < 0:
        problems.append(f"--generate {generate}: give a number of prompts >= 1 (or 0 for no answers)")
    elif generate == 0 and scorer:
        problems.append("--generate 0 leaves --scorer no answers to score: give --generate N >= 1, or leave --generate "
                        "out to answer every held-out prompt")
    for flag, value in (("--max-rows", max_rows), ("--batch-size", batch_size), ("--max-new-tokens", max_new_tokens)):
        if value is not None and value < 1:
            problems.append(f"{flag} {value}: give a whole number >= 1")
    if temperature is not None and temperature < 0:
        problems.append(f"--temperature {temperature}: give 0 (greedy) or more")
    if not 0 < top_p <= 1:
        problems.append(f"--top-p {top_p}: give a probability in (0, 1]")
    if problems:
        raise EvalError("; ".join(problems))


@dataclasses.dataclass
class Run:
    """What eval reads of one adapter before any model loads: its record, base, held-out data and β/γ."""
    adapter: str
    meta: dict
    cfg: object  # the run's Config, or None without a config.yaml
    base: str
    data: tuple  # resolve_data's (kind, where)
    simpo: dict


def read_run(adapter: str, base: str | None, data: str | None, beta: float | None, gamma: float | None) -> Run:
    from qsimpo.load import base_model, check_adapter
    from qsimpo.run_dir import read_config, read_meta, record_dir

    check_adapter(adapter)
    record = record_dir(adapter)
    meta = read_meta(record)
    base = base_model(adapter, base, meta)
    cfg = read_config(record)
    where = resolve_data(data, cfg, adapter)  # fail before loading a model
    return Run(adapter, meta, cfg, base, where, simpo_settings(meta, cfg, beta, gamma))


def loss_kwargs(simpo: dict) -> dict:
    """The keyword arguments of metrics.preference_metrics from eval.json's ``simpo`` section."""
    return {k: simpo[k] for k in ("beta", "gamma", "label_smoothing", "loss_type", "sft_weight", "sft_reduction") if k in simpo}


def model_blocks(sft: PairScores, aligned: PairScores, simpo: dict) -> dict:
    """eval.json's ``models``: the SFT and aligned models' preference metrics at the run's β, γ."""
    return {name: M.preference_metrics(s.chosen, s.rejected, s.chosen_len, s.rejected_len, **loss_kwargs(simpo))
            for name, s in (("sft", sft), ("aligned", aligned))}


def training_summary(rows: list[dict]) -> dict | None:
    """eval.json's ``training``: what the run's metrics.jsonl logged last (None without one)."""
    if not rows:
        return None
    evals = [r for r in rows if "eval_rewards/accuracies" in r]
    return {"logged_rows": len(rows), "last_step": max(r.get("step", 0) for r in rows),
            "last_eval": evals[-1] if evals else None}


def logp_columns(scores: dict) -> dict:
    """per_pair's log-prob columns of each named model's scores."""
    return {f"{name}_logp_{side}": [round(float(v), 6) for v in getattr(s, side)]
            for name, s in scores.items() for side in ("chosen", "rejected")}


def evaluate(adapter: str | list[str], data: str | None = None, split: str | None = None, max_rows: int | None = None,
             generate: int | None = None, out: str | None = None, scorer: str | None = None, base: str | None = None,
             batch_size: int = 8, max_new_tokens: int = 64, temperature: float | None = None, top_p: float = 0.95,
             seed: int = 0, beta: float | None = None, gamma: float | None = None, trust_remote_code: bool = False) -> dict:
    """Score held-out pairs with the SFT and aligned models; write eval.json and report.html; return eval.json's dict.

    ``generate`` answers that many held-out prompts with both models (None: none, or with ``scorer`` every
    prompt); ``scorer`` (a qsimpo.pairs.scorers spec) judges the answers; ``temperature`` None is 0.7, or 0
    (greedy) with ``scorer``. A prompts-only ``data`` source skips the preference metrics and says why.
    Several adapters on one base are compared side by side (qsimpo.eval.compare).
    """
    if not isinstance(adapter, str):
        if len(adapter) > 1:
            from qsimpo.eval.compare import compare

            return compare(list(adapter), data, split, max_rows, generate, out, scorer, base, batch_size, max_new_tokens,
                           temperature, top_p, seed, beta, gamma, trust_remote_code)
        adapter = adapter[0]
    from qsimpo.eval.judged import PROMPTS_ONLY, prompt_items, score_answers
    from qsimpo.load import load_adapter
    from qsimpo.run_dir import read_metrics, record_dir
    from qsimpo.eval.report import summary_lines, write_report

    t0 = time.perf_counter()
    check_args(generate, scorer, max_rows, batch_size, max_new_tokens, temperature, top_p)
    n_answers = generate if generate is not None else (None if scorer else 0)  # None: every held-out prompt
    temperature = temperature if temperature is not None else 0.0 if scorer else 0.7
    run = read_run(adapter, base, data, beta, gamma)
    base, cfg, (kind, where), simpo = run.base, run.cfg, run.data, run.simpo
    out_dir = Path(out) if out else (Path(adapter) / "eval" if Path(adapter).is_dir() else Path("eval") / adapter.replace("/", "--"))

    dc, held_out, prompts_only = read_held_out(kind, where, split, max_rows, cfg)  # bad data stops here, before the model loads
    check_prompts_only(prompts_only, n_answers, dc)
    judge = load_judge(scorer, batch_size, trust_remote_code)  # a bad scorer stops here
    model, tokenizer, _, _ = load_adapter(adapter, base)
    if prompts_only:
        try:
            items, summary = prompt_items(dc, held_out, tokenizer)
        except DataError as e:
            raise EvalError(f"held-out data {dc.path}: {e}") from None
        pairs, source, models, skipped, per_pair = [], str(where), None, PROMPTS_ONLY, None
    else:
        pairs, source, summary = held_out_pairs(kind, where, max_rows, cfg, dc, held_out, tokenizer)
        with sft_side(model):  # adapter off, or for a run on top of `qsimpo sft` its SFT adapter (qsimpo.train.stack)
            sft = score(model, pairs, tokenizer.pad_token_id, batch_size, "scoring SFT (adapter off)")
        aligned = score(model, pairs, tokenizer.pad_token_id, batch_size, "scoring aligned (adapter on)")
        items, skipped = pairs, None
        models = model_blocks(sft, aligned, simpo)
        per_pair = {"location": [p["location"] for p in pairs],
                    "chosen_len": sft.chosen_len.tolist(), "rejected_len": sft.rejected_len.tolist(),
                    **logp_columns({"sft": sft, "aligned": aligned})}
    result = {
        "schema_version": SCHEMA_VERSION,
        "adapter": str(adapter),
        "base_model": base,
        "data": {"source": source, "kind": "prompts" if prompts_only else "pairs", "pairs": len(pairs), "summary": summary},
        "simpo": simpo,
        "models": models,
        "preference_skipped": skipped,
        "generation": None,
        "scorer": None,
        "training": None,
    }
    if n_answers != 0:
        gen = generations(model, tokenizer, items, n_answers, max_new_tokens, temperature, top_p, seed, batch_size)
        prompts = gen.pop("_prompts")
        if judge is not None:
            result["scorer"] = score_answers(judge, gen, prompts, seed)
        result["generation"] = gen
    rows = read_metrics(record_dir(adapter))
    result["training"] = training_summary(rows)
    result["per_pair"] = per_pair
    write_result(result, out_dir, t0, lambda path: write_report(result, rows, path), summary_lines)
    return result


def check_prompts_only(prompts_only: bool, n_answers: int | None, dc) -> None:
    if prompts_only and n_answers == 0:
        raise EvalError(f"held-out data {dc.path} has prompts only (no chosen/rejected): there are no pairs to score; pass "
                        "--scorer SPEC to compare the models' answers to them (or --generate N to read the answers), "
                        "or --data with preference pairs")


def load_judge(scorer: str | None, batch_size: int, trust_remote_code: bool):
    """The --scorer, loaded before any model (a spec that does not load stops eval here); None without one."""
    if not scorer:
        return None
    from qsimpo.pairs.scorers import load_scorer
    from qsimpo.train.model import device_for_rank

    return load_scorer(scorer, device_for_rank(), batch_size, trust_remote_code)


def write_result(result: dict, out_dir: Path, t0: float, report, summary_lines) -> None:
    """eval.json (with versions and seconds), report.html (``report(path)``) and the printed summary."""
    from qsimpo.record import versions

    result["versions"] = versions()
    result["seconds"] = round(time.perf_counter() - t0, 1)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "eval.json").write_text(json.dumps(result, indent=2, allow_nan=False) + "\n")
    report(out_dir / "report.html")
    say("\n".join(summary_lines(result)))
    say(f"wrote {out_dir / 'eval.json'} and {out_dir / 'report.html'}")
