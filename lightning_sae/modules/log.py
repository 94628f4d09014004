"""Logging a unit's training step through its LightningModule (any Lightning logger)."""

from lightning.pytorch import LightningModule
from lightning.pytorch.loggers import TensorBoardLogger
from torch import Tensor

from lightning_sae.metrics import log10_feature_density
from lightning_sae.modules.unit import StepResult


def log_step_result(module: LightningModule, result: StepResult, prefix: str = "") -> None:
    """Log a unit's step through ``module`` (names prefixed by ``prefix``, e.g. a hook name)."""
    module.log_dict({f"{prefix}{name}": value for name, value in result.losses.items()})
    if result.metrics:
        module.log_dict({f"{prefix}{name}": value for name, value in result.metrics.items()})
        short = {
            "train/l0": "l0",
            "train/explained_variance": "ev",
            "train/tokens_per_sec": "tok/s",
        }
        bar = {
            f"{prefix}{short[name]}": value
            for name, value in result.metrics.items()
            if name in short
        }
        module.log_dict(bar, prog_bar=True, logger=False)
    if result.density is not None:
        log_density_histogram(module, f"{prefix}train/feature_density_log10", result.density)


def log_density_histogram(module: LightningModule, name: str, density: Tensor) -> None:
    """Send the log10 feature density to every TensorBoard logger of ``module``."""
    if module._trainer is None:
        return
    for logger in module.loggers:
        if isinstance(logger, TensorBoardLogger):
            logger.experiment.add_histogram(
                name, log10_feature_density(density), module.global_step
            )
