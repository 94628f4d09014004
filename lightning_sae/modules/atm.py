"""LightningModule for Adaptive Temporal Masking SAEs (Li & Ren, arXiv 2510.08855).

The math is :class:`lightning_sae.saes.ATMTrainingSAE` (registered with sae-lens as ``atm``,
exported as a plain ``standard`` SAE); which parts follow the paper and which are our choices is
documented there.

>>> from lightning_sae import ATMSAE
>>> module = ATMSAE(d_in=16, d_sae=64)
>>> module.sae.cfg.architecture(), module.sae.cfg.get_inference_config_class().architecture()
('atm', 'standard')
"""

from typing import ClassVar, Literal

from lightning_sae.modules.standard import StandardSAE
from lightning_sae.saes.atm import ATM_HYPERPARAMETERS, ATM_STATISTICS, ATMTrainingSAE


class ATMSAE(StandardSAE):
    """ReLU + L1 SAE trained with Adaptive Temporal Masking; exports as sae-lens ``standard``.

    Per-latent EMAs of magnitude, frequency and reconstruction contribution make an importance
    score; during training, after ``atm_warm_up_steps``, latents below ``θ = μ + c·sigma`` are
    masked with probability ``1 - exp(-r·(θ - I)/θ)``. Invalid values raise ``ValueError`` at
    construction.

    Args:
        d_in: Width of the activations.
        d_sae: Number of latents.
        l1_coefficient: λ of the decoder-norm-weighted L1 penalty (on normalised activations).
            5.0 as for :class:`StandardSAE` (inputs normalised to ``E‖x‖ = sqrt(d_in)``); lower
            it where features are few and large (the synthetic benchmark uses 1.0).
        lp_norm: The p of the penalty's p-norm (1 is L1).
        atm_ema_decay: Decay β in (0, 1) of the three per-latent EMAs.
        atm_magnitude_weight: Weight of the activation-magnitude signal in the importance.
        atm_frequency_weight: Weight of the firing-frequency signal.
        atm_contribution_weight: Weight of the reconstruction-contribution signal.
        atm_threshold_c: ``c`` of the threshold ``θ = μ + c·sigma``.
        atm_mask_rate: ``r`` > 0 of the masking probability.
        atm_warm_up_steps: Optimisation steps before masking starts.
        atm_mask_granularity: ``token`` (each token and latent independently) or ``batch``.
        **kwargs: Training options of :class:`~lightning_sae.SAEModule` (``lr``, schedules, ...).

    """

    architecture = "atm"
    training_sae_class = ATMTrainingSAE  # registered with sae-lens as "atm" on import
    sae_config_fields: ClassVar[dict[str, str]] = {
        **StandardSAE.sae_config_fields,
        **{name: name for name in ATM_HYPERPARAMETERS},
    }
    #: The EMAs stay float32 under any Trainer precision, like thresholds elsewhere.
    full_precision_tensors = (*StandardSAE.full_precision_tensors, *ATM_STATISTICS)

    def __init__(
        self,
        d_in: int,
        d_sae: int,
        l1_coefficient: float = 5.0,
        lp_norm: float = 1.0,
        atm_ema_decay: float = 0.99,
        atm_magnitude_weight: float = 1.0,
        atm_frequency_weight: float = 1.0,
        atm_contribution_weight: float = 1.0,
        atm_threshold_c: float = 0.0,
        atm_mask_rate: float = 1.0,
        atm_warm_up_steps: int = 1000,
        atm_mask_granularity: Literal["token", "batch"] = "token",
        **kwargs,
    ) -> None:
        super().__init__(
            d_in=d_in, d_sae=d_sae, l1_coefficient=l1_coefficient, lp_norm=lp_norm, **kwargs
        )
