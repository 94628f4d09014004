"""Feature absorption metric (lightning_sae.metrics) on hand-built cases and synthetic data.

Lives beside the ATM tests because absorption is how ATM is evaluated; the metric itself is
``lightning_sae.metrics.Absorption``.
"""

import pytest
import torch
from sae_lens.synthetic import (
    ActivationGenerator,
    FeatureDictionary,
    HierarchyNode,
    hierarchy_modifier,
)

from lightning_sae.metrics import (
    Absorption,
    hierarchy_parent_child_pairs,
    match_features_to_latents,
    synthetic_absorption,
)

ROOTS = [
    HierarchyNode(0, children=[HierarchyNode(1), HierarchyNode(2)]),
    HierarchyNode(None, children=[HierarchyNode(3, children=[HierarchyNode(4)])]),
]


def test_pairs_are_direct_edges_between_real_features():
    assert hierarchy_parent_child_pairs(ROOTS).tolist() == [[0, 1], [0, 2], [3, 4]]
    assert hierarchy_parent_child_pairs(ROOTS[0]).tolist() == [[0, 1], [0, 2]]
    assert hierarchy_parent_child_pairs(HierarchyNode(5)).shape == (0, 2)


def test_matching_picks_the_most_cosine_similar_decoder_row():
    features = torch.eye(3)
    decoder = torch.tensor([[0.0, 0.0, 5.0], [2.0, 0.1, 0.0], [0.1, 0.3, 0.0]])  # scale-free
    assert match_features_to_latents(features, decoder).tolist() == [1, 2, 0]


def test_absorption_on_a_hand_built_case():
    # Features 0 (parent) -> 1, 2 (children); feature f is latent 2 - f for f < 3 (reversed).
    pairs = torch.tensor([[0, 1], [0, 2]])
    metric = Absorption(pairs, feature_to_latent=torch.tensor([2, 1, 0]))
    true_acts = torch.tensor(
        [
            [1.0, 0.0, 0.0],  # parent alone: not a child occurrence
            [1.0, 1.0, 0.0],  # child 1, parent latent (2) fires  -> hit
            [1.0, 1.0, 0.0],  # child 1, parent latent silent     -> miss
            [1.0, 0.0, 1.0],  # child 2, parent latent silent     -> miss
            [0.0, 1.0, 0.0],  # child without parent: not counted
        ]
    )
    latents = torch.tensor(
        [[0.0, 0.0, 1.0], [0.0, 1.0, 0.5], [0.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]
    )
    metric.update(latents[:2], true_acts[:2])  # accumulates across batches
    metric.update(latents[2:], true_acts[2:])
    assert metric.compute().item() == pytest.approx(2 / 3)
    assert metric.occurrences.tolist() == [2, 1]
    assert metric.misses.tolist() == [1, 1]


def test_absorption_of_a_perfect_and_a_fully_absorbing_sae():
    torch.manual_seed(0)
    dictionary = FeatureDictionary(5, 8, seed=0)
    generator = ActivationGenerator(
        5, torch.tensor([0.3, 0.4, 0.4, 0.2, 0.5]), modify_activations=hierarchy_modifier(ROOTS)
    )
    decoder = dictionary.feature_vectors.detach()
    inverse = torch.linalg.pinv(decoder)

    def perfect(x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x @ inverse)

    def absorbing(x: torch.Tensor) -> torch.Tensor:
        latents = perfect(x)  # parents 0 and 3 go silent whenever one of their children fires
        latents[:, 0] *= (latents[:, 1:3] <= 1e-4).all(dim=1)
        latents[:, 3] *= latents[:, 4] <= 1e-4
        return latents

    args = (decoder, dictionary, generator, ROOTS)
    assert synthetic_absorption(perfect, *args, n_tokens=4096, batch_size=1000) == 0.0
    assert synthetic_absorption(absorbing, *args, n_tokens=4096, batch_size=1000) == 1.0


def test_bad_pairs_are_rejected():
    with pytest.raises(ValueError, match="non-empty"):
        Absorption(torch.zeros(0, 2, dtype=torch.long), torch.arange(3))
