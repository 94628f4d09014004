"""AdaptiveJumpReLUTrainingSAE: sae-lens parity, the fast threshold, the data start, the controller.

The synthetic set is issue 10's: 96 unit feature directions in 32 dimensions (sae-lens
``FeatureDictionary``), each firing with p = 0.04 (about 3.8 per token), d_sae 128, batch 1024.
"""

import copy
import math

import pytest
import torch
from helpers import quiet_trainer
from sae_lens.saes.jumprelu_sae import JumpReLUTrainingSAE, JumpReLUTrainingSAEConfig
from sae_lens.saes.sae import TrainStepInput
from sae_lens.synthetic import ActivationGenerator, FeatureDictionary
from torch.utils.data import DataLoader, IterableDataset

from lightning_sae import JumpReLUSAE
from lightning_sae.saes.jumprelu import (
    MAX_LOG_SCALE,
    AdaptiveJumpReLUTrainingSAE,
    AdaptiveJumpReLUTrainingSAEConfig,
)

D_IN, D_SAE = 8, 32


def reference(mode: str = "step", seed: int = 0, **kwargs) -> JumpReLUTrainingSAE:
    """sae-lens's own training SAE, with non-trivial biases and thresholds."""
    torch.manual_seed(seed)
    target = {"target_l0": 4.0} if mode == "quadratic" else {}
    cfg = JumpReLUTrainingSAEConfig(
        d_in=D_IN, d_sae=D_SAE, jumprelu_sparsity_loss_mode=mode, **(target | kwargs)
    )
    sae = JumpReLUTrainingSAE(cfg)
    with torch.no_grad():
        sae.W_enc.mul_(20.0)  # pre-activations of order 1, so thresholds matter
        sae.b_enc.normal_(0.0, 0.1)
        sae.b_dec.normal_(0.0, 0.1)
        sae.threshold.uniform_(0.0, 0.4)
    return sae


def step_input(
    x: torch.Tensor, coefficient: float = 0.7, dead: torch.Tensor | None = None
) -> TrainStepInput:
    return TrainStepInput(
        sae_in=x,
        coefficients={"l0": coefficient},
        dead_neuron_mask=dead,
        n_training_steps=0,
        is_logging_step=False,
    )


def grads(sae: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.grad.clone() for name, p in sae.named_parameters()}


@pytest.mark.parametrize("mode", ["step", "tanh", "quadratic"])
@pytest.mark.parametrize("anthropic", [False, True], ids=["deepmind", "ste_to_input+pre_act"])
def test_default_config_trains_as_sae_lens(mode, anthropic):
    """Same weights and batch: the fused pass gives sae-lens's losses, outputs and gradients.

    Losses and outputs are bit-identical; gradients agree to float32 rounding (rtol 1e-5,
    atol 1e-6): the threshold's two pseudo-gradient terms are summed in another order.
    """
    options = {"jumprelu_ste_to_input": True, "pre_act_loss_coefficient": 0.3} if anthropic else {}
    theirs = reference(mode, **options)
    ours = AdaptiveJumpReLUTrainingSAE.from_sae_lens(theirs)
    x = torch.randn(64, D_IN)
    dead = torch.arange(D_SAE) % 3 == 0
    out_theirs = theirs.training_forward_pass(step_input(x, dead=dead))
    out_ours = ours.training_forward_pass(step_input(x, dead=dead))
    out_theirs.loss.backward()
    out_ours.loss.backward()
    assert 0 < (out_ours.feature_acts > 0).float().mean() < 1  # thresholds do cut
    assert set(out_ours.losses) == set(out_theirs.losses)
    for name, value in out_theirs.losses.items():
        torch.testing.assert_close(out_ours.losses[name], value, rtol=0, atol=0, msg=name)
    torch.testing.assert_close(out_ours.loss, out_theirs.loss, rtol=0, atol=0)
    torch.testing.assert_close(out_ours.feature_acts, out_theirs.feature_acts, rtol=0, atol=0)
    torch.testing.assert_close(out_ours.sae_out, out_theirs.sae_out, rtol=0, atol=0)
    ours_grads, theirs_grads = grads(ours), grads(theirs)
    assert set(ours_grads) == set(theirs_grads)
    assert theirs_grads["threshold"].abs().max() > 0  # the kernel caught some entries
    for name, grad in theirs_grads.items():
        torch.testing.assert_close(ours_grads[name], grad, rtol=1e-5, atol=1e-6, msg=name)
    # Inference-mode encoding and sae-lens's aux-loss entry point agree too.
    torch.testing.assert_close(ours.encode(x), theirs.encode(x), rtol=0, atol=0)
    hidden_pre = out_theirs.hidden_pre.detach()
    aux = ours.calculate_aux_loss(step_input(x, dead=dead), out_ours.feature_acts, hidden_pre, None)
    torch.testing.assert_close(aux["l0_loss"], out_theirs.losses["l0_loss"], rtol=0, atol=0)


def batch_error(sae: JumpReLUTrainingSAE, x: torch.Tensor, target: float) -> torch.Tensor:
    """The controller's error ``log(L0 / target)`` on ``x``, from sae-lens's own encoding."""
    l0 = (sae.encode(x) > 0).sum(-1).double().mean()
    return torch.log(l0 / target)


def test_controlled_coefficient_is_sae_lens_loss_with_scaled_lambda():
    """λ·exp(s + k_i·e + k_p·e): the integral steps first, the proportional term is this batch's."""
    theirs = reference()
    ours = AdaptiveJumpReLUTrainingSAE.from_sae_lens(
        theirs, target_l0=4.0, l0_controller_gain=0.1, l0_controller_proportional_gain=2.0
    )
    ours.log_l0_coefficient_scale.fill_(math.log(3.0))
    x = torch.randn(64, D_IN)
    error = batch_error(theirs, x, 4.0)
    assert abs(error) > 0.1
    coefficient = 0.5 * torch.exp(math.log(3.0) + 0.1 * error + 2.0 * error).item()
    out_ours = ours.training_forward_pass(step_input(x, coefficient=0.5))
    out_theirs = theirs.training_forward_pass(step_input(x, coefficient=coefficient))
    torch.testing.assert_close(out_ours.loss, out_theirs.loss, rtol=1e-6, atol=0)
    torch.testing.assert_close(
        ours.log_l0_coefficient_scale, math.log(3.0) + 0.1 * error, rtol=1e-12, atol=0
    )


def test_threshold_learns_lr_scale_times_faster():
    """With SGD, m times sae-lens's threshold step; every other parameter moves alike."""
    m, lr = 7.0, 0.05
    theirs = reference()
    ours = AdaptiveJumpReLUTrainingSAE.from_sae_lens(theirs, jumprelu_threshold_lr_scale=m)
    start = copy.deepcopy(theirs.state_dict())
    opt_theirs = torch.optim.SGD(
        [
            {"params": [p for n, p in theirs.named_parameters() if n != "threshold"], "lr": lr},
            {"params": [theirs.threshold], "lr": m * lr},
        ]
    )
    opt_ours = torch.optim.SGD(ours.parameters(), lr=lr)
    x = torch.randn(64, D_IN)
    for sae, opt in ((theirs, opt_theirs), (ours, opt_ours)):
        sae.training_forward_pass(step_input(x)).loss.backward()
        opt.step()
    ours.training_forward_pass(step_input(x))  # the next pass applies the m-fold step
    assert not torch.equal(theirs.threshold, start["threshold"])
    for name, value in theirs.state_dict().items():
        torch.testing.assert_close(ours.state_dict()[name], value, rtol=1e-6, atol=1e-7)


def test_threshold_step_is_scaled_only_in_training_mode():
    sae = AdaptiveJumpReLUTrainingSAE.from_sae_lens(reference(), jumprelu_threshold_lr_scale=5.0)
    with torch.no_grad():
        sae.threshold.add_(0.01)  # as if the optimiser had moved it
    moved = sae.threshold.detach().clone()
    sae.eval()
    sae.training_forward_pass(step_input(torch.randn(8, D_IN)))
    torch.testing.assert_close(sae.threshold.detach(), moved)


def test_initialize_from_batch_starts_at_the_target_l0():
    cfg = AdaptiveJumpReLUTrainingSAEConfig(
        d_in=D_IN, d_sae=D_SAE, target_l0=4.0, jumprelu_threshold_init_from_data=True
    )
    torch.manual_seed(0)
    sae = AdaptiveJumpReLUTrainingSAE(cfg)
    x = torch.randn(4096, D_IN) * 3 + 5  # a large mean, as residual streams have
    sae.initialize_from_batch(x)
    torch.testing.assert_close(sae.b_dec.detach(), x.mean(dim=0))
    torch.testing.assert_close(sae.previous_threshold, sae.threshold.detach())
    active = (sae.encode(x) > 0).float()
    assert active.sum(dim=-1).mean().item() == pytest.approx(4.0, rel=0.01)
    # Every latent fires on its share of the tokens: none starts dead.
    torch.testing.assert_close(
        active.mean(dim=0), torch.full((D_SAE,), 4.0 / D_SAE), rtol=0, atol=1e-3
    )


def test_initialize_from_batch_keeps_a_trained_decoder_bias():
    sae = AdaptiveJumpReLUTrainingSAE.from_sae_lens(
        reference(), target_l0=4.0, jumprelu_threshold_init_from_data=True
    )
    b_dec = sae.b_dec.detach().clone()
    sae.initialize_from_batch(torch.randn(1024, D_IN) + 5)
    torch.testing.assert_close(sae.b_dec.detach(), b_dec)


def test_initialize_from_batch_is_a_no_op_without_the_option():
    sae = AdaptiveJumpReLUTrainingSAE.from_sae_lens(reference(), target_l0=4.0)
    state = copy.deepcopy(sae.state_dict())
    sae.initialize_from_batch(torch.randn(256, D_IN))
    for name, value in state.items():
        assert torch.equal(sae.state_dict()[name], value), name


def test_controller_moves_lambda_toward_the_target_and_is_bounded():
    sae = AdaptiveJumpReLUTrainingSAE.from_sae_lens(
        reference(), target_l0=1.0, l0_controller_gain=0.5
    )
    x = torch.randn(64, D_IN)
    error = batch_error(sae, x, 1.0).clamp(max=math.log(10.0))
    assert error > 0  # L0 above the target: the controller raises λ
    sae.training_forward_pass(step_input(x))
    torch.testing.assert_close(sae.log_l0_coefficient_scale, 0.5 * error)
    for _ in range(200):
        sae.training_forward_pass(step_input(x))
    assert sae.log_l0_coefficient_scale.item() == pytest.approx(MAX_LOG_SCALE)
    sae.cfg.target_l0 = float(D_SAE)  # far above: λ falls
    sae.training_forward_pass(step_input(x))
    assert sae.log_l0_coefficient_scale.item() < MAX_LOG_SCALE
    sae.eval()  # an evaluation pass leaves the integral alone
    before = sae.log_l0_coefficient_scale.clone()
    sae.training_forward_pass(step_input(x))
    assert torch.equal(sae.log_l0_coefficient_scale, before)
    assert AdaptiveJumpReLUTrainingSAE.rank_averaged_state == (
        "log_l0_coefficient_scale",
        "log_threshold_step",
    )


def test_controller_scales_every_threshold_on_the_next_pass_without_extrapolating_it():
    """θ ← (θ_prev + m·δ)·exp(g·e) at the start of the next training pass (δ the optimiser's
    step): the optimiser's step is extrapolated m-fold, the controller's common step is not."""
    gain, m, x = 0.1, 5.0, torch.randn(64, D_IN)
    theirs = reference()
    target = 0.5 * (theirs.encode(x) > 0).sum(-1).float().mean().item()  # e = log 2, unclipped
    sae = AdaptiveJumpReLUTrainingSAE.from_sae_lens(
        theirs, target_l0=target, l0_controller_threshold_gain=gain, jumprelu_threshold_lr_scale=m
    )
    start = sae.threshold.detach().clone()
    error = batch_error(sae, x, target)
    torch.testing.assert_close(error.item(), math.log(2.0))
    sae.training_forward_pass(step_input(x))
    torch.testing.assert_close(sae.threshold.detach(), start)  # used as it was by this pass
    torch.testing.assert_close(sae.log_threshold_step, gain * error)
    delta = torch.linspace(0.0, 0.02, D_SAE)
    with torch.no_grad():
        sae.threshold.add_(delta)  # as if the optimiser had moved it
    sae.training_forward_pass(step_input(x))
    raised = (start + m * delta) * torch.exp(gain * error).float()
    torch.testing.assert_close(sae.threshold.detach(), raised)
    torch.testing.assert_close(sae.previous_threshold, raised)  # not an optimiser step
    second_error = batch_error(sae, x, target)  # what the second pass saw
    assert second_error < error  # raised thresholds: fewer latents fire
    assert sae.log_l0_coefficient_scale.item() == 0.0  # the coefficient's gains are 0
    sae.eval()  # an evaluation pass neither moves the thresholds nor sets a step
    sae.training_forward_pass(step_input(x))
    torch.testing.assert_close(sae.threshold.detach(), raised)
    sae.train()
    sae.training_forward_pass(step_input(x))
    torch.testing.assert_close(
        sae.threshold.detach(), raised * torch.exp(gain * second_error).float()
    )


def test_state_round_trips_and_exports_as_plain_jumprelu(tmp_path):
    sae = AdaptiveJumpReLUTrainingSAE.from_sae_lens(
        reference(),
        target_l0=4.0,
        l0_controller_gain=0.1,
        l0_controller_threshold_gain=0.1,
        jumprelu_threshold_lr_scale=3.0,
    )
    sae.training_forward_pass(step_input(torch.randn(32, D_IN)))
    again = AdaptiveJumpReLUTrainingSAE(copy.deepcopy(sae.cfg))
    again.load_state_dict(sae.state_dict())  # a training checkpoint keeps our buffers
    for name in ("previous_threshold", "log_l0_coefficient_scale", "log_threshold_step"):
        assert getattr(sae, name).any(), name  # a real state, not the defaults
        assert torch.equal(getattr(again, name), getattr(sae, name)), name

    sae.save_inference_model(tmp_path)
    from sae_lens import SAE

    loaded = SAE.load_from_disk(tmp_path)
    assert loaded.cfg.architecture() == "jumprelu"
    assert set(loaded.state_dict()) == {"W_enc", "W_dec", "b_enc", "b_dec", "threshold"}
    # A plain sae-lens state loads strictly; θ_prev restarts at its θ (no spurious step).
    fresh = AdaptiveJumpReLUTrainingSAE(copy.deepcopy(sae.cfg))
    fresh.load_state_dict(loaded.state_dict())
    torch.testing.assert_close(fresh.previous_threshold, loaded.threshold.detach())
    assert fresh.log_l0_coefficient_scale.item() == fresh.log_threshold_step.item() == 0.0


def test_training_state_keeps_full_precision():
    sae = AdaptiveJumpReLUTrainingSAE.from_sae_lens(reference())
    sae.to(torch.bfloat16)
    assert sae.threshold.dtype == sae.previous_threshold.dtype == torch.float32
    assert sae.log_l0_coefficient_scale.dtype == sae.log_threshold_step.dtype == torch.float64


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"jumprelu_threshold_lr_scale": 0.5}, "jumprelu_threshold_lr_scale must be a number >= 1"),
        ({"l0_controller_gain": -0.1, "target_l0": 4.0}, "l0_controller_gain must be"),
        ({"l0_controller_proportional_gain": -1.0}, "l0_controller_proportional_gain must be"),
        ({"l0_controller_proportional_gain": 1.0}, "need target_l0"),
        ({"l0_controller_gain": 0.1}, "need target_l0"),
        ({"l0_controller_threshold_gain": -0.1}, "l0_controller_threshold_gain must be"),
        ({"l0_controller_threshold_gain": 0.1}, "need target_l0"),
        ({"jumprelu_threshold_init_from_data": True}, "need target_l0"),
        ({"target_l0": 0.0}, "0 < target_l0 <= d_sae"),
        ({"target_l0": D_SAE + 1.0}, "0 < target_l0 <= d_sae"),
    ],
)
def test_invalid_options_fail_at_construction(kwargs, match):
    with pytest.raises(ValueError, match=match):
        AdaptiveJumpReLUTrainingSAEConfig(d_in=D_IN, d_sae=D_SAE, **kwargs)


def test_module_passes_the_controller_options_and_turns_them_off_without_a_target():
    options = {
        "jumprelu_threshold_lr_scale": 7.0,
        "l0_controller_gain": 0.3,
        "l0_controller_proportional_gain": 2.0,
        "l0_controller_threshold_gain": 0.2,
        "jumprelu_threshold_init_from_data": True,
    }
    controlled = JumpReLUSAE(d_in=D_IN, d_sae=D_SAE, target_l0=4.0, **options).sae.cfg
    assert {name: getattr(controlled, name) for name in options} == options
    plain = JumpReLUSAE(d_in=D_IN, d_sae=D_SAE, **options).sae.cfg
    assert plain.jumprelu_threshold_lr_scale == 7.0
    assert not plain.controlled and not plain.jumprelu_threshold_init_from_data


# ---------------------------------------------------------------------------- through Trainer.fit
class IssueSet(IterableDataset):
    """Endless batches of issue 10's synthetic set (a fixed feature dictionary and seed)."""

    def __init__(self, batch_size: int = 1024, seed: int = 0) -> None:
        self.batch_size, self.seed = batch_size, seed
        self.dictionary = FeatureDictionary(96, 32, seed=seed)
        self.generator = ActivationGenerator(
            96, firing_probabilities=0.04, std_firing_magnitudes=0.2, mean_firing_magnitudes=1.0
        )

    def __iter__(self):
        torch.manual_seed(self.seed)
        while True:
            with torch.no_grad():
                yield self.dictionary(self.generator.sample(self.batch_size))

    def heldout(self, n_tokens: int = 8192) -> torch.Tensor:
        torch.manual_seed(self.seed + 1)
        with torch.no_grad():
            return self.dictionary(self.generator.sample(n_tokens))


def fit_l0(steps: int, **kwargs) -> float:
    """Train a JumpReLUSAE on the issue's set; return its L0 on held-out tokens."""
    data = IssueSet()
    module = JumpReLUSAE(d_in=32, d_sae=128, seed=0, **kwargs)
    quiet_trainer(max_steps=steps).fit(module, DataLoader(data, batch_size=None))
    with torch.no_grad():
        return (module.encode(data.heldout()) > 0).sum(-1).float().mean().item()


@pytest.mark.slow
@pytest.mark.parametrize("target", [2.0, 8.0])
def test_target_l0_is_reached_within_ten_percent(target):
    assert fit_l0(1000, target_l0=target) == pytest.approx(target, rel=0.1)


@pytest.mark.slow
def test_l0_coefficient_steers_l0():
    """Plain λ mode: λ ×10 clearly lowers L0 once the threshold can move."""
    low, high = fit_l0(600, l0_coefficient=1.0), fit_l0(600, l0_coefficient=10.0)
    assert high < 0.6 * low, (low, high)


FLOAT32_TOLERANCE = {"rtol": 1e-5, "atol": 1e-6}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(
    ("mode", "anthropic"),
    [("step", True), ("tanh", False), ("tanh", True)],
    ids=["step-ste_to_input+pre_act", "tanh-deepmind", "tanh-ste_to_input+pre_act"],
)
def test_sparse_decode_trains_as_sae_lens(monkeypatch, dtype, mode, anthropic):
    """Few latents near their thresholds, a loss that needs dense latents (``tanh``, the
    pre-activation loss): the dense pass's sparse decode gives sae-lens's step.

    Same weights and batch as sae-lens's ``training_forward_pass``: losses, outputs and every
    gradient agree within float rounding (float32: rtol 1e-5, atol 1e-6; float64: rtol 1e-12,
    atol 1e-14, but float32's for our threshold, kept float32), the decode summing in another
    order. Entries just below a threshold (inside the
    kernel) feed the threshold's gradient, so they are part of the sparse decode.
    """
    from lightning_sae.saes import kernels

    calls = []
    sparse_decode = kernels.SparseDecode.apply
    monkeypatch.setattr(
        kernels.SparseDecode, "apply", lambda *a: calls.append(a[0].shape[0]) or sparse_decode(*a)
    )
    options = {"jumprelu_ste_to_input": True, "pre_act_loss_coefficient": 0.3} if anthropic else {}
    theirs = reference(mode, jumprelu_bandwidth=0.3, **options).to(dtype)
    x = torch.randn(256, D_IN, dtype=dtype)
    with torch.no_grad():  # ~3% of the entries above θ - ε: thresholds at a high quantile
        hidden_pre = (x - theirs.b_dec) @ theirs.W_enc + theirs.b_enc
        theirs.threshold.copy_(hidden_pre.quantile(0.985, dim=0))
    ours = AdaptiveJumpReLUTrainingSAE.from_sae_lens(theirs).to(dtype)
    dead = torch.arange(D_SAE) % 3 == 0
    out_theirs = theirs.training_forward_pass(step_input(x, dead=dead))
    out_ours = ours.training_forward_pass(step_input(x, dead=dead))
    out_theirs.loss.backward()
    out_ours.loss.backward()
    assert calls and calls[0] < kernels.THRESHOLD_DECODE_DENSITY_LIMIT * x.shape[0] * D_SAE
    u = (hidden_pre - theirs.threshold) / theirs.bandwidth
    assert ((u > -0.5) & (u <= 0)).any()  # inactive entries inside the kernel
    tolerance = FLOAT32_TOLERANCE if dtype == torch.float32 else {"rtol": 1e-12, "atol": 1e-14}
    assert set(out_ours.losses) == set(out_theirs.losses)
    for name, value in out_theirs.losses.items():
        torch.testing.assert_close(out_ours.losses[name], value, **tolerance, msg=name)
    torch.testing.assert_close(out_ours.loss, out_theirs.loss, **tolerance)
    torch.testing.assert_close(out_ours.feature_acts, out_theirs.feature_acts, rtol=0, atol=0)
    torch.testing.assert_close(out_ours.sae_out, out_theirs.sae_out, **tolerance)
    ours_grads, theirs_grads = grads(ours), grads(theirs)
    assert set(ours_grads) == set(theirs_grads)
    assert theirs_grads["threshold"].abs().max() > 0
    for name, grad in theirs_grads.items():
        expected = grad.to(ours_grads[name].dtype)  # our threshold stays float32
        close = tolerance if expected.dtype == dtype else FLOAT32_TOLERANCE
        torch.testing.assert_close(ours_grads[name], expected, **close, msg=name)


def test_autocast_runs_sae_lens_lines(monkeypatch):
    """Under autocast the pass is sae-lens's own (the encoder product and the dense decode in
    autocast's dtype) even where few latents are near their thresholds: the same outputs and
    loss to the bit, never a float32 sparse decode."""
    from lightning_sae.saes import kernels

    calls = []
    sparse_decode = kernels.SparseDecode.apply
    monkeypatch.setattr(
        kernels.SparseDecode, "apply", lambda *a: calls.append(1) or sparse_decode(*a)
    )
    theirs = reference(jumprelu_bandwidth=0.3)
    x = torch.randn(256, D_IN)
    with torch.no_grad():  # ~3% of the entries above θ - ε: the sparse decode would pay
        hidden_pre = (x - theirs.b_dec) @ theirs.W_enc + theirs.b_enc
        theirs.threshold.copy_(hidden_pre.quantile(0.985, dim=0))
    ours = AdaptiveJumpReLUTrainingSAE.from_sae_lens(theirs)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out_theirs = theirs.training_forward_pass(step_input(x))
        out_ours = ours.training_forward_pass(step_input(x))
    assert not calls
    torch.testing.assert_close(out_ours.sae_out, out_theirs.sae_out, rtol=0, atol=0)
    torch.testing.assert_close(out_ours.loss, out_theirs.loss, rtol=0, atol=0)
