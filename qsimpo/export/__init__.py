"""Export: merging an adapter into its base (verified against the adapter), GGUF, and sharing on the Hub.

    merge.py      `qsimpo merge`: dequantize the NF4 base, merge, save, verify
    verify.py     the KL / top-1 check of a merged model against the adapter on its 4-bit base
    hub.py        `qsimpo push`: file selection, model card, token checks, the one upload call
    gguf_out.py   `qsimpo merge --gguf`: the merged model as GGUF for llama.cpp/Ollama, with a Modelfile
    gguf_check.py a written GGUF read back through transformers and compared with the merged model
    space.py      `qsimpo push --space`: the demo/ folder as a Gradio Space for an adapter
"""
