"""Several SAEs, one per hook, trained together from one forward pass of the language model.

This is Gemma Scope's "all layers" set-up: the :class:`~lightning_sae.ActivationDataModule` with
several ``hook_names`` yields ``{hook_name: [batch, d_in]}`` batches, and :class:`MultiSAEModule`
routes each hook's activations to its own :class:`SAEModule`. The SAEs share nothing but the
optimiser object: each keeps its own parameter group, learning-rate schedule, gradient clipping,
activation scale, dead-latent counters and metrics (logged under ``<hook_name>/``).

>>> module = MultiSAEModule("topk", ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post"],
...                         d_in=16, d_sae=64, k=4)
>>> type(module.sae_module("blocks.1.hook_resid_post")).__name__
'TopKSAE'
"""

from collections.abc import Mapping
from typing import Any

import torch
from lightning.pytorch import LightningModule
from torch import Tensor, nn

from lightning_sae.modules.base import SAEModule, adam_with_schedules, get_module_class


def _child_key(hook_name: str) -> str:
    # ModuleDict keys cannot contain ".", hook names always do.
    return hook_name.replace(".", "__")


class MultiSAEModule(LightningModule):
    """Train one SAE of the same architecture per hook from one stream of activations.

    Export each SAE with ``export_to_sae_lens(module.sae_module(hook), path,
    metadata={"hook_name": hook})``.

    Args:
        architecture: sae-lens architecture or module class name of every SAE (``"batchtopk"``).
        hook_names: The hooks, in the order the DataModule names them.
        d_in: Activation width, one int for all hooks or ``{hook_name: d_in}``.
        d_sae: Number of latents of every SAE.
        per_hook: Per-hook overrides of the SAE arguments, ``{hook_name: {"k": 64}}``.
        **sae_kwargs: Arguments of every SAE (``k``, ``lr``, ``dead_window_tokens``, ...).

    """

    def __init__(
        self,
        architecture: str,
        hook_names: list[str],
        d_in: int | Mapping[str, int],
        d_sae: int,
        per_hook: Mapping[str, Mapping[str, Any]] | None = None,
        **sae_kwargs: Any,
    ) -> None:
        super().__init__()
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
        self.save_hyperparameters()
        module_cls = get_module_class(architecture)
        self.hook_names = hook_names
        self.saes = nn.ModuleDict(
            {
                _child_key(hook): module_cls(
                    d_in=d_in_of[hook], d_sae=d_sae, **(sae_kwargs | dict(per_hook.get(hook, {})))
                )
                for hook in hook_names
            }
        )
        for hook in hook_names:
            self.sae_module(hook).attach_to(self, log_prefix=f"{hook}/")

    def sae_module(self, hook_name: str) -> SAEModule:
        """Return the SAE module trained on ``hook_name``."""
        if hook_name not in self.hook_names:
            raise KeyError(f"No SAE for hook {hook_name!r}; hooks: {self.hook_names}.")
        return self.saes[_child_key(hook_name)]

    def _children(self) -> list[tuple[str, SAEModule]]:
        return [(hook, self.sae_module(hook)) for hook in self.hook_names]

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
        return {hook: batch[hook] for hook in self.hook_names}

    def forward(self, batch: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Reconstruct each hook's activations with its own SAE."""
        return {hook: sae(batch[hook]) for hook, sae in self._children()}

    # ------------------------------------------------------------------ Lightning hooks
    def setup(self, stage: str) -> None:
        """Attach the trainer to every child SAE (a ModuleDict hides them from Lightning)."""
        for _, sae in self._children():
            sae.trainer = self.trainer

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        """Sum of the SAEs' losses: their parameters are disjoint, so gradients are independent."""
        hook_batches = self._hook_batches(batch)
        losses = [
            sae.training_step(hook_batches[hook], batch_idx) for hook, sae in self._children()
        ]
        return torch.stack(losses).sum()

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        """Validate each SAE on its own hook."""
        hook_batches = self._hook_batches(batch)
        for hook, sae in self._children():
            sae.validation_step(hook_batches[hook], batch_idx)

    def configure_optimizers(self) -> dict[str, Any]:
        """One Adam with a parameter group and learning-rate schedule per SAE."""
        return adam_with_schedules([sae for _, sae in self._children()])

    def configure_gradient_clipping(
        self,
        optimizer: torch.optim.Optimizer,
        gradient_clip_val: float | None = None,
        gradient_clip_algorithm: str | None = None,
    ) -> None:
        """Clip each SAE's gradients on their own, as if it were trained alone."""
        if not gradient_clip_val:
            return
        for _, sae in self._children():
            if gradient_clip_algorithm == "value":
                torch.nn.utils.clip_grad_value_(sae.parameters(), gradient_clip_val)
            else:
                torch.nn.utils.clip_grad_norm_(sae.parameters(), gradient_clip_val)

    def on_train_start(self) -> None:
        """Let every SAE start counting this fit's density windows."""
        for _, sae in self._children():
            sae.on_train_start()

    def on_train_end(self) -> None:
        """Let every SAE publish its feature density (for the exporter)."""
        for _, sae in self._children():
            sae.on_train_end()

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Keep every SAE's metadata, per hook."""
        checkpoint["sae_metadata"] = {
            hook: sae.sae.cfg.metadata.to_dict() for hook, sae in self._children()
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Restore every SAE's metadata and keep its checkpointed activation scale."""
        metadata = checkpoint.get("sae_metadata", {})
        for hook, sae in self._children():
            sae.on_load_checkpoint({"sae_metadata": metadata[hook]} if hook in metadata else {})
