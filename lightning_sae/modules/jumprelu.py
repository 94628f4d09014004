"""``JumpReLUSAE``: a per-latent threshold trained with an L0 penalty (sae-lens ``jumprelu``).

>>> from lightning_sae import JumpReLUSAE
>>> JumpReLUSAE(d_in=16, d_sae=64).sae.cfg.architecture()
'jumprelu'
"""

from collections.abc import Mapping
from typing import Any, ClassVar, Literal

from lightning_sae.modules.base import SAEModule
from lightning_sae.modules.validation import check_positive


class JumpReLUSAE(SAEModule):
    """JumpReLU SAE (Rajamanoharan et al. 2024) trained with an L0 penalty.

    Gradients reach the threshold through straight-through estimators; the threshold stays float32
    under any precision.

    Args:
        d_in: Width of the activations.
        d_sae: Number of latents.
        l0_coefficient: Weight of the L0 (or tanh/quadratic) sparsity penalty.
        jumprelu_bandwidth: Width ε of the rectangle kernel of the pseudo-derivatives.
        jumprelu_init_threshold: Initial threshold θ₀ of every latent.
        jumprelu_sparsity_loss_mode: ``step`` (DeepMind), ``tanh`` (Anthropic) or ``quadratic``.
        pre_act_loss_coefficient: Anthropic's pre-activation loss weight (``None`` disables it).
        target_l0: Target L0 of the ``quadratic`` mode (required by it, ignored otherwise).
        **kwargs: Training options of :class:`SAEModule`.

    """

    architecture = "jumprelu"
    sae_config_fields: ClassVar[dict[str, str]] = {
        **SAEModule.sae_config_fields,
        "l0_coefficient": "l0_coefficient",
        "l0_warm_up_steps": "sparsity_warm_up_steps",
        "jumprelu_bandwidth": "jumprelu_bandwidth",
        "jumprelu_init_threshold": "jumprelu_init_threshold",
        "jumprelu_sparsity_loss_mode": "jumprelu_sparsity_loss_mode",
        "pre_act_loss_coefficient": "pre_act_loss_coefficient",
        "target_l0": "target_l0",
    }

    def __init__(
        self,
        d_in: int,
        d_sae: int,
        l0_coefficient: float = 1.0,
        jumprelu_bandwidth: float = 0.05,
        jumprelu_init_threshold: float = 0.01,
        jumprelu_sparsity_loss_mode: Literal["step", "tanh", "quadratic"] = "step",
        pre_act_loss_coefficient: float | None = None,
        target_l0: float | None = None,
        **kwargs,
    ) -> None:
        super().__init__(d_in=d_in, d_sae=d_sae, **kwargs)

    @classmethod
    def validate_hparams(cls, hp: Mapping[str, Any]) -> None:
        """Add: positive coefficient, bandwidth and threshold; a known loss mode."""
        super().validate_hparams(hp)
        for name in ("l0_coefficient", "jumprelu_bandwidth", "jumprelu_init_threshold"):
            check_positive(name, hp[name])
        mode = hp["jumprelu_sparsity_loss_mode"]
        if mode not in ("step", "tanh", "quadratic"):
            raise ValueError(
                f"jumprelu_sparsity_loss_mode must be 'step', 'tanh' or 'quadratic', got {mode!r}."
            )
        if mode == "quadratic" and hp["target_l0"] is None:
            raise ValueError("jumprelu_sparsity_loss_mode='quadratic' needs target_l0.")
