"""ATMTrainingSAE: registration, validation, EMAs by hand, masking statistics, inference export."""

import importlib
import json

import pytest
import torch
from sae_lens.registry import get_sae_training_class
from sae_lens.saes.sae import TrainStepInput
from sae_lens.saes.standard_sae import StandardSAEConfig
from safetensors.torch import load_file

import lightning_sae.saes.atm as atm_module
from lightning_sae.saes import ATMTrainingSAE, ATMTrainingSAEConfig


def build_sae(d_in: int = 4, d_sae: int = 6, **kwargs) -> ATMTrainingSAE:
    return ATMTrainingSAE(ATMTrainingSAEConfig(d_in=d_in, d_sae=d_sae, **kwargs))


def train_pass(sae: ATMTrainingSAE, x: torch.Tensor, step: int = 10_000):
    return sae.training_forward_pass(
        TrainStepInput(
            sae_in=x,
            coefficients={"l1": 1.0},
            dead_neuron_mask=None,
            n_training_steps=step,
            is_logging_step=False,
        )
    )


def always_firing(sae: ATMTrainingSAE, value: float = 1.0) -> None:
    """W_enc = 0, b_enc = value, b_dec = 0: every latent fires with ``value`` on every token."""
    with torch.no_grad():
        sae.W_enc.zero_()
        sae.b_enc.fill_(value)
        sae.b_dec.zero_()


def test_registered_under_atm_and_reimport_is_harmless():
    assert get_sae_training_class("atm") == (ATMTrainingSAE, ATMTrainingSAEConfig)
    importlib.reload(atm_module)  # registers again only if absent: no "already registered"
    assert get_sae_training_class("atm")[0].__name__ == "ATMTrainingSAE"
    cfg = ATMTrainingSAEConfig(d_in=4, d_sae=6)
    assert cfg.get_inference_config_class() is StandardSAEConfig
    assert cfg.get_inference_sae_cfg_dict()["architecture"] == "standard"


@pytest.mark.parametrize(
    ("field", "value", "match"),
    [
        ("atm_ema_decay", 0.0, r"atm_ema_decay must be in \(0, 1\)"),
        ("atm_ema_decay", 1.0, r"atm_ema_decay must be in \(0, 1\)"),
        ("atm_ema_decay", float("nan"), "atm_ema_decay must be a finite number"),
        ("atm_mask_rate", 0.0, r"atm_mask_rate \(r\) must be > 0"),
        ("atm_mask_rate", -1.0, r"atm_mask_rate \(r\) must be > 0"),
        ("atm_mask_rate", float("inf"), "atm_mask_rate must be a finite number"),
        ("atm_threshold_c", float("nan"), "atm_threshold_c must be a finite number"),
        ("atm_magnitude_weight", -0.5, "atm_magnitude_weight must be >= 0"),
        ("atm_warm_up_steps", -1, "atm_warm_up_steps must be an integer >= 0"),
        ("atm_warm_up_steps", 2.5, "atm_warm_up_steps must be an integer >= 0"),
        ("atm_mask_granularity", "sequence", "atm_mask_granularity must be 'token' or 'batch'"),
    ],
)
def test_invalid_hyper_parameters_fail_at_construction(field, value, match):
    with pytest.raises(ValueError, match=match):
        ATMTrainingSAEConfig(d_in=4, d_sae=6, **{field: value})


def test_all_zero_weights_are_rejected():
    with pytest.raises(ValueError, match="At least one of atm_magnitude_weight"):
        ATMTrainingSAEConfig(
            d_in=4,
            d_sae=6,
            atm_magnitude_weight=0.0,
            atm_frequency_weight=0.0,
            atm_contribution_weight=0.0,
        )


def test_emas_match_a_hand_computation():
    sae = build_sae(d_in=2, d_sae=3, atm_ema_decay=0.9)
    with torch.no_grad():
        sae.W_dec.copy_(torch.tensor([[3.0, 4.0], [1.0, 0.0], [0.0, 2.0]]))  # norms 5, 1, 2
    first = torch.tensor([[1.0, 0.0, 2.0], [3.0, 0.0, 0.0]])
    second = torch.tensor([[0.0, 4.0, 0.0], [2.0, 0.0, 0.0], [1.0, 0.0, 6.0], [0.0, 0.0, 0.0]])
    sae.update_statistics(first)
    sae.update_statistics(second)
    # Batch values (magnitude = mean where fired, frequency, contribution = mean f_i * |W_dec,i|):
    # first:  magnitude [2, 0, 2],   frequency [1, 0, .5],    contribution [10, 0, 2]
    # second: magnitude [1.5, 4, 6], frequency [.5, .25, .25], contribution [3.75, 1, 3]
    # ema = 0.9 * (0.1 * first) + 0.1 * second
    expected = {
        "ema_magnitude": [0.09 * 2 + 0.1 * 1.5, 0.1 * 4, 0.09 * 2 + 0.1 * 6],
        "ema_frequency": [0.09 * 1 + 0.1 * 0.5, 0.1 * 0.25, 0.09 * 0.5 + 0.1 * 0.25],
        "ema_contribution": [0.09 * 10 + 0.1 * 3.75, 0.1 * 1, 0.09 * 2 + 0.1 * 3],
    }
    for name, values in expected.items():
        buffer = getattr(sae, name)
        assert buffer.dtype == torch.float32
        torch.testing.assert_close(buffer, torch.tensor(values))


def set_statistics(sae: ATMTrainingSAE, magnitude, frequency, contribution) -> None:
    for name, values in zip(
        atm_module.ATM_STATISTICS, (magnitude, frequency, contribution), strict=True
    ):
        getattr(sae, name).copy_(torch.tensor(values))


def test_importance_threshold_and_probability_by_hand():
    sae = build_sae(
        d_sae=4,
        atm_magnitude_weight=1.0,
        atm_frequency_weight=0.0,
        atm_contribution_weight=3.0,
        atm_threshold_c=0.5,
        atm_mask_rate=2.0,
    )
    set_statistics(sae, [1.0, 2.0, 3.0, 2.0], [9.0, 9.0, 9.0, 9.0], [0.0, 1.0, 1.0, 2.0])
    # Normalised by their means (2 and 1): magnitude [.5, 1, 1.5, 1], contribution [0, 1, 1, 2].
    importance = (torch.tensor([0.5, 1.0, 1.5, 1.0]) + 3 * torch.tensor([0.0, 1.0, 1.0, 2.0])) / 4
    torch.testing.assert_close(sae.importance(), importance)
    theta = importance.mean() + 0.5 * importance.std(correction=0)
    expected = torch.where(
        importance < theta, 1 - torch.exp(-2.0 * (theta - importance) / theta), 0.0
    )
    torch.testing.assert_close(sae.masking_probability(), expected)
    assert expected[3] == 0 and (expected[:3] > 0).all()


def test_no_statistics_means_no_masking():
    sae = build_sae()
    assert torch.equal(sae.masking_probability(), torch.zeros(6))


@pytest.mark.parametrize("granularity", ["token", "batch"])
def test_masking_rates_match_the_formula(granularity):
    torch.manual_seed(0)
    sae = build_sae(
        d_sae=8, atm_threshold_c=0.0, atm_mask_rate=3.0, atm_mask_granularity=granularity
    )
    always_firing(sae)
    magnitude = [0.1, 0.3, 0.5, 0.7, 1.5, 1.6, 1.7, 1.6]
    set_statistics(sae, magnitude, magnitude, magnitude)
    probability = sae.masking_probability()
    below = probability > 0
    assert below.tolist() == [True] * 4 + [False] * 4
    tokens, passes = (20_000, 1) if granularity == "token" else (2, 1_500)
    statistics = {name: getattr(sae, name).clone() for name in atm_module.ATM_STATISTICS}
    masked = torch.zeros(8)
    for _ in range(passes):
        for name, value in statistics.items():  # hold I fixed across passes
            getattr(sae, name).copy_(value)
        acts = train_pass(sae, torch.zeros(tokens, 4)).feature_acts
        if granularity == "batch":  # one decision per latent for the whole batch
            assert ((acts == 0).all(0) | (acts == 1).all(0)).all()
        masked += (acts == 0).float().sum(0)
    n = tokens * passes if granularity == "token" else passes
    rate = masked / (tokens * passes)
    # Binomial tolerance: 5 standard deviations of the observed rate.
    tolerance = 5 * torch.sqrt(probability * (1 - probability) / n)
    assert (rate - probability).abs().le(tolerance).all(), (rate, probability)
    assert (rate[~below] == 0).all()  # above the threshold: never masked


def test_masking_only_in_training_mode_after_warm_up():
    torch.manual_seed(0)
    sae = build_sae(d_sae=8, atm_warm_up_steps=5, atm_mask_rate=5.0)
    always_firing(sae)
    set_statistics(sae, [0.1] * 4 + [1.0] * 4, [0.1] * 4 + [1.0] * 4, [0.1] * 4 + [1.0] * 4)
    x = torch.zeros(256, 4)
    assert (train_pass(sae, x, step=4).feature_acts == 1).all()  # warm-up
    assert (train_pass(sae, x, step=5).feature_acts == 0).any()  # masking on
    sae.eval()
    before = sae.ema_frequency.clone()
    assert (train_pass(sae, x, step=5).feature_acts == 1).all()
    assert torch.equal(sae.ema_frequency, before)  # eval passes leave the EMAs alone
    assert (sae.encode(x) == 1).all()
    sae.train()
    assert (sae.encode(x) == 1).all()  # outside training_forward_pass: never masked


def test_emas_see_unmasked_activations():
    torch.manual_seed(0)
    sae = build_sae(d_sae=8, atm_warm_up_steps=0, atm_mask_rate=5.0, atm_ema_decay=0.5)
    always_firing(sae, value=2.0)
    set_statistics(sae, [0.1] * 4 + [1.0] * 4, [0.1] * 4 + [1.0] * 4, [0.1] * 4 + [1.0] * 4)
    output = train_pass(sae, torch.zeros(64, 4))
    assert (output.feature_acts[:, :4] == 0).any()
    # frequency: 0.5 * old + 0.5 * 1 whether or not the latent was masked.
    torch.testing.assert_close(sae.ema_frequency, torch.tensor([0.55] * 4 + [1.0] * 4))


def test_masked_pass_loss_and_gradients_are_finite():
    torch.manual_seed(0)
    sae = build_sae(d_in=8, d_sae=16, atm_warm_up_steps=0)
    x = torch.randn(128, 8)
    train_pass(sae, x)  # fills the EMAs
    output = train_pass(sae, x)
    assert set(output.losses) == {"mse_loss", "l1_loss"}
    output.loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in sae.parameters())
    assert torch.isfinite(output.loss)


def test_inference_export_is_a_standard_sae_without_atm_buffers(tmp_path):
    sae = build_sae()
    train_pass(sae, torch.randn(32, 4))
    assert set(atm_module.ATM_STATISTICS) <= set(sae.state_dict())  # kept in checkpoints
    weights_path, cfg_path = sae.save_inference_model(tmp_path)
    assert set(load_file(weights_path)) == {"W_enc", "W_dec", "b_enc", "b_dec"}
    cfg = json.loads(cfg_path.read_text())
    assert cfg["architecture"] == "standard"
    assert cfg["metadata"]["training_architecture"] == "atm"
