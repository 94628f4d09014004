import pytest

from lightning_sae.optim import LRSchedule, warm_up_coefficient


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
