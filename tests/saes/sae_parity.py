"""Parity of our training SAE classes with sae-lens's own: same weights, same batch, same step.

A fast training pass must give sae-lens's loss, per-loss terms, ``sae_out``, ``feature_acts``
(densified), ``hidden_pre`` and the gradient of every parameter, within ``TOLERANCES`` (float
rounding only: the fast passes sum in another order). Continuous random data, so no ties.
"""

import copy

import torch
from sae_lens.saes.sae import TrainingSAE, TrainingSAEConfig, TrainStepInput, TrainStepOutput

from lightning_sae.metrics import active_counts

#: Tolerances of every compared tensor (values are O(1)).
TOLERANCES = {
    torch.float32: {"rtol": 1e-4, "atol": 1e-5},
    torch.float64: {"rtol": 1e-10, "atol": 1e-12},
}


def build_pair(
    reference_class: type[TrainingSAE],
    fast_class: type[TrainingSAE],
    cfg: TrainingSAEConfig,
    dtype: torch.dtype,
    seed: int = 0,
) -> tuple[TrainingSAE, TrainingSAE]:
    """sae-lens's SAE with generic weights (non-zero biases, uneven decoder norms) and ours."""
    torch.manual_seed(seed)
    reference = reference_class(copy.deepcopy(cfg)).to(dtype)
    with torch.no_grad():
        for name, parameter in reference.named_parameters():
            if parameter.ndim == 1:
                parameter.normal_(0.0, 0.1 if name != "r_mag" else 0.3)
        reference.W_dec.mul_(torch.rand(cfg.d_sae, 1, dtype=dtype) + 0.5)
    fast = fast_class(copy.deepcopy(cfg)).to(dtype)
    fast.load_state_dict(reference.state_dict())
    return reference, fast


def training_pass(
    sae: TrainingSAE,
    x: torch.Tensor,
    dead: torch.Tensor | None = None,
    coefficients: dict[str, float] | None = None,
) -> TrainStepOutput:
    """One training pass and its backward (gradients accumulate on the parameters)."""
    output = sae.training_forward_pass(
        TrainStepInput(
            sae_in=x,
            coefficients=coefficients or {},
            dead_neuron_mask=dead,
            n_training_steps=0,
            is_logging_step=False,
        )
    )
    output.loss.backward()
    return output


def dense(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to_dense() if tensor.layout == torch.sparse_csr else tensor


def assert_same_step(
    reference: TrainingSAE,
    fast: TrainingSAE,
    x: torch.Tensor,
    dead: torch.Tensor | None = None,
    coefficients: dict[str, float] | None = None,
) -> TrainStepOutput:
    """Run both training passes on ``x`` and compare everything; return ours."""
    tolerance = TOLERANCES[x.dtype]
    expected = training_pass(reference, x, dead, coefficients)
    actual = training_pass(fast, x, dead, coefficients)
    torch.testing.assert_close(actual.loss, expected.loss, **tolerance)
    assert actual.losses.keys() == expected.losses.keys()
    for name, value in expected.losses.items():
        torch.testing.assert_close(actual.losses[name], value, **tolerance, msg=name)
    torch.testing.assert_close(actual.sae_out, expected.sae_out, **tolerance)
    torch.testing.assert_close(dense(actual.feature_acts), expected.feature_acts, **tolerance)
    torch.testing.assert_close(actual.hidden_pre, expected.hidden_pre.detach(), **tolerance)
    assert torch.equal(active_counts(actual.feature_acts), active_counts(expected.feature_acts))
    for (name, parameter), (_, ours) in zip(
        reference.named_parameters(), fast.named_parameters(), strict=True
    ):
        torch.testing.assert_close(ours.grad, parameter.grad, **tolerance, msg=f"grad {name}")
    # Our saved state is sae-lens's; a non-persistent buffer of ours (a speed hint) is not state.
    saved = fast.state_dict()
    assert {name for name, _ in reference.named_buffers()} == {
        name for name, _ in fast.named_buffers() if name in saved
    }
    for name, buffer in reference.named_buffers():
        torch.testing.assert_close(saved[name], buffer, **tolerance, msg=name)
    return actual
