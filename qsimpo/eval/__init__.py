"""Evaluation: the numbers, the report, and generation (pairs are scored by qsimpo.scoring, as training scores them).

    metrics.py    eval's numbers as pure functions: accuracy, margins, Spearman, length splits, win rate
    evaluate.py   `qsimpo eval`: SFT vs aligned on held-out pairs, generations, judge, eval.json
    report.py     eval's printed table and report.html
    generate.py   the model.generate setup shared by eval, the quickstart, merge's probes and the demo
"""
