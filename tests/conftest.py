"""Session fixtures of real sae-lens synthetic data (see ``helpers.py``)."""

import pytest
import torch
from helpers import build_feature_dictionary, synthetic_activations
from sae_lens.synthetic import FeatureDictionary

# The tests' matrices are tiny: one intra-op thread avoids oversubscribing a 2-core machine
# (about 10x faster under load, measured on a 30-step fit).
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def feature_dictionary() -> FeatureDictionary:
    return build_feature_dictionary()


@pytest.fixture(scope="session")
def synthetic_train(feature_dictionary: FeatureDictionary) -> torch.Tensor:
    return synthetic_activations(feature_dictionary, 32_768, seed=1)


@pytest.fixture(scope="session")
def synthetic_heldout(feature_dictionary: FeatureDictionary) -> torch.Tensor:
    return synthetic_activations(feature_dictionary, 8_192, seed=2)
