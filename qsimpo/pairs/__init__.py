"""On-policy preference pairs (`qsimpo pairs`), the SimPO paper's recipe: for each prompt, n answers sampled from
the SFT model, scored, best = chosen and worst = rejected.

    sample.py    the policy (a base or an adapter on its 4-bit base) and batched sampling, seeded per answer
    vllm_backend.py  the same sampling with vLLM (--backend), on a CUDA GPU
    scorers.py   --scorer: a Python callable (module:function, file.py:function), a reward model or PairRM, checked scores
    pairrm.py    PairRM (LLM-Blender's pairwise ranker) on transformers' DeBERTa-v2, ranking as LLM-Blender ranks
    judges.py    forward passes of the model judges sized by memory; each prompt's answers as a group
    write.py     the output rows (the paper's data-set layout), dropped prompts, resuming an interrupted run
    run.py       make_pairs: the command from top to bottom
    examples.py  scorers to copy: a rule-based "concise, complete answer" scorer
"""

from qsimpo.pairs.run import make_pairs

__all__ = ["make_pairs"]
