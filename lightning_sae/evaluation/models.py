"""The language model an sae-lens export was trained on, ready to attach the SAE to.

>>> from sae_lens import SAE
>>> from lightning_sae.evaluation import load_model_for_sae
>>> sae = SAE.load_from_disk("runs/default/sae")  # doctest: +SKIP
>>> model = load_model_for_sae(sae)  # a HookedSAETransformer  # doctest: +SKIP
>>> model.add_sae(sae)  # doctest: +SKIP
"""

import os
from pathlib import Path
from typing import Any

import torch
from sae_lens import SAE, HookedSAETransformer

from lightning_sae.data.models import build_hooked_transformer, transformer_lens_hook_name


def load_model_for_sae(
    sae: SAE[Any] | str | os.PathLike[str],
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> HookedSAETransformer:
    """Build the model named in an export's metadata as a ``HookedSAETransformer``.

    The model is built from the export's ``model_name`` with transformer-lens and no weight
    processing (:func:`~lightning_sae.data.models.build_hooked_transformer`): the offline default
    ``"smollm2-135m"``, a local Hugging Face folder, a transformer-lens name or a Hugging Face hub
    name, so its hook ``hook_name`` sees the activations the SAE was trained on. Attach the SAE
    with ``model.add_sae(sae)``; sae-lens's ``run_evals``, SAEDashboard and SAEBench take the
    model too.

    Args:
        sae: An sae-lens ``SAE`` or the path of an export folder.
        device: Device to build on.
        dtype: Dtype of the weights.

    Raises:
        ValueError: The export names no model, or its hook has no transformer-lens name.

    """
    if not isinstance(sae, SAE):
        sae = SAE.load_from_disk(str(Path(sae)), device="cpu")
    metadata = sae.cfg.metadata
    if not metadata.model_name:
        raise ValueError(
            "The SAE's metadata names no model_name: build the model yourself (e.g. "
            "lightning_sae.data.models.build_hooked_transformer(<name or folder>, "
            "model_class=HookedSAETransformer))."
        )
    hook = metadata.hook_name
    if hook is not None and transformer_lens_hook_name(hook) is not None:
        raise ValueError(
            f"The SAE's hook_name {hook!r} is a Hugging Face module path; transformer-lens calls "
            f"that hook {transformer_lens_hook_name(hook)!r}. Set cfg.metadata.hook_name to it "
            "before add_sae (newer lightning-sae exports record it)."
        )
    model = build_hooked_transformer(
        metadata.model_name, dtype=dtype, device=device, model_class=HookedSAETransformer
    )
    if hook is not None and hook not in model.hook_dict:
        raise ValueError(
            f"The SAE's hook_name {hook!r} is no hook of the transformer-lens model "
            f"{metadata.model_name!r} (it was trained on a Hugging Face module without a "
            "transformer-lens name): use sae_lens.load_model('AutoModelForCausalLM', "
            f"{metadata.model_name!r}, hook_names=[{hook!r}]) and sae-lens's run_evals instead."
        )
    return model  # type: ignore[return-value]
