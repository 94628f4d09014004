"""Activation data: token sources, hooked models, the streaming DataModule and its cache."""

from lightning_sae.data.cache import ActivationCache
from lightning_sae.data.datamodule import ActivationDataModule
from lightning_sae.data.models import HookedModel, load_hooked_model
from lightning_sae.data.offline import shakespeare_documents, smollm2_path
from lightning_sae.data.sources import TokenSource, pack

__all__ = [
    "ActivationCache",
    "ActivationDataModule",
    "HookedModel",
    "TokenSource",
    "load_hooked_model",
    "pack",
    "shakespeare_documents",
    "smollm2_path",
]
