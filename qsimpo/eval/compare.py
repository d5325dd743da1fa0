"""`qsimpo eval A B C`: several adapters on one base, side by side with the SFT model, in one eval.json and report.html.

    qsimpo eval adapters/simpo adapters/dpo adapters/orpo --data heldout.jsonl --scorer my_scorers:helpful

The base is loaded once; the first adapter is loaded on it as `qsimpo eval A` loads one, the others
beside it by name (peft's ``load_adapter(..., adapter_name=)``), and each model is one ``set_adapter``
away. The SFT side (the base with every adapter off, or for runs on top of `qsimpo sft` the base with
their one SFT adapter) is scored and answers once. Every number of an adapter is the one `qsimpo eval`
of that adapter alone computes (``models``, at its run's β and γ; ``scorer``'s comparison against SFT),
and beside them the numbers every loss can be compared by: reward accuracy, margin and length
diagnostics under one definition (metrics.SHARED_DEFINITION) and the per-token KL from the SFT
model on the held-out responses. With ``--scorer`` every adapter is also compared with every other.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

from qsimpo.errors import UsageError


# ------------------------------------------------------------------------ names, before anything loads
def adapter_labels(adapters: list[str]) -> list[str]:
    """How each adapter is named in eval.json and the report: its Hub id, or its folder's name, with as many parent
    folders as it takes to tell the adapters apart (``simpo/adapter``, ``dpo/adapter``)."""
    from qsimpo.load import is_local

    parts = [Path(a).expanduser().resolve().parts if is_local(a) else (a,) for a in adapters]
    if len(set(parts)) < len(parts):
        twice = next(a for a, p in zip(adapters, parts) if parts.count(p) > 1)
        raise UsageError(f"adapter {twice} is given twice: name each adapter to compare once")
    depth = 1
    while True:
        labels = ["/".join(p[-depth:]) for p in parts]
        if len(set(labels)) == len(labels) and "sft" not in {x.lower() for x in labels}:
            return labels
        if all(depth >= len(p) for p in parts):
            return [f"{x} (adapter {i + 1})" for i, x in enumerate(labels)]
        depth += 1


def default_out(adapters: list[str]) -> str:
    """Where several adapters' eval goes by default: ``eval-A-vs-B`` beside the first adapter's folder (for a Hub id
    first, in the current folder)."""
    from qsimpo.load import is_local

    first = Path(adapters[0]).expanduser()
    root = first.parent if is_local(adapters[0]) and first.is_dir() else Path(".")
    return str(root / ("eval-" + "-vs-".join(x.replace("/", "--") for x in adapter_labels(adapters))))


# ------------------------------------------------------------------------------ one base, one SFT side
def loss_of(run) -> dict:
    """The loss a run trained with and its parameters: qsimpo.json's ``loss``, else config.yaml's, else SimPO."""
    if run.meta.get("loss"):
        return dict(run.meta["loss"])
    if run.cfg is not None:
        from qsimpo.train.recipe import loss_settings

        return loss_settings(run.cfg)
    return {"type": "simpo", **(run.meta.get("simpo") or {})}


def check_one_base(runs, labels: list[str], base_given: bool) -> None:
    """Every adapter on the same base, quantized the same way, with the same SFT side; else one message naming both."""
    from qsimpo.eval.evaluate import EvalError
    from qsimpo.train.stack import sft_fingerprint

    def what(run):
        m = run.meta
        return (run.base, m.get("base_model_revision"), m.get("base_model_gguf_file"), m.get("quantization", "nf4"))

    first, label0 = runs[0], labels[0]
    for run, label in zip(runs[1:], labels[1:]):
        a, b = what(first), what(run)
        if a[:3] != b[:3]:
            show = [f"{x[0]}{' at ' + x[1] if x[1] else ''}{' (' + x[2] + ')' if x[2] else ''}" for x in (a, b)]
            raise EvalError(f"the adapters are on different bases: {label0} on {show[0]}, {label} on {show[1]}; the "
                            "adapters of one eval must share one base: evaluate them separately" +
                            ("" if base_given else ", or pass --base if both were trained on the same model under "
                             "different names"))
        if a[3] != b[3]:
            raise EvalError(f"the adapters were trained on differently quantized bases: {label0} on a {a[3]} base, "
                            f"{label} on a {b[3]} base; evaluate them separately")
    sides = [(sft_fingerprint(r.adapter, r.meta), r) for r in runs]
    for (fp, run), label in zip(sides[1:], labels[1:]):
        if fp != sides[0][0]:
            def desc(f, r):
                return ("the base alone" if f is None else
                        f"the base with the SFT adapter {r.meta['sft_adapter'].get('source', 'of ' + r.adapter)}")
            raise EvalError(f"the adapters have different SFT models: {label0}'s is {desc(sides[0][0], first)}, "
                            f"{label}'s is {desc(fp, run)}; the adapters of one eval must share their SFT model: "
                            "evaluate them separately")


def load_all(runs, labels: list[str]):
    """(model, tokenizer, {label: peft adapter name}): the base once, the first adapter as eval loads one, the others
    beside it by name."""
    from qsimpo.errors import InputNotFound, QsimpoError
    from qsimpo.load import load_adapter

    model, tokenizer, _, _ = load_adapter(runs[0].adapter, runs[0].base)
    names = {labels[0]: "default"}
    for i, (run, label) in enumerate(zip(runs[1:], labels[1:]), 1):
        try:
            model.load_adapter(run.adapter, adapter_name=f"adapter_{i}")
        except (OSError, ValueError) as e:
            if isinstance(e, QsimpoError):
                raise
            raise InputNotFound(f"could not load adapter {run.adapter} on the base {run.base}: {e}") from None
        names[label] = f"adapter_{i}"
    model.set_adapter("default")
    model.eval()
    return model, tokenizer, names


@contextlib.contextmanager
def adapter_on(model, name: str):
    model.set_adapter(name)
    try:
        yield
    finally:
        model.set_adapter("default")


def same_items(items: list[list[dict]], labels: list[str]) -> None:
    """Each adapter's run reads the same held-out pairs (or prompts) from the data: else the numbers would not compare."""
    from qsimpo.eval.evaluate import EvalError

    def key(xs):
        return [(x["prompt_ids"], x.get("chosen_ids"), x.get("rejected_ids")) for x in xs]

    for xs, label in zip(items[1:], labels[1:]):
        if key(xs) != key(items[0]):
            raise EvalError(f"{labels[0]} and {label} read different held-out pairs (their runs' data.eval or data "
                            "settings differ: chat template, max_length, ...): pass the same --data to both and make "
                            "their data settings agree, or evaluate them separately")


# ------------------------------------------------------------------------------------ KL from the SFT model
def kl_from_sft(model, pairs: list[dict], pad_token_id: int, batch_size: int, names: dict[str, str]) -> dict:
    """{label: KL(adapter ‖ SFT)} per response token of the held-out pairs, teacher-forced on their chosen and rejected
    responses, over the whole vocabulary; the SFT side's distributions are computed once per batch."""
    import torch
    from tqdm.auto import tqdm

    from qsimpo.response_logps import attn_implementation, response_log_softmax
    from qsimpo.train.packing import make_collator
    from qsimpo.train.stack import sft_side

    collate = make_collator("shared_prompt", pad_token_id, attn_implementation(model))
    device = next(model.parameters()).device
    sums = {label: torch.zeros(2, dtype=torch.float64) for label in names}
    counts = torch.zeros(2, dtype=torch.float64)
    with tqdm(total=len(pairs), desc="KL from SFT", unit="pair", dynamic_ncols=True) as bar:
        for i in range(0, len(pairs), batch_size):
            part = pairs[i:i + batch_size]
            batch = {k: v.to(device) for k, v in collate(part).items()}
            rejected = (batch["score_seq"] >= len(part)).long().cpu()  # sequences 0..b-1 chosen, b..2b-1 rejected
            counts += torch.bincount(rejected, minlength=2).double()
            with sft_side(model):
                ref = response_log_softmax(model, batch)
            for label, name in names.items():
                with adapter_on(model, name):
                    lp = response_log_softmax(model, batch)
                kl = (lp.exp() * (lp - ref)).sum(-1).double().cpu()
                sums[label] += torch.zeros(2, dtype=torch.float64).index_add(0, rejected, kl)
            bar.update(len(part))
    return {label: {"per_token": float(s.sum() / counts.sum()), "chosen": float(s[0] / counts[0]),
                    "rejected": float(s[1] / counts[1]), "tokens": int(counts.sum())} for label, s in sums.items()}


# ---------------------------------------------------------------------------------- answers and verdicts
def answers(model, tokenizer, items, names: dict[str, str], n: int | None, max_new_tokens: int, temperature: float,
            top_p: float, seed: int, batch_size: int) -> tuple[dict, list]:
    """(eval.json's ``generation``, the prompts' chat messages): the SFT side's and every adapter's answers."""
    from qsimpo.data import prompt_messages
    from qsimpo.eval import metrics as M
    from qsimpo.eval.evaluate import answer_all, distinct_prompts, prompt_display
    from qsimpo.train.stack import sft_side

    chosen = distinct_prompts(items, n)
    sides = {"sft": lambda: sft_side(model), **{label: (lambda name=name: adapter_on(model, name)) for label, name in names.items()}}
    got = answer_all(model, tokenizer, chosen, sides, max_new_tokens, temperature, top_p, seed, batch_size)
    gen = {"n": len(chosen), "max_new_tokens": max_new_tokens, "temperature": temperature, "top_p": top_p, "seed": seed,
           "models": {name: M.generation_metrics([a[0] for a in g], [a[1] for a in g], [a[2] for a in g])
                      for name, g in got.items()},
           "samples": [{"location": p["location"], "prompt": prompt_display(p["text"]),
                        "answers": {name: got[name][k][0] for name in got}, "tokens": {name: got[name][k][1] for name in got}}
                       for k, p in enumerate(chosen)]}
    return gen, [prompt_messages(p["text"]) for p in chosen]


def comparison(model: str, against: str, stats: dict) -> dict:
    """One entry of ``scorer.comparisons``: metrics.scored_answers of ``model`` (its "aligned") against ``against``."""
    rename = {"sft": "against", "aligned": "model"}
    return {"model": model, "against": against,
            **{k: ({rename[n]: x for n, x in v.items()} if k in ("mean_score", "mean_score_ci", "mean_length_tokens") else v)
               for k, v in stats.items()}}


def verdicts(judge, gen: dict, prompts: list, labels: list[str], seed: int) -> dict:
    """eval.json's ``scorer``: each adapter against SFT, then each against each later one; samples gain ``scores``."""
    from qsimpo.eval import metrics as M
    from qsimpo.eval.judged import score_groups, scorer_section

    samples = gen["samples"]
    names = ["sft", *labels]
    scores = score_groups(judge, {n: [s["answers"][n] for s in samples] for n in names}, prompts,
                          [s["location"] for s in samples])
    for k, s in enumerate(samples):
        s["scores"] = {n: scores[n][k] for n in names}
    tokens = {n: [s["tokens"][n] for s in samples] for n in names}
    pairs = [(a, "sft") for a in labels] + [(a, b) for i, a in enumerate(labels) for b in labels[i + 1:]]
    found = [comparison(a, b, M.scored_answers(scores[b], scores[a], tokens[b], tokens[a], seed=seed)) for a, b in pairs]
    return scorer_section(judge, gen["temperature"], {"comparisons": found})


# ---------------------------------------------------------------------------------------------- the command
def compare(adapters: list[str], data: str | None, split: str | None, max_rows: int | None, generate: int | None,
            out: str | None, scorer: str | None, base: str | None, batch_size: int, max_new_tokens: int,
            temperature: float | None, top_p: float, seed: int, beta: float | None, gamma: float | None,
            trust_remote_code: bool) -> dict:
    """`qsimpo eval` of several adapters (its arguments, see qsimpo.eval.evaluate.evaluate): one eval.json, one report."""
    import time

    from qsimpo.data import DataError
    from qsimpo.eval import evaluate as E
    from qsimpo.eval import metrics as M
    from qsimpo.eval.compare_report import summary_lines, write_report
    from qsimpo.eval.judged import PROMPTS_ONLY, prompt_items
    from qsimpo.run_dir import read_metrics, record_dir
    from qsimpo.train.stack import sft_side

    t0 = time.perf_counter()
    E.check_args(generate, scorer, max_rows, batch_size, max_new_tokens, temperature, top_p)
    n_answers = generate if generate is not None else (None if scorer else 0)
    temperature = temperature if temperature is not None else 0.0 if scorer else 0.7
    labels = adapter_labels(adapters)
    runs = [E.read_run(a, base, data, beta, gamma) for a in adapters]
    check_one_base(runs, labels, base is not None)
    out_dir = Path(out) if out else Path(default_out(adapters))
    read = [E.read_held_out(*r.data, split, max_rows, r.cfg) for r in runs]  # bad data stops here
    prompts_only = read[0][2]
    if any(r[2] != prompts_only for r in read):
        raise E.EvalError("the adapters' held-out data are pairs for some and prompts for others: pass one --data")
    E.check_prompts_only(prompts_only, n_answers, read[0][0])
    judge = E.load_judge(scorer, batch_size, trust_remote_code)
    model, tokenizer, names = load_all(runs, labels)

    def items_of(run, dc, held_out):
        try:
            if prompts_only:
                found, summary = prompt_items(dc, held_out, tokenizer)
                return found, str(run.data[1]), summary
            return E.held_out_pairs(*run.data, max_rows, run.cfg, dc, held_out, tokenizer)
        except DataError as e:
            raise E.EvalError(f"held-out data {dc.path}: {e}") from None

    got = [items_of(run, dc, held_out) for run, (dc, held_out, _) in zip(runs, read)]
    same_items([g[0] for g in got], labels)
    items, source, summary = got[0]
    entries = [{"name": label, "adapter": run.adapter, "loss": loss_of(run), "simpo": run.simpo, "models": None,
                "kl_from_sft": None, "training": E.training_summary(read_metrics(record_dir(run.adapter)))}
               for run, label in zip(runs, labels)]
    result = {"schema_version": E.SCHEMA_VERSION, "kind": "comparison", "adapters": entries,
              "base_model": runs[0].base,
              "sft_side": "the base with the adapters off" if runs[0].meta.get("sft_adapter") is None else
                          f"the base with the SFT adapter {runs[0].meta['sft_adapter'].get('source', '')}".rstrip(),
              "data": {"source": source, "kind": "prompts" if prompts_only else "pairs",
                       "pairs": 0 if prompts_only else len(items), "summary": summary},
              "shared": None, "preference_skipped": PROMPTS_ONLY if prompts_only else None,
              "generation": None, "scorer": None, "per_pair": None}
    if not prompts_only:
        pad = tokenizer.pad_token_id
        with sft_side(model):
            sft = E.score(model, items, pad, batch_size, "scoring SFT")
        scores = {}
        for label, name in names.items():
            with adapter_on(model, name):
                scores[label] = E.score(model, items, pad, batch_size, f"scoring {label}")
        kl = kl_from_sft(model, items, pad, batch_size, names)
        for entry, run in zip(entries, runs):
            entry["models"] = E.model_blocks(sft, scores[entry["name"]], run.simpo)
            entry["kl_from_sft"] = kl[entry["name"]]
        result["shared"] = {"definition": M.SHARED_DEFINITION,
                            "models": {n: M.shared_metrics(s.chosen, s.rejected, s.chosen_len, s.rejected_len)
                                       for n, s in {"sft": sft, **scores}.items()}}
        result["per_pair"] = {"location": [p["location"] for p in items], "chosen_len": sft.chosen_len.tolist(),
                              "rejected_len": sft.rejected_len.tolist(), **E.logp_columns({"sft": sft, **scores})}
    if n_answers != 0:
        gen, prompts = answers(model, tokenizer, items, names, n_answers, max_new_tokens, temperature, top_p, seed,
                               batch_size)
        if judge is not None:
            result["scorer"] = verdicts(judge, gen, prompts, labels, seed)
        result["generation"] = gen
    E.write_result(result, out_dir, t0, lambda path: write_report(result, path), summary_lines)
    return result
