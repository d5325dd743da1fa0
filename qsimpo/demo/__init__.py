"""`qsimpo demo`: chat with the SFT model and the aligned model side by side, one base in memory.

    app.py       the Gradio UI (gradio is imported only there)
    sides.py     the model side: both columns from one batched generation, log-probs under each side
    batcher.py   many users: requests waiting while the model is busy run together as one batch
    stream.py    the per-row pieces of that batch: text streaming, seeded sampling, stopping
"""
