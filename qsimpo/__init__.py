"""qsimpo: QLoRA + SimPO preference alignment on one GPU (or a CPU)."""

__version__ = "0.1.0"
