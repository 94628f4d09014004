"""FastMatryoshkaBatchTopKTrainingSAE against sae-lens's (``sae_parity.TOLERANCES``)."""

import pytest
import torch
from sae_lens.saes.matryoshka_batchtopk_sae import (
    MatryoshkaBatchTopKTrainingSAE,
    MatryoshkaBatchTopKTrainingSAEConfig,
)
from saes.sae_parity import assert_same_step, build_pair

from lightning_sae.saes import FastMatryoshkaBatchTopKTrainingSAE

D_IN, D_SAE = 16, 64


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("rescale", [True, False])
@pytest.mark.parametrize("level_aux", [True, False])
def test_step_matches_sae_lens(dtype: torch.dtype, rescale: bool, level_aux: bool):
    cfg = MatryoshkaBatchTopKTrainingSAEConfig(
        d_in=D_IN,
        d_sae=D_SAE,
        k=4,
        matryoshka_widths=[4, 24, 64],  # the first level is narrower than k_aux = 8
        rescale_acts_by_decoder_norm=rescale,
        use_matryoshka_aux_loss=level_aux,
    )
    reference, fast = build_pair(
        MatryoshkaBatchTopKTrainingSAE, FastMatryoshkaBatchTopKTrainingSAE, cfg, dtype
    )
    # Dead latents in the first and last levels only: the middle level's AuxK group is empty.
    dead = torch.zeros(D_SAE, dtype=torch.bool)
    dead[[1, 2, 3, 30, 40, 41, 50, 51, 52, 53, 60]] = True
    for mask in (None, dead):
        output = assert_same_step(reference, fast, torch.randn(32, D_IN, dtype=dtype), mask)
    assert set(output.losses) == {
        "mse_loss",
        "auxiliary_reconstruction_loss",
        "inner_mse_loss_4",
        "inner_mse_loss_24",
    }
    assert output.losses["auxiliary_reconstruction_loss"] > 0
