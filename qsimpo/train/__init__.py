"""Training: the 4-bit base with LoRA, the batch layouts, log-probs, the SimPO loss and the loop.

    recipe.py     `qsimpo train` top to bottom: config -> data -> 4-bit base + LoRA -> trainer -> adapter folder
    model.py      the base model (NF4 / int8 / unquantized) + LoRA; the only module that touches bitsandbytes
    packing.py    shared-prompt packing and its attention mask (dense or FlexAttention), the score_* layout
    logprobs.py   per-sequence response log-probs; the chunked head that never builds full logits
    loss.py       the SimPO loss, a pure function
    trainer.py    the thin transformers.Trainer subclass: batch -> log-probs -> loss -> metrics
    callbacks.py  metrics.jsonl, the progress bar, the non-finite guard, stopping on a signal
    plan.py       the GPU memory estimate behind `qsimpo plan`
"""
