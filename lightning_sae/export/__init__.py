"""sae-lens interop: write trained SAEs as sae-lens folders, read sae-lens SAEs back.

- ``writer.py``: :func:`export_to_sae_lens` (atomic, folded, metadata, sparsity).
- ``calibration.py``: the BatchTopK → JumpReLU threshold estimated on held-out activations.
- ``reader.py``: :func:`load_from_sae_lens` (folders, ``SAE`` objects, Gemma Scope npz).
"""

from lightning_sae.export.calibration import calibrate_batchtopk_threshold
from lightning_sae.export.reader import load_from_sae_lens
from lightning_sae.export.writer import (
    DEFAULT_CALIBRATION_TOKENS,
    EXPORT_FILES,
    SAE_LENS_METADATA_KEYS,
    export_to_sae_lens,
)

__all__ = [
    "DEFAULT_CALIBRATION_TOKENS",
    "EXPORT_FILES",
    "SAE_LENS_METADATA_KEYS",
    "calibrate_batchtopk_threshold",
    "export_to_sae_lens",
    "load_from_sae_lens",
]
