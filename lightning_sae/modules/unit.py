"""One SAE with everything it needs to train, as a plain ``nn.Module``.

An :class:`SAEUnit` holds the sae-lens training SAE, its :class:`ActivationNormalizer`, its
:class:`TrainingStatistics` and its optimiser settings. A LightningModule holds one
(:class:`~lightning_sae.SAEModule`) or one per hook (:class:`~lightning_sae.MultiSAEModule`) and
only adds what Lightning needs: logging, the optimiser, checkpoint hooks.
"""

from dataclasses import dataclass
from typing import Any

import torch
from sae_lens.saes.sae import TrainingSAE, TrainStepInput
from sae_lens.util import dtype_to_str
from torch import Tensor, nn
from torchmetrics import MetricCollection

from lightning_sae.distributed import all_reduce_mean
from lightning_sae.modules.normalizer import ActivationNormalizer
from lightning_sae.modules.statistics import TrainingStatistics, keep_metrics_float64
from lightning_sae.optim import LRSchedule, LRSchedulerName, warm_up_coefficient


@dataclass(frozen=True)
class OptimizerSettings:
    """Adam and learning-rate schedule settings of one SAE (its own parameter group)."""

    lr: float
    adam_beta1: float
    adam_beta2: float
    lr_scheduler: LRSchedulerName
    lr_warm_up_steps: int
    lr_decay_steps: int
    lr_min_ratio: float


@dataclass
class StepResult:
    """What one training step of a unit gives its LightningModule to log and optimise."""

    loss: Tensor
    #: Per-step values (loss terms), logged every step.
    losses: dict[str, Tensor]
    #: Window metrics, on logging steps only.
    metrics: dict[str, Tensor]
    #: The density window closed on this step, if one did.
    density: Tensor | None


class SAEUnit(nn.Module):
    """A training SAE, its normaliser, its statistics and its optimiser settings.

    Args:
        sae: The sae-lens training SAE (sees normalised activations).
        normalizer: Activation scaling.
        statistics: Dead latents, metrics and the density window.
        optimizer: Adam/schedule settings of this SAE's parameter group.
        check_finite: Refuse a batch holding NaN/inf before it touches the weights.
        full_precision: SAE tensors kept in their creation dtype under any Trainer precision.

    The SAE's ``rank_averaged_state`` (class attribute, optional) names buffers its training pass
    updates from the rank's own batch; they are averaged over DDP ranks after every pass.

    """

    def __init__(
        self,
        sae: TrainingSAE[Any],
        normalizer: ActivationNormalizer,
        statistics: TrainingStatistics,
        optimizer: OptimizerSettings,
        check_finite: bool = True,
        full_precision: tuple[str, ...] = (),
    ) -> None:
        super().__init__()
        self.sae = sae
        self.normalizer = normalizer
        self.statistics = statistics
        self.optimizer = optimizer
        self.check_finite = check_finite
        self.rank_averaged: tuple[str, ...] = tuple(getattr(sae, "rank_averaged_state", ()))
        state = dict(sae.named_parameters()) | dict(sae.named_buffers())
        names = [n for n in full_precision if n in state]
        self._full_precision = {f"sae.{n}": state[n].dtype for n in names}
        self._full_precision |= {"normalizer.scale": torch.float32}
        self._full_precision |= {"statistics.feature_density": torch.float64}
        #: False until the first training batch of a fresh fit (or a restore) initialised the SAE.
        self.initialized = False

    # ------------------------------------------------------------------ inference
    def encode(self, x: Tensor) -> Tensor:
        """Latents of raw activations ``x``."""
        return self.sae.encode(self.normalizer(x))

    def decode(self, feature_acts: Tensor) -> Tensor:
        """Reconstruction, in raw units, of latents ``feature_acts``."""
        return self.normalizer.inverse(self.sae.decode(feature_acts))

    def forward(self, x: Tensor) -> Tensor:
        """Reconstruct raw activations ``x``, in ``x``'s units and dtype."""
        return self.decode(self.encode(x)).to(x.dtype)

    # ------------------------------------------------------------------ training
    def check_batch(self, batch: Any, owner: str) -> Tensor:
        """Return ``batch`` as a ``[batch, d_in]`` float tensor, or raise naming the fix.

        A one-element tuple/list (what a ``TensorDataset`` yields) is unwrapped.
        """
        if isinstance(batch, list | tuple) and len(batch) == 1:
            batch = batch[0]
        if not isinstance(batch, Tensor):
            raise TypeError(
                f"{owner} expects a tensor [batch, d_in] of activations, got "
                f"{type(batch).__name__}. For several hooks at once use MultiSAEModule."
            )
        d_in = self.normalizer.d_in
        if batch.ndim != 2 or batch.shape[-1] != d_in:
            raise ValueError(
                f"{owner} expects activations of shape [batch, {d_in}] (d_in), got "
                f"{tuple(batch.shape)}. Flatten tokens into the batch dimension, or set d_in."
            )
        if not batch.is_floating_point():
            raise TypeError(f"{owner} needs float activations, got {batch.dtype}.")
        return batch

    def mark_restored(self) -> None:
        """Treat the weights and scale as trained: never re-estimate or re-initialise them."""
        self.normalizer.pending = False
        self.initialized = True

    def coefficients(self, step: int) -> dict[str, float]:
        """sae-lens loss coefficients at ``step``, after their linear warm-up."""
        coefficients = {}
        for name, config in self.sae.get_coefficients().items():
            value, warm_up = (config, 0) if isinstance(config, int | float) else config
            coefficients[name] = warm_up_coefficient(value, warm_up, step)
        return coefficients

    def training_step(self, x: Tensor, step: int, log_every_n_steps: int) -> StepResult:
        """One training pass on raw activations ``x`` ``[batch, d_in]`` at optimisation ``step``.

        Every rank calls this on every step (it holds collectives).
        """
        if self.check_finite:
            _check_finite(x, step)
        if not self.initialized:
            if self.normalizer.pending:
                self.normalizer.estimate(x)
            initialize = getattr(self.sae, "initialize_from_batch", None)
            if callable(initialize):
                initialize(self.normalizer(x))
            self.initialized = True
        sae_in = self.normalizer(x)
        output = self.sae.training_forward_pass(
            TrainStepInput(
                sae_in=sae_in,
                coefficients=self.coefficients(step),
                dead_neuron_mask=self.statistics.dead_latent_mask,
                n_training_steps=step,
                is_logging_step=False,
            )
        )
        for name in self.rank_averaged:
            setattr(self.sae, name, all_reduce_mean(getattr(self.sae, name)))
        statistics = self.statistics
        statistics.update(output.sae_in, output.sae_out, output.feature_acts)
        metrics = statistics.values_to_log(step, log_every_n_steps)
        return StepResult(
            loss=output.loss,
            losses={"train/loss": output.loss.detach()}
            | {f"train/{name}": value.detach() for name, value in output.losses.items()},
            metrics=metrics,
            density=statistics.close_full_window() if metrics else None,
        )

    def evaluate(self, x: Tensor, metrics: MetricCollection) -> None:
        """Update ``metrics`` (``evaluation_metrics``) with inference ``encode``/``decode``.

        Never the training pass: BatchTopK's would move its threshold.
        """
        sae_in = self.normalizer(x)
        feature_acts = self.sae.encode(sae_in)
        metrics.update(x=sae_in, x_hat=self.sae.decode(feature_acts), feature_acts=feature_acts)

    def finish_fit(self) -> Tensor | None:
        """Publish the open density window if this fit closed none, so an export sees this run."""
        statistics = self.statistics
        if statistics.window_tokens > 0 and not statistics.density_published:
            return statistics.publish_density()
        return None

    # ------------------------------------------------------------------ optimisation
    def param_group(self) -> dict[str, Any]:
        """Adam parameter group of this SAE: parameters, learning rate and betas."""
        settings = self.optimizer
        return {
            "params": list(self.parameters()),
            "lr": settings.lr,
            "betas": (settings.adam_beta1, settings.adam_beta2),
        }

    def lr_schedule(self, max_steps: int | None) -> LRSchedule:
        """Learning-rate multiplier per step of a run of ``max_steps`` (decay needs it)."""
        settings = self.optimizer
        return LRSchedule(
            total_steps=max_steps if max_steps and max_steps > 0 else None,
            warm_up_steps=settings.lr_warm_up_steps,
            decay_steps=settings.lr_decay_steps,
            scheduler=settings.lr_scheduler,
            min_lr_ratio=settings.lr_min_ratio,
        )

    # ------------------------------------------------------------------ dtypes
    def _apply(self, fn: Any, recurse: bool = True) -> "SAEUnit":
        """Move/cast like any module, but keep thresholds in full precision and resync the SAE.

        Lightning moves and casts the parent module, so the SAE's ``device``/``dtype`` attributes
        (read by sae-lens's ``process_sae_in``) would otherwise go stale.
        """
        super()._apply(fn, recurse)
        for dotted, dtype in self._full_precision.items():
            owner_name, _, name = dotted.rpartition(".")
            owner = self.get_submodule(owner_name)
            tensor = getattr(owner, name)
            if tensor.dtype == dtype:
                continue
            if isinstance(tensor, nn.Parameter):
                tensor.data = tensor.data.to(dtype)
            else:
                owner._buffers[name] = tensor.to(dtype)
        keep_metrics_float64(self)
        sae = self.sae
        sae.dtype = sae.W_enc.dtype
        sae.device = sae.W_enc.device
        sae.cfg.dtype = dtype_to_str(sae.dtype)
        sae.cfg.device = str(sae.device)
        return self


def _check_finite(x: Tensor, step: int) -> None:
    if not torch.isfinite(x).all():
        bad = (~torch.isfinite(x)).any(dim=-1).nonzero().flatten()[:5].tolist()
        raise FloatingPointError(
            f"The training batch at global step {step} holds NaN or inf activations (first bad "
            f"rows: {bad}); the weights were not updated. Check the activation source, or the "
            "model's dtype (fp16 activations overflow)."
        )
