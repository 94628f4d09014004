"""``SAEModule``: the thin LightningModule every SAE architecture derives from.

A module holds one :class:`~lightning_sae.modules.unit.SAEUnit` (the SAE, its normaliser, its
statistics, its optimiser settings) and adds what Lightning needs around it: logging, the
optimiser, validation/test steps and checkpoint hooks. An architecture subclass states three
things: its sae-lens name (:attr:`SAEModule.architecture`), the sae-lens training-config fields
its hyper-parameters fill (:attr:`SAEModule.sae_config_fields`) and how it validates them
(:meth:`SAEModule.validate_hparams`).
"""

import inspect
import math
from collections.abc import Mapping
from typing import Any, ClassVar

import torch
from lightning.fabric.utilities.cloud_io import _load as load_checkpoint_file
from lightning.pytorch import Callback, LightningModule
from lightning.pytorch.utilities.model_helpers import _restricted_classmethod
from sae_lens.registry import get_sae_training_class
from sae_lens.saes.sae import SAEMetadata, TrainingSAE, TrainingSAEConfig
from torch import Tensor

from lightning_sae.io import AtomicCheckpoints, read_checkpoint
from lightning_sae.modules.checkpoints import (
    CLASS_PATH_KEY,
    DENSITY_WINDOW_KEY,
    check_checkpoint_matches,
    saved_class,
    upgrade_state_dict,
)
from lightning_sae.modules.log import log_density_histogram, log_step_result
from lightning_sae.modules.normalizer import ActivationNormalizer
from lightning_sae.modules.statistics import (
    TrainingStatistics,
    evaluation_metrics,
    keep_metrics_float64,
)
from lightning_sae.modules.unit import OptimizerSettings, SAEUnit
from lightning_sae.modules.validation import check_positive_ints
from lightning_sae.optim import adam_with_schedules
from lightning_sae.registry import (
    available_architectures,
    class_path,
    get_module_class,
    normalize_name,
)


class _ArchitectureDispatch(LightningModule):
    """Holds ``SAEModule.__new__`` so that signature tools read ``SAEModule.__init__``.

    jsonargparse (LightningCLI) takes a class's parameters from ``__new__`` when the class itself
    defines one; defined one level up, it reads ``__init__`` and its ``**kwargs`` chain.
    """

    architecture: ClassVar[str] = ""

    def __new__(cls, *args: Any, architecture: str | None = None, **kwargs: Any) -> "SAEModule":
        """Dispatch ``SAEModule(architecture=...)`` to the registered class of that architecture."""
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

    ``SAEModule(architecture="topk", d_in=..., d_sae=...)`` builds the registered class of that
    architecture, and ``SAEModule.load_from_checkpoint`` returns the class that saved the
    checkpoint (a user's subclass included).

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
            ranks) is dead: it feeds AuxK and the logged dead-latent rate, and the feature density
            written on export covers windows of this many tokens. 10M as in OpenAI's, sparsify's
            and dictionary_learning's recipes.
        normalize_activations: Scale inputs by ``s = sqrt(d_in) / E‖x‖`` (sae-lens's
            ``expected_average_only_in``), estimated on the first training batch over all ranks
            unless ``activation_scale`` is given. The scale is a buffer, so it is in every
            checkpoint and the exporter folds it into the weights.
        activation_scale: A fixed scale to use instead of estimating one.
        apply_b_dec_to_input: Subtract ``b_dec`` before encoding (sae-lens's default).
        decoder_init_norm: Norm of each decoder row at initialisation (Anthropic's 0.1 heuristic).
        check_finite: Stop the fit when a training batch or the loss holds NaN/inf. Recorded on
            the device every step and read on logging steps (``log_every_n_steps``), before every
            checkpoint and export, and at the end of fit: no device-to-host sync per step, so the
            weights of the bad step are updated, and the error names that step. Checkpoints and
            exports refuse non-finite weights whatever this is set to.
        architecture: Only needed when constructing through the base class; must match the
            subclass otherwise.
        seed: Seed for weight initialisation (``None`` uses the global RNG).

    """

    #: sae-lens training-architecture name this module trains.
    architecture: ClassVar[str] = ""
    #: The training SAE class; ``None`` takes the class sae-lens registers for the architecture.
    training_sae_class: ClassVar[type[TrainingSAE[Any]] | None] = None
    #: sae-lens training-config field -> the hyper-parameter that fills it. The one mapping
    #: between the two: export, import and the checkpoint metadata all read it.
    sae_config_fields: ClassVar[dict[str, str]] = {
        "d_in": "d_in",
        "d_sae": "d_sae",
        "apply_b_dec_to_input": "apply_b_dec_to_input",
        "decoder_init_norm": "decoder_init_norm",
    }
    #: SAE tensors kept in the dtype sae-lens created them in, whatever the Trainer precision:
    #: JumpReLU's threshold stops learning in bf16 and BatchTopK's float64 EMA stalls.
    full_precision_tensors: ClassVar[tuple[str, ...]] = ("threshold", "topk_threshold")
    #: Hyper-parameters that define the SAE itself (its shapes and inference function): a
    #: checkpoint resumes only into a module that agrees on them.
    structural_hparams: ClassVar[tuple[str, ...]] = ("d_in", "d_sae", "apply_b_dec_to_input")

    unit: SAEUnit

    def __init__(
        self,
        d_in: int,
        d_sae: int,
        lr: float = 3e-4,
        adam_beta1: float = 0.9,
        adam_beta2: float = 0.999,
        lr_scheduler: str = "constant",
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
        if architecture is not None and normalize_name(architecture) not in (
            normalize_name(self.architecture),
            normalize_name(type(self).__name__),
        ):
            raise ValueError(
                f"architecture={architecture!r} does not match {type(self).__name__} "
                f"({self.architecture!r}); drop the argument or use SAEModule(architecture=...)."
            )
        self.save_hyperparameters(ignore=["architecture"])
        # Saved so that SAEModule.load_from_checkpoint can rebuild by name.
        self.hparams["architecture"] = self.architecture
        self.unit = self.build_unit(self.hparams)
        self.val_metrics = evaluation_metrics(d_in, "val/")
        self.test_metrics = evaluation_metrics(d_in, "test/")

    # ------------------------------------------------------------------ construction
    @classmethod
    def validate_hparams(cls, hp: Mapping[str, Any]) -> None:
        """Raise ``ValueError`` naming the first invalid hyper-parameter and the fix.

        Subclasses extend it (calling ``super()``) with their own rules.
        """
        check_positive_ints({name: hp[name] for name in ("d_in", "d_sae", "dead_window_tokens")})
        if not 0 < hp["lr"] < math.inf:
            raise ValueError(f"lr must be a positive finite number, got {hp['lr']!r}.")
        for name in ("adam_beta1", "adam_beta2"):
            if not 0.0 <= hp[name] < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {hp[name]!r}.")
        for name in ("lr_warm_up_steps", "lr_decay_steps", "sparsity_warm_up_steps"):
            if hp[name] < 0:
                raise ValueError(f"{name} must be >= 0, got {hp[name]!r}.")
        if hp["lr_scheduler"] not in ("constant", "cosine"):
            raise ValueError(
                f"lr_scheduler must be 'constant' or 'cosine', got {hp['lr_scheduler']!r}."
            )

    @classmethod
    def sae_config_kwargs(cls, hp: Mapping[str, Any]) -> dict[str, Any]:
        """Fields of the sae-lens training config, from the hyper-parameters."""
        return {field: hp[name] for field, name in cls.sae_config_fields.items()}

    @classmethod
    def hparams_from_sae_config(cls, cfg: Mapping[str, Any]) -> dict[str, Any]:
        """Hyper-parameters of this class that an sae-lens config (dict) determines."""
        return {name: cfg[field] for field, name in cls.sae_config_fields.items() if field in cfg}

    @classmethod
    def structural_view(cls, hp: dict[str, Any]) -> dict[str, Any]:
        """Return the settings that define this SAE (``structural_hparams``) from ``hp``."""
        return {name: hp.get(name) for name in cls.structural_hparams}

    @classmethod
    def sae_classes(cls) -> tuple[type[TrainingSAE[Any]], type[TrainingSAEConfig]]:
        """Return the training SAE class this module builds, and its config class."""
        registered_cls, config_cls = get_sae_training_class(cls.architecture)
        return cls.training_sae_class or registered_cls, config_cls

    @classmethod
    def build_unit(cls, hp: Mapping[str, Any]) -> SAEUnit:
        """Validate ``hp`` (every hyper-parameter of this class) and build the SAE's unit."""
        cls.validate_hparams(hp)
        sae_cls, config_cls = cls.sae_classes()
        # Normalisation is ours (a checkpointed buffer), so the SAE always sees scaled input.
        config = config_cls(**cls.sae_config_kwargs(hp), normalize_activations="none")
        seed = hp["seed"]
        with torch.random.fork_rng(enabled=seed is not None):
            if seed is not None:
                torch.manual_seed(seed)
            sae = sae_cls(config)
        return SAEUnit(
            sae,
            ActivationNormalizer(hp["d_in"], hp["normalize_activations"], hp["activation_scale"]),
            TrainingStatistics(hp["d_in"], hp["d_sae"], hp["dead_window_tokens"]),
            OptimizerSettings(
                **{name: hp[name] for name in OptimizerSettings.__dataclass_fields__}
            ),
            check_finite=hp["check_finite"],
            full_precision=cls.full_precision_tensors,
        )

    @classmethod
    def default_hparams(cls) -> dict[str, Any]:
        """Every constructor argument of this class with its default (required ones omitted)."""
        defaults: dict[str, Any] = {}
        for klass in reversed(cls.__mro__):
            if isinstance(klass, type) and issubclass(klass, SAEModule):
                for name, parameter in inspect.signature(klass.__init__).parameters.items():
                    if parameter.default is not inspect.Parameter.empty:
                        defaults[name] = parameter.default
        defaults.pop("architecture", None)
        return defaults

    # ------------------------------------------------------------------ the parts
    @property
    def sae(self) -> TrainingSAE[Any]:
        """The wrapped sae-lens training SAE (it sees normalised activations)."""
        return self.unit.sae

    @property
    def activation_scale(self) -> Tensor:
        """The factor activations are multiplied by before the SAE sees them."""
        return self.unit.normalizer.scale

    @property
    def feature_density(self) -> Tensor:
        """Per-latent firing frequency of the last closed window (what an export writes)."""
        return self.unit.statistics.feature_density

    @property
    def tokens_since_fired(self) -> Tensor:
        """Tokens, over all ranks, since each latent last fired."""
        return self.unit.statistics.tokens_since_fired

    @property
    def dead_latent_mask(self) -> Tensor:
        """Latents that fired on no token in the last ``dead_window_tokens`` tokens."""
        return self.unit.statistics.dead_latent_mask

    # ------------------------------------------------------------------ inference API
    def encode(self, x: Tensor) -> Tensor:
        """Latents of activations ``x`` (given in the input's own units)."""
        return self.unit.encode(x)

    def decode(self, feature_acts: Tensor) -> Tensor:
        """Reconstruction, in the input's own units, of latents ``feature_acts``."""
        return self.unit.decode(feature_acts)

    def forward(self, x: Tensor) -> Tensor:
        """Reconstruct activations ``x``; the result is in ``x``'s units and dtype."""
        return self.unit(x)

    # ------------------------------------------------------------------ steps
    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        """One training pass on a ``[batch, d_in]`` tensor of activations."""
        result = self.unit.training_step(
            self._activations(batch), self.global_step, self._log_every_n_steps()
        )
        log_step_result(self, result)
        return result.loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        """Evaluate inference-mode ``encode``/``decode`` on held-out activations."""
        self.unit.evaluate(self._activations(batch), self.val_metrics)
        self.log_dict(self.val_metrics, on_step=False, on_epoch=True)

    def test_step(self, batch: Any, batch_idx: int) -> None:
        """Like :meth:`validation_step`, logged under ``test/``."""
        self.unit.evaluate(self._activations(batch), self.test_metrics)
        self.log_dict(self.test_metrics, on_step=False, on_epoch=True)

    def _log_every_n_steps(self) -> int:
        return self.trainer.log_every_n_steps if self._trainer is not None else 50

    def _activations(self, batch: Any) -> Tensor:
        return self.unit.check_batch(batch, type(self).__name__)

    def on_train_start(self) -> None:
        """Start counting the density windows this fit closes."""
        self.unit.statistics.density_published = False

    def on_train_end(self) -> None:
        """Publish the open density window if this fit closed none (for the exporter)."""
        density = self.unit.finish_fit()
        if density is not None:
            log_density_histogram(self, "train/feature_density_log10", density)

    def configure_model(self) -> None:
        """Shard the SAE as ``ModelParallelStrategy``'s mesh asks (:mod:`lightning_sae.parallel`).

        A no-op under every other strategy.
        """
        if self._device_mesh is not None:
            from lightning_sae.parallel import parallelize  # torch.distributed's APIs: lazily

            parallelize(self, self._device_mesh)

    # ------------------------------------------------------------------ optimisation
    def configure_optimizers(self) -> dict[str, Any]:
        """Adam with a per-step warm-up / constant-or-cosine / linear-decay schedule."""
        unit = self.unit
        return adam_with_schedules([unit.param_group()], [unit.lr_schedule(_max_steps(self))])

    # ------------------------------------------------------------------ checkpoints
    def configure_callbacks(self) -> list[Callback]:
        """Callbacks the module owns: atomic checkpoint writes (:class:`AtomicCheckpoints`)."""
        return [AtomicCheckpoints()]

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Record the class and the SAE's metadata (model, hook, dataset; e.g. of a release).

        Raises:
            FloatingPointError: Training went NaN/inf: the checkpoint is not written, so the
                last good one is kept.

        """
        self.unit.raise_if_not_finite()
        checkpoint[CLASS_PATH_KEY] = class_path(type(self))
        checkpoint["sae_metadata"] = self.sae.cfg.metadata.to_dict()
        # ModelParallelStrategy restores a gathered (one-file) checkpoint parameter by parameter
        # and buffer by buffer, skipping torchmetrics states: the open density window also
        # travels here.
        checkpoint[DENSITY_WINDOW_KEY] = self.unit.statistics.window.state_dict()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Restore the metadata; keep the checkpoint's activation scale (never re-estimate).

        Raises:
            ValueError: If the checkpoint was written by another architecture or with other
                architecture settings (``fit(..., ckpt_path=...)`` would otherwise train the
                checkpoint's SAE in place of the one asked for).

        """
        check_checkpoint_matches(self, checkpoint)
        self.unit.mark_restored()
        if "sae_metadata" in checkpoint:
            self.sae.cfg.metadata = SAEMetadata(**checkpoint["sae_metadata"])
        window = self.unit.statistics.window
        for name, value in checkpoint.get(DENSITY_WINDOW_KEY, {}).items():
            getattr(window, name).copy_(value)  # in place: keeps the device and float64

    @_restricted_classmethod
    def load_from_checkpoint(cls, checkpoint_path: Any, *args: Any, **kwargs: Any) -> Any:
        """Load a checkpoint into the class that saved it.

        Called on ``SAEModule`` or on a parent of the saving class, it returns the saving class
        (a user's subclass when its module is imported, else the library class of the saved
        architecture); on an unrelated class it raises ``TypeError``. Lightning checkpoints are
        pickles: load only files you trust.
        """
        checkpoint = read_checkpoint(
            checkpoint_path,
            lambda: load_checkpoint_file(
                checkpoint_path, map_location="cpu", weights_only=kwargs.get("weights_only")
            ),
        )
        saved_cls = saved_class(checkpoint)
        if saved_cls is None:
            architecture = checkpoint.get("hyper_parameters", {}).get("architecture")
            saved_cls = get_module_class(architecture) if architecture else cls
        del checkpoint  # loaded again below by Lightning; never two copies alive
        if hasattr(checkpoint_path, "seek"):
            checkpoint_path.seek(0)
        if not (isinstance(saved_cls, type) and issubclass(saved_cls, SAEModule)):
            raise TypeError(f"{checkpoint_path} records {saved_cls}, which is no SAEModule.")
        if not issubclass(saved_cls, cls):
            raise TypeError(
                f"{checkpoint_path} was saved by {saved_cls.__name__}; it cannot be loaded as "
                f"{cls.__name__}. Use {saved_cls.__name__}.load_from_checkpoint or "
                "SAEModule.load_from_checkpoint."
            )
        # Lightning's own implementation, bound to the most specific class: the saving one.
        load = LightningModule.load_from_checkpoint.__func__  # type: ignore[attr-defined]
        return load(saved_cls, checkpoint_path, *args, **kwargs)

    def _apply(self, fn: Any, recurse: bool = True) -> "SAEModule":
        super()._apply(fn, recurse)
        keep_metrics_float64(self)  # the val/test metrics live outside the unit
        return self

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        upgrade_state_dict(state_dict, prefix, prefix + "unit.", self.unit)
        super()._load_from_state_dict(state_dict, prefix, *args)


def _max_steps(module: LightningModule) -> int | None:
    return module.trainer.max_steps if module._trainer is not None else None
