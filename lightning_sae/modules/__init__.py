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

__all__ = [
    "ATMSAE",
    "BatchTopKSAE",
    "GatedSAE",
    "JumpReLUSAE",
    "MatryoshkaBatchTopKSAE",
    "SAEModule",
    "StandardSAE",
    "TopKSAE",
    "available_architectures",
    "get_module_class",
]
