"""FastGatedTrainingSAE against sae-lens's GatedTrainingSAE (``sae_parity.TOLERANCES``)."""

import pytest
import torch
from sae_lens.saes.gated_sae import GatedTrainingSAE, GatedTrainingSAEConfig
from saes.sae_parity import assert_same_step, build_pair

from lightning_sae.saes import FastGatedTrainingSAE

D_IN, D_SAE = 16, 64


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("sparse", [True, False])
@pytest.mark.parametrize("apply_b_dec_to_input", [True, False])
def test_step_matches_sae_lens(dtype: torch.dtype, sparse: bool, apply_b_dec_to_input: bool):
    cfg = GatedTrainingSAEConfig(d_in=D_IN, d_sae=D_SAE, apply_b_dec_to_input=apply_b_dec_to_input)
    reference, fast = build_pair(GatedTrainingSAE, FastGatedTrainingSAE, cfg, dtype)
    fast.sparse_density_limit = 1.0 if sparse else 0.0
    x = torch.randn(32, D_IN, dtype=dtype)
    output = assert_same_step(reference, fast, x, coefficients={"l1": 0.7})
    assert output.feature_acts.layout == (torch.sparse_csr if sparse else torch.strided)
