"""Activation data: token sources, hooked models, the two activation sources and the DataModule.

- ``sources.py``: documents → token rows. ``models.py``: the hooked language model.
- ``live.py``: activations computed by the model. ``store.py``: the activation store (litdata),
  ``sae_lens_cache.py``: sae-lens's cached activations; ``cache.py``: the DataModule's source over
  them, and the previous cache format (read to convert it).
- ``chunks.py``: the chunks the live source yields, and batching. ``datamodule.py``: the DataModule.
- ``protocol.py``: what the exporter and the evaluation need from the data.
"""

from lightning_sae.data.cache import ActivationCache, StoredSource
from lightning_sae.data.datamodule import ActivationDataModule
from lightning_sae.data.live import LiveSource
from lightning_sae.data.models import HookedModel, load_hooked_model
from lightning_sae.data.offline import shakespeare_documents, smollm2_path
from lightning_sae.data.protocol import EvaluationData, ExportData
from lightning_sae.data.sources import TokenSource, pack

__all__ = [
    "ActivationCache",
    "ActivationDataModule",
    "EvaluationData",
    "ExportData",
    "HookedModel",
    "LiveSource",
    "StoredSource",
    "TokenSource",
    "load_hooked_model",
    "pack",
    "shakespeare_documents",
    "smollm2_path",
]
