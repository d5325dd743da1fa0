"""`qsimpo demo`: chat with the SFT model and the aligned model side by side, one base in memory.

    app.py     the Gradio UI (gradio is imported only there)
    sides.py   the model side: the two sides on one PeftModel, streaming, log-probs
"""
