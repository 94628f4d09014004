"""Write a trained SAE as the sae-lens folder plain ``sae_lens.SAE.load_from_disk`` reads.

The folder holds ``cfg.json``, ``sae_weights.safetensors`` and ``sparsity.safetensors`` (log10
feature density). It is written by sae-lens's own ``TrainingSAE.save_inference_model`` on a deep
copy of the SAE with the activation scale folded into the weights, so the exported SAE takes raw
activations, and it is written atomically (:func:`lightning_sae.io.atomic_folder`).

BatchTopK and Matryoshka BatchTopK export as ``jumprelu`` with a threshold *calibrated* on
held-out activations (:func:`~lightning_sae.export.calibration.calibrate_batchtopk_threshold`)
rather than sae-lens's EMA, which starts at 0 and after a short run exports an SAE firing
thousands of latents per token.

>>> import tempfile
>>> from lightning_sae import StandardSAE, export_to_sae_lens, load_from_sae_lens
>>> module = StandardSAE(d_in=8, d_sae=32, normalize_activations=False)
>>> path = export_to_sae_lens(module, tempfile.mkdtemp() + "/sae", {"hook_name": "blocks.0.hook_z"})
>>> load_from_sae_lens(path).sae.cfg.metadata.hook_name
'blocks.0.hook_z'
"""

import copy
import json
import os
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import LightningModule
from sae_lens import __version__ as sae_lens_version
from sae_lens.constants import SAE_CFG_FILENAME, SAE_WEIGHTS_FILENAME, SPARSITY_FILENAME
from sae_lens.saes.batchtopk_sae import BatchTopKTrainingSAE
from safetensors.torch import save_file
from torch import Tensor

from lightning_sae.data.protocol import ExportData
from lightning_sae.export.calibration import calibrate_batchtopk_threshold
from lightning_sae.io import atomic_folder
from lightning_sae.metrics import log10_feature_density
from lightning_sae.modules import MultiSAEModule, SAEModule, SAEUnit
from lightning_sae.parallel import is_sharded

#: Metadata names a user (or a DataModule's ``sae_metadata()``) may set. sae-lens's
#: ``SAEMetadata`` answers ``None`` for any other name, so a typo would be lost silently.
SAE_LENS_METADATA_KEYS = frozenset(
    {
        "model_name",
        "model_class_name",
        "hook_name",
        "hook_head_index",
        "context_size",
        "prepend_bos",
        "dataset_path",
        "dataset_trust_remote_code",
        "exclude_special_tokens",
        "seqpos_slice",
        "model_from_pretrained_kwargs",
        "sequence_separator_token",
        "disable_concat_sequences",
        "neuronpedia_id",
    }
)
#: Metadata the exporter itself writes (from sae-lens and the module), never taken from a user.
EXPORTER_METADATA_KEYS = frozenset(
    {
        "sae_lens_version",
        "sae_lens_training_version",
        "training_architecture",
        "training_architecture_details",
    }
)
#: The only files an export holds: a folder with nothing else may be replaced by a new export.
EXPORT_FILES = frozenset({SAE_CFG_FILENAME, SAE_WEIGHTS_FILENAME, SPARSITY_FILENAME})
#: Tokens drawn from the data's ``sample_activations`` to calibrate a BatchTopK threshold.
DEFAULT_CALIBRATION_TOKENS = 16_384


def export_to_sae_lens(
    module: SAEModule | MultiSAEModule,
    path: str | os.PathLike[str],
    metadata: Mapping[str, Any] | None = None,
    *,
    hook_name: str | None = None,
    data: ExportData | None = None,
    calibration_activations: Tensor | Iterable[Tensor] | None = None,
    calibration_tokens: int = DEFAULT_CALIBRATION_TOKENS,
    overwrite: bool = False,
) -> Path:
    """Write ``module``'s SAE as an sae-lens SAE folder that plain ``SAE.load_from_disk`` reads.

    The module is never modified; an interrupted export never leaves a half-written folder where a
    complete one stood. Under DDP call it on one rank (``trainer.is_global_zero``), as
    :class:`~lightning_sae.SAELensExport` does.

    The exported SAE reconstructs like ``module(x)``. Its latents equal ``module.encode(x)``,
    except for architectures that rank ``hidden_pre * ‖W_dec‖`` (TopK, BatchTopK, Matryoshka):
    there a latent is the norm of its contribution to the reconstruction, which is now in raw
    units, so it is ``module.encode(x) / module.activation_scale`` (the same fold as sae-lens's).

    Metadata (``model_name``, ``hook_name``, ...) is merged, later winning, from: what the SAE
    carries (an imported SAE's), ``hook_name``, ``data.sae_metadata(hook_name)``, and
    ``metadata``.
    ``sae_lens_version`` and the training architecture are always written by the exporter.

    Args:
        module: The trained module.
        path: The folder to write.
        metadata: sae-lens metadata; keys must be in :data:`SAE_LENS_METADATA_KEYS`.
        hook_name: Which SAE of a :class:`~lightning_sae.MultiSAEModule` (required for one).
        data: Where metadata and calibration activations come from (default: the DataModule of
            the module's trainer, when it implements :class:`~lightning_sae.data.ExportData`).
        calibration_activations: Raw (unscaled) held-out activations ``[n, d_in]``, or an iterable
            of such batches, to calibrate a BatchTopK threshold. ``None`` draws
            ``calibration_tokens`` from ``data.sample_activations``.
        calibration_tokens: Tokens to draw from ``data`` when calibrating.
        overwrite: Replace a non-empty folder that is not an earlier export.

    Returns:
        The export folder.

    Raises:
        FileExistsError: If ``path`` is a file, or a folder holding other files (without
            ``overwrite``).
        FloatingPointError: If the SAE's weights hold NaN or inf (training diverged).
        ValueError: If ``metadata`` has unknown keys or calibration data is missing or invalid.

    """
    path = Path(path)
    unit, hook_name = _unit(module, hook_name)
    if is_sharded(unit.sae):
        raise ValueError(
            "This SAE is sharded over ranks (ModelParallelStrategy: latent-parallel or FSDP2), so "
            "one rank cannot export it. On every rank call "
            "lightning_sae.parallel.gathered_module(module), then export the result on rank 0; "
            "or export from a gathered checkpoint (save_distributed_checkpoint=False) loaded in "
            "one process."
        )
    data = data if data is not None else attached_data(module)
    _check_target(path, overwrite)
    unit.raise_if_not_finite()
    merged = _export_metadata(unit, data, hook_name, metadata)
    # Calibrate on the hook this export is for, when one was named (else the data's only one).
    chosen_hook = hook_name or (metadata or {}).get("hook_name")
    sae = _inference_copy(unit, data, chosen_hook, calibration_activations, calibration_tokens)
    with atomic_folder(path, check=lambda target: _check_target(target, overwrite)) as tmp:
        sae.save_inference_model(tmp)
        cfg_path = tmp / SAE_CFG_FILENAME
        cfg = json.loads(cfg_path.read_text())
        cfg["device"] = "cpu"
        cfg["normalize_activations"] = "none"  # folded by _inference_copy
        cfg["metadata"] |= merged | {"sae_lens_version": sae_lens_version}
        cfg_path.write_text(json.dumps(cfg, indent=2) + "\n")
        density = unit.statistics.feature_density
        if density.any():
            sparsity = log10_feature_density(density.detach().cpu())
            save_file({"sparsity": sparsity.contiguous()}, tmp / SPARSITY_FILENAME)
        else:
            warnings.warn(
                "The feature density was never published (no density window closed), so "
                f"{path / SPARSITY_FILENAME} is not written.",
                stacklevel=2,
            )
    return path


def attached_data(module: LightningModule) -> ExportData | None:
    """Return the DataModule of ``module``'s trainer if it implements ExportData, else None."""
    trainer = module._trainer
    datamodule = None if trainer is None else trainer.datamodule
    if isinstance(datamodule, ExportData):
        return datamodule
    if hasattr(datamodule, "sae_metadata"):
        warnings.warn(
            f"{type(datamodule).__name__} has sae_metadata() but no sample_activations(), so it "
            "is not an ExportData and its metadata is not used: define both (see "
            "lightning_sae.data.ExportData).",
            stacklevel=3,
        )
    return None


def _unit(module: SAEModule | MultiSAEModule, hook_name: str | None) -> tuple[SAEUnit, str | None]:
    if isinstance(module, MultiSAEModule):
        if hook_name is None:
            raise ValueError(
                f"{type(module).__name__} trains one SAE per hook: pass hook_name=<one of "
                f"{module.hook_names}> to export one of them."
            )
        return module.sae_unit(hook_name), hook_name
    if not isinstance(module, SAEModule):
        raise TypeError(f"Expected a lightning_sae SAE module, got {type(module).__name__}.")
    return module.unit, hook_name


def _check_target(path: Path, overwrite: bool) -> None:
    if path.is_symlink():
        raise FileExistsError(
            f"Export path {path} is a symlink; export to the folder it points to, or to a new path."
        )
    if path.exists() and not path.is_dir():
        raise FileExistsError(f"Export path {path} is a file; give a folder path to export into.")
    if path.is_dir() and not overwrite and not _is_replaceable(path):
        names = sorted(p.name for p in path.iterdir())[:5]
        raise FileExistsError(
            f"Export folder {path} holds files that are not an sae-lens export ({names}); pick "
            "another path or pass overwrite=True to replace the whole folder."
        )


def _is_replaceable(path: Path) -> bool:
    """Tell whether ``path`` is empty or an earlier export (``cfg.json`` plus export files only)."""
    names = {p.name for p in path.iterdir()}
    return not names or (SAE_CFG_FILENAME in names and names <= EXPORT_FILES)


def _export_metadata(
    unit: SAEUnit,
    data: ExportData | None,
    hook_name: str | None,
    metadata: Mapping[str, Any] | None,
) -> dict[str, Any]:
    carried = {
        key: value
        for key, value in unit.sae.cfg.metadata.items()
        if key not in EXPORTER_METADATA_KEYS
    }
    if hook_name is not None:
        carried["hook_name"] = hook_name
    from_data: dict[str, Any] = {}
    if data is not None:
        # Without a hook the call is the one-SAE form (a DataModule may take no hook at all).
        found = data.sae_metadata() if hook_name is None else data.sae_metadata(hook_name)
        from_data = validate_metadata(found, "the data's sae_metadata()")
    explicit = validate_metadata(metadata or {}, "metadata")
    return carried | from_data | explicit


def validate_metadata(metadata: Mapping[str, Any], source: str) -> dict[str, Any]:
    """Return ``metadata`` as a dict after checking its keys and that it is JSON."""
    unknown = sorted(set(metadata) - SAE_LENS_METADATA_KEYS)
    if unknown:
        raise ValueError(
            f"Unknown sae-lens metadata keys {unknown} in {source} (sae-lens would read them as "
            f"None). Valid keys: {sorted(SAE_LENS_METADATA_KEYS)}."
        )
    try:
        json.dumps(dict(metadata))
    except TypeError as error:
        raise ValueError(f"{source} must hold JSON values only: {error}") from error
    return dict(metadata)


def _inference_copy(
    unit: SAEUnit,
    data: ExportData | None,
    hook_name: str | None,
    calibration_activations: Tensor | Iterable[Tensor] | None,
    calibration_tokens: int,
) -> Any:
    """Deep-copy the SAE, fold the activation scale and calibrate a BatchTopK threshold."""
    sae = copy.deepcopy(unit.sae)
    sae.eval()
    sae.fold_activation_norm_scaling_factor(float(unit.normalizer.scale))
    if needs_calibration(unit):
        activations = _calibration_activations(
            unit, data, hook_name, calibration_activations, calibration_tokens
        )
        threshold = calibrate_batchtopk_threshold(sae, activations.to(sae.W_enc.device))
        sae.topk_threshold.fill_(threshold)
    return sae.to("cpu")


def needs_calibration(unit: SAEUnit) -> bool:
    """Whether exporting ``unit`` calibrates a threshold on held-out activations (BatchTopK)."""
    return isinstance(unit.sae, BatchTopKTrainingSAE)


def check_calibration(
    module: SAEModule | MultiSAEModule,
    data: ExportData | None,
    calibration_activations: Tensor | Iterable[Tensor] | None,
    calibration_tokens: int = DEFAULT_CALIBRATION_TOKENS,
) -> None:
    """Raise ``ValueError`` now if exporting ``module`` would fail for want of calibration data.

    Draws (and, for an :class:`~lightning_sae.ActivationDataModule`, keeps) the activations an
    export would, so a run learns at its start, not at its first export, that its held-out data
    is too small.
    """
    hooks = module.hook_names if isinstance(module, MultiSAEModule) else [None]
    for hook in hooks:
        unit, _ = _unit(module, hook)
        if needs_calibration(unit):
            given = calibration_activations
            if isinstance(given, Mapping):  # one tensor per hook (SAELensExport of several)
                given = given.get(hook) if hook is not None else None
                if given is None:
                    raise ValueError(f"calibration_activations has no activations for {hook!r}.")
            _calibration_activations(unit, data, hook, given, calibration_tokens)


def _calibration_activations(
    unit: SAEUnit,
    data: ExportData | None,
    hook_name: str | None,
    given: Tensor | Iterable[Tensor] | None,
    n_tokens: int,
) -> Tensor:
    d_in = unit.normalizer.d_in
    if given is None:
        if data is None:
            raise ValueError(
                "Exporting a BatchTopK SAE needs held-out activations to calibrate its JumpReLU "
                "threshold (sae-lens's EMA starts at 0 and is far off after short runs). Pass "
                "calibration_activations=<tensor [n, d_in] of raw activations>, or data=<an "
                "ExportData such as ActivationDataModule>, or train with such a DataModule."
            )
        given = (
            data.sample_activations(n_tokens)
            if hook_name is None
            else data.sample_activations(n_tokens, hook_name=hook_name)
        )
        if not isinstance(given, Tensor) or given.ndim != 2 or given.shape[0] < n_tokens:
            shape = tuple(given.shape) if isinstance(given, Tensor) else type(given).__name__
            raise ValueError(
                f"{type(data).__name__}.sample_activations({n_tokens}) gave {shape}, not "
                f"[{n_tokens}, d_in]: ask for fewer calibration tokens, or give it more held-out "
                "data."
            )
    batches = [given] if isinstance(given, Tensor) else list(given)
    if not batches or not all(isinstance(b, Tensor) and b.ndim == 2 for b in batches):
        raise ValueError(
            "calibration_activations must be a tensor [n, d_in] or an iterable of them."
        )
    activations = torch.cat([b.detach().to(unit.sae.W_enc.device) for b in batches])
    if activations.shape[-1] != d_in or not activations.is_floating_point():
        raise ValueError(
            f"calibration_activations must be float [n, {d_in}] (d_in), got "
            f"{activations.dtype} {tuple(activations.shape)}."
        )
    if not torch.isfinite(activations).all():
        raise ValueError(
            "calibration_activations hold NaN or inf values: pass finite held-out activations "
            "of the hook the SAE was trained on."
        )
    return activations
