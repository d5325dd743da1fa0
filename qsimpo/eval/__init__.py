"""Evaluation: the numbers, the report, and generation (pairs are scored by qsimpo.response_logps, as training scores them).

    metrics.py    eval's numbers as pure functions: accuracy, margins, Spearman, length splits, win rates, bootstrap
    evaluate.py   `qsimpo eval`: SFT vs aligned on held-out pairs, generations, eval.json
    judged.py     --scorer: both models' answers judged by a `qsimpo pairs` scorer; prompts-only held-out sources
    report.py     eval's printed table and report.html
    compare.py    `qsimpo eval A B C`: several adapters on one base beside the SFT model, KL from SFT, pairwise verdicts
    compare_report.py  its printed table and report.html
    generate.py   the model.generate setup shared by eval, the quickstart, merge's probes and the demo
"""
