"""Adaptive Temporal Masking (ATM) SAE: a ReLU + L1 SAE trained with importance-based masking.

ATM (Li & Ren, "Adaptive Temporal Masking", arXiv 2510.08855, 2025) tracks, per latent,
exponential moving averages of activation magnitude, firing frequency and reconstruction
contribution, combines them into an importance score ``I_t``, and during training masks latents
whose score falls below the statistical threshold ``θ_t = μ_t + c·sigma_t`` with probability
``p = 1 - exp(-r·(θ_t - I_t)/θ_t)``. The loss is reconstruction + L1. At inference no latent is
masked, so the trained SAE *is* a ReLU SAE: it exports as sae-lens's built-in ``standard``
architecture and loads with plain sae-lens.

What follows the paper: the three per-latent EMA signals, the threshold ``μ_t + c·sigma_t`` over the
latents' scores, the masking probability formula, masking during training only, and the
reconstruction + L1 loss (here sae-lens ``standard``'s decoder-norm-weighted L1).

What the paper does not publish, and is our choice (each a hyper-parameter of
:class:`ATMTrainingSAEConfig`):

* **Signals**, measured on the *unmasked* ReLU activations ``f`` of each training batch, so that
  masking a latent does not by itself drive its statistics down and mask it for good:

  - magnitude ``m_i``: mean of ``f_i`` over the batch's tokens where latent ``i`` fires (0 if it
    fires on none);
  - frequency ``q_i``: fraction of the batch's tokens where ``f_i > 0``;
  - contribution ``u_i``: mean over tokens of ``f_i·‖W_dec,i‖``, the norm of the latent's term
    in the reconstruction.

  One decay ``atm_ema_decay`` (β) for all three: ``ema ← β·ema + (1 - β)·batch``, starting at 0.
  No bias correction is needed: it would scale every latent alike and cancels below.
* **Combination**: each signal is divided by its mean over latents (so it is unit-free and the
  start-at-zero bias cancels), and ``I = (w_m·m̂ + w_q·q̂ + w_u·û) / (w_m + w_q + w_u)``, a
  weighted arithmetic mean (mean importance over latents is 1). Arithmetic rather than geometric
  so that one zero signal (a latent silent in the window) does not zero the score outright.
* **Threshold statistics**: ``μ_t`` and the population ``sigma_t`` over all ``d_sae`` scores.
  ``θ_t <= 0`` masks nothing (scores are never negative).
* **Granularity**: by default each (token, latent) pair is masked independently (dropout-like);
  ``atm_mask_granularity="batch"`` draws one decision per latent for the whole batch.
* **Timing**: the mask at step ``t`` uses the EMAs up to step ``t - 1``, and masking starts after
  ``atm_warm_up_steps`` steps, when the EMAs have seen enough batches to mean something.
* Under DDP each rank updates the EMAs from its own batch (no collective in the forward pass);
  :class:`~lightning_sae.ATMSAE` then averages them over ranks after every step
  (``rank_averaged_state``), so every rank
  masks from the same scores.

The forward pass is vectorised and never syncs with the host: the warm-up test uses the Python
step count, and the mask uses the global ``torch.rand`` so Lightning's seeding applies.

>>> from lightning_sae.saes import ATMTrainingSAE, ATMTrainingSAEConfig
>>> sae = ATMTrainingSAE(ATMTrainingSAEConfig(d_in=8, d_sae=32))
>>> sae.cfg.get_inference_config_class().architecture()
'standard'
"""

import math
from dataclasses import dataclass
from typing import Any, Literal

import torch
from sae_lens.registry import SAE_TRAINING_CLASS_REGISTRY, register_sae_training_class
from sae_lens.saes.sae import SAEConfig, TrainStepInput, TrainStepOutput
from sae_lens.saes.standard_sae import (
    StandardSAEConfig,
    StandardTrainingSAE,
    StandardTrainingSAEConfig,
)
from torch import Tensor
from typing_extensions import override

#: Names of the per-latent EMA buffers (float32, in checkpoints, dropped from inference exports).
ATM_STATISTICS = ("ema_magnitude", "ema_frequency", "ema_contribution")
#: The config fields ATM adds to sae-lens's ``standard`` training config.
ATM_HYPERPARAMETERS = (
    "atm_ema_decay",
    "atm_magnitude_weight",
    "atm_frequency_weight",
    "atm_contribution_weight",
    "atm_threshold_c",
    "atm_mask_rate",
    "atm_warm_up_steps",
    "atm_mask_granularity",
)

_TINY = torch.finfo(torch.float32).tiny


def _check_finite(name: str, value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}.")


@dataclass
class ATMTrainingSAEConfig(StandardTrainingSAEConfig):
    """Training config of an ATM SAE: sae-lens ``standard`` fields plus the ATM hyper-parameters.

    Args:
        atm_ema_decay: β of the three per-latent EMAs, in (0, 1). 0.99 averages over ~100 steps.
        atm_magnitude_weight: Weight ``w_m`` of the magnitude signal in the importance (>= 0).
        atm_frequency_weight: Weight ``w_q`` of the firing-frequency signal (>= 0).
        atm_contribution_weight: Weight ``w_u`` of the reconstruction-contribution signal (>= 0).
            At least one weight must be positive.
        atm_threshold_c: ``c`` in ``θ = μ + c·sigma`` (any finite number; negative masks only the
            low tail, 0 masks every latent below average importance).
        atm_mask_rate: ``r`` in ``p = 1 - exp(-r·(θ - I)/θ)``, > 0; the largest masking
            probability (a latent with ``I = 0``) is ``1 - exp(-r)``.
        atm_warm_up_steps: Training steps before masking starts (>= 0).
        atm_mask_granularity: ``token`` masks each (token, latent) pair independently; ``batch``
            masks a latent for the whole batch.

    """

    atm_ema_decay: float = 0.99
    atm_magnitude_weight: float = 1.0
    atm_frequency_weight: float = 1.0
    atm_contribution_weight: float = 1.0
    atm_threshold_c: float = 0.0
    atm_mask_rate: float = 1.0
    atm_warm_up_steps: int = 1000
    atm_mask_granularity: Literal["token", "batch"] = "token"

    def __post_init__(self) -> None:
        """Reject out-of-range hyper-parameters before any tensor exists."""
        super().__post_init__()
        _check_finite("atm_ema_decay", self.atm_ema_decay)
        if not 0.0 < self.atm_ema_decay < 1.0:
            raise ValueError(
                f"atm_ema_decay must be in (0, 1) (the EMA keeps this fraction of its old value "
                f"each step), got {self.atm_ema_decay!r}."
            )
        weights = {
            "atm_magnitude_weight": self.atm_magnitude_weight,
            "atm_frequency_weight": self.atm_frequency_weight,
            "atm_contribution_weight": self.atm_contribution_weight,
        }
        for name, weight in weights.items():
            _check_finite(name, weight)
            if weight < 0:
                raise ValueError(f"{name} must be >= 0, got {weight!r}.")
        if sum(weights.values()) <= 0:
            raise ValueError(
                "At least one of atm_magnitude_weight, atm_frequency_weight and "
                "atm_contribution_weight must be positive: the importance score needs a signal."
            )
        _check_finite("atm_threshold_c", self.atm_threshold_c)
        _check_finite("atm_mask_rate", self.atm_mask_rate)
        if not self.atm_mask_rate > 0:
            raise ValueError(f"atm_mask_rate (r) must be > 0, got {self.atm_mask_rate!r}.")
        steps = self.atm_warm_up_steps
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
            raise ValueError(f"atm_warm_up_steps must be an integer >= 0, got {steps!r}.")
        if self.atm_mask_granularity not in ("token", "batch"):
            raise ValueError(
                "atm_mask_granularity must be 'token' or 'batch', got "
                f"{self.atm_mask_granularity!r}."
            )

    @override
    @classmethod
    def architecture(cls) -> str:
        return "atm"

    @override
    def get_inference_config_class(self) -> type[SAEConfig]:
        """Masking is training-only: the inference SAE is sae-lens's built-in ``standard``."""
        return StandardSAEConfig


class ATMTrainingSAE(StandardTrainingSAE):
    """sae-lens ``standard`` training SAE with Adaptive Temporal Masking (see the module docstring).

    Buffers ``ema_magnitude``, ``ema_frequency`` and ``ema_contribution`` (float32, ``[d_sae]``)
    are part of the state dict, so training checkpoints resume them; inference exports drop them.
    ``ATMSAE`` keeps them float32 under any Trainer precision (a bare ``sae.to(dtype)`` casts them).
    """

    #: Updated from each rank's own batch; the module averages them over ranks every step (with
    #: equal decays, the average of the ranks' EMAs is the EMA of their averaged statistics).
    rank_averaged_state = ATM_STATISTICS

    cfg: ATMTrainingSAEConfig  # type: ignore[assignment]
    ema_magnitude: Tensor
    ema_frequency: Tensor
    ema_contribution: Tensor

    def __init__(self, cfg: ATMTrainingSAEConfig, use_error_term: bool = False) -> None:
        super().__init__(cfg, use_error_term)
        for name in ATM_STATISTICS:
            self.register_buffer(
                name, torch.zeros(cfg.d_sae, dtype=torch.float32, device=self.W_dec.device)
            )
        # Set by training_forward_pass for the duration of one pass; None means "do not mask".
        self._mask_probability: Tensor | None = None

    @torch.no_grad()
    def importance(self) -> Tensor:
        """Return the importance score ``I`` of each latent, ``[d_sae]``; its mean is 1."""
        cfg = self.cfg
        total = cfg.atm_magnitude_weight + cfg.atm_frequency_weight + cfg.atm_contribution_weight
        score = torch.zeros_like(self.ema_magnitude)
        for weight, signal in (
            (cfg.atm_magnitude_weight, self.ema_magnitude),
            (cfg.atm_frequency_weight, self.ema_frequency),
            (cfg.atm_contribution_weight, self.ema_contribution),
        ):
            score += (weight / total) * signal / signal.mean().clamp_min(_TINY)
        return score

    @torch.no_grad()
    def masking_probability(self) -> Tensor:
        """Return the probability ``p`` that each latent is masked at this step, ``[d_sae]``.

        ``p = 1 - exp(-r·(θ - I)/θ)`` below ``θ = μ + c·sigma`` and exactly 0 at or above it.
        """
        importance = self.importance()
        theta = importance.mean() + self.cfg.atm_threshold_c * importance.std(correction=0)
        gap = (theta - importance) / theta.clamp_min(_TINY)
        probability = -torch.expm1(-self.cfg.atm_mask_rate * gap)
        return torch.where(importance < theta, probability, torch.zeros_like(probability))

    @torch.no_grad()
    def update_statistics(self, feature_acts: Tensor) -> None:
        """Fold one batch of unmasked latents ``[..., d_sae]`` into the three EMAs."""
        acts = feature_acts.detach().float().reshape(-1, self.cfg.d_sae)
        tokens = acts.shape[0]
        fired = (acts > 0).sum(dim=0).float()
        total = acts.sum(dim=0)
        batch_values = (
            total / fired.clamp_min(1.0),
            fired / tokens,
            total * self.W_dec.detach().float().norm(dim=1) / tokens,
        )
        weight = 1.0 - self.cfg.atm_ema_decay
        for name, value in zip(ATM_STATISTICS, batch_values, strict=True):
            getattr(self, name).lerp_(value, weight)

    @override
    def encode_with_hidden_pre(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """ReLU encoding; inside a masked training pass, low-importance latents are zeroed."""
        feature_acts, hidden_pre = super().encode_with_hidden_pre(x)
        if self._mask_probability is None:
            return feature_acts, hidden_pre
        if self.cfg.atm_mask_granularity == "token":
            shape = feature_acts.shape
        else:
            shape = (*(1,) * (feature_acts.ndim - 1), feature_acts.shape[-1])
        keep = torch.rand(shape, device=feature_acts.device) >= self._mask_probability
        return feature_acts * keep, hidden_pre

    @override
    def training_forward_pass(self, step_input: TrainStepInput) -> TrainStepOutput:
        """sae-lens's training pass with ATM masking (after warm-up), then an EMA update.

        In eval mode this is the plain ``standard`` pass and the EMAs are left alone.
        """
        masking = self.training and step_input.n_training_steps >= self.cfg.atm_warm_up_steps
        self._mask_probability = self.masking_probability() if masking else None
        try:
            output = super().training_forward_pass(step_input)
        finally:
            self._mask_probability = None
        if self.training:
            self.update_statistics(self.activation_fn(output.hidden_pre))
        return output

    @override
    def process_state_dict_for_saving_inference(self, state_dict: dict[str, Any]) -> None:
        """Drop the EMA buffers: the ``standard`` inference SAE loads its tensors strictly."""
        super().process_state_dict_for_saving_inference(state_dict)
        for name in ATM_STATISTICS:
            state_dict.pop(name, None)


if "atm" not in SAE_TRAINING_CLASS_REGISTRY:  # importlib.reload or a second import path
    register_sae_training_class("atm", ATMTrainingSAE, ATMTrainingSAEConfig)
