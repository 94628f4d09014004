"""lightning-sae: train sae-lens sparse autoencoders with PyTorch Lightning.

>>> from lightning_sae import BatchTopKSAE
>>> BatchTopKSAE(d_in=16, d_sae=64, k=4).sae.cfg.d_sae
64
"""

import logging

# bitsandbytes (imported by transformer-lens) logs an error at import on CPUs with AVX512-BF16
# when the optional ``kernels`` package is absent; nothing a user can act on. Before sae-lens.
logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(
    lambda record: "gemm_4bit_forward" not in record.getMessage()
)

from lightning_sae import metrics  # noqa: E402
from lightning_sae.callbacks import SAELensExport  # noqa: E402
from lightning_sae.data import ActivationDataModule  # noqa: E402
from lightning_sae.export import export_to_sae_lens, load_from_sae_lens  # noqa: E402
from lightning_sae.modules import (  # noqa: E402
    ATMSAE,
    BatchTopKSAE,
    GatedSAE,
    JumpReLUSAE,
    MatryoshkaBatchTopKSAE,
    MultiSAEModule,
    SAEModule,
    StandardSAE,
    TopKSAE,
)
from lightning_sae.registry import available_architectures, get_module_class, register_architecture  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "ATMSAE",
    "ActivationDataModule",
    "BatchTopKSAE",
    "GatedSAE",
    "JumpReLUSAE",
    "MatryoshkaBatchTopKSAE",
    "MultiSAEModule",
    "SAELensExport",
    "SAEModule",
    "StandardSAE",
    "TopKSAE",
    "__version__",
    "available_architectures",
    "export_to_sae_lens",
    "get_module_class",
    "load_from_sae_lens",
    "metrics",
    "register_architecture",
]
