"""``StandardSAE``: ReLU with a decoder-norm-weighted L1 penalty (sae-lens ``standard``).

>>> from lightning_sae import StandardSAE
>>> StandardSAE(d_in=16, d_sae=64).sae.cfg.architecture()
'standard'
"""

from collections.abc import Mapping
from typing import Any, ClassVar

from lightning_sae.modules.base import SAEModule
from lightning_sae.modules.validation import check_positive
from lightning_sae.saes.standard import FastStandardTrainingSAE


class StandardSAE(SAEModule):
    """ReLU SAE with a decoder-norm-weighted L1 penalty (Anthropic, April 2024 update).

    Loss = ‖x − x̂‖² + λ Σ f_i ‖W_dec,i‖; λ warms up over ``sparsity_warm_up_steps``.

    Args:
        d_in: Width of the activations.
        d_sae: Number of latents.
        l1_coefficient: λ, the sparsity penalty's weight (on normalised activations).
        lp_norm: The p of the penalty's p-norm (1 is L1).
        **kwargs: Training options of :class:`SAEModule` (``lr``, schedules, ...).

    """

    architecture = "standard"
    training_sae_class = FastStandardTrainingSAE
    sae_config_fields: ClassVar[dict[str, str]] = {
        **SAEModule.sae_config_fields,
        "l1_coefficient": "l1_coefficient",
        "lp_norm": "lp_norm",
        "l1_warm_up_steps": "sparsity_warm_up_steps",
    }

    def __init__(
        self, d_in: int, d_sae: int, l1_coefficient: float = 5.0, lp_norm: float = 1.0, **kwargs
    ) -> None:
        super().__init__(d_in=d_in, d_sae=d_sae, **kwargs)

    @classmethod
    def validate_hparams(cls, hp: Mapping[str, Any]) -> None:
        """Add: λ and p are positive."""
        super().validate_hparams(hp)
        check_positive("l1_coefficient", hp["l1_coefficient"])
        check_positive("lp_norm", hp["lp_norm"])
