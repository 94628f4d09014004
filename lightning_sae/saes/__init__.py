"""sae-lens ``TrainingSAE`` architectures of our own, registered with sae-lens on import."""

from lightning_sae.saes.atm import ATMTrainingSAE, ATMTrainingSAEConfig

__all__ = ["ATMTrainingSAE", "ATMTrainingSAEConfig"]
