"""JumpReLU training whose sparsity is a setting: fast thresholds, a data start, an L0 controller.

sae-lens's ``JumpReLUTrainingSAE`` (the DeepMind recipe: ``f = π·H(π − θ)``, an L0 penalty
``λ·Σ H(π − θ)`` reaching ``θ`` through straight-through pseudo-derivatives) rarely reaches a
useful sparsity in a normal budget, and ``λ`` does not steer it. The reasons, measured on the
synthetic set of issue 10 (96 unit features in 32 dimensions, ~3.8 active per token, d_sae 128):

* **The threshold cannot move.** In the DeepMind formulation the L0 penalty reaches only ``θ``.
  Adam moves ``θ`` by about ``lr`` per step whatever the gradient's size, while the encoder's
  pre-activations ``π`` grow from their small initial scale (decoder rows of norm 0.1) by
  ``lr·‖x‖₁`` per step — tens of times faster for normalised inputs. ``θ`` lags far behind
  (L0 68 of 128 after 2,000 steps at ``lr`` 3e-4).
* **So λ cannot steer L0.** While ``θ`` lags, the penalty's gradient only has a sign: any ``λ``
  moves ``θ`` at Adam's top speed, and ``λ ×10`` gives the same L0 (67 vs 68). ``λ`` only matters
  at the equilibrium where the penalty's and the reconstruction's pulls on ``θ`` balance, which
  is never reached.

Three options of :class:`AdaptiveJumpReLUTrainingSAEConfig` fix this; with their config defaults
the class trains exactly as sae-lens does (a test compares losses, outputs and gradients):

* ``jumprelu_threshold_lr_scale`` (``m``): ``θ`` learns ``m`` times faster than the other
  parameters. Implemented without a separate optimiser group: each training pass extrapolates the
  optimiser's last step of ``θ`` to ``m`` times its size (``θ ← θ_prev + m·(θ − θ_prev)``, with
  ``θ_prev`` the threshold the previous pass used), which for Adam or SGD is exactly a learning
  rate ``m`` times higher for ``θ``. Any change of ``θ`` made between passes outside the optimiser
  is scaled alike, except through :meth:`~AdaptiveJumpReLUTrainingSAE.initialize_from_batch` and
  ``load_state_dict`` (both reset ``θ_prev``). With ``θ`` at equilibrium, ``λ ×10`` clearly
  lowers L0.
* ``l0_controller_gain`` (with ``target_l0``): the L0 coefficient is multiplied by
  ``exp(s)``, and after every training pass ``s ← s + gain·log(L0_batch / target_l0)`` (the
  ratio clipped to [0.1, 10], ``s`` to ±ln 10⁴): dual ascent on the constraint
  ``E[L0] = target_l0``, so the requested sparsity is reached without a sweep of ``λ``.
* ``jumprelu_threshold_init_from_data`` (with ``target_l0``): on the first training batch each
  latent's threshold is set to the quantile of its pre-activations at which it fires on
  ``target_l0 / d_sae`` of the tokens, so training starts at the requested L0 with every latent
  alive.

The controller state ``log_l0_coefficient_scale`` is averaged over DDP ranks after every pass
(:attr:`~AdaptiveJumpReLUTrainingSAE.rank_averaged_state`); the thresholds (and so ``θ_prev``)
are identical on every rank already, and the data-driven start averages the ranks' quantiles.
The extra buffers are in training checkpoints and dropped from inference exports, which stay
sae-lens's built-in ``jumprelu`` (this class is not registered under any name).

>>> sae = AdaptiveJumpReLUTrainingSAE(
...     AdaptiveJumpReLUTrainingSAEConfig(d_in=8, d_sae=32, target_l0=4.0, l0_controller_gain=0.02)
... )
>>> sae.cfg.architecture(), sae.cfg.get_inference_config_class().architecture()
('jumprelu', 'jumprelu')
"""

import math
from dataclasses import dataclass, fields
from typing import Any, ClassVar

import torch
from sae_lens.saes.jumprelu_sae import (
    JumpReLUTrainingSAE,
    JumpReLUTrainingSAEConfig,
)
from sae_lens.saes.sae import TrainStepInput, TrainStepOutput
from torch import Tensor
from typing_extensions import override

from lightning_sae.distributed import all_reduce_mean

#: Bound of the controller's log-multiplier of the L0 coefficient (λ stays within 10⁻⁴..10⁴ × λ₀).
MAX_LOG_SCALE = math.log(1e4)
#: Bound of the L0 ratio one controller step reacts to, so a batch with L0 0 moves it finitely.
MAX_L0_RATIO = 10.0

#: Buffers of ours (name → dtype): training state, kept out of inference exports.
_EXTRA_STATE = {"previous_threshold": torch.float32, "log_l0_coefficient_scale": torch.float64}


@dataclass
class AdaptiveJumpReLUTrainingSAEConfig(JumpReLUTrainingSAEConfig):
    """sae-lens's JumpReLU training config plus the options that let sparsity be set.

    With these fields at their defaults the SAE trains as sae-lens's ``JumpReLUTrainingSAE``.

    Args:
        jumprelu_threshold_lr_scale: ``m``, how many times faster than the other parameters the
            thresholds learn (>= 1; 1 is sae-lens).
        l0_controller_gain: Gain of the controller that adapts the L0 coefficient so the batch L0
            follows ``target_l0`` (>= 0; 0 disables it; needs ``target_l0`` when positive).
        jumprelu_threshold_init_from_data: Set the thresholds from the first training batch so
            that each latent fires on ``target_l0 / d_sae`` of its tokens (needs ``target_l0``).

    """

    jumprelu_threshold_lr_scale: float = 1.0
    l0_controller_gain: float = 0.0
    jumprelu_threshold_init_from_data: bool = False

    def __post_init__(self) -> None:
        """Reject out-of-range options before any tensor exists."""
        super().__post_init__()
        scale = self.jumprelu_threshold_lr_scale
        if isinstance(scale, bool) or not isinstance(scale, int | float) or not scale >= 1:
            raise ValueError(
                f"jumprelu_threshold_lr_scale must be a number >= 1 (1 trains the threshold at "
                f"the optimiser's learning rate, as sae-lens does), got {scale!r}."
            )
        gain = self.l0_controller_gain
        if isinstance(gain, bool) or not isinstance(gain, int | float) or not gain >= 0:
            raise ValueError(f"l0_controller_gain must be a number >= 0, got {gain!r}.")
        needs_target = gain > 0 or self.jumprelu_threshold_init_from_data
        if needs_target and self.target_l0 is None:
            raise ValueError(
                "l0_controller_gain > 0 and jumprelu_threshold_init_from_data need target_l0, "
                "the L0 to reach: set target_l0, or turn both off."
            )
        if self.target_l0 is not None and not 0 < self.target_l0 <= self.d_sae:
            raise ValueError(
                f"target_l0 must satisfy 0 < target_l0 <= d_sae ({self.d_sae}), got "
                f"{self.target_l0!r}: it is the mean number of active latents per token."
            )


class AdaptiveJumpReLUTrainingSAE(JumpReLUTrainingSAE):
    """sae-lens's ``JumpReLUTrainingSAE`` with a fast threshold, a data start and an L0 controller.

    See the module docstring. Parameters keep sae-lens's names and meaning (``threshold`` is
    ``θ`` itself), so exports are plain sae-lens ``jumprelu`` folders.
    """

    cfg: AdaptiveJumpReLUTrainingSAEConfig  # type: ignore[assignment]
    previous_threshold: Tensor
    log_l0_coefficient_scale: Tensor

    #: Buffers the module averages over DDP ranks after every training pass.
    rank_averaged_state: ClassVar[tuple[str, ...]] = ("log_l0_coefficient_scale",)

    def __init__(self, cfg: AdaptiveJumpReLUTrainingSAEConfig, use_error_term: bool = False):
        super().__init__(cfg, use_error_term)
        self.register_buffer("previous_threshold", self.threshold.detach().clone())
        self.register_buffer(
            "log_l0_coefficient_scale",
            torch.zeros((), dtype=torch.float64, device=self.threshold.device),
        )

    @classmethod
    def from_sae_lens(
        cls, sae: JumpReLUTrainingSAE, **options: Any
    ) -> "AdaptiveJumpReLUTrainingSAE":
        """Return a copy of sae-lens's ``sae`` (same config and weights) with our ``options``."""
        base = {f.name: getattr(sae.cfg, f.name) for f in fields(JumpReLUTrainingSAEConfig)}
        adaptive = cls(AdaptiveJumpReLUTrainingSAEConfig(**(base | options)))
        adaptive.load_state_dict(sae.state_dict())
        return adaptive

    # ------------------------------------------------------------------ the options
    @property
    def l0_coefficient_scale(self) -> Tensor:
        """The controller's current multiplier of the L0 coefficient (1 without a controller)."""
        return self.log_l0_coefficient_scale.exp()

    @torch.no_grad()
    def initialize_from_batch(self, sae_in: Tensor) -> None:
        """Set each threshold so its latent fires on ``target_l0 / d_sae`` of ``sae_in``'s tokens.

        Called once, on the first training batch of a fresh fit (``sae_in`` already normalised);
        a no-op unless ``jumprelu_threshold_init_from_data``. An all-zero (untrained) ``b_dec``
        is set to the batch mean first. Under DDP the ranks' means and quantiles are averaged,
        so every rank starts from the same weights.
        """
        cfg = self.cfg
        if not cfg.jumprelu_threshold_init_from_data or cfg.target_l0 is None:
            return
        if cfg.apply_b_dec_to_input and not self.b_dec.any():
            # An untrained b_dec (sae-lens starts it at 0) starts at the data mean instead: the
            # quantiles are then taken on centred inputs and do not shift as b_dec learns it.
            self.b_dec.data.copy_(all_reduce_mean(sae_in.float().mean(dim=0)))
        hidden_pre = self.process_sae_in(sae_in) @ self.W_enc + self.b_enc
        tokens = hidden_pre.shape[0]
        # The threshold below which exactly round(tokens·(1 − rate)) pre-activations lie.
        below = round(tokens * (1.0 - cfg.target_l0 / cfg.d_sae))
        below = min(max(below, 1), tokens)
        quantile = torch.kthvalue(hidden_pre.float(), below, dim=0).values
        threshold = all_reduce_mean(quantile).clamp_min(0.0)
        self.threshold.data.copy_(threshold)
        self.previous_threshold.copy_(self.threshold)

    @torch.no_grad()
    def _scale_threshold_step(self) -> None:
        """Extrapolate the optimiser's last threshold step ``m``-fold, then remember ``θ``."""
        scale = self.cfg.jumprelu_threshold_lr_scale
        threshold = self.threshold.data
        if scale != 1:
            previous = self.previous_threshold
            threshold.copy_(previous + scale * (threshold - previous))
        threshold.clamp_(min=0.0)  # sae-lens's projection (θ ≥ 0)
        self.previous_threshold.copy_(threshold)

    @torch.no_grad()
    def _update_controller(self, l0: Tensor) -> None:
        """One dual-ascent step of the L0 coefficient's log-multiplier from the batch's mean L0."""
        target = self.cfg.target_l0
        assert target is not None  # checked by the config
        ratio = (l0.double().mean() / target).clamp(1.0 / MAX_L0_RATIO, MAX_L0_RATIO)
        scale = self.log_l0_coefficient_scale
        scale.add_(self.cfg.l0_controller_gain * ratio.log()).clamp_(-MAX_LOG_SCALE, MAX_LOG_SCALE)

    # ------------------------------------------------------------------ training pass
    @override
    def training_forward_pass(self, step_input: TrainStepInput) -> TrainStepOutput:
        """sae-lens's training pass, after scaling the threshold's last step (training mode)."""
        if self.training:
            self._scale_threshold_step()
        return super().training_forward_pass(step_input)

    @override
    def calculate_aux_loss(
        self,
        step_input: TrainStepInput,
        feature_acts: Tensor,
        hidden_pre: Tensor,
        sae_out: Tensor,
    ) -> dict[str, Tensor]:
        """sae-lens's sparsity loss with the controlled coefficient; then one controller step."""
        scale = self.l0_coefficient_scale
        coefficients = step_input.coefficients
        if self.cfg.l0_controller_gain > 0:
            coefficient = coefficients["l0"] * scale.to(hidden_pre.dtype)
            coefficients = {**coefficients, "l0": coefficient}  # type: ignore[dict-item]
        losses = super().calculate_aux_loss(
            TrainStepInput(
                sae_in=step_input.sae_in,
                coefficients=coefficients,
                dead_neuron_mask=step_input.dead_neuron_mask,
                n_training_steps=step_input.n_training_steps,
                is_logging_step=step_input.is_logging_step,
            ),
            feature_acts,
            hidden_pre,
            sae_out,
        )
        if self.training and self.cfg.l0_controller_gain > 0:
            self._update_controller((feature_acts > 0).sum(dim=-1))
        return losses

    # ------------------------------------------------------------------ state and dtypes
    @override
    def _apply(self, *args: Any, **kwargs: Any) -> "AdaptiveJumpReLUTrainingSAE":
        """Move like any module, keeping our training state in its full-precision dtypes."""
        out = super()._apply(*args, **kwargs)
        for name, dtype in _EXTRA_STATE.items():
            buffer = self._buffers.get(name)
            if buffer is not None and buffer.dtype != dtype:
                self._buffers[name] = buffer.to(dtype)
        return out

    @override
    def _load_from_state_dict(
        self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any
    ) -> None:
        """Load sae-lens states too: a state without our buffers restarts them from its ``θ``."""
        threshold = state_dict.get(f"{prefix}threshold")
        if threshold is not None:
            # A threshold loaded from elsewhere is not an optimiser step: never extrapolate it.
            state_dict.setdefault(f"{prefix}previous_threshold", threshold)
        state_dict.setdefault(
            f"{prefix}log_l0_coefficient_scale", torch.zeros((), dtype=torch.float64)
        )
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @override
    def process_state_dict_for_saving_inference(self, state_dict: dict[str, Any]) -> None:
        """Drop our training buffers: sae-lens's ``jumprelu`` loads its tensors strictly."""
        super().process_state_dict_for_saving_inference(state_dict)
        for name in _EXTRA_STATE:
            state_dict.pop(name, None)


__all__ = ["AdaptiveJumpReLUTrainingSAE", "AdaptiveJumpReLUTrainingSAEConfig"]
