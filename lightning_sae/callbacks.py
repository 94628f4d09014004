"""Lightning callbacks of lightning-sae.

>>> from lightning import Trainer
>>> from lightning_sae import SAELensExport
>>> trainer = Trainer(callbacks=[SAELensExport("exports", every_n_steps=1000)], logger=False)
"""

import os
import re
import shutil
import uuid
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer
from torch import Tensor

from lightning_sae.data.protocol import ExportData
from lightning_sae.errors import ConfigurationError
from lightning_sae.export import DEFAULT_CALIBRATION_TOKENS, export_to_sae_lens
from lightning_sae.export.writer import attached_data, check_calibration
from lightning_sae.io import OLD_MARKER, TEMP_MARKER, remove_stale_temporaries
from lightning_sae.modules import MultiSAEModule, SAEModule
from lightning_sae.modules.validation import check_positive_ints
from lightning_sae.parallel import gathered_module

#: Names of the export folders ``SAELensExport`` writes (and may delete past ``keep_last_n``).
STEP_FOLDER = re.compile(r"step-(\d{6,})")


class PeriodicCallback(Callback):
    """A callback that acts on every ``every_n_steps``-th optimisation step, once per step.

    Under gradient accumulation several batches end on the same global step (the first ones on
    step 0, before any update): :meth:`run` is called once per due step, never on the initial
    weights. A subclass calls :meth:`mark_ran` when it acts (also outside the schedule, e.g. at
    the end of fit) so that a step is never handled twice.
    """

    def __init__(self, every_n_steps: int | None) -> None:
        check_positive_ints({"every_n_steps": every_n_steps}, allow_none=True)
        self.every_n_steps = every_n_steps
        self._last_step: int | None = None

    def on_train_batch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        """Call :meth:`run` when the global step reaches a new multiple of ``every_n_steps``."""
        step = trainer.global_step
        due = self.every_n_steps and step > 0 and step % self.every_n_steps == 0
        if due and not self.ran_at(step):
            self.run(trainer, pl_module)

    def ran_at(self, step: int) -> bool:
        """Whether this callback already acted at ``step``."""
        return step == self._last_step

    def mark_ran(self, step: int) -> None:
        """Record that this callback acted at ``step``."""
        self._last_step = step

    def run(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Act now (the subclass's periodic work)."""
        raise NotImplementedError


class SAELensExport(PeriodicCallback):
    """Export the SAE in sae-lens's format every ``every_n_steps`` steps and at the end of fit.

    Each export goes to its own folder ``<dirpath>/step-<global step, 6 digits>/`` (written
    atomically by :func:`~lightning_sae.export_to_sae_lens`), and ``<dirpath>/latest`` is a relative
    symlink to the newest one, replaced atomically, so ``SAE.load_from_disk("<dirpath>/latest")``
    always reads a complete export. A :class:`~lightning_sae.MultiSAEModule` exports one sae-lens
    folder per hook, ``step-<step>/<hook_name>/``, each with its own metadata. Exports run on global
    rank 0 only and involve no collective; a DataModule's ``sample_activations`` (used to calibrate
    BatchTopK thresholds) must therefore be rank-local.

    The final export runs in ``on_fit_end``, after the module's ``on_train_end`` has published the
    feature density of a window still open, so ``sparsity.safetensors`` covers the end of training.

    Disk use is bounded: after each export only the newest ``keep_last_n`` ``step-*`` folders are
    kept (the one just written always among them). Each old folder is renamed to a hidden
    temporary name before it is deleted, so an interrupted clean-up never leaves a partial export.

    At the start of fit (rank 0), a BatchTopK module's calibration data is drawn once, so data too
    small for ``calibration_tokens`` stops the run there rather than at its first export.

    Args:
        dirpath: Folder of the exports; ``None`` uses ``<trainer.default_root_dir>/sae_lens``.
        every_n_steps: Also export every this many optimisation steps (``None``: only at the end).
        metadata: sae-lens metadata passed to every export (overrides the DataModule's).
        calibration_activations: Held-out activations for BatchTopK thresholds, or
            ``{hook_name: activations}`` for a ``MultiSAEModule`` (each hook calibrates on its
            own layer); ``None`` draws ``calibration_tokens`` from the DataModule's
            ``sample_activations``.
        calibration_tokens: Tokens drawn from the DataModule per BatchTopK export.
        keep_last_n: Export folders to keep (``None``: all of them, unbounded).

    """

    #: Name of the pointer to the newest export inside ``dirpath``.
    latest_name = "latest"

    def __init__(
        self,
        dirpath: str | os.PathLike[str] | None = None,
        every_n_steps: int | None = None,
        metadata: Mapping[str, Any] | None = None,
        *,
        calibration_activations: Tensor | Iterable[Tensor] | Mapping[str, Tensor] | None = None,
        calibration_tokens: int = DEFAULT_CALIBRATION_TOKENS,
        keep_last_n: int | None = 3,
    ) -> None:
        super().__init__(every_n_steps)
        check_positive_ints({"keep_last_n": keep_last_n}, allow_none=True)
        check_positive_ints({"calibration_tokens": calibration_tokens})
        self.dirpath = None if dirpath is None else Path(dirpath)
        self.metadata = dict(metadata or {})
        # A one-shot iterable (a generator) would be empty at the second export: keep a list.
        self.calibration_activations = (
            calibration_activations
            if calibration_activations is None
            or isinstance(calibration_activations, Tensor | Mapping)
            else list(calibration_activations)
        )
        self.calibration_tokens = calibration_tokens
        self.keep_last_n = keep_last_n

    def _calibration_for(self, hook: str | None) -> Any:
        given = self.calibration_activations
        if isinstance(given, Mapping):
            if hook is None or hook not in given:
                raise ValueError(
                    f"calibration_activations has no activations for hook {hook!r}; it has "
                    f"{sorted(given)}."
                )
            return given[hook]
        return given

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        """Check the module type and the calibration data; resolve the export folder.

        Raises:
            ConfigurationError: A BatchTopK export could not be calibrated (too few held-out
                tokens for ``calibration_tokens``, or none at all).

        """
        if not isinstance(pl_module, SAEModule | MultiSAEModule):
            raise TypeError(
                "SAELensExport exports lightning_sae SAE modules (SAEModule, MultiSAEModule), got "
                f"{type(pl_module).__name__}."
            )
        several = isinstance(pl_module, MultiSAEModule)
        given = self.calibration_activations
        if several and given is not None and not isinstance(given, Mapping):
            raise ValueError(
                "A MultiSAEModule calibrates each hook on its own layer: pass "
                "calibration_activations={hook_name: activations}, or leave it None to sample "
                "the DataModule."
            )
        if several and "hook_name" in self.metadata:
            raise ValueError(
                "metadata['hook_name'] would name every hook's export alike: leave it out (each "
                "export records its own hook)."
            )
        if self.dirpath is None:
            self.dirpath = Path(trainer.default_root_dir) / "sae_lens"
        if stage == "fit" and trainer.is_global_zero:
            data = trainer.datamodule if isinstance(trainer.datamodule, ExportData) else None
            try:
                check_calibration(
                    pl_module, data, self.calibration_activations, self.calibration_tokens
                )
            except ValueError as error:
                raise ConfigurationError(
                    f"SAELensExport cannot calibrate the BatchTopK threshold of its exports: "
                    f"{error} SAELensExport's calibration_tokens is {self.calibration_tokens}: "
                    "lower it (--trainer.callbacks.calibration_tokens N on the command line) or "
                    "pass calibration_activations."
                ) from error

    def run(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Export (every ``every_n_steps`` steps)."""
        self.export(trainer, pl_module)

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Export the final SAE (replacing a periodic export of the same step)."""
        self.export(trainer, pl_module)

    def export(self, trainer: Trainer, pl_module: LightningModule) -> Path | None:
        """Export now to ``step-<global step>`` and point ``latest`` at it (rank 0 only).

        Returns:
            The export folder on global rank 0, ``None`` on other ranks.

        """
        step = trainer.global_step
        self.mark_ran(step)
        data = attached_data(pl_module)
        # A latent-parallel or FSDP2 SAE is gathered first (a collective: every rank takes part).
        module = gathered_module(pl_module) if isinstance(pl_module, SAEModule) else pl_module
        if not trainer.is_global_zero:
            return None
        assert self.dirpath is not None  # set in setup()
        path = self.dirpath / f"step-{step:06d}"
        hooks = pl_module.hook_names if isinstance(pl_module, MultiSAEModule) else [None]
        for hook in hooks:
            export_to_sae_lens(
                module,
                path if hook is None else path / hook,
                self.metadata,
                data=data,
                hook_name=hook,
                calibration_activations=self._calibration_for(hook),
                calibration_tokens=self.calibration_tokens,
            )
        link = self.dirpath / f".{self.latest_name}{TEMP_MARKER}{uuid.uuid4().hex[:8]}"
        os.symlink(path.name, link, target_is_directory=True)
        os.replace(link, self.dirpath / self.latest_name)
        self._remove_old_exports(path)
        return path

    def _remove_old_exports(self, newest: Path) -> None:
        """Delete ``step-*`` folders beyond the newest ``keep_last_n`` (``newest`` always kept)."""
        assert self.dirpath is not None
        # What an interrupted export, swap, link or deletion of another step left behind.
        markers = f"{re.escape(TEMP_MARKER)}|{re.escape(OLD_MARKER)}"
        for hidden in self.dirpath.glob(".*"):
            name = re.split(markers, hidden.name)[0]
            if name != hidden.name:
                remove_stale_temporaries(self.dirpath / name[1:])
        if self.keep_last_n is None:
            return
        others = sorted(
            (p for p in self.dirpath.iterdir() if _is_step_folder(p) and p != newest),
            key=lambda p: int(p.name.removeprefix("step-")),
        )
        for old in others[: max(0, len(others) - (self.keep_last_n - 1))]:
            doomed = old.with_name(f".{old.name}{TEMP_MARKER}{uuid.uuid4().hex[:8]}")
            os.replace(old, doomed)
            shutil.rmtree(doomed, ignore_errors=True)


def _is_step_folder(path: Path) -> bool:
    return STEP_FOLDER.fullmatch(path.name) is not None and path.is_dir() and not path.is_symlink()
