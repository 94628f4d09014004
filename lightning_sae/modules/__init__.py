"""LightningModules that train sae-lens SAEs, one per architecture."""

from lightning_sae.modules.architectures import (
    BatchTopKSAE,
    GatedSAE,
    JumpReLUSAE,
    MatryoshkaBatchTopKSAE,
    StandardSAE,
    TopKSAE,
)
from lightning_sae.modules.atm import ATMSAE
from lightning_sae.modules.base import SAEModule, available_architectures, get_module_class
from lightning_sae.modules.multi import MultiSAEModule

__all__ = [
    "ATMSAE",
    "BatchTopKSAE",
    "GatedSAE",
    "JumpReLUSAE",
    "MatryoshkaBatchTopKSAE",
    "MultiSAEModule",
    "SAEModule",
    "StandardSAE",
    "TopKSAE",
    "available_architectures",
    "get_module_class",
]
