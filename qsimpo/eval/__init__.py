"""Evaluation: scoring pairs the way training does, the numbers, the report, and generation.

    scoring.py    per-response average log-probs through the training path (packed rows, chunked head)
    metrics.py    eval's numbers as pure functions: accuracy, margins, Spearman, length splits, win rate
    evaluate.py   `qsimpo eval`: SFT vs aligned on held-out pairs, generations, judge, eval.json
    report.py     eval's printed table and report.html
    generate.py   the model.generate setup shared by eval, the quickstart, merge's probes and the demo
"""
