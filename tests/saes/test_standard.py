"""FastStandardTrainingSAE against sae-lens's StandardTrainingSAE (``sae_parity.TOLERANCES``)."""

import pytest
import torch
from sae_lens.saes.standard_sae import StandardTrainingSAE, StandardTrainingSAEConfig
from saes.sae_parity import assert_same_step, build_pair

from lightning_sae.saes import FastStandardTrainingSAE

D_IN, D_SAE = 16, 64


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("sparse", [True, False])
@pytest.mark.parametrize("lp_norm", [1.0, 2.0])
@pytest.mark.parametrize("apply_b_dec_to_input", [True, False])
def test_step_matches_sae_lens(
    dtype: torch.dtype, sparse: bool, lp_norm: float, apply_b_dec_to_input: bool
):
    cfg = StandardTrainingSAEConfig(
        d_in=D_IN, d_sae=D_SAE, lp_norm=lp_norm, apply_b_dec_to_input=apply_b_dec_to_input
    )
    reference, fast = build_pair(StandardTrainingSAE, FastStandardTrainingSAE, cfg, dtype)
    fast.sparse_density_limit = 1.0 if sparse else 0.0
    x = torch.randn(32, D_IN, dtype=dtype)
    output = assert_same_step(reference, fast, x, coefficients={"l1": 0.7})
    # The sparse path needs lp_norm 1 (a sum over the active entries).
    expected_layout = torch.sparse_csr if sparse and lp_norm == 1 else torch.strided
    assert output.feature_acts.layout == expected_layout
