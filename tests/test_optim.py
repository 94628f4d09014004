import copy

import pytest
import torch
from lightning.fabric.plugins.precision.amp import _optimizer_handles_unscaling

from lightning_sae.optim import LRSchedule, fastest_adam, warm_up_coefficient


def test_cosine_with_decay_needs_a_floor():
    with pytest.raises(ValueError, match="lr_min_ratio > 0"):
        LRSchedule(total_steps=100, decay_steps=10, scheduler="cosine")
    schedule = LRSchedule(total_steps=100, decay_steps=10, scheduler="cosine", min_lr_ratio=0.1)
    assert schedule(89) == pytest.approx(0.1, abs=1e-3)
    assert schedule(99) == pytest.approx(0.01)


def test_decay_needs_the_run_length():
    with pytest.raises(ValueError, match="max_steps"):
        LRSchedule(total_steps=None, decay_steps=10)


def test_coefficient_warm_up_matches_sae_lens():
    assert [warm_up_coefficient(2.0, 4, step) for step in range(6)] == [0, 0.5, 1, 1.5, 2, 2]


def _adam_run(optimizer: torch.optim.Optimizer, steps: int) -> None:
    for step in range(steps):
        for group in optimizer.param_groups:
            for param in group["params"]:
                param.grad = torch.sin(param.detach() * (step + 1))
        optimizer.step()


def _params(dtype: torch.dtype) -> list[torch.nn.Parameter]:
    torch.manual_seed(0)
    return [torch.nn.Parameter(torch.randn(shape, dtype=dtype)) for shape in ((8, 16), (16,))]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_fastest_adam_is_fused_on_cpu_and_steps_like_torch_default(dtype):
    fast_params, reference_params = _params(dtype), _params(dtype)
    fast = fastest_adam([{"params": fast_params, "lr": 1e-2}])
    reference = torch.optim.Adam(reference_params, lr=1e-2, foreach=False)
    assert fast.param_groups[0]["fused"] is True
    _adam_run(fast, 5)
    _adam_run(reference, 5)
    # Same update rule: float rounding only (bf16: one unit in the last place of its 8 bits).
    tolerance = {torch.float32: 1e-6, torch.float64: 1e-12, torch.bfloat16: 1e-2}[dtype]
    for ours, theirs in zip(fast_params, reference_params, strict=True):
        torch.testing.assert_close(ours, theirs, rtol=tolerance, atol=tolerance)


def test_checkpoints_resume_across_adam_variants():
    """A for-loop Adam's checkpoint (older runs) resumes fused, and back, with the same steps."""
    reference_params = _params(torch.float32)
    reference = torch.optim.Adam(reference_params, lr=1e-2, foreach=False)
    _adam_run(reference, 3)
    saved = copy.deepcopy(reference.state_dict())

    fast_params = [torch.nn.Parameter(p.detach().clone()) for p in reference_params]
    fast = fastest_adam([{"params": fast_params, "lr": 1e-2}])
    fast.load_state_dict(saved)
    assert fast.param_groups[0]["fused"] is True  # the checkpoint's variant did not come back
    assert fast.state_dict()["state"][0]["step"].item() == 3
    _adam_run(fast, 2)
    _adam_run(reference, 2)
    for ours, theirs in zip(fast_params, reference_params, strict=True):
        torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-6)

    back = torch.optim.Adam([torch.nn.Parameter(p.detach().clone()) for p in fast_params], lr=1e-2)
    back.load_state_dict(fast.state_dict())
    assert back.state_dict()["state"][1]["step"].item() == 5


def test_fused_adam_leaves_fp16_unscaling_to_the_scaler():
    """Lightning unscales before clipping only when the optimizer does not unscale itself."""
    optimizer = fastest_adam([{"params": _params(torch.float32)}])
    assert not _optimizer_handles_unscaling(optimizer)
