"""Several SAEs, one per hook, trained together from one forward pass of the language model.

This is Gemma Scope's "all layers" set-up: the :class:`~lightning_sae.ActivationDataModule` with
several ``hook_names`` yields ``{hook_name: [batch, d_in]}`` batches, and :class:`MultiSAEModule`
routes each hook's activations to its own :class:`~lightning_sae.modules.unit.SAEUnit`. The SAEs
share nothing but the optimiser object: each keeps its own parameter group, learning-rate
schedule, gradient clipping, activation scale, dead-latent counters and metrics (logged under
``<hook_name>/``).

>>> module = MultiSAEModule("topk", ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post"],
...                         d_in=16, d_sae=64, k=4)
>>> module.sae_unit("blocks.1.hook_resid_post").sae.cfg.architecture()
'topk'
"""

from collections.abc import Mapping
from typing import Any

import torch
from lightning.pytorch import LightningModule
from sae_lens.saes.sae import SAEMetadata
from torch import Tensor, nn

from lightning_sae.modules.base import SAEModule
from lightning_sae.modules.checkpoints import (
    CLASS_PATH_KEY,
    check_checkpoint_matches,
    upgrade_state_dict,
)
from lightning_sae.modules.log import log_density_histogram, log_step_result
from lightning_sae.modules.statistics import evaluation_metrics, keep_metrics_float64
from lightning_sae.modules.unit import SAEUnit
from lightning_sae.optim import adam_with_schedules
from lightning_sae.registry import class_path, get_module_class


def _key(hook_name: str) -> str:
    # ModuleDict keys cannot contain ".", hook names always do.
    return hook_name.replace(".", "__")


class MultiSAEModule(LightningModule):
    """Train one SAE of the same architecture per hook from one stream of activations.

    ``d_in`` may be ``{hook_name: width}`` (what :attr:`ActivationDataModule.d_in` gives for
    several hooks, so the command line links it); its keys are then the hooks. Export every SAE
    with :class:`~lightning_sae.SAELensExport` (a folder per hook) or
    ``export_to_sae_lens(module, path, hook_name=hook)``.

    Args:
        architecture: Architecture or module class name of every SAE (``"batchtopk"``).
        hook_names: The hooks, in the order the DataModule names them (default: ``d_in``'s keys).
        d_in: Activation width, one int for all hooks or ``{hook_name: d_in}``.
        d_sae: Number of latents of every SAE.
        per_hook: Per-hook overrides of the SAE arguments, ``{hook_name: {"k": 64}}``.
        sae_options: Arguments of every SAE (``k``, ``lr``, ...) as a mapping (config files).
        **sae_kwargs: The same as keyword arguments.

    """

    def __init__(
        self,
        architecture: str,
        hook_names: list[str] | None = None,
        d_in: int | Mapping[str, int] = 0,
        d_sae: int = 0,
        per_hook: Mapping[str, Mapping[str, Any]] | None = None,
        sae_options: Mapping[str, Any] | None = None,
        **sae_kwargs: Any,
    ) -> None:
        super().__init__()
        # Hooks taken from d_in's keys are not saved twice (and never clash with the DataModule's
        # hook_names when Lightning merges the two's hyper-parameters).
        self.save_hyperparameters(ignore=[] if hook_names is not None else ["hook_names"])
        if hook_names is None:
            if not isinstance(d_in, Mapping):
                raise ValueError(
                    "MultiSAEModule trains one SAE per hook of several: pass hook_names, or d_in "
                    "as {hook_name: width} (the command line links it from a DataModule with "
                    "several hook_names; for one hook use a single-SAE module such as TopKSAE)."
                )
            hook_names = list(d_in)
        hook_names = list(hook_names)
        if not hook_names or len(set(hook_names)) != len(hook_names):
            raise ValueError(f"hook_names must be non-empty and distinct, got {hook_names!r}.")
        per_hook = dict(per_hook or {})
        d_in_of = dict(d_in) if isinstance(d_in, Mapping) else dict.fromkeys(hook_names, d_in)
        for name, mapping in (("per_hook", per_hook), ("d_in", d_in_of)):
            unknown = sorted(set(mapping) - set(hook_names))
            if unknown:
                raise ValueError(f"{name} names hooks {unknown} that are not in {hook_names}.")
        missing = [hook for hook in hook_names if hook not in d_in_of]
        if missing:
            raise ValueError(f"d_in gives no width for hooks {missing}.")
        module_cls = get_module_class(architecture)
        #: The architecture's module class: its rules and mappings build every unit.
        self.module_class: type[SAEModule] = module_cls
        self.hook_names = hook_names
        self.units = nn.ModuleDict()
        self.val_metrics = nn.ModuleDict()
        self.test_metrics = nn.ModuleDict()
        options = self._sae_options(module_cls, dict(sae_options or {}) | sae_kwargs)
        for hook in hook_names:
            hparams = options | self._sae_options(module_cls, per_hook.get(hook, {}), hook)
            hparams |= {"d_in": d_in_of[hook], "d_sae": d_sae}
            unit = module_cls.build_unit(hparams)
            unit.label = f"The SAE of hook {hook!r}"
            self.units[_key(hook)] = unit
            self.val_metrics[_key(hook)] = evaluation_metrics(d_in_of[hook], f"{hook}/val/")
            self.test_metrics[_key(hook)] = evaluation_metrics(d_in_of[hook], f"{hook}/test/")

    @staticmethod
    def _sae_options(
        module_cls: type[SAEModule], options: Mapping[str, Any], hook: str | None = None
    ) -> dict[str, Any]:
        """Every SAE argument, defaults filled in (``options`` checked for unknown names)."""
        defaults = module_cls.default_hparams()
        unknown = sorted(set(options) - set(defaults))
        if unknown:
            where = f"per_hook[{hook!r}]" if hook else "The SAE options"
            raise TypeError(
                f"{where} name arguments {unknown} that {module_cls.__name__} does not take; see "
                f"help({module_cls.__name__})."
            )
        return defaults | dict(options) if hook is None else dict(options)

    @classmethod
    def structural_view(cls, hp: dict[str, Any]) -> dict[str, Any]:
        """Return the settings that define the SAEs (architecture, widths, each hook's k...).

        ``hp`` are this class's hyper-parameters (a checkpoint's, or a config's init args).
        """
        module_cls = get_module_class(hp["architecture"])
        own = {"architecture", "hook_names", "d_in", "d_sae", "per_hook", "sae_options"}
        extra = {name: value for name, value in hp.items() if name not in own | {"_instantiator"}}
        options = cls._sae_options(module_cls, dict(hp.get("sae_options") or {}) | extra)
        view = {
            "architecture": module_cls.architecture,
            "d_sae": hp.get("d_sae"),
            "sae": {n: options.get(n) for n in module_cls.structural_hparams if n != "d_in"},
        }
        for hook, overrides in sorted((hp.get("per_hook") or {}).items()):
            view[f"per_hook[{hook}]"] = {
                n: overrides[n] for n in module_cls.structural_hparams if n in overrides
            }
        return view

    def sae_unit(self, hook_name: str) -> SAEUnit:
        """Return the SAE unit trained on ``hook_name``."""
        if hook_name not in self.hook_names:
            raise KeyError(f"No SAE for hook {hook_name!r}; hooks: {self.hook_names}.")
        return self.units[_key(hook_name)]  # type: ignore[return-value]

    def _units(self) -> list[tuple[str, SAEUnit]]:
        return [(hook, self.sae_unit(hook)) for hook in self.hook_names]

    def _hook_batches(self, batch: Any) -> dict[str, Tensor]:
        if not isinstance(batch, Mapping):
            raise TypeError(
                f"MultiSAEModule expects a dict {{hook_name: [batch, d_in] tensor}}, got "
                f"{type(batch).__name__}; use ActivationDataModule(hook_names=[...]) with several "
                "hooks, or a single-SAE module for one hook."
            )
        missing = [hook for hook in self.hook_names if hook not in batch]
        if missing:
            raise KeyError(
                f"The batch has no activations for hooks {missing}; it has {list(batch)}."
            )
        return {
            hook: self.sae_unit(hook).check_batch(batch[hook], f"MultiSAEModule[{hook!r}]")
            for hook in self.hook_names
        }

    def forward(self, batch: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Reconstruct each hook's activations with its own SAE."""
        return {hook: unit(batch[hook]) for hook, unit in self._units()}

    # ------------------------------------------------------------------ steps
    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        """Sum of the SAEs' losses: their parameters are disjoint, so gradients are independent."""
        hook_batches = self._hook_batches(batch)
        log_every = self.trainer.log_every_n_steps if self._trainer is not None else 50
        losses = []
        for hook, unit in self._units():
            result = unit.training_step(hook_batches[hook], self.global_step, log_every)
            log_step_result(self, result, prefix=f"{hook}/")
            losses.append(result.loss)
        return torch.stack(losses).sum()

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        """Validate each SAE on its own hook, logged under ``<hook>/val/``."""
        self._evaluate(batch, self.val_metrics)

    def test_step(self, batch: Any, batch_idx: int) -> None:
        """Test each SAE on its own hook, logged under ``<hook>/test/``."""
        self._evaluate(batch, self.test_metrics)

    def _evaluate(self, batch: Any, metrics: nn.ModuleDict) -> None:
        hook_batches = self._hook_batches(batch)
        for hook, unit in self._units():
            unit.evaluate(hook_batches[hook], metrics[_key(hook)])  # type: ignore[arg-type]
            self.log_dict(metrics[_key(hook)], on_step=False, on_epoch=True)  # type: ignore[arg-type]

    def on_train_start(self) -> None:
        """Start counting the density windows this fit closes."""
        for _, unit in self._units():
            unit.statistics.density_published = False

    def on_train_end(self) -> None:
        """Let every SAE publish its feature density (for the exporter)."""
        for hook, unit in self._units():
            density = unit.finish_fit()
            if density is not None:
                log_density_histogram(self, f"{hook}/train/feature_density_log10", density)

    # ------------------------------------------------------------------ optimisation
    def configure_optimizers(self) -> dict[str, Any]:
        """One Adam with a parameter group and learning-rate schedule per SAE."""
        max_steps = self.trainer.max_steps if self._trainer is not None else None
        units = [unit for _, unit in self._units()]
        return adam_with_schedules(
            [unit.param_group() for unit in units], [unit.lr_schedule(max_steps) for unit in units]
        )

    def configure_gradient_clipping(
        self,
        optimizer: torch.optim.Optimizer,
        gradient_clip_val: float | None = None,
        gradient_clip_algorithm: str | None = None,
    ) -> None:
        """Clip each SAE's gradients on their own, as if it were trained alone."""
        if not gradient_clip_val:
            return
        for _, unit in self._units():
            if gradient_clip_algorithm == "value":
                torch.nn.utils.clip_grad_value_(unit.parameters(), gradient_clip_val)
            else:
                torch.nn.utils.clip_grad_norm_(unit.parameters(), gradient_clip_val)

    # ------------------------------------------------------------------ checkpoints & dtypes
    configure_callbacks = SAEModule.configure_callbacks

    def _apply(self, fn: Any, recurse: bool = True) -> "MultiSAEModule":
        super()._apply(fn, recurse)
        keep_metrics_float64(self)  # the val/test metrics live outside the units
        return self

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        for hook, unit in self._units():  # lightning-sae 0.1 kept each SAE under saes.<hook>.
            upgrade_state_dict(
                state_dict, f"{prefix}saes.{_key(hook)}.", f"{prefix}units.{_key(hook)}.", unit
            )
        super()._load_from_state_dict(state_dict, prefix, *args)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Record the class and every SAE's metadata, per hook.

        Raises:
            FloatingPointError: An SAE went NaN/inf: the checkpoint is not written.

        """
        for _, unit in self._units():
            unit.raise_if_not_finite()
        checkpoint[CLASS_PATH_KEY] = class_path(type(self))
        checkpoint["sae_metadata"] = {
            hook: unit.sae.cfg.metadata.to_dict() for hook, unit in self._units()
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Restore every SAE's metadata and keep its checkpointed activation scale."""
        check_checkpoint_matches(self, checkpoint)
        metadata = checkpoint.get("sae_metadata", {})
        for hook, unit in self._units():
            unit.mark_restored()
            if hook in metadata:
                unit.sae.cfg.metadata = SAEMetadata(**metadata[hook])
