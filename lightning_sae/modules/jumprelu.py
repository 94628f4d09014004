"""``JumpReLUSAE``: a per-latent threshold trained with an L0 penalty (sae-lens ``jumprelu``).

>>> from lightning_sae import JumpReLUSAE
>>> JumpReLUSAE(d_in=16, d_sae=64).sae.cfg.architecture()
'jumprelu'
"""

from collections.abc import Mapping
from typing import Any, ClassVar, Literal

from sae_lens.saes.sae import TrainingSAE, TrainingSAEConfig

from lightning_sae.modules.base import SAEModule
from lightning_sae.modules.validation import check_positive
from lightning_sae.saes.jumprelu import (
    AdaptiveJumpReLUTrainingSAE,
    AdaptiveJumpReLUTrainingSAEConfig,
)


class JumpReLUSAE(SAEModule):
    """JumpReLU SAE (Rajamanoharan et al. 2024) trained with an L0 penalty.

    Gradients reach the threshold through straight-through estimators; the threshold stays float32
    under any precision. The training SAE is
    :class:`~lightning_sae.saes.jumprelu.AdaptiveJumpReLUTrainingSAE` (sae-lens's, plus the
    options below); exports are sae-lens ``jumprelu`` folders. ``target_l0`` makes the sparsity a
    setting: the thresholds start at the requested L0 and a controller keeps it there (it adapts
    the L0 coefficient and scales all thresholds together). ``jumprelu_threshold_lr_scale=1``
    without ``target_l0`` trains exactly as sae-lens does.

    Args:
        d_in: Width of the activations.
        d_sae: Number of latents.
        l0_coefficient: Weight λ of the L0 (or tanh/quadratic) sparsity penalty; with
            ``target_l0``, its starting value.
        jumprelu_bandwidth: Width ε of the rectangle kernel of the pseudo-derivatives.
        jumprelu_init_threshold: Initial threshold θ₀ of every latent (without ``target_l0``).
        jumprelu_sparsity_loss_mode: ``step`` (DeepMind), ``tanh`` (Anthropic) or ``quadratic``.
        pre_act_loss_coefficient: Anthropic's pre-activation loss weight (``None`` disables it).
        target_l0: Mean active latents per token to reach (required by ``quadratic``, where it
            is also the penalty's centre); ``None``: the plain λ penalty.
        jumprelu_threshold_lr_scale: How many times faster than ``lr`` the thresholds learn
            (>= 1; 1 is sae-lens's speed, at which λ barely steers L0 in a normal budget).
        l0_controller_gain: Integral gain of the controller adapting λ toward ``target_l0``
            (0 disables the controller).
        l0_controller_proportional_gain: Its proportional gain, which damps overshoot.
        l0_controller_threshold_gain: Gain of its common step of all thresholds toward
            ``target_l0`` (every training pass multiplies them by ``exp(gain·log(L0/target_l0))``
            of the previous pass, the ratio clipped to [0.1, 10]), which lets them follow the
            encoder's growing pre-activations (0 disables it).
        jumprelu_threshold_init_from_data: With ``target_l0``, set the thresholds on the first
            training batch so that every latent fires on ``target_l0 / d_sae`` of the tokens.
        **kwargs: Training options of :class:`SAEModule`.

    """

    architecture = "jumprelu"
    training_sae_class = AdaptiveJumpReLUTrainingSAE
    full_precision_tensors = (
        *SAEModule.full_precision_tensors,
        "previous_threshold",
        "log_l0_coefficient_scale",
        "log_threshold_step",
    )
    sae_config_fields: ClassVar[dict[str, str]] = {
        **SAEModule.sae_config_fields,
        "l0_coefficient": "l0_coefficient",
        "l0_warm_up_steps": "sparsity_warm_up_steps",
        "jumprelu_bandwidth": "jumprelu_bandwidth",
        "jumprelu_init_threshold": "jumprelu_init_threshold",
        "jumprelu_sparsity_loss_mode": "jumprelu_sparsity_loss_mode",
        "pre_act_loss_coefficient": "pre_act_loss_coefficient",
        "target_l0": "target_l0",
        "jumprelu_threshold_lr_scale": "jumprelu_threshold_lr_scale",
        "l0_controller_gain": "l0_controller_gain",
        "l0_controller_proportional_gain": "l0_controller_proportional_gain",
        "l0_controller_threshold_gain": "l0_controller_threshold_gain",
        "jumprelu_threshold_init_from_data": "jumprelu_threshold_init_from_data",
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
        jumprelu_threshold_lr_scale: float = 30.0,
        l0_controller_gain: float = 0.02,
        l0_controller_proportional_gain: float = 3.0,
        l0_controller_threshold_gain: float = 0.05,
        jumprelu_threshold_init_from_data: bool = True,
        **kwargs,
    ) -> None:
        super().__init__(d_in=d_in, d_sae=d_sae, **kwargs)

    @classmethod
    def sae_classes(cls) -> tuple[type[TrainingSAE[Any]], type[TrainingSAEConfig]]:
        """Return our JumpReLU training class and its config (sae-lens's plus our options)."""
        return AdaptiveJumpReLUTrainingSAE, AdaptiveJumpReLUTrainingSAEConfig

    @classmethod
    def sae_config_kwargs(cls, hp: Mapping[str, Any]) -> dict[str, Any]:
        """Turn the controller and the data start off without a target L0 (plain λ)."""
        kwargs = super().sae_config_kwargs(hp)
        if hp["target_l0"] is None:
            kwargs |= {
                "l0_controller_gain": 0.0,
                "l0_controller_proportional_gain": 0.0,
                "l0_controller_threshold_gain": 0.0,
                "jumprelu_threshold_init_from_data": False,
            }
        return kwargs

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
