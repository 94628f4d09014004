"""torchmetrics ``Metric``s for sparse autoencoders, exact across batches and DDP ranks.

Every metric keeps sufficient statistics (sums and counts, float64 where precision matters) and
reduces them with ``sum`` across ranks, so a 2-process run gives the value one process gets on the
union of the data:

* :class:`L0` — mean number of non-zero latents per token.
* :class:`ExplainedVariance` — ``1 - Σ‖x − x̂‖² / Σ‖x − x̄‖²`` over the whole evaluated set.
* :class:`NormalizedMSE` — ``Σ‖x − x̂‖² / Σ‖x‖²``.
* :class:`FeatureDensity` — per-latent firing frequency ``#{t : f_i > 0} / N``.

>>> import torch
>>> l0 = L0()
>>> l0.update(torch.tensor([[1.0, 0.0, 2.0], [0.0, 0.0, 3.0]]))
>>> float(l0.compute())
1.5
"""

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import torch
from sae_lens.util import cosine_similarities
from torch import Tensor
from torchmetrics import Metric

if TYPE_CHECKING:  # sae-lens's synthetic package pulls in plotly: only needed for type hints
    from sae_lens.synthetic import ActivationGenerator, FeatureDictionary, HierarchyNode

_F64 = torch.float64


def _flatten_tokens(x: Tensor) -> Tensor:
    """Collapse every leading dimension into one token dimension: ``[..., d] -> [N, d]``."""
    return x.reshape(-1, x.shape[-1])


def active_counts(feature_acts: Tensor) -> Tensor:
    """Per-latent firing counts of a ``[..., d_sae]`` batch, with the token count appended.

    One pass over the latents that :class:`L0`, :class:`FeatureDensity` and a dead-latent tracker
    can all share (``[d_sae + 1]``, int64). ``feature_acts`` may be dense or a sparse CSR tensor
    ``[tokens, d_sae]`` (the fast training passes' output): then only its stored values are read,
    and stored zeros do not count as firing.
    """
    if feature_acts.layout == torch.sparse_csr:
        tokens, d_sae = feature_acts.shape
        fired = (feature_acts.values() != 0).long()
        counts = fired.new_zeros(d_sae).index_add_(0, feature_acts.col_indices(), fired)
        return torch.cat([counts, counts.new_tensor([tokens])])
    acts = _flatten_tokens(feature_acts)
    counts = torch.count_nonzero(acts, dim=0)
    return torch.cat([counts, counts.new_tensor([acts.shape[0]])])


def _counts_and_tokens(
    feature_acts: Tensor | None, counts: Tensor | None
) -> tuple[Tensor, Tensor | int]:
    if (feature_acts is None) == (counts is None):
        raise ValueError("Pass exactly one of feature_acts and active_counts.")
    if counts is None:
        counts = active_counts(feature_acts)
    return counts[:-1], counts[-1].to(_F64)


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

    def update(
        self, feature_acts: Tensor | None = None, *, active_counts: Tensor | None = None
    ) -> None:
        """Count the active latents of a ``[..., d_sae]`` batch of latents.

        Args:
            feature_acts: The latents.
            active_counts: Instead of ``feature_acts``, per-latent firing counts
                (:func:`active_counts`) already computed for another metric, plus the token count
                as a last element — saves a pass over ``[batch, d_sae]`` on the training hot path.

        """
        counts, tokens = _counts_and_tokens(feature_acts, active_counts)
        self.active += counts.sum().to(_F64)
        self.tokens += tokens

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
            raise ValueError(
                f"x and x_hat must have the same shape, got {x.shape} and {x_hat.shape}."
            )
        # One float64 copy of x, reused for the error in place, and dot products for the sums of
        # squares: one [N, d_in] temporary fewer than three (a training step runs this every batch).
        x = _flatten_tokens(x).to(_F64, memory_format=torch.contiguous_format, copy=True)
        flat = x.view(-1)
        self.sum_x += x.sum(dim=0)
        self.sum_squared_x += flat.dot(flat)
        error = x.sub_(_flatten_tokens(x_hat).to(_F64)).view(-1)
        self.squared_error += error.dot(error)
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

    The caller decides the window by calling :meth:`reset`; an SAE's training statistics reset it
    every ``dead_window_tokens`` tokens (counted over all ranks). A latent is dead when its
    density over that window is 0.
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

    def update(
        self, feature_acts: Tensor | None = None, *, active_counts: Tensor | None = None
    ) -> None:
        """Count, per latent, the tokens of a ``[..., d_sae]`` batch on which it fired.

        Args:
            feature_acts: The latents.
            active_counts: Instead of ``feature_acts``, the output of :func:`active_counts`.

        """
        counts, tokens = _counts_and_tokens(feature_acts, active_counts)
        self.counts += counts.to(_F64)
        self.tokens += tokens

    def compute(self) -> Tensor:
        """Return the firing frequency of each latent, shape ``[d_sae]``."""
        return self.counts / self.tokens


def log10_feature_density(density: Tensor, eps: float = 1e-10) -> Tensor:
    """Log10 feature density as sae-lens writes it in ``sparsity.safetensors`` (float32)."""
    return torch.log10(density.to(_F64) + eps).float()


# --------------------------------------------------------------------------- feature absorption


def hierarchy_parent_child_pairs(roots: "HierarchyNode | Sequence[HierarchyNode]") -> Tensor:
    """Every direct (parent feature, child feature) edge of ``sae_lens.synthetic`` hierarchy trees.

    Organisational nodes (``feature_index=None``) are skipped along with their edges: their
    children have no parent feature whose latent could fail to fire.

    Returns:
        Long tensor ``[n_pairs, 2]`` of feature indices, parent first.

    """
    pending = [roots] if not isinstance(roots, Sequence) else list(roots)
    pairs = []
    while pending:
        node = pending.pop()
        for child in node.children:
            if node.feature_index is not None and child.feature_index is not None:
                pairs.append((node.feature_index, child.feature_index))
            pending.append(child)
    return torch.tensor(sorted(pairs), dtype=torch.long).reshape(-1, 2)


def match_features_to_latents(feature_vectors: Tensor, decoder: Tensor) -> Tensor:
    """For each true feature, the latent whose decoder row is most cosine-similar to it.

    Each feature picks its own best latent (an argmax, not a one-to-one assignment), so a
    feature whose direction the SAE never learnt still gets its closest latent, and two features
    may share one. Cosine similarity ignores scale, so ``decoder`` may be in normalised units.

    Args:
        feature_vectors: True feature directions ``[n_features, d_in]`` (a ``FeatureDictionary``'s
            ``feature_vectors``).
        decoder: The SAE's ``W_dec`` ``[d_sae, d_in]``.

    Returns:
        Long tensor ``[n_features]`` of latent indices.

    """
    return cosine_similarities(feature_vectors.detach().float(), decoder.detach().float()).argmax(1)


class Absorption(Metric):
    """Feature absorption on synthetic data with a known hierarchy.

    The fraction of child-feature occurrences (child and parent both active in the ground truth)
    on which the parent feature's latent does not fire, pooled over every (parent, child) pair:
    ``Σ misses / Σ occurrences``. An SAE whose child latents absorbed the parent direction leaves
    the parent latent silent exactly when a child fires, so this is 0 without absorption and near
    1 with full absorption. NaN if no child fired.

    Args:
        pairs: ``[n_pairs, 2]`` (parent, child) feature indices (see
            :func:`hierarchy_parent_child_pairs`).
        feature_to_latent: ``[n_features]`` latent of each feature (see
            :func:`match_features_to_latents`).

    """

    full_state_update = False
    higher_is_better = False
    is_differentiable = False

    occurrences: Tensor
    misses: Tensor
    pairs: Tensor
    parent_latents: Tensor

    def __init__(self, pairs: Tensor, feature_to_latent: Tensor, **kwargs) -> None:
        super().__init__(**kwargs)
        pairs = torch.as_tensor(pairs, dtype=torch.long)
        if pairs.ndim != 2 or pairs.shape[1] != 2 or pairs.shape[0] == 0:
            raise ValueError(f"pairs must be a non-empty [n_pairs, 2] tensor, got {pairs.shape}.")
        self.register_buffer("pairs", pairs, persistent=False)
        parent_latents = torch.as_tensor(feature_to_latent, dtype=torch.long)[pairs[:, 0]]
        self.register_buffer("parent_latents", parent_latents, persistent=False)
        n_pairs = pairs.shape[0]
        self.add_state("occurrences", torch.zeros(n_pairs, dtype=_F64), dist_reduce_fx="sum")
        self.add_state("misses", torch.zeros(n_pairs, dtype=_F64), dist_reduce_fx="sum")

    def update(self, feature_acts: Tensor, true_feature_acts: Tensor) -> None:
        """Count latents ``[N, d_sae]`` against the true feature activations ``[N, n_features]``."""
        true_acts = _flatten_tokens(true_feature_acts)
        occurred = (true_acts[:, self.pairs[:, 0]] > 0) & (true_acts[:, self.pairs[:, 1]] > 0)
        parent_silent = _flatten_tokens(feature_acts)[:, self.parent_latents] <= 0
        self.occurrences += occurred.sum(dim=0).to(_F64)
        self.misses += (occurred & parent_silent).sum(dim=0).to(_F64)

    def compute(self) -> Tensor:
        """Return the pooled absorption rate over every pair and token seen."""
        return self.misses.sum() / self.occurrences.sum()


@torch.no_grad()
def synthetic_absorption(
    encode: Callable[[Tensor], Tensor],
    decoder: Tensor,
    feature_dictionary: "FeatureDictionary",
    activation_generator: "ActivationGenerator",
    hierarchy: "HierarchyNode | Sequence[HierarchyNode]",
    n_tokens: int = 65_536,
    batch_size: int = 4_096,
) -> float:
    """Absorption of an SAE on fresh samples of a ``sae_lens.synthetic`` hierarchy.

    Matches features to latents by decoder cosine similarity, samples ``n_tokens`` true feature
    activations from ``activation_generator`` (built with ``hierarchy_modifier(hierarchy)``),
    maps them through ``feature_dictionary`` and counts parent-latent misses (:class:`Absorption`).

    Args:
        encode: Activations ``[N, d_in]`` -> latents ``[N, d_sae]`` (e.g. ``SAEModule.encode``).
        decoder: The SAE's ``W_dec`` ``[d_sae, d_in]``.
        feature_dictionary: Maps true feature activations to activations.
        activation_generator: Samples true feature activations under the hierarchy.
        hierarchy: The hierarchy roots the generator enforces.
        n_tokens: Tokens to evaluate (the global RNG draws them: seed it for repeatability).
        batch_size: Tokens per encoded batch.

    """
    metric = Absorption(
        hierarchy_parent_child_pairs(hierarchy),
        match_features_to_latents(feature_dictionary.feature_vectors, decoder),
    )
    for start in range(0, n_tokens, batch_size):
        true_acts = activation_generator.sample(min(batch_size, n_tokens - start))
        metric.update(encode(feature_dictionary(true_acts)), true_acts)
    return float(metric.compute())
