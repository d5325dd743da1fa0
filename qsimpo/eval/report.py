"""What ``qsimpo eval`` shows: the printed summary and a self-contained report.html.

The report is built from eval.json's dict and the adapter's metrics.jsonl alone (plots are
matplotlib PNGs embedded as base64, so the one file can be mailed or attached to a PR):
training curves, the reward-margin histogram of SFT vs aligned, response length vs average
log-likelihood for both models, and with --scorer the per-prompt outcomes against the answers'
length difference with the fitted length-controlled win-rate curve.
"""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path

ROWS = [  # (label, key in models.*, digits)
    ("reward accuracy", "reward_accuracy", 3),
    ("reward margin β·Δ (mean)", "reward_margin_mean", 3),
    ("reward margin β·Δ (median)", "reward_margin_median", 3),
    ("avg log-prob, chosen", "logp_chosen_mean", 4),
    ("avg log-prob, rejected", "logp_rejected_mean", 4),
    ("SimPO loss at β, γ", "simpo_loss", 4),
    ("the run's loss (with its options)", "loss", 4),
]
GEN_ROWS = [("mean length (tokens)", "mean_length_tokens", 1), ("distinct-2", "distinct_2", 3),
            ("repetition rate (3-grams)", "repetition_rate", 3), ("unfinished (no EOS)", "unfinished_rate", 3)]


def _fmt(v, digits: int = 3) -> str:
    return "—" if v is None else f"{v:.{digits}f}" if isinstance(v, float) else str(v)


def length_rows(result: dict) -> list[tuple[str, str, str]]:
    sft, al = (result["models"][name]["length"] for name in ("sft", "aligned"))
    rho = ("Spearman ρ(length, avg log-prob)", _fmt(sft["spearman_length_logp"]["rho"]), _fmt(al["spearman_length_logp"]["rho"]))
    rows = [rho]
    for group, label in (("chosen_longer", "chosen is longer"), ("chosen_shorter", "chosen is shorter"), ("same_length", "same length")):
        n = sft["accuracy_by_length"][group]["n"]
        rows.append((f"accuracy, {label} (n={n})", _fmt(sft["accuracy_by_length"][group]["accuracy"]),
                     _fmt(al["accuracy_by_length"][group]["accuracy"])))
    by = sft["accuracy_by_length"]
    unequal = by["chosen_longer"]["n"] + by["chosen_shorter"]["n"]
    data = f"; data {by['chosen_longer']['n'] / unequal:.3f}" if unequal else ""  # what a perfectly accurate model scores
    rows.append((f"prefers the longer response (n={unequal}{data})", _fmt(sft["prefers_longer"]["rate"]),
                 _fmt(al["prefers_longer"]["rate"])))
    return rows


def _ci(ci: list[float], digits: int = 3) -> str:
    return f"[{ci[0]:.{digits}f}, {ci[1]:.{digits}f}]"


def _score(v: float) -> str:
    return f"{v:.4g}"  # a scorer's scale is its own: a reward logit, a word count, ...


def sampling(g: dict) -> str:
    return "greedy" if g["temperature"] == 0 else f"temperature {g['temperature']:g}, top-p {g['top_p']:g}"


def scorer_lines(j: dict) -> list[str]:
    """The scorer's verdict in two lines (a third when the length-controlled win rate fell back)."""
    m, ci, length = j["mean_score"], j["mean_score_ci"], j["mean_length_tokens"]
    ci_score = {k: f"[{_score(v[0])}, {_score(v[1])}]" for k, v in ci.items()}
    lines = [f"scorer {j['spec']}, {j['n']} prompts: mean score SFT {_score(m['sft'])} {ci_score['sft']}, aligned "
             f"{_score(m['aligned'])} {ci_score['aligned']}; mean answer length SFT {length['sft']:.1f}, aligned "
             f"{length['aligned']:.1f} tokens",
             f"  aligned vs SFT: win rate {j['win_rate']:.3f} {_ci(j['win_rate_ci'])} ({j['wins']} wins, {j['losses']} "
             f"losses, {j['ties']} ties), length-controlled {j['lc_win_rate']:.3f} {_ci(j['lc_win_rate_ci'])} "
             f"({j['confidence']:.0%} bootstrap intervals)"]
    if j["lc_fallback"]:
        lines.append(f"  length-controlled: {j['lc_fallback']}")
    return lines


def summary_lines(result: dict) -> list[str]:
    """The table ``qsimpo eval`` prints: SFT vs aligned, side by side."""
    s, d = result["simpo"], result["data"]
    if result["models"] is None:
        lines = [f"held-out prompts: {d['summary']['kept']} ({d['source']}); preference metrics skipped: "
                 f"{result['preference_skipped']}"]
    else:
        sft, al = result["models"]["sft"], result["models"]["aligned"]
        lines = [f"held-out pairs: {d['pairs']} ({d['source']}); β = {s['beta']:g}, γ = {s['gamma']:g} (from {s['source']})",
                 f"{'':<50}{'SFT':>10}{'aligned':>10}"]
        lines += [f"{label:<50}{_fmt(sft[k], n):>10}{_fmt(al[k], n):>10}" for label, k, n in ROWS]
        lines += [f"{label:<50}{a:>10}{b:>10}" for label, a, b in length_rows(result)]
    g = result.get("generation")
    if g:
        lines.append(f"generation: {g['n']} prompts, same seed for both models ({sampling(g)})")
        lines += [f"  {label:<48}{_fmt(g['sft'][k], n):>10}{_fmt(g['aligned'][k], n):>10}" for label, k, n in GEN_ROWS]
    if result.get("scorer"):
        lines += scorer_lines(result["scorer"])
    return lines


# ------------------------------------------------------------------------------------------- plots
def _png(fig) -> str:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def training_curves(rows: list[dict]) -> str | None:
    """2×2 panels over optimizer steps: loss, reward accuracy, reward margin, chosen/rejected log-probs."""
    import matplotlib.pyplot as plt

    train = [r for r in rows if "rewards/accuracies" in r]
    evals = [r for r in rows if "eval_rewards/accuracies" in r]
    if not train and not evals:
        return None
    fig, axes = plt.subplots(2, 2, figsize=(11, 7), sharex=True)
    panels = [("loss (the run's objective)", [("loss", "train")]), ("reward accuracy", [("rewards/accuracies", "train")]),
              ("reward margin β·Δ", [("rewards/margins", "train")]),
              ("average log-prob", [("logps/chosen", "chosen (train)"), ("logps/rejected", "rejected (train)")])]
    for ax, (title, series) in zip(axes.flat, panels):
        for i, (key, label) in enumerate(series):
            color = f"C{i}"
            pts = [(r["step"], r[key]) for r in train if r.get(key) is not None]
            if pts:
                ax.plot(*zip(*pts), color=color, lw=1.2, label=label)
            pts = [(r["step"], r["eval_" + key]) for r in evals if r.get("eval_" + key) is not None]
            if pts:
                ax.plot(*zip(*pts), color=color, ls="--", marker="o", ms=4, label=label.replace("train", "held-out"))
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    for ax in axes[1]:
        ax.set_xlabel("optimizer step")
    fig.suptitle("training (metrics.jsonl): solid = training batches, dashed = held-out (data.eval)")
    return _png(fig)


def _per_pair(result: dict, name: str):
    p = result["per_pair"]
    return p[f"{name}_logp_chosen"], p[f"{name}_logp_rejected"]


def margin_histogram(result: dict) -> str:
    import matplotlib.pyplot as plt
    import numpy as np

    beta, gamma = result["simpo"]["beta"], result["simpo"]["gamma"]
    margins = {n: beta * (np.array(c) - np.array(r)) for n, (c, r) in ((n, _per_pair(result, n)) for n in ("sft", "aligned"))}
    both = np.concatenate(list(margins.values()))
    bins = np.linspace(min(both.min(), 0, gamma), max(both.max(), 0, gamma), 41)
    fig, ax = plt.subplots(figsize=(8, 4))
    for i, (name, m) in enumerate(margins.items()):
        acc = result["models"][name]["reward_accuracy"]
        ax.hist(m, bins=bins, alpha=0.55, color=f"C{i}", label=f"{'SFT' if name == 'sft' else 'aligned'} (accuracy {acc:.3f})")
    ax.axvline(0, color="k", lw=1, label="0: no preference")
    ax.axvline(gamma, color="k", lw=1, ls="--", label=f"γ = {gamma:g}: SimPO's target margin")
    ax.set_xlabel("reward margin β·(avg log-prob chosen − avg log-prob rejected)")
    ax.set_ylabel("pairs")
    ax.set_title("held-out reward margins: right of 0 = the chosen response is preferred")
    ax.legend(fontsize=8)
    return _png(fig)


def length_scatter(result: dict) -> str:
    import matplotlib.pyplot as plt

    p = result["per_pair"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharex=True, sharey=True)
    for ax, name in zip(axes, ("sft", "aligned")):
        chosen, rejected = _per_pair(result, name)
        ax.scatter(p["chosen_len"], chosen, s=10, alpha=0.6, color="C2", label="chosen")
        ax.scatter(p["rejected_len"], rejected, s=10, alpha=0.6, color="C3", label="rejected")
        rho = result["models"][name]["length"]["spearman_length_logp"]["rho"]
        ax.set_title(f"{'SFT (adapter off)' if name == 'sft' else 'aligned (adapter on)'}: Spearman ρ = {_fmt(rho)}")
        ax.set_xlabel("response length (tokens)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[0].set_ylabel("average log-prob of the response")
    return _png(fig)


def outcome_plot(result: dict) -> str | None:
    """Each prompt's outcome (aligned vs SFT) against the answers' length difference, with the LC fit's curve."""
    import matplotlib.pyplot as plt
    import numpy as np

    j, samples = result["scorer"], result["generation"]["samples"]
    d = np.array([x["aligned_tokens"] - x["sft_tokens"] for x in samples], dtype=float)
    y = np.array([1.0 if x["aligned_score"] > x["sft_score"] else 0.0 if x["aligned_score"] < x["sft_score"] else 0.5
                  for x in samples])
    jitter = np.random.default_rng(0).uniform(-0.03, 0.03, y.size)
    fig, ax = plt.subplots(figsize=(8, 3.8))
    ax.scatter(d, y + jitter, s=14, alpha=0.6, color="C0", label="prompts (1 win, ½ tie, 0 loss)")
    ax.axhline(j["win_rate"], color="C1", lw=1, ls="--", label=f"win rate {j['win_rate']:.3f}")
    if not j["lc_fallback"] and d.std() > 0:
        lc = min(max(j["lc_win_rate"], 1e-12), 1 - 1e-12)
        grid = np.linspace(min(d.min(), 0), max(d.max(), 0), 200)
        ax.plot(grid, 1 / (1 + np.exp(-(np.log(lc / (1 - lc)) + j["lc_slope"] * grid / d.std()))), color="C2", lw=1.5,
                label="fitted P(win | length difference)")
    ax.plot([0], [j["lc_win_rate"]], "o", color="C2", ms=7, label=f"length-controlled {j['lc_win_rate']:.3f} (at 0)")
    ax.axvline(0, color="k", lw=0.8)
    ax.set_xlabel("answer length difference, aligned − SFT (tokens)")
    ax.set_ylabel("aligned beats SFT")
    ax.set_ylim(-0.1, 1.1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))
    return _png(fig)


# -------------------------------------------------------------------------------------------- HTML
def _table(header: list[str], rows: list[list[str]]) -> str:
    th = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><tr>{th}</tr>{body}</table>"


def _img(b64: str | None, alt: str) -> str:
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{b64}">' if b64 else f"<p><i>{html.escape(alt)}: no data</i></p>"


CSS = ("body{font-family:system-ui,sans-serif;max-width:1150px;margin:2em auto;color:#222}"
       "table{border-collapse:collapse;margin:.5em 0 1.5em}td,th{border:1px solid #ccc;padding:4px 10px;text-align:left;"
       "vertical-align:top}td{white-space:pre-wrap}img{max-width:100%}.note{color:#555;font-size:.92em}")


def preference_parts(result: dict) -> list[str]:
    s, d = result["simpo"], result["data"]
    if result["models"] is None:
        return [f"<p>{d['summary']['kept']} held-out prompts from {html.escape(d['source'])}</p>",
                f"<h2>Preference metrics</h2><p><i>skipped: {html.escape(result['preference_skipped'])}</i></p>"]
    sft, al = result["models"]["sft"], result["models"]["aligned"]
    return [f"<p>{d['pairs']} held-out pairs from {html.escape(d['source'])} · "
            f"β = {s['beta']:g}, γ = {s['gamma']:g} (from {html.escape(s['source'])})</p>",
            "<h2>Preference metrics</h2>",
            _table(["", "SFT (adapter off)", "aligned (adapter on)"],
                   [[label, _fmt(sft[k], n), _fmt(al[k], n)] for label, k, n in ROWS]),
            "<h2>Length diagnostics</h2>",
            _table(["", "SFT", "aligned"], [list(r) for r in length_rows(result)]),
            "<p class=note>Length exploitation shows as the aligned column moving away from SFT towards length: a higher "
            "ρ, accuracy on 'chosen is longer' far above 'chosen is shorter', and a higher share preferring the longer "
            "response. SimPO's length normalisation is meant to keep these close to the SFT model's.</p>",
            _img(margin_histogram(result), "reward-margin histogram"),
            _img(length_scatter(result), "length vs average log-likelihood")]


def scorer_parts(result: dict) -> list[str]:
    j = result["scorer"]
    what = {"reward_model": "a reward model", "pairrm": "PairRM, comparing the two answers"}.get(j["kind"], "a Python function")
    m, ci, length = j["mean_score"], j["mean_score_ci"], j["mean_length_tokens"]
    conf = f"{j['confidence']:.0%}"
    lc = f"{j['lc_win_rate']:.3f} {_ci(j['lc_win_rate_ci'])}" + (f" ({j['lc_fallback']})" if j["lc_fallback"] else
                                                                 f" (length slope {j['lc_slope']:+.3f})")
    return [f"<h2>Answers judged by the scorer</h2><p><b>{html.escape(j['spec'])}</b> ({what}) on both models' answers to "
            f"{j['n']} held-out prompts ({sampling(result['generation'])}); {conf} percentile bootstrap intervals over "
            f"the prompts ({j['resamples']} resamples, seed {j['seed']})</p>",
            _table(["", "SFT (adapter off)", "aligned (adapter on)"],
                   [[f"mean score [{conf} interval]", f"{_score(m['sft'])} [{_score(ci['sft'][0])}, {_score(ci['sft'][1])}]",
                     f"{_score(m['aligned'])} [{_score(ci['aligned'][0])}, {_score(ci['aligned'][1])}]"],
                    ["mean answer length (tokens)", f"{length['sft']:.1f}", f"{length['aligned']:.1f}"]]),
            _table(["aligned vs SFT", "estimate"],
                   [["win rate (a tie counts half)", f"{j['win_rate']:.3f} {_ci(j['win_rate_ci'])}"],
                    ["wins / losses / ties", f"{j['wins']} / {j['losses']} / {j['ties']}"],
                    ["length-controlled win rate", lc]]),
            "<p class=note>The length-controlled win rate is the win rate a logistic regression of each prompt's outcome "
            "on the answers' length difference predicts at equal lengths (AlpacaEval 2's idea): a win rate that falls "
            "there was bought with longer answers.</p>",
            _img(outcome_plot(result), "outcome vs length difference")]


def write_page(parts: list[str], path: str | Path) -> Path:
    """The HTML parts as one self-contained page (styles inline, plots as data URIs) at ``path``."""
    doc = (f"<!doctype html><html><head><meta charset=utf-8><title>qsimpo eval</title><style>{CSS}</style></head>"
           f"<body>{''.join(parts)}</body></html>\n")
    path = Path(path)
    path.write_text(doc, encoding="utf-8")
    return path


def write_report(result: dict, rows: list[dict], path: str | Path) -> Path:
    """Render report.html next to eval.json; every image is inline."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed (CI, servers)
    parts = [f"<h1>qsimpo eval: {html.escape(result['adapter'])}</h1>",
             f"<p>base {html.escape(result['base_model'])}</p>", *preference_parts(result),
             "<h2>Training</h2>", _img(training_curves(rows), "training curves from metrics.jsonl")]
    g = result.get("generation")
    if g:
        j = result.get("scorer")
        if j:
            parts += scorer_parts(result)
        parts += [f"<h2>Generations ({g['n']} prompts, {sampling(g)}, seed {g['seed']} for both)</h2>",
                  _table(["", "SFT", "aligned"], [[label, _fmt(g["sft"][k], n), _fmt(g["aligned"][k], n)] for label, k, n in GEN_ROWS])]
        head = ["prompt", "SFT", "aligned", "tokens SFT", "tokens aligned"] + (["score SFT", "score aligned"] if j else [])
        parts.append(_table(head, [[x["prompt"], x["sft"], x["aligned"], x["sft_tokens"], x["aligned_tokens"]]
                                   + ([_score(x["sft_score"]), _score(x["aligned_score"])] if j else [])
                                   for x in g["samples"]]))
    return write_page(parts, path)
