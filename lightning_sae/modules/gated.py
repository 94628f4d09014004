"""``GatedSAE``: separate gate and magnitude paths (sae-lens ``gated``).

>>> from lightning_sae import GatedSAE
>>> GatedSAE(d_in=16, d_sae=64).sae.cfg.architecture()
'gated'
"""

from collections.abc import Mapping
from typing import Any, ClassVar

from lightning_sae.modules.base import SAEModule
from lightning_sae.modules.validation import check_positive
from lightning_sae.saes.gated import FastGatedTrainingSAE


class GatedSAE(SAEModule):
    """Gated SAE (Rajamanoharan et al. 2024): separate gate and magnitude paths.

    The gate decides *which* latents fire, the magnitude path *how much*; an L1 penalty acts on
    the gate, plus an auxiliary reconstruction through the gate.

    Args:
        d_in: Width of the activations.
        d_sae: Number of latents.
        l1_coefficient: Weight of the gate's (decoder-norm-weighted) L1 penalty.
        **kwargs: Training options of :class:`SAEModule`.

    """

    architecture = "gated"
    training_sae_class = FastGatedTrainingSAE
    sae_config_fields: ClassVar[dict[str, str]] = {
        **SAEModule.sae_config_fields,
        "l1_coefficient": "l1_coefficient",
        "l1_warm_up_steps": "sparsity_warm_up_steps",
    }

    def __init__(self, d_in: int, d_sae: int, l1_coefficient: float = 5.0, **kwargs) -> None:
        super().__init__(d_in=d_in, d_sae=d_sae, **kwargs)

    @classmethod
    def validate_hparams(cls, hp: Mapping[str, Any]) -> None:
        """Add: λ is positive."""
        super().validate_hparams(hp)
        check_positive("l1_coefficient", hp["l1_coefficient"])
