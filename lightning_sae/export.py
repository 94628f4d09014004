"""Write trained modules as sae-lens SAE folders, and read sae-lens SAEs back into modules.

An export is the folder plain sae-lens loads with ``sae_lens.SAE.load_from_disk`` (no
``lightning_sae`` import needed): ``cfg.json``, ``sae_weights.safetensors`` and
``sparsity.safetensors`` (log10 feature density). It is written through sae-lens's own
``TrainingSAE.save_inference_model`` on a deep copy of the module's SAE, with the module's
activation scale folded into the weights, so the exported SAE takes raw activations.

BatchTopK and Matryoshka BatchTopK export as ``jumprelu`` with a threshold *calibrated* on
held-out activations (see :func:`calibrate_batchtopk_threshold`) rather than sae-lens's EMA, which
starts at 0 and after a short run exports an SAE firing thousands of latents per token.

>>> import tempfile, torch
>>> from lightning_sae import StandardSAE, export_to_sae_lens, load_from_sae_lens
>>> module = StandardSAE(d_in=8, d_sae=32, normalize_activations=False)
>>> path = export_to_sae_lens(module, tempfile.mkdtemp() + "/sae", {"hook_name": "blocks.0.hook_z"})
>>> load_from_sae_lens(path).sae.cfg.metadata.hook_name
'blocks.0.hook_z'
"""

import contextlib
import copy
import inspect
import json
import os
import shutil
import uuid
import warnings
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sae_lens import __version__ as sae_lens_version
from sae_lens.constants import SAE_CFG_FILENAME, SAE_WEIGHTS_FILENAME, SPARSITY_FILENAME
from sae_lens.saes.batchtopk_sae import BatchTopKTrainingSAE
from sae_lens.saes.sae import SAE, SAEMetadata
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from lightning_sae.metrics import log10_feature_density
from lightning_sae.modules import SAEModule, available_architectures, get_module_class

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
_EXPORTER_METADATA_KEYS = frozenset(
    {
        "sae_lens_version",
        "sae_lens_training_version",
        "training_architecture",
        "training_architecture_details",
    }
)
#: The only files an export holds: a folder with nothing else may be replaced by a new export.
EXPORT_FILES = frozenset({SAE_CFG_FILENAME, SAE_WEIGHTS_FILENAME, SPARSITY_FILENAME})
#: Tokens drawn from ``trainer.datamodule.sample_activations`` to calibrate a BatchTopK threshold.
DEFAULT_CALIBRATION_TOKENS = 16_384
#: Gemma Scope ``params.npz`` arrays, the JumpReLU parameters under sae-lens's names.
_GEMMA_SCOPE_KEYS = ("W_enc", "W_dec", "b_enc", "b_dec", "threshold")
#: sae-lens training-config fields named differently in the modules' arguments.
_RENAMED_TRAINING_FIELDS = {
    "l1_warm_up_steps": "sparsity_warm_up_steps",
    "l0_warm_up_steps": "sparsity_warm_up_steps",
}


# ---------------------------------------------------------------------------------------- export
def export_to_sae_lens(
    module: SAEModule,
    path: str | os.PathLike[str],
    metadata: Mapping[str, Any] | None = None,
    *,
    calibration_activations: Tensor | Iterable[Tensor] | None = None,
    calibration_tokens: int = DEFAULT_CALIBRATION_TOKENS,
    overwrite: bool = False,
) -> Path:
    """Write ``module`` as an sae-lens SAE folder that plain ``SAE.load_from_disk`` reads.

    The folder is written beside ``path`` under a temporary name and renamed into place, so an
    interrupted export never leaves a half-written folder where a complete one stood (if the
    process dies between moving the old export aside and moving the new one in, the old one is
    kept as ``.<name>.old-*`` beside it). The module is never modified. Under DDP call it on one
    rank (``trainer.is_global_zero``), as :class:`~lightning_sae.SAELensExport` does.

    The exported SAE reconstructs like ``module(x)``. Its latents equal ``module.encode(x)``,
    except for architectures that rank ``hidden_pre * ‖W_dec‖`` (TopK, BatchTopK, Matryoshka):
    there a latent is the norm of its contribution to the reconstruction, which is now in raw
    units, so it is ``module.encode(x) / module.activation_scale`` (the same fold as sae-lens's).

    Metadata (``model_name``, ``hook_name``, ...) is merged, later winning, from: what the module
    carries (an imported SAE's), ``trainer.datamodule.sae_metadata()`` when the module is attached
    to a trainer whose DataModule has that method, and ``metadata``. ``sae_lens_version`` and the
    training architecture are always written by the exporter.

    Args:
        module: The trained module.
        path: The folder to write.
        metadata: sae-lens metadata; keys must be in :data:`SAE_LENS_METADATA_KEYS`.
        calibration_activations: Raw (unscaled) held-out activations ``[n, d_in]``, or an iterable
            of such batches, to calibrate a BatchTopK threshold. ``None`` draws
            ``calibration_tokens`` from ``trainer.datamodule.sample_activations`` (for the
            export's ``hook_name`` when that method takes a ``hook_name`` argument).
        calibration_tokens: Tokens to draw from the DataModule when calibrating.
        overwrite: Replace a non-empty folder that is not an earlier export.

    Returns:
        The export folder.

    Raises:
        FileExistsError: If ``path`` is a file, or a folder holding other files (without
            ``overwrite``).
        ValueError: If ``metadata`` has unknown keys or calibration data is missing or invalid.

    """
    path = Path(path)
    _check_target(path, overwrite)
    merged_metadata = _export_metadata(module, metadata)
    sae = _inference_copy(
        module, calibration_activations, calibration_tokens, merged_metadata.get("hook_name")
    )
    with _atomic_folder(path, overwrite) as tmp:
        sae.save_inference_model(tmp)
        cfg_path = tmp / SAE_CFG_FILENAME
        cfg = json.loads(cfg_path.read_text())
        cfg["device"] = "cpu"
        cfg["normalize_activations"] = "none"  # folded by _inference_copy
        cfg["metadata"] |= merged_metadata | {"sae_lens_version": sae_lens_version}
        cfg_path.write_text(json.dumps(cfg, indent=2) + "\n")
        if module.feature_density.any():
            sparsity = log10_feature_density(module.feature_density.detach().cpu())
            save_file({"sparsity": sparsity.contiguous()}, tmp / SPARSITY_FILENAME)
        else:
            warnings.warn(
                f"{type(module).__name__}.feature_density was never published (no density window "
                f"closed), so {path / SPARSITY_FILENAME} is not written.",
                stacklevel=2,
            )
    return path


def calibrate_batchtopk_threshold(
    sae: BatchTopKTrainingSAE, activations: Tensor, chunk_size: int = 4096
) -> float:
    """Estimate the JumpReLU threshold at which ``sae`` fires on ``k`` latents per token on average.

    BatchTopK keeps the top ``B·k`` values of ``ReLU(π)`` over a batch of ``B`` tokens (``π`` the
    decoder-norm-scaled pre-activations when ``rescale_acts_by_decoder_norm``). Over the whole
    calibration set of ``N`` tokens, this estimator takes the threshold between the ``m``-th and
    ``(m+1)``-th largest values, ``m = floor(N·k)``: the set's ``(1 - k/d_sae)`` quantile, so the
    exported ``π > θ`` fires on exactly ``m`` entries there (up to float rounding of the fold), i.e.
    mean L0 = ``k`` on that set, and it is the limit of the training-time batch top-k as ``B``
    grows. On other tokens the L0 error is the sampling error of that quantile, which falls as
    ``1/sqrt(N)`` (tokens, not entries, are the independent unit: a token's latents fire together).
    Measured on synthetic activations (d_sae 128 and 512, k 8 and 16, 30 and 120 steps, 5
    calibration sets each, L0 on 16,384 other tokens): worst relative L0 error 6.2 % with N = 1,024,
    4.5 % with 4,096, 2.8 % with 16,384; active sets agree with the training batch top-k on
    4,096-token batches with Jaccard >= 0.944, 0.960, 0.975 respectively. sae-lens's own estimate,
    an EMA (rate ``topk_threshold_lr``) of the smallest kept activation per batch, starts at 0 and
    tracks a batch minimum rather than a quantile: in the same runs it gave L0 54 for k = 8 and 110
    for k = 16, so it is not used. On real activations (SmolLM2-135M layer 15 on Shakespeare, d_sae
    2,304, k 32, 60 steps; calibration and test tokens from different scenes) the worst errors were
    5.9 %, 4.9 % and 3.1 % for N = 1,024, 4,096 and 16,384, mostly the difference between
    documents (calibrate on many), Jaccard >= 0.948, 0.972, 0.998, and the EMA gave L0 267.

    The pre-activations are sae-lens's own (``encode_with_hidden_pre``); only the top ``m + 1``
    values are kept while streaming chunks, so memory is ``O(N·k + chunk_size·d_sae)``.

    Args:
        sae: A BatchTopK (or Matryoshka BatchTopK) training SAE; it is not modified.
        activations: ``[N, d_in]`` activations in the units ``sae`` expects.
        chunk_size: Tokens per encoder pass.

    Returns:
        The threshold, in the units of ``π``.

    Raises:
        ValueError: If ``N·k < 1``.

    """
    n_active = int(sae.cfg.k * activations.shape[0])
    if n_active < 1:
        raise ValueError(
            f"{activations.shape[0]} calibration tokens with k={sae.cfg.k} select no latent; "
            "give at least 1/k tokens (thousands for an accurate threshold)."
        )
    kept = activations.new_empty(0, dtype=torch.float32)
    # Only the pre-activations are needed: a plain ReLU skips sae-lens's batch top-k, whose result
    # would be discarded. The activation function holds no state and is restored below.
    batch_topk, sae.activation_fn = sae.activation_fn, torch.nn.ReLU()
    try:
        with torch.no_grad():
            for chunk in activations.split(chunk_size):
                _, hidden_pre = sae.encode_with_hidden_pre(chunk.to(sae.W_enc.dtype))
                values = hidden_pre.relu().flatten().float()
                if kept.numel() > n_active:  # only values above the current (m+1)-th can enter
                    values = values[values > kept[-1]]
                size = min(n_active + 1, kept.numel() + values.numel())
                kept = torch.cat([kept, values]).topk(size).values
    finally:
        sae.activation_fn = batch_topk
    if kept.numel() <= n_active:  # k == d_sae: every positive value fires
        return 0.0
    return float((kept[n_active - 1].double() + kept[n_active].double()) / 2)


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


@contextlib.contextmanager
def _atomic_folder(path: Path, overwrite: bool) -> Iterator[Path]:
    """Yield a temporary folder beside ``path``; on success rename it to ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    token = uuid.uuid4().hex[:8]
    tmp = path.parent / f".{path.name}.tmp-{token}"
    tmp.mkdir()
    try:
        yield tmp
        _check_target(path, overwrite)  # the folder may have changed while we wrote
        if path.exists():
            old = path.parent / f".{path.name}.old-{token}"
            path.rename(old)
            tmp.rename(path)
            shutil.rmtree(old)
        else:
            tmp.rename(path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def _export_metadata(module: SAEModule, metadata: Mapping[str, Any] | None) -> dict[str, Any]:
    carried = {
        key: value
        for key, value in module.sae.cfg.metadata.items()
        if key not in _EXPORTER_METADATA_KEYS
    }
    from_data: dict[str, Any] = {}
    sae_metadata = getattr(_datamodule(module), "sae_metadata", None)
    if callable(sae_metadata):
        from_data = _validate_metadata(sae_metadata(), "DataModule.sae_metadata()")
    explicit = _validate_metadata(metadata or {}, "metadata")
    return carried | from_data | explicit


def _validate_metadata(metadata: Mapping[str, Any], source: str) -> dict[str, Any]:
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


def _datamodule(module: SAEModule) -> Any:
    trainer = module._trainer
    return None if trainer is None else trainer.datamodule


def _inference_copy(
    module: SAEModule,
    calibration_activations: Tensor | Iterable[Tensor] | None,
    calibration_tokens: int,
    hook_name: str | None,
) -> Any:
    """Deep-copy ``module.sae``, fold the activation scale and calibrate a BatchTopK threshold."""
    sae = copy.deepcopy(module.sae)
    sae.eval()
    sae.fold_activation_norm_scaling_factor(float(module.activation_scale))
    if isinstance(sae, BatchTopKTrainingSAE):
        activations = _calibration_activations(
            module, calibration_activations, calibration_tokens, hook_name
        )
        threshold = calibrate_batchtopk_threshold(sae, activations.to(sae.W_enc.device))
        sae.topk_threshold.fill_(threshold)
    return sae.to("cpu")


def _calibration_activations(
    module: SAEModule,
    given: Tensor | Iterable[Tensor] | None,
    n_tokens: int,
    hook_name: str | None,
) -> Tensor:
    d_in = module.hparams.d_in
    if given is None:
        sample = getattr(_datamodule(module), "sample_activations", None)
        if not callable(sample):
            raise ValueError(
                f"Exporting {type(module).__name__} needs held-out activations to calibrate its "
                "JumpReLU threshold (sae-lens's EMA starts at 0 and is far off after short runs). "
                "Pass calibration_activations=<tensor [n, d_in] of raw activations>, or train with "
                "a DataModule that has sample_activations(n_tokens)."
            )
        # A DataModule of several hooks samples the one this SAE is exported for.
        takes_hook = "hook_name" in inspect.signature(sample).parameters
        given = (
            sample(n_tokens, hook_name=hook_name) if takes_hook and hook_name else sample(n_tokens)
        )
    batches = [given] if isinstance(given, Tensor) else list(given)
    if not batches or not all(isinstance(b, Tensor) and b.ndim == 2 for b in batches):
        raise ValueError(
            "calibration_activations must be a tensor [n, d_in] or an iterable of them."
        )
    activations = torch.cat([b.detach().to(module.sae.W_enc.device) for b in batches])
    if activations.shape[-1] != d_in or not activations.is_floating_point():
        raise ValueError(
            f"calibration_activations must be float [n, {d_in}] (d_in), got "
            f"{activations.dtype} {tuple(activations.shape)}."
        )
    if not torch.isfinite(activations).all():
        raise ValueError("calibration_activations hold NaN or inf values.")
    return activations


# ---------------------------------------------------------------------------------------- import
def load_from_sae_lens(
    source: str | os.PathLike[str] | SAE[Any], **module_kwargs: Any
) -> SAEModule:
    """Build a module initialised from an sae-lens SAE, to fine-tune it.

    ``source`` is an sae-lens folder (``cfg.json`` + ``sae_weights.safetensors``), an
    ``sae_lens.SAE`` object, or a Gemma Scope ``params.npz`` file (or a folder holding one):
    ``W_enc``, ``W_dec``, ``b_enc``, ``b_dec``, ``threshold``, loaded as a JumpReLU SAE with
    ``apply_b_dec_to_input=False`` as Gemma Scope encodes. The module class is the one training
    the SAE's architecture (``jumprelu`` → JumpReLUSAE, ``standard`` → StandardSAE, ``topk`` →
    TopKSAE, ``gated`` → GatedSAE). Nothing is unpickled: safetensors, JSON, and npz with
    ``allow_pickle=False`` only.

    Hyper-parameters come from the SAE's config, then from its ``training_architecture_details``
    when it was trained as the same architecture, then from ``module_kwargs``. The module does not
    normalise activations (``activation_scale`` 1.0): exports are folded. Its metadata is kept for
    the next export, and a folder's ``sparsity.safetensors`` becomes ``module.feature_density``.

    Args:
        source: Folder, ``params.npz`` path, or SAE object.
        **module_kwargs: Module arguments (``lr``, ``l0_coefficient``, ...) overriding the above.

    Returns:
        The module, in training mode.

    Raises:
        FileNotFoundError: If the folder or its files do not exist.
        ValueError: If a file is unreadable, an architecture has no module, or ``d_in``/``d_sae``
            in ``module_kwargs`` disagree with the SAE. Each message names the file.

    """
    if isinstance(source, SAE):
        return _module_from_state(
            source.cfg.architecture(),
            source.cfg.to_dict(),
            source.state_dict(),
            f"the given {type(source).__name__}",
            None,
            module_kwargs,
        )
    path = Path(source)
    if path.is_dir() and not (path / SAE_CFG_FILENAME).exists() and (path / "params.npz").exists():
        path = path / "params.npz"
    if path.suffix == ".npz":
        return _load_gemma_scope(path, module_kwargs)
    return _load_folder(path, module_kwargs)


def _load_folder(path: Path, module_kwargs: dict[str, Any]) -> SAEModule:
    if not path.exists():
        raise FileNotFoundError(f"No sae-lens SAE at {path}.")
    if not path.is_dir():
        raise ValueError(
            f"{path} is a file; give the sae-lens folder holding {SAE_CFG_FILENAME} and "
            f"{SAE_WEIGHTS_FILENAME} (or a Gemma Scope params.npz)."
        )
    cfg_path, weights_path = path / SAE_CFG_FILENAME, path / SAE_WEIGHTS_FILENAME
    for required in (cfg_path, weights_path):
        if not required.is_file():
            raise FileNotFoundError(f"{required} is missing: {path} is not an sae-lens SAE folder.")
    try:
        cfg = json.loads(cfg_path.read_text())
        architecture = cfg["architecture"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as error:
        raise ValueError(f"{cfg_path} is not a valid sae-lens config: {error!r}") from error
    _module_class(architecture, str(cfg_path))
    try:
        sae = SAE.load_from_disk(path)
    except SafetensorError as error:
        raise ValueError(
            f"{weights_path} is not a readable safetensors file ({error}); export or download it "
            "again."
        ) from error
    except (OSError, RuntimeError, KeyError, ValueError) as error:
        raise ValueError(
            f"sae-lens could not load {path}: {cfg_path.name} and {weights_path.name} do not match "
            f"({error!r})."
        ) from error
    density = None
    sparsity_path = path / SPARSITY_FILENAME
    if sparsity_path.exists():
        try:
            log_density = load_file(sparsity_path)["sparsity"]
        except (SafetensorError, OSError, KeyError) as error:
            raise ValueError(f"{sparsity_path} is corrupt: {error!r}") from error
        # Inverse of log10_feature_density, so that a re-export writes the same file.
        density = (10 ** log_density.double() - 1e-10).clamp_min(0)
    return _module_from_state(
        architecture, sae.cfg.to_dict(), sae.state_dict(), str(path), density, module_kwargs
    )


def _load_gemma_scope(path: Path, module_kwargs: dict[str, Any]) -> SAEModule:
    try:
        with np.load(path, allow_pickle=False) as arrays:
            state = {name: torch.from_numpy(arrays[name]).float() for name in _GEMMA_SCOPE_KEYS}
    except (OSError, ValueError, KeyError) as error:
        raise ValueError(
            f"{path} is not a Gemma Scope params.npz with arrays {list(_GEMMA_SCOPE_KEYS)}: {error}"
        ) from error
    d_in, d_sae = state["W_enc"].shape
    cfg = {"d_in": d_in, "d_sae": d_sae, "apply_b_dec_to_input": False}
    return _module_from_state("jumprelu", cfg, state, str(path), None, module_kwargs)


def _module_class(architecture: str, origin: str) -> type[SAEModule]:
    try:
        return get_module_class(architecture)
    except ValueError:
        raise ValueError(
            f"{origin} has architecture {architecture!r}, which no lightning-sae module trains. "
            f"Supported: {available_architectures()}."
        ) from None


def _module_from_state(
    architecture: str,
    cfg: dict[str, Any],
    state: dict[str, Tensor],
    origin: str,
    density: Tensor | None,
    module_kwargs: dict[str, Any],
) -> SAEModule:
    module_cls = _module_class(architecture, origin)
    if cfg.get("normalize_activations", "none") != "none":
        raise ValueError(
            f"{origin} normalises activations at run time ({cfg['normalize_activations']!r}); "
            "only folded SAEs (normalize_activations 'none') can be fine-tuned here."
        )
    for name in ("d_in", "d_sae"):
        if name in module_kwargs and module_kwargs[name] != cfg[name]:
            raise ValueError(
                f"{origin} has {name}={cfg[name]} but {name}={module_kwargs[name]} was passed; "
                f"drop the argument or load an SAE of that {name}."
            )
    metadata = cfg.get("metadata") or {}
    fields = dict(cfg)
    if metadata.get("training_architecture") == module_cls.architecture:
        fields |= metadata.get("training_architecture_details") or {}
    fields = {_RENAMED_TRAINING_FIELDS.get(name, name): value for name, value in fields.items()}
    accepted = _init_arguments(module_cls)
    kwargs = {name: value for name, value in fields.items() if name in accepted}
    kwargs["normalize_activations"] = False
    module = module_cls(**(kwargs | module_kwargs))
    try:
        module.sae.load_state_dict(state)
    except RuntimeError as error:
        raise ValueError(
            f"The weights of {origin} do not fit {module_cls.__name__}: {error}"
        ) from error
    module.sae.cfg.metadata = SAEMetadata(**copy.deepcopy(metadata))
    module.sae.cfg.add_training_info_to_metadata()
    if density is not None:
        module.feature_density.copy_(density)
    return module


def _init_arguments(module_cls: type[SAEModule]) -> set[str]:
    """Argument names the module class accepts, through its ``__init__`` chain."""
    names: set[str] = set()
    for klass in module_cls.__mro__:
        if issubclass(klass, SAEModule):
            names |= set(inspect.signature(klass.__init__).parameters)
    return names - {"self", "kwargs", "architecture"}
