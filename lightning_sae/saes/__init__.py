"""Our sae-lens ``TrainingSAE`` classes: fast training passes and architectures of our own.

``TRAINING_CLASSES`` maps a sae-lens architecture name to the training class of ours that trains
it with sae-lens's own config class (so configs, checkpoints and exports are plain sae-lens).
"""

from sae_lens.saes.sae import TrainingSAE

from lightning_sae.saes.atm import ATMTrainingSAE, ATMTrainingSAEConfig
from lightning_sae.saes.batchtopk import FastBatchTopKTrainingSAE
from lightning_sae.saes.gated import FastGatedTrainingSAE
from lightning_sae.saes.matryoshka import FastMatryoshkaBatchTopKTrainingSAE
from lightning_sae.saes.standard import FastStandardTrainingSAE
from lightning_sae.saes.topk import FastTopKTrainingSAE

#: sae-lens architecture name → our training class for it (built on sae-lens's config class).
TRAINING_CLASSES: dict[str, type[TrainingSAE]] = {
    "standard": FastStandardTrainingSAE,
    "gated": FastGatedTrainingSAE,
    "topk": FastTopKTrainingSAE,
    "batchtopk": FastBatchTopKTrainingSAE,
    "matryoshka_batchtopk": FastMatryoshkaBatchTopKTrainingSAE,
}

__all__ = [
    "TRAINING_CLASSES",
    "ATMTrainingSAE",
    "ATMTrainingSAEConfig",
    "FastBatchTopKTrainingSAE",
    "FastGatedTrainingSAE",
    "FastMatryoshkaBatchTopKTrainingSAE",
    "FastStandardTrainingSAE",
    "FastTopKTrainingSAE",
]
