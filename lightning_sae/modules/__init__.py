"""LightningModules that train sae-lens SAEs: one file per architecture over a thin base.

- ``base.py``: :class:`SAEModule`, the Lightning side (logging, optimiser, checkpoints).
- ``unit.py``: :class:`SAEUnit`, one SAE with its parts — ``normalizer.py`` (activation scale),
  ``statistics.py`` (dead latents, metrics, density window) and optimiser settings.
- ``standard.py``, ``gated.py``, ``jumprelu.py``, ``topk.py`` (TopK, BatchTopK, Matryoshka),
  ``atm.py``: each architecture's hyper-parameters, rules and sae-lens config mapping.
- ``multi.py``: :class:`MultiSAEModule`, one unit per hook from one stream.
- ``checkpoints.py`` (the class a checkpoint records, the checks on load), ``log.py``,
  ``validation.py`` (rules shared by architectures).
"""

from lightning_sae.modules.atm import ATMSAE
from lightning_sae.modules.base import SAEModule
from lightning_sae.modules.gated import GatedSAE
from lightning_sae.modules.jumprelu import JumpReLUSAE
from lightning_sae.modules.multi import MultiSAEModule
from lightning_sae.modules.standard import StandardSAE
from lightning_sae.modules.topk import BatchTopKSAE, MatryoshkaBatchTopKSAE, TopKSAE
from lightning_sae.modules.unit import SAEUnit

__all__ = [
    "ATMSAE",
    "BatchTopKSAE",
    "GatedSAE",
    "JumpReLUSAE",
    "MatryoshkaBatchTopKSAE",
    "MultiSAEModule",
    "SAEModule",
    "SAEUnit",
    "StandardSAE",
    "TopKSAE",
]
