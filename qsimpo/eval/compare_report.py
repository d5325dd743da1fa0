"""What ``qsimpo eval A B C`` shows: the printed table and report.html of several adapters beside the SFT model.

Built from the comparison's eval.json dict alone (qsimpo.eval.compare); the pieces of one adapter's
report (qsimpo.eval.report: formatting, tables, inline PNGs) are reused, the columns are SFT and
each adapter, labelled by name and loss.
"""

from __future__ import annotations

import html
from pathlib import Path

from qsimpo.eval.report import GEN_ROWS, ROWS, _ci, _fmt, _img, _png, _score, _table, sampling, write_page

SHARED_ROWS = [("reward accuracy", "reward_accuracy", 3), ("margin Δ avg log-prob (mean)", "margin_mean", 4),
               ("margin Δ avg log-prob (median)", "margin_median", 4), ("avg log-prob, chosen", "logp_chosen_mean", 4),
               ("avg log-prob, rejected", "logp_rejected_mean", 4)]


def loss_text(loss: dict) -> str:
    """``dpo β=0.1``: the loss and its parameters (SimPO's resolved γ, not the two ways of giving it)."""
    params = {k: v for k, v in loss.items() if k != "type" and v is not None and k not in ("gamma", "gamma_beta_ratio")}
    if "gamma_resolved" in params:
        params["γ"] = params.pop("gamma_resolved")
    named = {"beta": "β", "lam": "λ", "alpha": "α"}
    return " ".join([loss.get("type", "simpo")] + [f"{named.get(k, k)}={v:g}" if isinstance(v, float) else f"{named.get(k, k)}={v}"
                                                    for k, v in params.items() if v not in (0, 0.0, "sigmoid", "tokens")])


def columns(result: dict) -> list[tuple[str, str]]:
    """(key, header) of every model: SFT first, then each adapter as ``name (loss)``."""
    return [("sft", "SFT")] + [(a["name"], f"{a['name']} ({a['loss'].get('type', 'simpo')})") for a in result["adapters"]]


def shared_rows(result: dict) -> list[list[str]]:
    models = result["shared"]["models"]
    keys = [k for k, _ in columns(result)]
    kl = {a["name"]: a["kl_from_sft"] for a in result["adapters"]}
    rows = [[label] + [_fmt(models[k][key], n) for k in keys] for label, key, n in SHARED_ROWS]
    rows.append(["KL from SFT per response token"] + ["0" if k == "sft" else _fmt(kl[k]["per_token"], 4) for k in keys])
    length = {k: models[k]["length"] for k in keys}
    rows.append(["Spearman ρ(length, avg log-prob)"] + [_fmt(length[k]["spearman_length_logp"]["rho"]) for k in keys])
    by = length["sft"]["accuracy_by_length"]
    for group, label in (("chosen_longer", "chosen is longer"), ("chosen_shorter", "chosen is shorter"),
                         ("same_length", "same length")):
        rows.append([f"accuracy, {label} (n={by[group]['n']})"]
                    + [_fmt(length[k]["accuracy_by_length"][group]["accuracy"]) for k in keys])
    unequal = by["chosen_longer"]["n"] + by["chosen_shorter"]["n"]
    data = f"; data {by['chosen_longer']['n'] / unequal:.3f}" if unequal else ""
    rows.append([f"prefers the longer response (n={unequal}{data})"] + [_fmt(length[k]["prefers_longer"]["rate"]) for k in keys])
    return rows


def comparison_line(c: dict) -> str:
    against = "SFT" if c["against"] == "sft" else c["against"]
    line = (f"  {c['model']} vs {against}: win rate {c['win_rate']:.3f} {_ci(c['win_rate_ci'])} ({c['wins']} wins, "
            f"{c['losses']} losses, {c['ties']} ties), length-controlled {c['lc_win_rate']:.3f} {_ci(c['lc_win_rate_ci'])}")
    return line + (f" ({c['lc_fallback']})" if c["lc_fallback"] else "")


def summary_lines(result: dict) -> list[str]:
    """The table ``qsimpo eval A B ...`` prints: SFT and each adapter, side by side."""
    d, cols = result["data"], columns(result)
    width = max(10, *(len(k) + 2 for k, _ in cols))
    lines = ["adapters: " + "; ".join(f"{a['name']} = {a['adapter']} ({loss_text(a['loss'])})" for a in result["adapters"]),
             f"SFT: {result['sft_side']}"]
    if result["shared"] is None:
        lines.append(f"held-out prompts: {d['summary']['kept']} ({d['source']}); preference metrics skipped: "
                     f"{result['preference_skipped']}")
    else:
        lines += [f"held-out pairs: {d['pairs']} ({d['source']}); {result['shared']['definition']}",
                  f"{'':<50}" + "".join(f"{'SFT' if k == 'sft' else k:>{width}}" for k, _ in cols)]
        lines += [f"{r[0]:<50}" + "".join(f"{v:>{width}}" for v in r[1:]) for r in shared_rows(result)]
    g = result.get("generation")
    if g:
        lines.append(f"generation: {g['n']} prompts, same seed for every model ({sampling(g)})")
        lines += [f"  {label:<48}" + "".join(f"{_fmt(g['models'][k][key], n):>{width}}" for k, _ in cols)
                  for label, key, n in GEN_ROWS]
    j = result.get("scorer")
    if j:
        first = j["comparisons"][0]
        lines.append(f"scorer {j['spec']}, {first['n']} prompts ({first['confidence']:.0%} bootstrap intervals):")
        lines += [comparison_line(c) for c in j["comparisons"]]
    return lines


def margin_histogram(result: dict) -> str:
    """Every model's held-out margins Δ avg log-prob (the shared definition), overlaid."""
    import matplotlib.pyplot as plt
    import numpy as np

    p = result["per_pair"]
    margins = {k: np.array(p[f"{k}_logp_chosen"]) - np.array(p[f"{k}_logp_rejected"]) for k, _ in columns(result)}
    both = np.concatenate(list(margins.values()))
    bins = np.linspace(min(both.min(), 0), max(both.max(), 0), 41)
    fig, ax = plt.subplots(figsize=(8, 4))
    for i, ((k, header), m) in enumerate(zip(columns(result), margins.values())):
        acc = result["shared"]["models"][k]["reward_accuracy"]
        ax.hist(m, bins=bins, alpha=0.45, color=f"C{i}", label=f"{header} (accuracy {acc:.3f})")
    ax.axvline(0, color="k", lw=1, label="0: no preference")
    ax.set_xlabel("margin: avg log-prob chosen − avg log-prob rejected")
    ax.set_ylabel("pairs")
    ax.set_title("held-out margins: right of 0 = the chosen response is preferred")
    ax.legend(fontsize=8)
    return _png(fig)


def write_report(result: dict, path: str | Path) -> Path:
    """report.html of a comparison; every image inline."""
    import matplotlib

    matplotlib.use("Agg")
    cols = columns(result)
    e = html.escape
    parts = [f"<h1>qsimpo eval: {e(', '.join(a['name'] for a in result['adapters']))}</h1>",
             f"<p>base {e(result['base_model'])}; SFT: {e(result['sft_side'])}</p>",
             _table(["adapter", "folder or Hub id", "loss"],
                    [[a["name"], a["adapter"], loss_text(a["loss"])] for a in result["adapters"]])]
    d = result["data"]
    if result["shared"] is None:
        parts.append(f"<h2>Preference metrics</h2><p><i>skipped: {e(result['preference_skipped'])}</i></p>")
    else:
        parts += [f"<p>{d['pairs']} held-out pairs from {e(d['source'])}</p>",
                  "<h2>Preference metrics, one definition for every loss</h2>",
                  f"<p class=note>{e(result['shared']['definition'])}. KL from SFT is KL(adapter ‖ SFT) of the next-token "
                  "distributions over the whole vocabulary, averaged over the held-out responses' tokens (chosen and "
                  "rejected, teacher-forced).</p>",
                  _table([""] + [h for _, h in cols], shared_rows(result)),
                  _img(margin_histogram(result), "margin histogram"),
                  "<h2>Each adapter at its own run's β and γ</h2><p class=note>As <code>qsimpo eval</code> of that "
                  "adapter alone reports them (SimPO's reward and loss; for another loss, the SimPO settings its config "
                  "holds).</p>",
                  _table([""] + [h for _, h in cols[1:]],
                         [[label] + [_fmt(a["models"]["aligned"][k], n) for a in result["adapters"]] for label, k, n in ROWS])]
    j = result.get("scorer")
    if j:
        rows = [[c["model"], "SFT" if c["against"] == "sft" else c["against"],
                 f"{c['win_rate']:.3f} {_ci(c['win_rate_ci'])}", f"{c['wins']} / {c['losses']} / {c['ties']}",
                 f"{c['lc_win_rate']:.3f} {_ci(c['lc_win_rate_ci'])}" + (f" ({c['lc_fallback']})" if c["lc_fallback"] else ""),
                 f"{_score(c['mean_score']['model'])} vs {_score(c['mean_score']['against'])}"] for c in j["comparisons"]]
        parts += [f"<h2>Answers judged by the scorer</h2><p><b>{e(j['spec'])}</b>; {j['comparisons'][0]['confidence']:.0%} "
                  "percentile bootstrap intervals over the prompts; a tie counts half</p>",
                  _table(["model", "against", "win rate", "wins / losses / ties", "length-controlled win rate",
                          "mean score"], rows)]
    g = result.get("generation")
    if g:
        parts += [f"<h2>Generations ({g['n']} prompts, {sampling(g)}, seed {g['seed']} for every model)</h2>",
                  _table([""] + [h for _, h in cols], [[label] + [_fmt(g["models"][k][key], n) for k, _ in cols]
                                                       for label, key, n in GEN_ROWS])]
        scored = j is not None
        parts.append(_table(["prompt"] + [h for _, h in cols],
                            [[x["prompt"]] + [f"{x['answers'][k]}\n({x['tokens'][k]} tokens"
                                              + (f", score {_score(x['scores'][k])})" if scored else ")") for k, _ in cols]
                             for x in g["samples"]]))
    return write_page(parts, path)
