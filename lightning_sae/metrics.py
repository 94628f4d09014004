"""torchmetrics ``Metric``s for sparse autoencoders, exact across batches and DDP ranks.

Every metric keeps sufficient statistics (sums and counts, float64 where precision matters) and
reduces them with ``sum`` across ranks, so a 2-process run gives the value one process gets on the
union of the data. Formulas follow ``shared/ALGORITHMS.md``:

* :class:`L0` — mean number of non-zero latents per token.
* :class:`ExplainedVariance` — ``1 - Σ‖x − x̂‖² / Σ‖x − x̄‖²`` over the whole evaluated set.
* :class:`NormalizedMSE` — ``Σ‖x − x̂‖² / Σ‖x‖²``.
* :class:`FeatureDensity` — per-latent firing frequency ``#{t : f_i > 0} / N``.
* :class:`DeadLatentRate` — fraction of latents that never fired in the accumulated window.

>>> import torch
>>> l0 = L0()
>>> l0.update(torch.tensor([[1.0, 0.0, 2.0], [0.0, 0.0, 3.0]]))
>>> float(l0.compute())
1.5
"""

import torch
from torch import Tensor
from torchmetrics import Metric

_F64 = torch.float64


def _flatten_tokens(x: Tensor) -> Tensor:
    """Collapse every leading dimension into one token dimension: ``[..., d] -> [N, d]``."""
    return x.reshape(-1, x.shape[-1])


class L0(Metric):
    """Mean number of active (non-zero) latents per token."""

    full_state_update = False
    higher_is_better = False
    is_differentiable = False

    active: Tensor
    tokens: Tensor

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("active", torch.zeros((), dtype=_F64), dist_reduce_fx="sum")
        self.add_state("tokens", torch.zeros((), dtype=_F64), dist_reduce_fx="sum")

    def update(self, feature_acts: Tensor) -> None:
        """Count the active latents of a ``[..., d_sae]`` batch of latents."""
        acts = _flatten_tokens(feature_acts)
        self.active += torch.count_nonzero(acts).to(_F64)
        self.tokens += acts.shape[0]

    def compute(self) -> Tensor:
        """Return the mean L0 over every token seen."""
        return self.active / self.tokens


class _ReconstructionMetric(Metric):
    """Shared float64 sufficient statistics of a reconstruction ``x̂`` of ``x``."""

    full_state_update = False
    is_differentiable = False

    squared_error: Tensor
    sum_x: Tensor
    sum_squared_x: Tensor
    tokens: Tensor

    def __init__(self, d_in: int, **kwargs) -> None:
        super().__init__(**kwargs)
        if d_in <= 0:
            raise ValueError(f"d_in must be positive, got {d_in}.")
        self.add_state("squared_error", torch.zeros((), dtype=_F64), dist_reduce_fx="sum")
        self.add_state("sum_x", torch.zeros(d_in, dtype=_F64), dist_reduce_fx="sum")
        self.add_state("sum_squared_x", torch.zeros((), dtype=_F64), dist_reduce_fx="sum")
        self.add_state("tokens", torch.zeros((), dtype=_F64), dist_reduce_fx="sum")

    def update(self, x: Tensor, x_hat: Tensor) -> None:
        """Accumulate a batch of inputs ``x`` and reconstructions ``x_hat`` (``[..., d_in]``)."""
        if x.shape != x_hat.shape:
            raise ValueError(f"x and x_hat must have the same shape, got {x.shape} and {x_hat.shape}.")
        x = _flatten_tokens(x).to(_F64)
        x_hat = _flatten_tokens(x_hat).to(_F64)
        self.squared_error += (x - x_hat).square().sum()
        self.sum_x += x.sum(dim=0)
        self.sum_squared_x += x.square().sum()
        self.tokens += x.shape[0]


class ExplainedVariance(_ReconstructionMetric):
    """Dataset-level explained variance ``1 - Σ‖x − x̂‖² / Σ‖x − x̄‖²``.

    ``Σ‖x − x̄‖² = Σ‖x‖² − ‖Σx‖² / N`` is exact in float64, so the value over many batches (or
    ranks) equals the value over their concatenation. This is sae-lens's streaming formula, not the
    per-token "legacy" average.
    """

    higher_is_better = True

    def compute(self) -> Tensor:
        """Return the explained variance over every token seen."""
        total_variance = self.sum_squared_x - self.sum_x.square().sum() / self.tokens
        return 1.0 - self.squared_error / total_variance


class NormalizedMSE(_ReconstructionMetric):
    """Normalised MSE ``Σ‖x − x̂‖² / Σ‖x‖²`` (0 is perfect, 1 is as bad as predicting zero)."""

    higher_is_better = False

    def compute(self) -> Tensor:
        """Return the normalised MSE over every token seen."""
        return self.squared_error / self.sum_squared_x


class FeatureDensity(Metric):
    """Per-latent firing frequency ``p_i = #{t : f_i > 0} / N`` over the accumulated window.

    The caller decides the window by calling :meth:`reset`; :class:`~lightning_sae.SAEModule`
    resets it every ``dead_window_tokens`` tokens (counted over all ranks).
    """

    full_state_update = False
    is_differentiable = False

    counts: Tensor
    tokens: Tensor

    def __init__(self, d_sae: int, **kwargs) -> None:
        super().__init__(**kwargs)
        if d_sae <= 0:
            raise ValueError(f"d_sae must be positive, got {d_sae}.")
        self.add_state("counts", torch.zeros(d_sae, dtype=_F64), dist_reduce_fx="sum")
        self.add_state("tokens", torch.zeros((), dtype=_F64), dist_reduce_fx="sum")

    def update(self, feature_acts: Tensor) -> None:
        """Count, per latent, the tokens of a ``[..., d_sae]`` batch on which it fired."""
        acts = _flatten_tokens(feature_acts)
        self.counts += torch.count_nonzero(acts, dim=0).to(_F64)
        self.tokens += acts.shape[0]

    def compute(self) -> Tensor:
        """Return the firing frequency of each latent, shape ``[d_sae]``."""
        return self.counts / self.tokens


class DeadLatentRate(FeatureDensity):
    """Fraction of latents that did not fire on any token of the window (on any rank)."""

    higher_is_better = False

    def compute(self) -> Tensor:
        """Return the fraction of latents with zero firings in the window."""
        return (self.counts == 0).to(_F64).mean()


def log10_feature_density(density: Tensor, eps: float = 1e-10) -> Tensor:
    """Log10 feature density as sae-lens writes it in ``sparsity.safetensors`` (float32)."""
    return torch.log10(density.to(_F64) + eps).float()
