"""The sparse JumpReLU training pass against sae-lens's ``JumpReLUTrainingSAE``.

Same weights and batch: losses, ``sae_out``, ``feature_acts`` (densified), ``hidden_pre`` and the
gradient of every parameter agree within ``sae_parity.TOLERANCES`` of the SAE's dtype; the
threshold is float32 in both classes (sae-lens keeps it so), so its gradient is compared at the
float32 tolerance. The thresholds sit at a high quantile of each latent's pre-activations, with a
wide kernel (ε 0.3), so the band holds entries below ``θ`` inside the kernel: their ``θ``-gradient
(``−(θ/ε)·∂f`` and ``−(1/ε)·∂L0``) is part of what is compared.
"""

import copy
import dataclasses
import math

import pytest
import torch
from sae_lens.saes.jumprelu_sae import JumpReLUTrainingSAE, JumpReLUTrainingSAEConfig
from sae_lens.saes.sae import TrainStepInput, TrainStepOutput
from saes.sae_parity import TOLERANCES, dense

from lightning_sae.metrics import active_counts
from lightning_sae.saes.jumprelu import AdaptiveJumpReLUTrainingSAE

D_IN, D_SAE, BATCH, BANDWIDTH = 16, 64, 128, 0.3


def build_reference(
    mode: str = "step",
    dtype: torch.dtype = torch.float64,
    quantile: float = 0.97,
    seed: int = 0,
    batch: int = BATCH,
    **options,
) -> tuple[JumpReLUTrainingSAE, torch.Tensor]:
    """sae-lens's SAE with generic weights, thresholds at ``quantile`` of its pre-activations."""
    torch.manual_seed(seed)
    target = {"target_l0": 4.0} if mode == "quadratic" else {}
    cfg = JumpReLUTrainingSAEConfig(
        d_in=D_IN,
        d_sae=D_SAE,
        dtype=str(dtype).removeprefix("torch."),
        jumprelu_sparsity_loss_mode=mode,
        jumprelu_bandwidth=BANDWIDTH,
        **(target | options),
    )
    sae = JumpReLUTrainingSAE(cfg)
    x = torch.randn(batch, D_IN, dtype=dtype)
    with torch.no_grad():
        sae.W_enc.mul_(10.0)  # pre-activations of order 1
        sae.b_enc.normal_(0.0, 0.1)
        sae.b_dec.normal_(0.0, 0.1)
        sae.W_dec.mul_(torch.rand(D_SAE, 1, dtype=dtype) + 0.5)  # uneven decoder norms
        hidden_pre = sae.encode_with_hidden_pre(x)[1]
        sae.threshold.copy_(hidden_pre.quantile(quantile, dim=0).clamp_min(0.05))
    return sae, x


def ours_of(reference: JumpReLUTrainingSAE, limit: float | None = None, **options):
    """Our SAE with ``reference``'s config and weights (``limit``: the sparse pass's limit)."""
    ours = AdaptiveJumpReLUTrainingSAE.from_sae_lens(reference, **options)
    if limit is not None:
        ours.sparse_density_limit = limit
    return ours


def run(sae: torch.nn.Module, x: torch.Tensor, coefficient: float = 0.7) -> TrainStepOutput:
    output = sae.training_forward_pass(
        TrainStepInput(
            sae_in=x,
            coefficients={"l0": coefficient},
            dead_neuron_mask=None,
            n_training_steps=0,
            is_logging_step=False,
        )
    )
    output.loss.backward()
    return output


def assert_same_pass(expected: TrainStepOutput, actual: TrainStepOutput, theirs, ours) -> None:
    """Every output and gradient of ours is sae-lens's, within the dtype's tolerance."""
    tolerance = TOLERANCES[expected.sae_out.dtype]
    assert actual.losses.keys() == expected.losses.keys()
    for name, value in expected.losses.items():
        torch.testing.assert_close(actual.losses[name], value, **tolerance, msg=name)
    torch.testing.assert_close(actual.loss, expected.loss, **tolerance)
    torch.testing.assert_close(actual.sae_out, expected.sae_out, **tolerance)
    torch.testing.assert_close(dense(actual.feature_acts), expected.feature_acts, **tolerance)
    torch.testing.assert_close(actual.hidden_pre, expected.hidden_pre.detach(), **tolerance)
    assert torch.equal(active_counts(actual.feature_acts), active_counts(expected.feature_acts))
    theirs_grads = {name: p.grad for name, p in theirs.named_parameters()}
    ours_grads = {name: p.grad for name, p in ours.named_parameters()}
    assert ours_grads.keys() == theirs_grads.keys()
    for name, grad in theirs_grads.items():
        close = TOLERANCES[grad.dtype]  # the threshold: float32 in both
        torch.testing.assert_close(ours_grads[name], grad, **close, msg=f"grad {name}")


def inactive_in_kernel(sae: JumpReLUTrainingSAE, x: torch.Tensor) -> torch.Tensor:
    """Entries below their threshold whose pseudo-gradient reaches ``θ``."""
    with torch.no_grad():
        hidden_pre = sae.encode_with_hidden_pre(x)[1]
        u = (hidden_pre - sae.threshold.to(hidden_pre.dtype)) / sae.bandwidth
    return (u > -0.5) & (u <= 0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("mode", ["step", "quadratic"])
@pytest.mark.parametrize("ste_to_input", [False, True])
@pytest.mark.parametrize("apply_b_dec_to_input", [True, False])
def test_sparse_pass_trains_as_sae_lens(dtype, mode, ste_to_input, apply_b_dec_to_input):
    theirs, x = build_reference(
        mode,
        dtype,
        jumprelu_ste_to_input=ste_to_input,
        apply_b_dec_to_input=apply_b_dec_to_input,
    )
    ours = ours_of(theirs)  # the default limit: 7% of the entries in the band
    below = inactive_in_kernel(theirs, x)
    assert below.sum() > D_SAE  # the θ-gradient of entries below θ matters
    expected, actual = run(theirs, x), run(ours, x)
    assert actual.feature_acts.layout == torch.sparse_csr  # the sparse pass ran
    assert (actual.feature_acts.values() == 0).any()  # band entries below θ are listed
    assert theirs.threshold.grad.abs().max() > 0
    assert_same_pass(expected, actual, theirs, ours)


def test_sparse_pass_with_the_controller_trains_as_sae_lens_with_its_coefficient():
    """The controller reads the sparse pass's per-token L0: λ·exp(s + k_i·e + k_p·e) as in the
    dense pass (the same controller state to the bit), and sae-lens's step at that λ."""
    theirs, x = build_reference(quantile=0.9)
    target = 4.0
    options = {
        "target_l0": target,
        "l0_controller_gain": 0.1,
        "l0_controller_proportional_gain": 2.0,
        "l0_controller_threshold_gain": 0.05,
    }
    ours = ours_of(theirs, limit=1.0, **options)  # 17% of the entries in the band
    dense_ours = ours_of(theirs, limit=0.0, **options)
    for sae in (ours, dense_ours):
        sae.log_l0_coefficient_scale.fill_(math.log(3.0))
    with torch.no_grad():
        l0 = (theirs.encode(x) > 0).sum(-1).double().mean()
    error = torch.log(l0 / target)
    assert abs(error) > 0.1
    coefficient = 0.5 * torch.exp(math.log(3.0) + 0.1 * error + 2.0 * error).item()
    expected = run(theirs, x, coefficient=coefficient)
    actual = run(ours, x, coefficient=0.5)
    assert actual.feature_acts.layout == torch.sparse_csr
    assert_same_pass(expected, actual, theirs, ours)
    dense_actual = run(dense_ours, x, coefficient=0.5)
    assert dense_actual.feature_acts.layout == torch.strided
    for name in ("log_l0_coefficient_scale", "log_threshold_step"):
        assert torch.equal(getattr(ours, name), getattr(dense_ours, name)), name
    torch.testing.assert_close(ours.log_l0_coefficient_scale, math.log(3.0) + 0.1 * error)


def test_sparse_pass_without_band_entries_trains_as_sae_lens():
    """Every threshold above every pre-activation: no entry at all, only ``b_dec`` decodes."""
    theirs, x = build_reference()
    with torch.no_grad():
        theirs.threshold.fill_(1e3)
    ours = ours_of(theirs)
    expected, actual = run(theirs, x), run(ours, x)
    assert actual.feature_acts.layout == torch.sparse_csr
    assert actual.feature_acts.values().numel() == 0
    assert_same_pass(expected, actual, theirs, ours)


@pytest.mark.parametrize(
    ("case", "options"),
    [
        ("dense band", {}),
        ("tanh", {"jumprelu_sparsity_loss_mode": "tanh"}),
        ("pre-act loss", {"pre_act_loss_coefficient": 0.3}),
    ],
)
def test_dense_pass_where_the_band_is_dense_or_the_losses_need_dense_tensors(case, options):
    """A band over the limit, or a sparsity loss over every entry: sae-lens's step, densely."""
    mode = options.pop("jumprelu_sparsity_loss_mode", "step")
    quantile = 0.5 if case == "dense band" else 0.97  # 59% / 7% of the entries in the band
    theirs, x = build_reference(mode, quantile=quantile, **options)
    ours = ours_of(theirs)
    expected, actual = run(theirs, x), run(ours, x)
    assert actual.feature_acts.layout == torch.strided
    assert_same_pass(expected, actual, theirs, ours)


def test_sparse_and_dense_passes_train_alike():
    """Three Adam steps with the moving thresholds and the controller: same weights either way."""
    theirs, x = build_reference(quantile=0.9)
    options = {
        "target_l0": 4.0,
        "l0_controller_gain": 0.1,
        "l0_controller_threshold_gain": 0.05,
        "jumprelu_threshold_lr_scale": 5.0,
    }
    saes = [ours_of(theirs, limit=limit, **options) for limit in (1.0, 0.0)]
    for sae in saes:
        optimizer = torch.optim.Adam(sae.parameters(), lr=1e-2)
        for _ in range(3):
            optimizer.zero_grad()
            run(sae, x)
            optimizer.step()
    sparse, dense_sae = saes
    states = copy.deepcopy(sparse.state_dict()), dense_sae.state_dict()
    for name, value in states[1].items():
        torch.testing.assert_close(states[0][name], value, **TOLERANCES[torch.float32], msg=name)


@pytest.mark.parametrize("ste_to_input", [False, True])
def test_l0_alone_backpropagates_as_sae_lens(ste_to_input):
    """sae-lens's aux-loss entry point: the L0 loss alone reaches ``θ`` (and ``π`` with
    ``ste_to_input``) as sae-lens's ``Step`` sends it (float64; ``θ`` float32)."""
    theirs, x = build_reference(jumprelu_ste_to_input=ste_to_input)
    ours = ours_of(theirs)
    step_input = TrainStepInput(
        sae_in=x,
        coefficients={"l0": 0.7},
        dead_neuron_mask=None,
        n_training_steps=0,
        is_logging_step=False,
    )
    hidden_pre = theirs.encode_with_hidden_pre(x)[1].detach()
    grads = []
    for sae in (theirs, ours):
        pre = hidden_pre.clone().requires_grad_()
        sae.calculate_aux_loss(step_input, None, pre, None)["l0_loss"].backward()
        grads.append((pre.grad, sae.threshold.grad))
    (theirs_pre, theirs_threshold), (ours_pre, ours_threshold) = grads
    assert theirs_threshold.abs().max() > 0
    torch.testing.assert_close(ours_threshold, theirs_threshold, **TOLERANCES[torch.float32])
    if ste_to_input:
        assert theirs_pre.abs().max() > 0
        torch.testing.assert_close(ours_pre, theirs_pre, **TOLERANCES[torch.float64])
    else:  # no gradient at all (not a dense zero one): sae-lens's ``Step`` returns None
        assert theirs_pre is None
        assert ours_pre is None


def test_sparse_pass_in_bfloat16_is_as_accurate_as_sae_lens():
    """A bf16 SAE (no autocast): the sparse pass runs in bf16, and its gradients are as close to
    the float64 step's as sae-lens's own bf16 step's are (relative error at most 1.1 times
    sae-lens's plus 1e-3; ``θ``'s and ``b_enc``'s, summed in float32 over ~300 entries per
    latent, at most 1.05 times: summed in bf16 they are 1.10 and 1.6 times)."""
    exact, x = build_reference(batch=4096)
    run(exact, x)
    cfg = dataclasses.replace(exact.cfg, dtype="bfloat16")
    theirs = JumpReLUTrainingSAE(cfg)
    state = {
        name: value.to(theirs.state_dict()[name].dtype)
        for name, value in exact.state_dict().items()
    }
    theirs.load_state_dict(state)
    ours = ours_of(theirs)
    expected, actual = run(theirs, x.bfloat16()), run(ours, x.bfloat16())
    assert actual.feature_acts.layout == torch.sparse_csr
    assert torch.equal(dense(actual.feature_acts), expected.feature_acts)
    for (name, truth), theirs_p, ours_p in zip(
        exact.named_parameters(), theirs.parameters(), ours.parameters(), strict=True
    ):

        def error(grad: torch.Tensor, truth: torch.Tensor = truth.grad) -> float:
            return float((grad.double() - truth).norm() / truth.norm())

        if name in ("threshold", "b_enc"):
            assert error(ours_p.grad) <= 1.05 * error(theirs_p.grad), name
        else:
            assert error(ours_p.grad) <= 1.1 * error(theirs_p.grad) + 1e-3, name


@pytest.mark.parametrize("ste_to_input", [False, True])
def test_sparse_pass_at_the_kernel_edges_trains_as_sae_lens(ste_to_input):
    """Exact (dyadic) pre-activations at ``θ ∈ {0, 0.5, 1, 2}`` plus ``u·ε`` for
    ``u ∈ {−1, −½, −¼, 0, ¼, ½, 1, 2}``: ties ``π = θ`` (inactive, inside the kernel), the kernel's
    open ends ``u = ±½`` (outside), negative ``π`` inside the kernel of ``θ = 0``, the band's
    edge ``u = −1``; every band entry in the first token, the others' L0 0 (float64)."""
    bandwidth = 0.25
    cfg = JumpReLUTrainingSAEConfig(
        d_in=8,
        d_sae=32,
        dtype="float64",
        jumprelu_bandwidth=bandwidth,
        apply_b_dec_to_input=False,
        jumprelu_ste_to_input=ste_to_input,
    )
    torch.manual_seed(0)
    theirs = JumpReLUTrainingSAE(cfg)
    thresholds = torch.tensor([0.0, 0.5, 1.0, 2.0]).repeat_interleave(8)
    offsets = torch.tensor([-1.0, -0.5, -0.25, 0.0, 0.25, 0.5, 1.0, 2.0]).repeat(4) * bandwidth
    with torch.no_grad():
        theirs.threshold.copy_(thresholds)
        theirs.W_enc.fill_(-1.0)
        theirs.W_enc[0] = thresholds + offsets  # one-hot tokens: π is a row of W_enc, exactly
        theirs.b_enc.zero_()
        theirs.b_dec.normal_(0.0, 0.1)
    x = torch.eye(8, dtype=torch.float64)
    ours = ours_of(theirs)
    ours.sparse_density_limit = 1.0  # 11% of these few entries lie in the band
    expected, actual = run(theirs, x), run(ours, x)
    assert actual.feature_acts.layout == torch.sparse_csr
    crow = actual.feature_acts.crow_indices()
    assert crow[1] > 0 and (crow[1:] == crow[1]).all()  # token 0's entries only
    assert_same_pass(expected, actual, theirs, ours)


def test_sparse_pass_counts_more_than_256_active_latents_in_bfloat16():
    """A bf16 token with 600 active latents: its L0 is 600, as sae-lens's bf16 ``sum`` gives
    (counted in bf16 it would stop at 256, where ``256 + 1`` rounds back to 256)."""
    cfg = JumpReLUTrainingSAEConfig(
        d_in=2, d_sae=2048, dtype="bfloat16", jumprelu_bandwidth=0.25, apply_b_dec_to_input=False
    )
    theirs = JumpReLUTrainingSAE(cfg)
    with torch.no_grad():
        theirs.threshold.fill_(0.5)
        theirs.W_enc.fill_(-1.0)
        theirs.W_enc[0, :600] = 1.0
        theirs.b_enc.zero_()
    x = torch.zeros(16, 2, dtype=torch.bfloat16)
    x[0, 0] = x[1:, 1] = 1.0  # token 0 fires 600 latents, the others none
    ours = ours_of(theirs)
    expected, actual = run(theirs, x), run(ours, x)
    assert actual.feature_acts.layout == torch.sparse_csr
    assert active_counts(actual.feature_acts)[:-1].sum() == 600
    assert actual.losses["l0_loss"] == expected.losses["l0_loss"] == 0.7 * 600 / 16
