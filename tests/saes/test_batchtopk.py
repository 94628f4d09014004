"""FastBatchTopKTrainingSAE against sae-lens's BatchTopKTrainingSAE (``sae_parity.TOLERANCES``)."""

import pytest
import torch
from sae_lens.saes.batchtopk_sae import BatchTopKTrainingSAE, BatchTopKTrainingSAEConfig
from saes.sae_parity import assert_same_step, build_pair

from lightning_sae.saes import FastBatchTopKTrainingSAE

D_IN, D_SAE = 16, 64


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("rescale", [True, False])
@pytest.mark.parametrize("k", [4, 2.5])
def test_steps_and_threshold_match_sae_lens(dtype: torch.dtype, rescale: bool, k: float):
    cfg = BatchTopKTrainingSAEConfig(
        d_in=D_IN, d_sae=D_SAE, k=k, rescale_acts_by_decoder_norm=rescale, topk_threshold_lr=0.3
    )
    reference, fast = build_pair(BatchTopKTrainingSAE, FastBatchTopKTrainingSAE, cfg, dtype)
    dead = torch.arange(D_SAE) % 3 == 0
    for step in range(3):  # the threshold EMA compounds over steps
        x = torch.randn(32, D_IN, dtype=dtype)
        output = assert_same_step(reference, fast, x, dead if step else None)
        assert output.feature_acts.values().numel() == int(k * 32)
        assert output.metrics["topk_threshold"] is fast.topk_threshold
        # The hint for the next batch: this one's cut-off (the smallest kept activation).
        assert fast.cut_off_hint == output.feature_acts.values().min()
    assert fast.topk_threshold > 0
    assert "cut_off_hint" not in fast.state_dict()  # a speed hint, not state


def test_cut_off_hint_is_built_beside_the_weights():
    """An SAE built on a device (``cfg.device``) keeps its hint there: no host copy per step."""
    cfg = BatchTopKTrainingSAEConfig(d_in=D_IN, d_sae=D_SAE, k=4, device="meta")
    sae = FastBatchTopKTrainingSAE(cfg)
    assert sae.W_dec.device == sae.topk_threshold.device == torch.device("meta")
    assert sae.cut_off_hint.device == sae.W_dec.device


def test_outlier_tokens_extend_their_candidates():
    """A token with far more than 2k winners: the exactness check makes it list more."""
    cfg = BatchTopKTrainingSAEConfig(d_in=D_IN, d_sae=D_SAE, k=2)
    reference, fast = build_pair(BatchTopKTrainingSAE, FastBatchTopKTrainingSAE, cfg, torch.float64)
    x = torch.randn(32, D_IN, dtype=torch.float64)
    x[5] *= 40.0
    output = assert_same_step(reference, fast, x)
    winners_of_outlier = int((output.feature_acts.to_dense()[5] > 0).sum())
    assert winners_of_outlier > 2 * fast.candidates_per_k * cfg.k


def test_no_positive_activation_leaves_the_threshold_alone():
    cfg = BatchTopKTrainingSAEConfig(d_in=D_IN, d_sae=D_SAE, k=4, topk_threshold_lr=0.5)
    reference, fast = build_pair(BatchTopKTrainingSAE, FastBatchTopKTrainingSAE, cfg, torch.float32)
    for sae in (reference, fast):
        sae.topk_threshold.fill_(0.25)
        with torch.no_grad():
            sae.b_enc.fill_(-100.0)
    assert_same_step(reference, fast, torch.randn(16, D_IN))
    assert fast.topk_threshold.item() == 0.25


def test_fewer_than_one_winner_per_batch_fires_nothing():
    cfg = BatchTopKTrainingSAEConfig(d_in=D_IN, d_sae=D_SAE, k=0.01)
    reference, fast = build_pair(BatchTopKTrainingSAE, FastBatchTopKTrainingSAE, cfg, torch.float64)
    output = assert_same_step(reference, fast, torch.randn(32, D_IN, dtype=torch.float64))
    assert output.feature_acts.values().numel() == 0
