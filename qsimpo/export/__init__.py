"""Export: merging an adapter into its base (verified against the adapter) and sharing on the Hub.

    merge.py      `qsimpo merge`: dequantize the NF4 base, merge, save, verify
    verify.py     the KL / top-1 check of a merged model against the adapter on its 4-bit base
    hub.py        `qsimpo push`: file selection, model card, token checks, the one upload call
"""
