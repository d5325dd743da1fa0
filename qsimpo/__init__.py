"""qsimpo: QLoRA + SimPO preference alignment on one GPU (or a CPU)."""

import logging
import warnings

__version__ = "0.1.0"


class _NoKernelsPackageNotice(logging.Filter):
    """Drop bitsandbytes' import-time notice that the optional ``kernels`` package is not installed.

    On CPUs with AVX512-BF16, importing bitsandbytes tries to fetch a faster fused 4-bit CPU kernel
    through the ``kernels`` package and logs a warning when that package is missing. The kernel only
    serves bitsandbytes' repacked inference layout, which qsimpo.train.model.load_base turns off; every
    4-bit matmul qsimpo runs uses bitsandbytes' built-in path either way. Any other failure to load
    the kernel (the package installed but broken) still shows.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if not str(record.msg).startswith("Failed to load CPU gemm_4bit_forward from kernels-community"):
            return True
        exc = record.args[0] if isinstance(record.args, tuple) and record.args else None
        return not (isinstance(exc, ModuleNotFoundError) and exc.name == "kernels")


# Set before bitsandbytes is first imported (it logs the notice at import), hence here.
logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_NoKernelsPackageNotice())

# peft's PeftModel.__init__ reads model.is_gradient_checkpointing, which transformers 5 renamed to
# is_activation_checkpointing and warns about on every read; qsimpo itself uses the new names.
warnings.filterwarnings("ignore", message=r"`is_gradient_checkpointing` is deprecated", category=FutureWarning)
