"""What ``qsimpo eval`` shows: the printed summary and a self-contained report.html.

The report is built from eval.json's dict and the adapter's metrics.jsonl alone (plots are
matplotlib PNGs embedded as base64, so the one file can be mailed or attached to a PR):
training curves, the reward-margin histogram of SFT vs aligned, and response length vs
average log-likelihood for both models.
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


def summary_lines(result: dict) -> list[str]:
    """The table ``qsimpo eval`` prints: SFT vs aligned, side by side."""
    s, d = result["simpo"], result["data"]
    sft, al = result["models"]["sft"], result["models"]["aligned"]
    lines = [f"held-out pairs: {d['pairs']} ({d['source']}); β = {s['beta']:g}, γ = {s['gamma']:g} (from {s['source']})",
             f"{'':<50}{'SFT':>10}{'aligned':>10}"]
    lines += [f"{label:<50}{_fmt(sft[k], n):>10}{_fmt(al[k], n):>10}" for label, k, n in ROWS]
    lines += [f"{label:<50}{a:>10}{b:>10}" for label, a, b in length_rows(result)]
    g = result.get("generation")
    if g:
        lines.append(f"generation: {g['n']} prompts, same seed for both models (temperature {g['temperature']:g})")
        lines += [f"  {label:<48}{_fmt(g['sft'][k], n):>10}{_fmt(g['aligned'][k], n):>10}" for label, k, n in GEN_ROWS]
    j = result.get("judge")
    if j:
        lines.append(f"judge {j['model']}: aligned beats SFT {j['win_rate']:.3f} "
                     f"[{j['ci_low']:.3f}, {j['ci_high']:.3f}] ({j['confidence']:.0%} Wilson; {j['wins']} wins, "
                     f"{j['losses']} losses, {j['ties']} ties of {j['n']})")
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


def write_report(result: dict, rows: list[dict], path: str | Path) -> Path:
    """Render report.html next to eval.json; every image is inline."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed (CI, servers)
    sft, al = result["models"]["sft"], result["models"]["aligned"]
    s, d = result["simpo"], result["data"]
    parts = [f"<h1>qsimpo eval: {html.escape(result['adapter'])}</h1>",
             f"<p>base {html.escape(result['base_model'])} · {d['pairs']} held-out pairs from {html.escape(d['source'])} · "
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
             _img(length_scatter(result), "length vs average log-likelihood"),
             "<h2>Training</h2>", _img(training_curves(rows), "training curves from metrics.jsonl")]
    g = result.get("generation")
    if g:
        parts += [f"<h2>Generations ({g['n']} prompts, temperature {g['temperature']:g}, seed {g['seed']} for both)</h2>",
                  _table(["", "SFT", "aligned"], [[label, _fmt(g["sft"][k], n), _fmt(g["aligned"][k], n)] for label, k, n in GEN_ROWS])]
        j = result.get("judge")
        if j:
            parts.append(f"<p>judge <b>{html.escape(j['model'])}</b>: aligned beats SFT in {j['win_rate']:.3f} of prompts, "
                         f"{j['confidence']:.0%} Wilson interval [{j['ci_low']:.3f}, {j['ci_high']:.3f}] "
                         f"({j['wins']} wins, {j['losses']} losses, {j['ties']} ties)</p>")
        head = ["prompt", "SFT", "aligned"] + (["judge SFT", "judge aligned"] if j else [])
        parts.append(_table(head, [[x["prompt"], x["sft"], x["aligned"]] + ([_fmt(x["judge_sft"]), _fmt(x["judge_aligned"])]
                                                                            if j else []) for x in g["samples"]]))
    doc = (f"<!doctype html><html><head><meta charset=utf-8><title>qsimpo eval</title><style>{CSS}</style></head>"
           f"<body>{''.join(parts)}</body></html>\n")
    path = Path(path)
    path.write_text(doc, encoding="utf-8")
    return path
