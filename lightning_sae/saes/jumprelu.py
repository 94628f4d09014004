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

Four options of :class:`AdaptiveJumpReLUTrainingSAEConfig` fix this; with their config defaults
the class trains exactly as sae-lens does (a test compares losses, outputs and gradients):

* ``jumprelu_threshold_lr_scale`` (``m``): ``θ`` learns ``m`` times faster than the other
  parameters. Implemented without a separate optimiser group: each training pass extrapolates the
  optimiser's last step of ``θ`` to ``m`` times its size (``θ ← θ_prev + m·(θ − θ_prev)``, with
  ``θ_prev`` the threshold the previous pass used), which for Adam or SGD is exactly a learning
  rate ``m`` times higher for ``θ``. Any change of ``θ`` made between passes outside the optimiser
  is scaled alike, except through :meth:`~AdaptiveJumpReLUTrainingSAE.initialize_from_batch` and
  ``load_state_dict`` (both reset ``θ_prev``). With ``θ`` at equilibrium, ``λ ×10`` clearly
  lowers L0.
* ``l0_controller_gain`` and ``l0_controller_proportional_gain`` (with ``target_l0``): a PI
  controller of the L0 coefficient. With ``e = log(L0_batch / target_l0)`` (the ratio clipped to
  [0.1, 10]) the coefficient is multiplied by ``exp(s + k_p·e)``, and every training pass
  integrates ``s ← s + k_i·e`` (``s`` clipped to ±ln 10⁴): dual ascent on the constraint
  ``E[L0] = target_l0``, so the requested sparsity is reached without a sweep of ``λ``. The
  proportional term damps the overshoot that the thresholds' inertia (Adam's momentum and bounded
  step) causes under integral control alone.
* ``l0_controller_threshold_gain`` (with ``target_l0``): the controller's fast part. Every
  training pass multiplies all thresholds by ``exp(threshold_gain·e)`` (the previous pass's
  ``e``), outside the optimiser, so the thresholds follow the encoder's pre-activations however
  fast those grow; the per-latent thresholds still learn from their gradients which latents
  should fire more or less. Without it the integral of ``λ`` must do all the work and winds up:
  on cached SmolLM2 activations (target 32, 1,000 steps at batch 4,096) the L0 rose to 163 in
  the first 50 steps while ``θ`` lagged, ``λ`` grew ×154, and L0 ended at 22, 30% under.
* ``jumprelu_threshold_init_from_data`` (with ``target_l0``): on the first training batch each
  latent's threshold is set to the quantile of its pre-activations at which it fires on
  ``target_l0 / d_sae`` of the tokens, so training starts at the requested L0 with every latent
  alive.

The controller state (``log_l0_coefficient_scale`` and the pending common threshold step
``log_threshold_step``) is averaged over DDP ranks after every pass
(:attr:`~AdaptiveJumpReLUTrainingSAE.rank_averaged_state`), so the thresholds (and ``θ_prev``)
stay identical on every rank; the data-driven start averages the ranks' quantiles.
The extra buffers are in training checkpoints and dropped from inference exports, which stay
sae-lens's built-in ``jumprelu`` (this class is not registered under any name).

The training pass is fused (:class:`JumpReLUWithL0`: one mask for activation, L0 and backward)
and, when few pre-activations lie in the band its backward pass reads (at most
``sparse_density_limit`` of the entries above ``min(θ − ε, θ⁻)``), sparse: the encoder's
gradients, the pseudo-derivatives, the per-token L0 and the decoder run on those entries only
(:class:`JumpReLUEntries`), and ``feature_acts`` is returned as a CSR tensor. Both share the
pseudo-derivatives (:func:`jumprelu_gradients`); tests compare both with sae-lens.

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
    calculate_pre_act_loss,
)
from sae_lens.saes.sae import TrainStepInput, TrainStepOutput
from torch import Tensor
from typing_extensions import override

from lightning_sae.distributed import all_reduce_mean
from lightning_sae.saes.kernels import (
    DenseEncoder,
    SampledEncoder,
    SparseDecode,
    accumulator_dtype,
    entry_layout,
    flat_entries,
    runs_sae_lens_pass,
    sparse_csr,
    threshold_band,
    threshold_decode,
)

#: Bound of the controller's log-multiplier of the L0 coefficient (λ stays within 10⁻⁴..10⁴ × λ₀).
MAX_LOG_SCALE = math.log(1e4)
#: Bound of the L0 ratio one controller step reacts to, so a batch with L0 0 moves it finitely.
MAX_L0_RATIO = 10.0

#: Buffers of ours (name → dtype): training state, kept out of inference exports.
_EXTRA_STATE = {
    "previous_threshold": torch.float32,
    "log_l0_coefficient_scale": torch.float64,
    "log_threshold_step": torch.float64,
}


def jumprelu_gradients(
    hidden_pre: Tensor,
    threshold: Tensor,
    active: Tensor,
    bandwidth: float,
    ste_to_input: bool,
    grad_acts: Tensor | None,
    grad_l0: Tensor | None,
    needs_hidden_grad: bool,
) -> tuple[Tensor | None, Tensor | None]:
    """sae-lens's ``JumpReLU`` and ``Step`` pseudo-derivatives together, element-wise.

    With the rectangle kernel ``K(u) = 1[|u| < ½]`` of bandwidth ε at ``u = (π − θ)/ε``:
    ``∂f/∂π = H``, ``∂f/∂θ = −(θ/ε)·K``, ``∂L0/∂θ = −(1/ε)·K``, plus the kernel terms to ``π``
    (``+(θ/ε)·K`` and ``+(1/ε)·K``) when ``ste_to_input``. Works on any shape:
    ``threshold`` and ``grad_l0`` (the per-token L0's gradient) broadcast to ``hidden_pre``'s;
    ``active`` is ``H(π − θ)`` in ``π``'s dtype (the forward pass's mask).

    Returns the gradient of ``π`` (None unless ``needs_hidden_grad``, and for the L0 alone
    without ``ste_to_input``, as sae-lens's ``Step``) and the kernel term ``p``
    of every entry, ``K·(grad_acts·θ/ε + grad_l0/ε)``: ``θ``'s gradient is ``−p`` summed per
    latent. Each product is sae-lens's to the bit; only the sums are taken in another order.
    Two temporaries the size of ``π``, the second reused for ``π``'s gradient.
    """
    if grad_acts is None and grad_l0 is None:
        return None, None
    pseudo = (hidden_pre - threshold).div_(bandwidth).abs_().lt_(0.5)  # K, then p in place
    if grad_acts is not None:
        scaled = grad_acts * (threshold / bandwidth)
        if grad_l0 is not None:
            scaled.add_(grad_l0 * (1.0 / bandwidth))
    else:
        assert grad_l0 is not None
        scaled = (grad_l0 * (1.0 / bandwidth)).expand_as(pseudo)
    pseudo.mul_(scaled)
    if not needs_hidden_grad:
        return None, pseudo
    if grad_acts is None:
        return (pseudo.clone() if ste_to_input else None), pseudo
    grad_hidden = torch.mul(grad_acts, active, out=scaled)  # ``scaled`` is spent
    if ste_to_input:
        grad_hidden.add_(pseudo)
    return grad_hidden, pseudo


class JumpReLUWithL0(torch.autograd.Function):
    """``f = π·H(π − θ)`` and the per-token L0 ``Σ_i H(π_i − θ_i)`` in one element-wise pass.

    The pseudo-derivatives are sae-lens's ``JumpReLU`` and ``Step`` functions' together
    (:func:`jumprelu_gradients`). sae-lens runs two functions that each build their own masks;
    here one mask (in ``π``'s dtype: a bool mask's products and sums are several times slower
    on CPU) serves the activation, the L0 and the backward pass.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, hidden_pre: Tensor, threshold: Tensor, bandwidth: float, ste_to_input: bool
    ) -> tuple[Tensor, Tensor]:
        """Return the latents ``[..., d_sae]`` and the per-token L0 ``[...]`` (float)."""
        active = torch.gt(hidden_pre, threshold, out=torch.empty_like(hidden_pre))
        ctx.set_materialize_grads(False)  # an unused output's gradient: None, not dense zeros
        ctx.save_for_backward(hidden_pre, threshold, active)
        ctx.bandwidth, ctx.ste_to_input = bandwidth, ste_to_input
        return hidden_pre * active, active.sum(dim=-1)

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: Any, grad_acts: Tensor | None, grad_l0: Tensor | None
    ) -> tuple[Tensor | None, Tensor | None, None, None]:
        """Pseudo-gradients to ``π`` and ``θ`` (:func:`jumprelu_gradients`)."""
        hidden_pre, threshold, active = ctx.saved_tensors
        grad_hidden, pseudo = jumprelu_gradients(
            hidden_pre,
            threshold,
            active,
            ctx.bandwidth,
            ctx.ste_to_input,
            grad_acts,
            None if grad_l0 is None else grad_l0.unsqueeze(-1),
            ctx.needs_input_grad[0],
        )
        grad_threshold = None if pseudo is None else -pseudo.sum(dim=tuple(range(pseudo.ndim - 1)))
        return grad_hidden, grad_threshold, None, None


class JumpReLUEntries(torch.autograd.Function):
    """:class:`JumpReLUWithL0` on sparse entries: pre-activations ``π_e`` at ``(rows, cols)``.

    Returns each entry's latent ``f_e = π_e·H(π_e − θ_{col})`` and the per-token L0 ``[B]`` (the
    active entries of each row; entries not listed count as inactive). The backward pass is
    :func:`jumprelu_gradients` on the entries, ``θ``'s gradient summed per latent
    (``index_add``): exactly the dense function's wherever every active entry and every entry
    inside the kernel is listed (:func:`~lightning_sae.saes.kernels.threshold_band`).
    ``threshold`` may have another dtype (sae-lens keeps it float32): it is cast per entry, and
    both sums (L0, ``θ``'s gradient) accumulate in at least float32, as a dense ``sum`` does.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        values: Tensor,
        threshold: Tensor,
        rows: Tensor,
        cols: Tensor,
        batch: int,
        bandwidth: float,
        ste_to_input: bool,
    ) -> tuple[Tensor, Tensor]:
        """Return the entries' latents ``[n]`` and the per-token L0 ``[batch]`` (float)."""
        active = (values > threshold[cols].to(values.dtype)).to(values.dtype)
        ctx.set_materialize_grads(False)  # an unused output's gradient: None, not zeros
        ctx.save_for_backward(values, threshold, active, rows, cols)
        ctx.bandwidth, ctx.ste_to_input = bandwidth, ste_to_input
        total = accumulator_dtype(values.dtype)
        l0 = values.new_zeros(batch, dtype=total).index_add_(0, rows, active.to(total))
        return values * active, l0.to(values.dtype)

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: Any, grad_acts: Tensor | None, grad_l0: Tensor | None
    ) -> tuple[Tensor | None, ...]:
        """Pseudo-gradients to ``π_e`` and ``θ`` (:func:`jumprelu_gradients`)."""
        values, threshold, active, rows, cols = ctx.saved_tensors
        grad_values, pseudo = jumprelu_gradients(
            values,
            threshold[cols].to(values.dtype),
            active,
            ctx.bandwidth,
            ctx.ste_to_input,
            grad_acts,
            None if grad_l0 is None else grad_l0[rows],
            ctx.needs_input_grad[0],
        )
        grad_threshold = None
        if pseudo is not None and ctx.needs_input_grad[1]:
            total = accumulator_dtype(values.dtype)
            grad_threshold = threshold.new_zeros(threshold.shape, dtype=total)
            grad_threshold.index_add_(0, cols, pseudo.to(total), alpha=-1)
            grad_threshold = grad_threshold.to(threshold.dtype)
        return grad_values, grad_threshold, None, None, None, None, None


@dataclass
class AdaptiveJumpReLUTrainingSAEConfig(JumpReLUTrainingSAEConfig):
    """sae-lens's JumpReLU training config plus the options that let sparsity be set.

    With these fields at their defaults the SAE trains as sae-lens's ``JumpReLUTrainingSAE``.

    Args:
        jumprelu_threshold_lr_scale: ``m``, how many times faster than the other parameters the
            thresholds learn (>= 1; 1 is sae-lens).
        l0_controller_gain: Integral gain of the controller that adapts the L0 coefficient so
            the batch L0 follows ``target_l0`` (>= 0; 0 disables the controller; needs
            ``target_l0`` when positive).
        l0_controller_proportional_gain: Its proportional gain (>= 0), which damps overshoot.
        l0_controller_threshold_gain: Gain of its common threshold step (>= 0): every pass
            multiplies all thresholds by ``exp(gain·e)``, outside the optimiser, so they follow
            the encoder's growing pre-activations (needs ``target_l0`` when positive).
        jumprelu_threshold_init_from_data: Set the thresholds from the first training batch so
            that each latent fires on ``target_l0 / d_sae`` of its tokens (needs ``target_l0``).

    """

    jumprelu_threshold_lr_scale: float = 1.0
    l0_controller_gain: float = 0.0
    l0_controller_proportional_gain: float = 0.0
    l0_controller_threshold_gain: float = 0.0
    jumprelu_threshold_init_from_data: bool = False

    @property
    def controlled(self) -> bool:
        """Whether the controller acts (on the L0 coefficient or on all thresholds)."""
        gains = (
            self.l0_controller_gain,
            self.l0_controller_proportional_gain,
            self.l0_controller_threshold_gain,
        )
        return any(gain > 0 for gain in gains)

    def __post_init__(self) -> None:
        """Reject out-of-range options before any tensor exists."""
        super().__post_init__()
        scale = self.jumprelu_threshold_lr_scale
        if isinstance(scale, bool) or not isinstance(scale, int | float) or not scale >= 1:
            raise ValueError(
                f"jumprelu_threshold_lr_scale must be a number >= 1 (1 trains the threshold at "
                f"the optimiser's learning rate, as sae-lens does), got {scale!r}."
            )
        for name in (
            "l0_controller_gain",
            "l0_controller_proportional_gain",
            "l0_controller_threshold_gain",
        ):
            gain = getattr(self, name)
            if isinstance(gain, bool) or not isinstance(gain, int | float) or not gain >= 0:
                raise ValueError(f"{name} must be a number >= 0, got {gain!r}.")
        if (self.controlled or self.jumprelu_threshold_init_from_data) and self.target_l0 is None:
            raise ValueError(
                "The L0 controller (l0_controller_gain, l0_controller_proportional_gain or "
                "l0_controller_threshold_gain > 0) and jumprelu_threshold_init_from_data need "
                "target_l0, the L0 to reach: set target_l0, or turn them off."
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
    log_threshold_step: Tensor

    #: Largest fraction of the entries in the threshold band for which the sparse pass is used
    #: (measured crossover ~0.18 at d_sae 8192 and ~0.1 at 32768, ``benchmarks/bench_step.py``).
    sparse_density_limit: ClassVar[float] = 0.1

    #: Buffers the module averages over DDP ranks after every training pass.
    rank_averaged_state: ClassVar[tuple[str, ...]] = (
        "log_l0_coefficient_scale",
        "log_threshold_step",
    )

    def __init__(self, cfg: AdaptiveJumpReLUTrainingSAEConfig, use_error_term: bool = False):
        super().__init__(cfg, use_error_term)
        self.register_buffer("previous_threshold", self.threshold.detach().clone())
        for name in ("log_l0_coefficient_scale", "log_threshold_step"):
            self.register_buffer(
                name, torch.zeros((), dtype=torch.float64, device=self.threshold.device)
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
        """The controller's integral multiplier of the L0 coefficient (1 without a controller)."""
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
        self.log_threshold_step.zero_()

    @torch.no_grad()
    def _move_thresholds(self) -> None:
        """Extrapolate the optimiser's last threshold step ``m``-fold, apply the controller's.

        The controller's common step (set by the previous pass) multiplies every threshold by
        ``exp(threshold_gain·e)``; it is not an optimiser step, so it is never extrapolated.
        """
        scale = self.cfg.jumprelu_threshold_lr_scale
        threshold = self.threshold.data
        if scale != 1:
            previous = self.previous_threshold
            threshold.copy_(previous + scale * (threshold - previous))
        if self.cfg.l0_controller_threshold_gain > 0:
            threshold.mul_(self.log_threshold_step.exp().to(threshold.dtype))
            self.log_threshold_step.zero_()
        threshold.clamp_(min=0.0)  # sae-lens's projection (θ ≥ 0)
        self.previous_threshold.copy_(threshold)

    @torch.no_grad()
    def _controlled_log_scale(self, l0: Tensor) -> Tensor:
        """One controller step; return this pass's log-multiplier of λ.

        ``e = log(L0_batch / target_l0)`` (the ratio clipped to [0.1, 10]) from the batch's
        per-token L0 ``l0``. In training mode the integral ``s ← s + gain·e`` (clipped to
        ±ln 10⁴) steps, carrying λ to its equilibrium, and the next pass's common threshold
        step is set to ``threshold_gain·e``. The proportional term ``proportional_gain·e`` of
        this very batch damps the overshoot the thresholds' inertia would otherwise cause.
        """
        cfg = self.cfg
        assert cfg.target_l0 is not None  # checked by the config
        ratio = l0.detach().double().mean() / cfg.target_l0
        error = ratio.clamp(1.0 / MAX_L0_RATIO, MAX_L0_RATIO).log()
        integral = self.log_l0_coefficient_scale
        if self.training:
            integral.add_(cfg.l0_controller_gain * error).clamp_(-MAX_LOG_SCALE, MAX_LOG_SCALE)
            self.log_threshold_step.copy_(cfg.l0_controller_threshold_gain * error)
        return integral + cfg.l0_controller_proportional_gain * error

    def _sparsity_losses(
        self, step_input: TrainStepInput, feature_acts: Tensor, hidden_pre: Tensor, l0: Tensor
    ) -> dict[str, Tensor]:
        """sae-lens's sparsity loss terms, from the per-token L0 ``l0`` of the fused pass."""
        cfg = self.cfg
        coefficient: Any = step_input.coefficients["l0"]
        if cfg.controlled:
            coefficient = coefficient * self._controlled_log_scale(l0).exp().to(l0.dtype)
        mode = cfg.jumprelu_sparsity_loss_mode
        needs_norm = mode == "tanh" or cfg.pre_act_loss_coefficient is not None
        W_dec_norm = self.W_dec.norm(dim=1) if needs_norm else None
        if mode == "step":
            per_item = l0
        elif mode == "quadratic":
            assert cfg.target_l0 is not None  # checked by sae-lens's config
            per_item = 2 / cfg.target_l0 * (l0 - cfg.target_l0) ** 2
        elif mode == "tanh":
            per_item = torch.tanh(cfg.jumprelu_tanh_scale * feature_acts * W_dec_norm).sum(dim=-1)
        else:
            raise ValueError(f"Invalid sparsity loss mode: {mode}")
        losses = {"l0_loss": (coefficient * per_item).mean()}
        if cfg.pre_act_loss_coefficient is not None:
            losses["pre_act_loss"] = calculate_pre_act_loss(
                cfg.pre_act_loss_coefficient,
                self.threshold.to(hidden_pre.dtype),
                hidden_pre,
                step_input.dead_neuron_mask,
                W_dec_norm,  # type: ignore[arg-type]
            )
        return losses

    # ------------------------------------------------------------------ training pass
    @override
    def training_forward_pass(self, step_input: TrainStepInput) -> TrainStepOutput:
        """sae-lens's training pass, fused, and sparse when few entries lie in the band.

        In training mode the thresholds move first (:meth:`_move_thresholds`: the optimiser's
        last step scaled ``m``-fold, then the controller's pending common step). The loss terms,
        outputs and gradients are sae-lens's (tests compare them). As in the other fast passes
        the encoder product's backward skips the inputs' gradient (:class:`DenseEncoder`). When
        at most ``sparse_density_limit`` of the entries lie in the band the backward pass reads
        (:func:`threshold_band`; read on the host: free on CPU, one synchronisation on CUDA,
        and the sparse pass's ``nonzero`` a second), the step runs on those entries only
        (:meth:`_sparse_pass`); the sparsity modes that need
        dense tensors (``tanh``, ``pre_act_loss_coefficient``) stay dense, their decode sparse
        when few entries are in the band (:func:`threshold_decode`).
        """
        if self.training:
            self._move_thresholds()
        else:
            self.threshold.data.clamp_(min=0.0)  # sae-lens's projection (θ ≥ 0)
        cfg = self.cfg
        sae_in = step_input.sae_in
        # Under autocast, sae-lens's own lines: ``+ b_enc`` makes the latents float32 again, so
        # a fast decode would decode them in float32 where sae-lens's decode is autocast's.
        sae_lens_lines = runs_sae_lens_pass(self, sae_in) or torch.is_autocast_enabled(
            sae_in.device.type
        )
        dense_losses = (
            cfg.jumprelu_sparsity_loss_mode == "tanh" or cfg.pre_act_loss_coefficient is not None
        )
        if sae_lens_lines:
            hidden_pre = self.hook_sae_acts_pre(
                self.process_sae_in(sae_in) @ self.W_enc + self.b_enc
            )
            threshold = self.threshold.to(hidden_pre.dtype)
        else:  # the same product, whose backward skips the inputs' gradient
            x = sae_in.detach().to(self.dtype)
            b_dec = self.b_dec if cfg.apply_b_dec_to_input else None
            x_centered = x - self.b_dec.detach() if b_dec is not None else x
            hidden_pre = DenseEncoder.apply(x_centered, self.W_enc, self.b_enc, b_dec)
            threshold = self.threshold.to(hidden_pre.dtype)
            if not dense_losses:
                with torch.no_grad():
                    band = threshold_band(hidden_pre, threshold, self.bandwidth)
                if int(torch.count_nonzero(band)) <= self.sparse_density_limit * band.numel():
                    return self._sparse_pass(step_input, x_centered, b_dec, hidden_pre, band)
        feature_acts, l0 = JumpReLUWithL0.apply(
            hidden_pre, threshold, self.bandwidth, cfg.jumprelu_ste_to_input
        )
        feature_acts = self.hook_sae_acts_post(feature_acts)
        if sae_lens_lines:
            sae_out = self.decode(feature_acts)
        elif dense_losses:  # sae-lens's decode without its idle hooks, sparse when few are near θ
            sae_out = threshold_decode(
                feature_acts, hidden_pre, threshold.detach(), self.bandwidth, self.W_dec, self.b_dec
            )
        else:  # the band is too dense for a sparse decode to pay
            sae_out = feature_acts @ self.W_dec + self.b_dec
        return self._step_output(step_input, sae_out, feature_acts, hidden_pre, l0)

    def _sparse_pass(
        self,
        step_input: TrainStepInput,
        x_centered: Tensor,
        b_dec: Tensor | None,
        hidden_pre: Tensor,
        band: Tensor,
    ) -> TrainStepOutput:
        """Run the training pass on the band's entries only (``step``/``quadratic`` modes).

        The pre-activations at the entries (:class:`SampledEncoder`), JumpReLU and the per-token
        L0 on them (:class:`JumpReLUEntries`), their decode (:class:`SparseDecode`): every
        gradient comes from the entries alone, with no dense ``[B, d_sae]`` gradient and no
        second dense product. ``feature_acts`` is a CSR tensor of the band's entries (those
        below ``θ`` stored as zeros); ``hidden_pre`` is returned without gradient.
        """
        batch, d_sae = band.shape
        with torch.no_grad():
            entries = flat_entries(hidden_pre.detach(), band.view(-1).nonzero().squeeze(1))
            layout = entry_layout(entries.rows, entries.cols, entries.rows, batch, d_sae)
        pre = SampledEncoder.apply(
            entries.values, x_centered, self.W_enc, self.b_enc, b_dec, None, layout
        )
        acts, l0 = JumpReLUEntries.apply(
            pre,
            self.threshold,
            layout.rows,
            layout.cols,
            batch,
            self.bandwidth,
            self.cfg.jumprelu_ste_to_input,
        )
        sae_out = SparseDecode.apply(acts, self.W_dec, layout) + self.b_dec
        feature_acts = sparse_csr(entries, acts.detach(), d_sae)
        return self._step_output(step_input, sae_out, feature_acts, hidden_pre.detach(), l0)

    def _step_output(
        self,
        step_input: TrainStepInput,
        sae_out: Tensor,
        feature_acts: Tensor,
        hidden_pre: Tensor,
        l0: Tensor,
    ) -> TrainStepOutput:
        """Return the pass's losses (reconstruction and sparsity terms) and outputs."""
        mse_loss = self.mse_loss_fn(sae_out, step_input.sae_in).sum(dim=-1).mean()
        losses = {"mse_loss": mse_loss}
        losses |= self._sparsity_losses(step_input, feature_acts, hidden_pre, l0)
        return TrainStepOutput(
            sae_in=step_input.sae_in,
            sae_out=sae_out,
            feature_acts=feature_acts,
            hidden_pre=hidden_pre,
            loss=sum(losses.values()),  # type: ignore[arg-type]
            losses=losses,
        )

    @override
    def encode_with_hidden_pre(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """sae-lens's JumpReLU encoding, through the fused element-wise function."""
        sae_in = self.process_sae_in(x)
        hidden_pre = self.hook_sae_acts_pre(sae_in @ self.W_enc + self.b_enc)
        threshold = self.threshold.to(hidden_pre.dtype)
        feature_acts, _ = JumpReLUWithL0.apply(
            hidden_pre, threshold, self.bandwidth, self.cfg.jumprelu_ste_to_input
        )
        return self.hook_sae_acts_post(feature_acts), hidden_pre

    @override
    def calculate_aux_loss(
        self,
        step_input: TrainStepInput,
        feature_acts: Tensor,
        hidden_pre: Tensor,
        sae_out: Tensor,
    ) -> dict[str, Tensor]:
        """Return the sparsity loss terms (with the controller's coefficient when it is on)."""
        threshold = self.threshold.to(hidden_pre.dtype)
        _, l0 = JumpReLUWithL0.apply(
            hidden_pre, threshold, self.bandwidth, self.cfg.jumprelu_ste_to_input
        )
        return self._sparsity_losses(step_input, feature_acts, hidden_pre, l0)

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
        for name in ("log_l0_coefficient_scale", "log_threshold_step"):
            state_dict.setdefault(f"{prefix}{name}", torch.zeros((), dtype=torch.float64))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @override
    def process_state_dict_for_saving_inference(self, state_dict: dict[str, Any]) -> None:
        """Drop our training buffers: sae-lens's ``jumprelu`` loads its tensors strictly."""
        super().process_state_dict_for_saving_inference(state_dict)
        for name in _EXTRA_STATE:
            state_dict.pop(name, None)


__all__ = [
    "AdaptiveJumpReLUTrainingSAE",
    "AdaptiveJumpReLUTrainingSAEConfig",
    "JumpReLUEntries",
    "JumpReLUWithL0",
    "jumprelu_gradients",
]
