"""Read sae-lens SAEs (folders, ``SAE`` objects, Gemma Scope ``params.npz``) into modules.

Nothing is unpickled: safetensors, JSON, and npz with ``allow_pickle=False`` only. Every file
that fails to parse, or holds what it should not (NaN weights, a sparsity of the wrong length, a
config without a required field), is an error that names the file.
"""

import copy
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sae_lens.constants import SAE_CFG_FILENAME, SAE_WEIGHTS_FILENAME, SPARSITY_FILENAME
from sae_lens.saes.sae import SAE, SAEMetadata
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor

from lightning_sae.modules import SAEModule
from lightning_sae.registry import available_architectures, get_module_class

#: Gemma Scope ``params.npz`` arrays, the JumpReLU parameters under sae-lens's names.
_GEMMA_SCOPE_KEYS = ("W_enc", "W_dec", "b_enc", "b_dec", "threshold")
#: cfg.json fields without which sae-lens would load something else silently (a ``topk`` config
#: without ``k`` becomes k=100) or fail with a bare ``KeyError``.
_REQUIRED_FIELDS = {"": ("architecture", "d_in", "d_sae"), "topk": ("k",)}


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
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{cfg_path} is not valid JSON: {error}") from error
    if not isinstance(cfg, dict):
        raise ValueError(f"{cfg_path} must hold a JSON object, got {type(cfg).__name__}.")
    architecture = cfg.get("architecture")
    missing = [
        name
        for name in (*_REQUIRED_FIELDS[""], *_REQUIRED_FIELDS.get(architecture, ()))
        if name not in cfg
    ]
    if missing:
        raise ValueError(
            f"{cfg_path} lacks the required field(s) {missing}; sae-lens would guess them. Add "
            "them (export the SAE again with lightning-sae or sae-lens)."
        )
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
            raise ValueError(
                f"{sparsity_path} is corrupt ({error!r}); delete it or export the SAE again."
            ) from error
        if log_density.shape != (cfg["d_sae"],) or not torch.isfinite(log_density).all():
            raise ValueError(
                f"{sparsity_path} must hold d_sae={cfg['d_sae']} finite log10 densities, got "
                f"shape {tuple(log_density.shape)}; delete it or export the SAE again."
            )
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
    bad = [name for name, tensor in state.items() if not torch.isfinite(tensor).all()]
    if bad:
        raise ValueError(
            f"The weights of {origin} hold NaN or inf values in {bad}: the SAE is broken; export "
            "it again from a healthy checkpoint."
        )
    metadata = cfg.get("metadata") or {}
    fields = dict(cfg)
    if metadata.get("training_architecture") == module_cls.architecture:
        fields |= metadata.get("training_architecture_details") or {}
    kwargs = module_cls.hparams_from_sae_config(fields) | {"normalize_activations": False}
    module = module_cls(**(kwargs | module_kwargs))
    try:
        module.sae.load_state_dict(state)
    except RuntimeError as error:
        raise ValueError(
            f"The weights of {origin} do not fit {module_cls.__name__}: {error}"
        ) from error
    module.sae.cfg.metadata = SAEMetadata(**copy.deepcopy(metadata))
    module.sae.cfg.add_training_info_to_metadata()
    module.unit.mark_restored()
    if density is not None:
        module.feature_density.copy_(density)
    return module
