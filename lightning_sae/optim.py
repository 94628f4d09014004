"""Adam with a learning-rate schedule per SAE, and the sparsity-coefficient warm-up.

Schedules step once per optimisation step (``interval="step"``): the default ``"epoch"`` never
fires in one endless streaming epoch.
"""

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch

from lightning_sae.errors import ConfigurationError

LRSchedulerName = Literal["constant", "cosine"]


@dataclass(frozen=True)
class LRSchedule:
    """Learning-rate multiplier: linear warm-up, constant or cosine body, linear decay to zero.

    A plain callable (not a lambda) so ``LambdaLR`` can pickle it into checkpoints.

    Args:
        total_steps: Optimisation steps of the whole run (needed by ``cosine`` and decay).
        warm_up_steps: Steps of linear warm-up from ``1 / warm_up_steps`` to 1.
        decay_steps: Final steps over which the multiplier falls linearly to 0.
        scheduler: ``constant`` keeps 1 between warm-up and decay; ``cosine`` anneals to
            ``min_lr_ratio`` over the same span.
        min_lr_ratio: Floor of the cosine body, as a fraction of the peak learning rate.

    """

    total_steps: int | None
    warm_up_steps: int = 0
    decay_steps: int = 0
    scheduler: LRSchedulerName = "constant"
    min_lr_ratio: float = 0.0

    def __post_init__(self) -> None:
        # The settings themselves are validated where they are given (the module's
        # constructor); what is checked here depends on the run's length.
        needs_total = self.scheduler == "cosine" or self.decay_steps > 0
        if needs_total and not self.total_steps:
            raise ConfigurationError(
                "A cosine schedule or lr_decay_steps needs the run's length: set "
                "Trainer(max_steps=...) to a positive number."
            )
        if self.scheduler == "cosine" and self.decay_steps > 0 and self.min_lr_ratio <= 0:
            raise ConfigurationError(
                "A cosine schedule with lr_decay_steps needs lr_min_ratio > 0: the cosine already "
                "ends at 0, so the decay would train at LR 0 (sae-lens refuses this too)."
            )
        if self.total_steps and self.warm_up_steps + self.decay_steps > self.total_steps:
            raise ConfigurationError(
                f"lr_warm_up_steps + lr_decay_steps ({self.warm_up_steps} + {self.decay_steps}) "
                f"exceed the run's {self.total_steps} steps; shorten them or raise max_steps."
            )

    def __call__(self, step: int) -> float:
        """Return the multiplier of the peak learning rate at optimisation step ``step``."""
        if step < self.warm_up_steps:
            return (step + 1) / self.warm_up_steps
        if self.decay_steps and self.total_steps is not None:
            decay_start = self.total_steps - self.decay_steps
            if step >= decay_start:
                body_end = self._body(decay_start)
                return body_end * max(0.0, 1.0 - (step - decay_start) / self.decay_steps)
        return self._body(step)

    def _body(self, step: int) -> float:
        if self.scheduler == "constant" or self.total_steps is None:
            return 1.0
        span = max(1, self.total_steps - self.warm_up_steps - self.decay_steps)
        progress = min(1.0, (step - self.warm_up_steps) / span)
        cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
        return self.min_lr_ratio + (1.0 - self.min_lr_ratio) * cosine


def warm_up_coefficient(value: float, warm_up_steps: int, step: int) -> float:
    """Sparsity coefficient at ``step``: linear from 0 to ``value`` over ``warm_up_steps``.

    Matches sae-lens's ``CoefficientScheduler`` (the coefficient used at step ``n`` is
    ``value * min(1, n / warm_up_steps)``), but is a pure function of the step, so a resumed run
    needs no scheduler state.
    """
    if warm_up_steps <= 0:
        return value
    return value * min(1.0, step / warm_up_steps)


class _RunLambdaLR(torch.optim.lr_scheduler.LambdaLR):
    """``LambdaLR`` whose schedules follow this run's settings, not a resumed checkpoint's.

    ``LambdaLR`` restores a callable's ``__dict__`` from the checkpoint, which would keep the old
    ``max_steps`` when a run is resumed to go further (its decay would pin the LR at 0).
    """

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the step count and LRs, keeping the current schedules."""
        state_dict = {**state_dict, "lr_lambdas": [None] * len(self.lr_lambdas)}
        super().load_state_dict(state_dict)


def adam_with_schedules(
    param_groups: Sequence[dict[str, Any]], schedules: Sequence[LRSchedule]
) -> dict[str, Any]:
    """One Adam over the parameter groups (one per SAE), each with its own per-step schedule.

    Returns Lightning's ``configure_optimizers`` dictionary.
    """
    optimizer = torch.optim.Adam(list(param_groups))
    scheduler = _RunLambdaLR(optimizer, list(schedules))
    return {
        "optimizer": optimizer,
        "lr_scheduler": {"scheduler": scheduler, "interval": "step", "frequency": 1},
    }
