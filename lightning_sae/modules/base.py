"""The base LightningModule shared by every SAE architecture.

The SAE math is sae-lens's own: each module wraps the ``TrainingSAE`` registered under its
:attr:`SAEModule.architecture` name and calls its ``training_forward_pass``. This module adds what a
Lightning run needs around it: the optimiser and its per-step schedule, the sparsity-coefficient
warm-up, the dead-latent mask for AuxK (measured in tokens, shared across DDP ranks), activation
normalisation kept in the checkpoint, torchmetrics synced across ranks, and precision handling that
keeps thresholds in full precision.
"""

import time
from collections.abc import Mapping
from typing import Any, ClassVar

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.loggers import TensorBoardLogger
from sae_lens.registry import get_sae_training_class
from sae_lens.saes.sae import (
    SAEMetadata,
    TrainingSAE,
    TrainingSAEConfig,
    TrainStepInput,
    TrainStepOutput,
)
from sae_lens.util import dtype_to_str
from torch import Tensor
from torchmetrics import Metric, MetricCollection

from lightning_sae.metrics import (
    L0,
    ExplainedVariance,
    FeatureDensity,
    NormalizedMSE,
    active_counts,
    log10_feature_density,
)
from lightning_sae.optim import LRSchedule, LRSchedulerName, warm_up_coefficient

_MODULES: dict[str, type["SAEModule"]] = {}


def _lookup_key(name: str) -> str:
    return name.lower().replace("_", "").replace("-", "")


def get_module_class(architecture: str) -> type["SAEModule"]:
    """Return the module class for an sae-lens architecture name or a class name.

    Accepts ``"batchtopk"``, ``"BatchTopKSAE"`` or ``"batch_topk"`` alike.

    Raises:
        ValueError: If no module trains that architecture; the message lists those that exist.

    """
    key = _lookup_key(architecture)
    for cls in _MODULES.values():
        if key in (_lookup_key(cls.architecture), _lookup_key(cls.__name__)):
            return cls
    known = ", ".join(f"{name!r} ({cls.__name__})" for name, cls in sorted(_MODULES.items()))
    raise ValueError(f"Unknown SAE architecture {architecture!r}. Known architectures: {known}.")


class _RunLambdaLR(torch.optim.lr_scheduler.LambdaLR):
    """``LambdaLR`` whose schedules follow this run's settings, not a resumed checkpoint's.

    ``LambdaLR`` restores a callable's ``__dict__`` from the checkpoint, which would keep the old
    ``max_steps`` when a run is resumed to go further (its decay would pin the LR at 0).
    """

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the step count and LRs, keeping the current schedules."""
        state_dict = {**state_dict, "lr_lambdas": [None] * len(self.lr_lambdas)}
        super().load_state_dict(state_dict)


def adam_with_schedules(modules: "list[SAEModule]") -> dict[str, Any]:
    """One Adam over the modules' parameter groups, each with its own per-step LR schedule."""
    optimizer = torch.optim.Adam([module.param_group() for module in modules])
    schedules = [module.lr_schedule() for module in modules]
    scheduler = _RunLambdaLR(optimizer, schedules)
    return {
        "optimizer": optimizer,
        # "step": the default "epoch" never fires in one endless streaming epoch.
        "lr_scheduler": {"scheduler": scheduler, "interval": "step", "frequency": 1},
    }


def available_architectures() -> list[str]:
    """Names of every architecture a module is registered for, sorted."""
    return sorted(_MODULES)


class _ArchitectureDispatch(LightningModule):
    """Holds ``SAEModule.__new__`` so that signature tools read ``SAEModule.__init__``.

    jsonargparse (LightningCLI) takes a class's parameters from ``__new__`` when the class itself
    defines one; defined one level up, it reads ``__init__`` and its ``**kwargs`` chain.
    """

    architecture: ClassVar[str] = ""

    def __new__(cls, *args: Any, architecture: str | None = None, **kwargs: Any) -> "SAEModule":
        """Dispatch ``SAEModule(architecture=...)`` to the module class of that architecture."""
        if not cls.architecture:
            if architecture is None:
                raise TypeError(
                    f"{cls.__name__} is abstract: pass architecture=<one of "
                    f"{available_architectures()}> or construct a subclass such as TopKSAE."
                )
            cls = get_module_class(architecture)
        return super().__new__(cls)


class SAEModule(_ArchitectureDispatch):
    """Train one sae-lens ``TrainingSAE`` with ``Trainer.fit``.

    Subclasses set :attr:`architecture` and implement :meth:`sae_config_kwargs`; everything else
    (optimiser, schedules, metrics, dead latents, normalisation, precision) lives here.
    ``SAEModule(architecture="topk", d_in=..., d_sae=...)`` builds the matching subclass, and
    ``SAEModule.load_from_checkpoint`` returns the class the checkpoint was saved from.

    ``training_step`` takes a float tensor ``[batch, d_in]`` of activations (or a one-element
    tuple/list holding one, as a ``TensorDataset`` yields). ``module(x)`` returns the
    reconstruction in the input's units, :meth:`encode` the latents; :attr:`sae` is the wrapped
    sae-lens object, which always sees normalised activations ``x * activation_scale``.

    Args:
        d_in: Width of the activations.
        d_sae: Number of latents.
        lr: Peak Adam learning rate.
        adam_beta1: Adam's first-moment decay.
        adam_beta2: Adam's second-moment decay.
        lr_scheduler: ``constant`` or ``cosine`` between warm-up and decay.
        lr_warm_up_steps: Optimisation steps of linear learning-rate warm-up.
        lr_decay_steps: Final optimisation steps of linear decay to zero (needs ``max_steps``).
        lr_min_ratio: Floor of the cosine schedule as a fraction of ``lr``.
        sparsity_warm_up_steps: Steps over which the sparsity coefficient rises linearly from 0.
        dead_window_tokens: A latent that fired on no token in this many tokens (counted over all
            ranks) is dead: it feeds AuxK and the logged dead-latent rate. 10M as in OpenAI's,
            sparsify's and dictionary_learning's recipes.
        normalize_activations: Scale inputs by ``s = sqrt(d_in) / E‖x‖`` (sae-lens's
            ``expected_average_only_in``), estimated on the first training batch over all ranks
            unless ``activation_scale`` is given. The scale is a buffer, so it is in every
            checkpoint and the exporter folds it into the weights.
        activation_scale: A fixed scale to use instead of estimating one.
        apply_b_dec_to_input: Subtract ``b_dec`` before encoding (sae-lens's default).
        decoder_init_norm: Norm of each decoder row at initialisation (Anthropic's 0.1 heuristic).
        check_finite: Check each training batch for NaN/inf before it touches the weights
            (one device-to-host sync per step).
        architecture: Only needed when constructing through the base class; must match the
            subclass otherwise.
        seed: Seed for weight initialisation (``None`` uses the global RNG).

    """

    #: sae-lens training-architecture name this module trains (its registry key).
    architecture: ClassVar[str] = ""
    #: SAE tensors kept in the dtype sae-lens created them in, whatever the Trainer precision:
    #: JumpReLU's threshold stops learning in bf16 and BatchTopK's float64 EMA stalls.
    full_precision_tensors: ClassVar[tuple[str, ...]] = ("threshold", "topk_threshold")

    sae: TrainingSAE[Any]
    activation_scale: Tensor
    tokens_since_fired: Tensor

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.architecture:
            _MODULES[cls.architecture] = cls

    def __init__(
        self,
        d_in: int,
        d_sae: int,
        lr: float = 3e-4,
        adam_beta1: float = 0.9,
        adam_beta2: float = 0.999,
        lr_scheduler: LRSchedulerName = "constant",
        lr_warm_up_steps: int = 0,
        lr_decay_steps: int = 0,
        lr_min_ratio: float = 0.0,
        sparsity_warm_up_steps: int = 0,
        dead_window_tokens: int = 10_000_000,
        normalize_activations: bool = True,
        activation_scale: float | None = None,
        apply_b_dec_to_input: bool = True,
        decoder_init_norm: float | None = 0.1,
        check_finite: bool = True,
        architecture: str | None = None,
        seed: int | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__()
        if kwargs:
            # **kwargs only exists so Lightning passes subclass arguments through the base class
            # in load_from_checkpoint; a name that reaches here is a typo.
            raise TypeError(
                f"{type(self).__name__} got unexpected arguments {sorted(kwargs)}; see "
                f"help({type(self).__name__}) for the valid ones."
            )
        if architecture is not None and get_module_class(architecture) is not type(self):
            raise ValueError(
                f"architecture={architecture!r} does not match {type(self).__name__} "
                f"({self.architecture!r}); drop the argument or use SAEModule(architecture=...)."
            )
        self._validate(locals())
        self.save_hyperparameters(ignore=["architecture"])
        # Saved so that SAEModule.load_from_checkpoint can rebuild the right subclass.
        self.hparams["architecture"] = self.architecture

        self.configure_models()
        self.configure_metrics()

        self._scale_pending = normalize_activations and activation_scale is None
        self._window_tokens = 0
        self._density_published = False
        self._last_logged_step = -1
        self._last_log_time: float | None = None
        self._tokens_since_log = 0

    # ------------------------------------------------------------------ construction
    @staticmethod
    def _validate(args: Mapping[str, Any]) -> None:
        for name in ("d_in", "d_sae", "dead_window_tokens"):
            value = args[name]
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}.")
        if not args["lr"] > 0:
            raise ValueError(f"lr must be positive, got {args['lr']!r}.")
        for name in ("adam_beta1", "adam_beta2"):
            if not 0.0 <= args[name] < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {args[name]!r}.")
        for name in ("lr_warm_up_steps", "lr_decay_steps", "sparsity_warm_up_steps"):
            if args[name] < 0:
                raise ValueError(f"{name} must be >= 0, got {args[name]!r}.")
        scale = args["activation_scale"]
        if scale is not None and not (scale > 0 and scale != float("inf")):
            raise ValueError(f"activation_scale must be a positive finite number, got {scale!r}.")
        if args["lr_scheduler"] not in ("constant", "cosine"):
            raise ValueError(
                f"lr_scheduler must be 'constant' or 'cosine', got {args['lr_scheduler']!r}."
            )

    def sae_config_kwargs(self) -> dict[str, Any]:
        """Architecture-specific fields of the sae-lens training config, from ``self.hparams``."""
        return {}

    def build_sae_config(self) -> TrainingSAEConfig:
        """Build the sae-lens training config of this module's architecture."""
        _, config_cls = get_sae_training_class(self.architecture)
        return config_cls(
            d_in=self.hparams.d_in,
            d_sae=self.hparams.d_sae,
            apply_b_dec_to_input=self.hparams.apply_b_dec_to_input,
            decoder_init_norm=self.hparams.decoder_init_norm,
            # Normalisation is ours (a checkpointed buffer), so the SAE always sees scaled input.
            normalize_activations="none",
            **self.sae_config_kwargs(),
        )

    def configure_models(self) -> None:
        """Build the wrapped sae-lens SAE and the buffers that travel with it in checkpoints."""
        sae_cls, _ = get_sae_training_class(self.architecture)
        seed = self.hparams.seed
        with torch.random.fork_rng(enabled=seed is not None):
            if seed is not None:
                torch.manual_seed(seed)
            self.sae = sae_cls(self.build_sae_config())
        scale = self.hparams.activation_scale if self.hparams.normalize_activations else None
        self.register_buffer("activation_scale", torch.tensor(scale or 1.0, dtype=torch.float32))
        self.register_buffer(
            "tokens_since_fired", torch.zeros(self.hparams.d_sae, dtype=torch.int64)
        )
        self.register_buffer(
            "feature_density", torch.zeros(self.hparams.d_sae, dtype=torch.float64)
        )
        # Dotted name -> dtype of every tensor kept out of the Trainer's precision.
        names = [f"sae.{name}" for name in self.full_precision_tensors]
        names += ["activation_scale", "feature_density"]
        state = dict(self.named_parameters()) | dict(self.named_buffers())
        self._full_precision_dtypes = {name: state[name].dtype for name in names if name in state}

    def configure_metrics(self) -> None:
        """Create the train/val metric collections and the dead-latent window metrics."""
        d_in, d_sae = self.hparams.d_in, self.hparams.d_sae
        # Updated with keyword arguments: each metric takes the ones its update() names.
        reconstruction = {
            "explained_variance": ExplainedVariance(d_in),
            "nmse": NormalizedMSE(d_in),
        }
        # One compute group: EV and NMSE share their states, so one update feeds both.
        self.train_metrics = MetricCollection(reconstruction, prefix="train/")
        self.val_metrics = MetricCollection({"l0": L0(), **reconstruction}, prefix="val/").clone()
        # The training step feeds these two from one count pass over [batch, d_sae].
        self.train_l0 = L0()
        self.train_density = FeatureDensity(d_sae)  # reset every dead_window_tokens

    # ------------------------------------------------------------------ logging
    def attach_to(self, owner: LightningModule, log_prefix: str) -> None:
        """Train as part of ``owner`` (a multi-SAE module): log through it under ``log_prefix``."""
        # Kept out of the module tree: the owner already holds this module as a child.
        self.__dict__["_owner"] = owner
        self.__dict__["_log_prefix"] = log_prefix

    def log(self, name: str, value: Any, *args: Any, **kwargs: Any) -> None:
        """Log like ``LightningModule.log``, through the owning module when there is one."""
        owner = self.__dict__.get("_owner")
        if owner is not None:
            owner.log(f"{self.__dict__['_log_prefix']}{name}", value, *args, **kwargs)
        else:
            super().log(name, value, *args, **kwargs)

    # ------------------------------------------------------------------ inference API
    def encode(self, x: Tensor) -> Tensor:
        """Latents of activations ``x`` (given in the input's own units)."""
        return self.sae.encode(x * self.activation_scale)

    def decode(self, feature_acts: Tensor) -> Tensor:
        """Reconstruction, in the input's own units, of latents ``feature_acts``."""
        return self.sae.decode(feature_acts) / self.activation_scale

    def forward(self, x: Tensor) -> Tensor:
        """Reconstruct activations ``x``; the result is in ``x``'s units and dtype."""
        return self.decode(self.encode(x)).to(x.dtype)

    @property
    def dead_latent_mask(self) -> Tensor:
        """Latents that fired on no token in the last ``dead_window_tokens`` tokens."""
        return self.tokens_since_fired >= self.hparams.dead_window_tokens

    # ------------------------------------------------------------------ training
    def sparsity_coefficients(self) -> dict[str, float]:
        """Return the sae-lens loss coefficients at the current step, after linear warm-up."""
        coefficients = {}
        for name, config in self.sae.get_coefficients().items():
            value, warm_up = (config, 0) if isinstance(config, int | float) else config
            coefficients[name] = warm_up_coefficient(value, warm_up, self.global_step)
        return coefficients

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        """One sae-lens training forward pass on a ``[batch, d_in]`` tensor of activations."""
        x = self._activations(batch)
        if self.hparams.check_finite:
            self._check_finite(x)
        if self._scale_pending:
            self._estimate_activation_scale(x)
        sae_in = x * self.activation_scale
        output = self.sae.training_forward_pass(
            TrainStepInput(
                sae_in=sae_in,
                coefficients=self.sparsity_coefficients(),
                dead_neuron_mask=self.dead_latent_mask,
                n_training_steps=self.global_step,
                is_logging_step=False,
            )
        )
        self.synchronize_sae_state()
        self._track_training_statistics(output)
        self.log("train/loss", output.loss, prog_bar=False)
        self.log_dict({f"train/{name}": value for name, value in output.losses.items()})
        return output.loss

    def _activations(self, batch: Any) -> Tensor:
        if isinstance(batch, list | tuple) and len(batch) == 1:
            batch = batch[0]
        if not isinstance(batch, Tensor):
            raise TypeError(
                f"{type(self).__name__} expects a tensor [batch, d_in] of activations, got "
                f"{type(batch).__name__}. For several hooks at once use a multi-SAE module."
            )
        if batch.ndim != 2 or batch.shape[-1] != self.hparams.d_in:
            raise ValueError(
                f"Expected activations of shape [batch, {self.hparams.d_in}] (d_in), got "
                f"{tuple(batch.shape)}. Flatten tokens into the batch dimension, or set d_in."
            )
        if not batch.is_floating_point():
            raise TypeError(f"Activations must be a float tensor, got {batch.dtype}.")
        return batch

    def _check_finite(self, x: Tensor) -> None:
        if not torch.isfinite(x).all():
            bad = (~torch.isfinite(x)).any(dim=-1).nonzero().flatten()[:5].tolist()
            raise FloatingPointError(
                f"The training batch at global step {self.global_step} holds NaN or inf "
                f"activations (first bad rows: {bad}); the weights were not updated. Check the "
                "activation source, or the model's dtype (fp16 activations overflow)."
            )

    @torch.no_grad()
    def _estimate_activation_scale(self, x: Tensor) -> None:
        """Set ``activation_scale = sqrt(d_in) / E‖x‖`` from this batch, averaged over ranks."""
        stats = torch.stack([x.float().norm(dim=-1).sum(), x.new_tensor(x.shape[0]).float()])
        stats = self._all_reduce_sum(stats)
        mean_norm = (stats[0] / stats[1]).clamp_min(torch.finfo(torch.float32).tiny)
        self.activation_scale.fill_(float(self.hparams.d_in**0.5 / mean_norm))
        self._scale_pending = False

    def synchronize_sae_state(self) -> None:
        """Make state the SAE updated in its training pass identical on every rank.

        Called after every training forward pass; a no-op unless an architecture keeps such state
        (BatchTopK's threshold EMA).
        """

    def _all_reduce_sum(self, tensor: Tensor) -> Tensor:
        trainer = self._trainer
        if trainer is None or trainer.world_size == 1:
            return tensor
        return trainer.strategy.reduce(tensor, reduce_op="sum")

    @torch.no_grad()
    def _track_training_statistics(self, output: TrainStepOutput) -> None:
        """Update dead-latent counters and metrics; compute and log them on logging steps."""
        feature_acts = output.feature_acts
        world_size = self.trainer.world_size if self._trainer is not None else 1
        batch_tokens = feature_acts.shape[0] * world_size
        counts = active_counts(feature_acts)  # the one pass over [batch, d_sae]
        fired = self._all_reduce_sum((counts[:-1] > 0).to(torch.float32)) > 0
        self.tokens_since_fired.add_(batch_tokens).masked_fill_(fired, 0)

        self.train_metrics.update(output.sae_in, output.sae_out)
        self.train_l0.update(active_counts=counts)
        self.train_density.update(active_counts=counts)
        self._window_tokens += batch_tokens
        self._tokens_since_log += batch_tokens

        if self._trainer is None:
            return
        step = self.global_step
        # global_step repeats over the micro-batches of gradient accumulation: compute once.
        if (step + 1) % self.trainer.log_every_n_steps == 0 and step != self._last_logged_step:
            self._last_logged_step = step
            self._log_window_metrics()
        if self._window_tokens >= self.hparams.dead_window_tokens:
            density = self._publish_feature_density()
            self.log("train/dead_latent_rate", (density == 0).float().mean())

    def _log_window_metrics(self) -> None:
        # compute() is a collective under DDP; every rank reaches this on the same step.
        values = {**self.train_metrics.compute(), "train/l0": self.train_l0.compute()}
        self.train_metrics.reset()
        self.train_l0.reset()
        now = time.perf_counter()
        if self._last_log_time is not None:
            values["train/tokens_per_sec"] = torch.tensor(
                self._tokens_since_log / max(now - self._last_log_time, 1e-9)
            )
        self._last_log_time, self._tokens_since_log = now, 0
        self.log_dict({name: value.float() for name, value in values.items()})
        short = {
            "train/l0": "l0",
            "train/explained_variance": "ev",
            "train/tokens_per_sec": "tok/s",
        }
        self.log_dict(
            {short[name]: value.float() for name, value in values.items() if name in short},
            prog_bar=True,
            logger=False,
        )

    def _publish_feature_density(self) -> Tensor:
        """Copy the window's feature density to the checkpointed buffer, histogram it, reset.

        ``compute()`` is a collective: every rank calls this on the same step.
        """
        density = self.train_density.compute()
        self.train_density.reset()
        self._window_tokens = 0
        self.feature_density.copy_(density)
        self._density_published = True
        log_density = log10_feature_density(density)
        for logger in self.loggers:
            if isinstance(logger, TensorBoardLogger):
                logger.experiment.add_histogram(
                    "train/feature_density_log10", log_density, self.global_step
                )
        return density

    def on_train_start(self) -> None:
        """Start counting the density windows this fit closes."""
        self._density_published = False

    def on_train_end(self) -> None:
        """Publish the open window if this fit closed none, so the exporter sees this run."""
        if self._window_tokens > 0 and not self._density_published:
            self._publish_feature_density()

    # ------------------------------------------------------------------ validation
    def validation_step(self, batch: Any, batch_idx: int) -> None:
        """Evaluate inference-mode ``encode``/``decode`` (never the training pass)."""
        x = self._activations(batch)
        sae_in = x * self.activation_scale
        feature_acts = self.sae.encode(sae_in)
        self.val_metrics.update(
            x=sae_in, x_hat=self.sae.decode(feature_acts), feature_acts=feature_acts
        )
        self.log_dict(self.val_metrics, on_step=False, on_epoch=True)

    # ------------------------------------------------------------------ optimisation
    def param_group(self) -> dict[str, Any]:
        """Return the Adam parameter group of this SAE: parameters, learning rate and betas."""
        hp = self.hparams
        return {
            "params": list(self.parameters()),
            "lr": hp.lr,
            "betas": (hp.adam_beta1, hp.adam_beta2),
        }

    def lr_schedule(self) -> LRSchedule:
        """Return the learning-rate multiplier per step (decay needs ``max_steps``)."""
        hp = self.hparams
        max_steps = self.trainer.max_steps if self._trainer is not None else -1
        return LRSchedule(
            total_steps=max_steps if max_steps and max_steps > 0 else None,
            warm_up_steps=hp.lr_warm_up_steps,
            decay_steps=hp.lr_decay_steps,
            scheduler=hp.lr_scheduler,
            min_lr_ratio=hp.lr_min_ratio,
        )

    def configure_optimizers(self) -> dict[str, Any]:
        """Adam with a per-step warm-up / constant-or-cosine / linear-decay schedule."""
        return adam_with_schedules([self])

    # ------------------------------------------------------------------ checkpoints & dtypes
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Keep the SAE's metadata (model, hook, dataset; e.g. of an imported release)."""
        checkpoint["sae_metadata"] = self.sae.cfg.metadata.to_dict()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Restore the metadata and keep the checkpoint's activation scale (never re-estimate)."""
        self._scale_pending = False
        if "sae_metadata" in checkpoint:
            self.sae.cfg.metadata = SAEMetadata(**checkpoint["sae_metadata"])

    def _apply(self, fn: Any, recurse: bool = True) -> "SAEModule":
        """Move/cast like any module, but keep thresholds in full precision and resync the SAE.

        Lightning moves and casts the parent module, so the child SAE's ``device``/``dtype``
        attributes (read by sae-lens's ``process_sae_in``) would otherwise go stale.
        """
        super()._apply(fn, recurse)
        if "sae" not in self.__dict__["_modules"]:
            return self  # still inside __init__
        for dotted, dtype in self._full_precision_dtypes.items():
            owner_name, _, name = dotted.rpartition(".")
            owner = self.get_submodule(owner_name)
            tensor = getattr(owner, name)
            if tensor.dtype == dtype:
                continue
            if isinstance(tensor, torch.nn.Parameter):
                tensor.data = tensor.data.to(dtype)
            else:
                owner._buffers[name] = tensor.to(dtype)
        for module in self.modules():
            if isinstance(module, Metric):
                # A plain .to(bf16) (bf16-true) casts metric states and their defaults too.
                module.set_dtype(torch.float64)
        sae = self.sae
        sae.dtype = sae.W_enc.dtype
        sae.device = sae.W_enc.device
        sae.cfg.dtype = dtype_to_str(sae.dtype)
        sae.cfg.device = str(sae.device)
        return self
