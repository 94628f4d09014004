"""Activation normalisation kept in checkpoints: ``x * scale`` with ``scale = sqrt(d_in) / E‖x‖``.

sae-lens calls this ``expected_average_only_in``. The scale is a buffer, so it travels in every
checkpoint (a resumed run never re-estimates it) and the exporter folds it into the weights.
"""

import torch
from torch import Tensor, nn

from lightning_sae.distributed import all_reduce_sum


class ActivationNormalizer(nn.Module):
    """Scale activations by a factor estimated once, on the first training batch of all ranks.

    Args:
        d_in: Width of the activations.
        enabled: Scale at all (off: the scale stays 1).
        scale: A fixed scale instead of an estimated one.

    """

    scale: Tensor

    def __init__(self, d_in: int, enabled: bool = True, scale: float | None = None) -> None:
        super().__init__()
        if scale is not None and not (scale > 0 and scale != float("inf")):
            raise ValueError(f"activation_scale must be a positive finite number, got {scale!r}.")
        self.d_in = d_in
        self.register_buffer(
            "scale", torch.tensor(scale if enabled and scale else 1.0, dtype=torch.float32)
        )
        #: Estimate the scale from the next training batch (never after a checkpoint restore).
        self.pending = enabled and scale is None

    def forward(self, x: Tensor) -> Tensor:
        """Return ``x`` in the SAE's units."""
        return x * self.scale

    def inverse(self, x: Tensor) -> Tensor:
        """Return SAE-unit ``x`` in the activations' own units."""
        return x / self.scale

    @torch.no_grad()
    def estimate(self, x: Tensor) -> None:
        """Set ``scale = sqrt(d_in) / E‖x‖`` over this batch of every rank.

        Raises:
            FloatingPointError: If the batch's mean norm is zero or the scale is not finite (an
                all-zero first batch would scale every later activation by infinity).

        """
        stats = torch.stack([x.float().norm(dim=-1).sum(), x.new_tensor(x.shape[0]).float()])
        stats = all_reduce_sum(stats)
        scale = self.d_in**0.5 / (stats[0] / stats[1])
        if not torch.isfinite(scale):
            raise FloatingPointError(
                f"The first training batch has mean activation norm {float(stats[0] / stats[1])!r},"
                " so the activation scale sqrt(d_in)/E‖x‖ is not finite. Check the activation "
                "source (an all-zero hook?), or pass activation_scale=<value> or "
                "normalize_activations=False."
            )
        self.scale.fill_(scale)
        self.pending = False
