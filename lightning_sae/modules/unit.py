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
from torch.distributed.tensor import DTensor
from torchmetrics import MetricCollection

from lightning_sae.distributed import all_reduce_mean, all_reduce_min, broadcast_from_first
from lightning_sae.modules.normalizer import ActivationNormalizer
from lightning_sae.modules.statistics import TrainingStatistics, keep_metrics_float64
from lightning_sae.optim import LRSchedule, LRSchedulerName, warm_up_coefficient
from lightning_sae.parallel import gathered_parameters

#: ``SAEUnit.first_nonfinite_step`` of a run that has seen no NaN/inf.
NOT_SEEN = torch.iinfo(torch.int64).max


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
    #: ``train/loss`` every step (what ``ModelCheckpoint``/``EarlyStopping`` monitor), the loss
    #: terms on logging steps only: the logger writes only those steps' values, and every
    #: ``LightningModule.log`` call costs ~0.5 ms of host time (measured on CPU).
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
        check_finite: Record, on the device, the first step whose batch or loss holds NaN/inf, and
            stop the fit when a check reads it (see :meth:`raise_if_not_finite`).
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
        #: Ranks that must train on the same batch (latent-parallel: each holds some latents);
        #: they take the first one's batch every step. ``None``: every rank its own batch.
        self.batch_group: torch.distributed.ProcessGroup | None = None
        #: Names this SAE in error messages (a MultiSAEModule adds its hook).
        self.label = "The SAE"
        #: First global step whose [batch, loss] held NaN/inf (``NOT_SEEN`` if none). Written on
        #: the device every step without a sync; read only by :meth:`raise_if_not_finite`. Not a
        #: buffer: DDP would overwrite every rank's record with rank 0's before each forward.
        self.first_nonfinite_step = torch.full((2,), NOT_SEEN, dtype=torch.int64)

    # ------------------------------------------------------------------ inference
    def encode(self, x: Tensor) -> Tensor:
        """Latents of raw activations ``x`` ``[..., d_in]``."""
        _check_width(x, self.normalizer.d_in, "activations", "d_in")
        return self.sae.encode(self.normalizer(x))

    def decode(self, feature_acts: Tensor) -> Tensor:
        """Reconstruction, in raw units, of latents ``feature_acts`` ``[..., d_sae]``."""
        _check_width(feature_acts, self.sae.cfg.d_sae, "latents", "d_sae")
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
            raise TypeError(f"{owner} needs a float tensor of activations, got {batch.dtype}.")
        return batch

    def mark_restored(self) -> None:
        """Treat the weights and scale as trained: never re-estimate or re-initialise them.

        A NaN/inf recorded before the restore belonged to the replaced weights and is forgotten,
        and so are the logged metrics' batches since the last logging step (as in a new process).
        """
        self.normalizer.pending = False
        self.initialized = True
        self.first_nonfinite_step.fill_(NOT_SEEN)
        self.statistics.reset_logged_metrics()

    def coefficients(self, step: int) -> dict[str, float]:
        """sae-lens loss coefficients at ``step``, after their linear warm-up."""
        coefficients = {}
        for name, config in self.sae.get_coefficients().items():
            value, warm_up = (config, 0) if isinstance(config, int | float) else config
            coefficients[name] = warm_up_coefficient(value, warm_up, step)
        return coefficients

    def training_step(self, x: Tensor, step: int, log_every_n_steps: int) -> StepResult:
        """One training pass on raw activations ``x`` ``[batch, d_in]`` at optimisation ``step``.

        Every rank calls this on every step (it holds collectives). With ``check_finite``, a NaN or
        inf batch or loss is recorded on the device and raises on the next logging step (checked
        over all ranks), so no step waits on the host for it.
        """
        if self.batch_group is not None:
            x = broadcast_from_first(x, self.batch_group)
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
        if self.check_finite:
            self._record_nonfinite(statistics.inputs_finite(), output.loss, step)
            if (step + 1) % log_every_n_steps == 0:
                self.raise_if_not_finite(collective=True, weights=False)
        metrics = statistics.values_to_log(step, log_every_n_steps)
        losses = {"train/loss": output.loss.detach()}
        if metrics:
            losses |= {f"train/{name}": value.detach() for name, value in output.losses.items()}
        return StepResult(
            loss=output.loss,
            losses=losses,
            metrics=metrics,
            density=statistics.close_full_window() if metrics else None,
        )

    def evaluate(self, x: Tensor, metrics: MetricCollection) -> None:
        """Update ``metrics`` (``evaluation_metrics``) with inference ``encode``/``decode``.

        Never the training pass: BatchTopK's would move its threshold.
        """
        sae_in = self.normalizer(x)
        with gathered_parameters(self.sae):  # FSDP2: every rank validates, gathered
            feature_acts = self.sae.encode(sae_in)
            x_hat = self.sae.decode(feature_acts)
        metrics.update(x=sae_in, x_hat=x_hat, feature_acts=feature_acts)

    @torch.no_grad()
    def _record_nonfinite(self, inputs_finite: Tensor, loss: Tensor, step: int) -> None:
        bad = torch.stack([~inputs_finite, ~torch.isfinite(loss.detach())])
        first = self.first_nonfinite_step
        first.masked_fill_(bad & (first == NOT_SEEN), step)

    def raise_if_not_finite(self, collective: bool = False, weights: bool = True) -> None:
        """Raise ``FloatingPointError`` naming the step if training went NaN/inf (one sync).

        Reads the first NaN/inf batch and loss steps recorded during training (``check_finite``)
        and, with ``weights``, checks the weights and activation scale themselves: call it before
        anything is written. With ``collective`` (every rank must call it) the record is reduced
        over ranks, so every rank stops on the same step.
        """
        first = self.first_nonfinite_step
        batch_step, loss_step = (all_reduce_min(first) if collective else first).tolist()
        if batch_step != NOT_SEEN:
            raise FloatingPointError(
                f"{self.label}: the training batch of global step {batch_step} held NaN or inf "
                "activations, so the weights are no longer finite (checked without a per-step "
                "sync: on logging steps, checkpoints, exports and at the end of fit). Check the "
                "activation source or the model's dtype (fp16 activations overflow), then resume "
                f"from a checkpoint saved before step {batch_step}."
            )
        if loss_step != NOT_SEEN:
            raise FloatingPointError(
                f"{self.label}: the loss went NaN or inf at global step {loss_step}: training "
                "diverged. Lower lr, clip gradients (Trainer gradient_clip_val), keep "
                "normalize_activations on, and resume from a checkpoint saved before step "
                f"{loss_step}."
            )
        if not weights:
            return
        # A sharded SAE (latent-parallel, FSDP2) holds DTensors: each rank checks its own part.
        state = {
            name: t.to_local() if isinstance(t, DTensor) else t
            for name, t in self.sae.state_dict().items()
        }
        bad = [name for name, t in state.items() if not torch.isfinite(t).all()]
        if bad or not torch.isfinite(self.normalizer.scale):
            raise FloatingPointError(
                f"{self.label} holds NaN or inf values ({bad or ['activation_scale']}): training "
                "diverged, so nothing is written. Lower lr, clip gradients (Trainer "
                "gradient_clip_val), or resume from an earlier checkpoint."
            )

    def finish_fit(self) -> Tensor | None:
        """Publish the open density window if this fit closed none, so an export sees this run.

        The window stays open: a run resumed from a checkpoint saved now continues it.

        Raises:
            FloatingPointError: Training went NaN/inf (:meth:`raise_if_not_finite`).

        """
        if self.check_finite:
            self.raise_if_not_finite(collective=True)
        statistics = self.statistics
        if statistics.window_tokens > 0 and not statistics.density_published:
            return statistics.publish_density(close=False)
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
        """Move/cast like any module (the NaN/inf record too), keep thresholds in full precision.

        Lightning moves and casts the parent module, so the SAE's ``device``/``dtype`` attributes
        (read by sae-lens's ``process_sae_in``) would otherwise go stale.
        """
        super()._apply(fn, recurse)
        self.first_nonfinite_step = fn(self.first_nonfinite_step)
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


def _check_width(x: Tensor, width: int, what: str, name: str) -> None:
    if not isinstance(x, Tensor) or not x.is_floating_point() or x.ndim < 1:
        got = f"{x.dtype} tensor" if isinstance(x, Tensor) else type(x).__name__
        raise TypeError(f"Expected a float tensor of {what} [..., {width}], got a {got}.")
    if x.shape[-1] != width:
        raise ValueError(
            f"Expected {what} of shape [..., {width}] ({name} of this SAE), got "
            f"{tuple(x.shape)}: pass {what} of the width the SAE was built for."
        )
