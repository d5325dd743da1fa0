"""`qsimpo eval --scorer`: the SFT and aligned models' answers to the held-out prompts, judged by one scorer.

The scorer is the one `qsimpo pairs` uses (qsimpo.pairs.scorers.load_scorer: a Python function or a
reward model), so the pairs a model is trained on and the verdict on the trained model come from the
same judge. The numbers are qsimpo.eval.metrics.scored_answers: mean scores, win rate and
length-controlled win rate, with seeded bootstrap intervals.

The held-out source may hold prompts only (a ``prompt`` column, no chosen/rejected): it is then read
as `qsimpo pairs` reads prompts (``read_source(..., prompts=True)``), its prompts are tokenized as
training tokenizes a pair's prompt, and the preference metrics, which need pairs, are skipped.
"""

from __future__ import annotations

import dataclasses
import json

from qsimpo.data import DataError, cut_prompt, prompt_ids, read_source
from qsimpo.eval import metrics as M

PROMPTS_ONLY = ("the held-out data has prompts only (no chosen/rejected answers), so there are no pairs to score; "
                "pass --data with preference pairs for them")


def _has_answers(raw: str, columns: dict | None) -> bool:
    row = json.loads(raw)
    keys = {"chosen", "rejected"} | {(columns or {}).get(k) for k in ("chosen", "rejected")}
    return isinstance(row, dict) and any(k in row for k in keys if k)


def prompt_source(dc, pairs_error: DataError):
    """The held-out source read as prompts, when none of its rows has an answer (chosen or rejected).

    Called when reading it as pairs failed with ``pairs_error``, which stands for any source with
    answers (a pair file with bad rows is a pair file with bad rows, not prompts). A prompts source
    is read with the run's own data.on_bad_row, so a bad prompt row stops here, named.
    """
    try:
        peek = read_source(dataclasses.replace(dc, on_bad_row="skip"), prompts=True)
    except DataError:
        raise pairs_error from None
    if any(_has_answers(raw, dc.columns) for raw in peek.table["raw"] if raw is not None):
        raise pairs_error
    return read_source(dc, prompts=True)


def prompt_items(dc, source, tokenizer) -> tuple[list[dict], dict]:
    """(prompts as {"location", "text", "prompt_ids"}, the data summary) of a prompts source.

    Each prompt is tokenized exactly as training tokenizes a pair's prompt (qsimpo.data.prompt_ids with the
    run's chat template, system prompt and one BOS; left-truncated to the prompt limit when it leaves
    no room in data.max_length); a prompt the template rejects or that cannot fit is counted, as
    training counts it.
    """
    summary = source.summary
    items = []
    for text in source.texts():
        try:
            ids = prompt_ids(tokenizer, text, dc.system_prompt)
        except DataError as e:
            if e.reason is None:
                raise
            summary.record(e.reason, e.detail_line)
            continue
        if len(ids) + 1 > dc.max_length:  # as training cuts a pair's prompt: no room left for one answer token
            ids, truncated = cut_prompt(tokenizer, ids, dc.prompt_limit), len(ids) > dc.prompt_limit
            if len(ids) + 1 > dc.max_length:
                summary.record("too_long", "")
                continue
            summary.truncated_prompt += truncated
        items.append({"location": text["location"], "text": text, "prompt_ids": ids})
    summary.kept = len(items)
    summary.check(dc.on_bad_row)
    if not items:
        raise DataError(f"no usable prompts: {summary.line()}")
    return items, summary.to_dict()


def score_groups(scorer, answers: dict[str, list[str]], prompts: list, where: list[str], chunk: int = 64) -> dict:
    """Each model's scores of its answers ({name: answers to the prompts}): every model's answers to a prompt go to
    the scorer in one call, as a group (a pairwise judge compares them), about ``chunk`` answers per call."""
    from tqdm.auto import tqdm

    names, n = list(answers), len(prompts)
    per_call = max(1, chunk // len(names))
    scores = {name: [] for name in names}
    with tqdm(total=len(names) * n, desc="scoring answers", unit="answer", dynamic_ncols=True) as bar:
        for i in range(0, n, per_call):
            part = range(i, min(i + per_call, n))
            responses = [answers[name][k] for k in part for name in names]
            named = [f"{where[k]} (the {'SFT' if name == 'sft' else name} answer)" for k in part for name in names]
            asked = [prompts[k] for k in part for _ in names]
            got = scorer(asked, responses, named, [len(names)] * len(part))
            for j, name in enumerate(names):
                scores[name] += got[j::len(names)]
            bar.update(len(responses))
    return scores


def scorer_section(scorer, temperature: float, stats: dict) -> dict:
    return {"spec": scorer.spec, "kind": scorer.kind, "temperature": temperature, "judge_cut": scorer.cut_line(), **stats}


def score_answers(scorer, gen: dict, prompts: list, seed: int, chunk: int = 64) -> dict:
    """eval.json's ``scorer`` section; each sample gains ``sft_score`` and ``aligned_score``.

    Both models' answers go to the scorer with their prompt's chat messages, ``chunk`` at a time; the
    statistics bootstrap over the prompts with ``seed``.
    """
    samples = gen["samples"]
    scores = score_groups(scorer, {name: [s[name] for s in samples] for name in ("sft", "aligned")}, prompts,
                          [s["location"] for s in samples], chunk)
    sft, aligned = scores["sft"], scores["aligned"]
    for s, a, b in zip(samples, sft, aligned):
        s["sft_score"], s["aligned_score"] = a, b
    stats = M.scored_answers(sft, aligned, [s["sft_tokens"] for s in samples], [s["aligned_tokens"] for s in samples],
                             seed=seed)
    return scorer_section(scorer, gen["temperature"], stats)
