import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torchmetrics import MetricCollection

from lightning_sae.metrics import (
    L0,
    ExplainedVariance,
    FeatureDensity,
    NormalizedMSE,
    log10_feature_density,
)

X = torch.tensor([[1.0, 2.0], [3.0, -1.0], [0.0, 4.0]])
X_HAT = torch.tensor([[1.5, 2.0], [2.0, -1.0], [0.0, 3.0]])
ACTS = torch.tensor([[0.0, 1.0, 0.0, 2.0], [3.0, 0.0, 0.0, 1.0], [0.0, 0.0, 0.0, 5.0]])


def test_l0_hand_computation():
    metric = L0()
    metric.update(ACTS)
    assert metric.compute().item() == pytest.approx((2 + 2 + 1) / 3)


def test_explained_variance_hand_computation():
    # sse = 0.25 + 1 + 1 = 2.25; mean = (4/3, 5/3); sst = Σ‖x − mean‖².
    mean = X.mean(0)
    sst = ((X - mean) ** 2).sum().item()
    metric = ExplainedVariance(d_in=2)
    metric.update(X, X_HAT)
    assert metric.compute().item() == pytest.approx(1 - 2.25 / sst)


def test_normalized_mse_hand_computation():
    metric = NormalizedMSE(d_in=2)
    metric.update(X, X_HAT)
    assert metric.compute().item() == pytest.approx(2.25 / (X**2).sum().item())


def test_density_hand_computation():
    density = FeatureDensity(d_sae=4)
    density.update(ACTS)
    assert density.compute().tolist() == pytest.approx([1 / 3, 1 / 3, 0.0, 1.0])
    assert log10_feature_density(density.compute())[2].item() == pytest.approx(-10.0)


def test_batches_accumulate_to_the_dataset_value():
    torch.manual_seed(0)
    x = torch.randn(1000, 8) * 3 + 5  # large mean: a naive float32 variance loses digits
    x_hat = x + 0.3 * torch.randn_like(x)
    whole, parts = ExplainedVariance(8), ExplainedVariance(8)
    whole.update(x, x_hat)
    for xs, hs in zip(x.split(77), x_hat.split(77), strict=True):
        parts.update(xs, hs)
    x64, h64 = x.double().numpy(), x_hat.double().numpy()
    expected = 1 - ((x64 - h64) ** 2).sum() / ((x64 - x64.mean(0)) ** 2).sum()
    assert whole.compute().item() == pytest.approx(expected, rel=1e-12)
    assert parts.compute().item() == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("metric", [ExplainedVariance(3), NormalizedMSE(3)])
def test_reconstruction_update_leaves_its_inputs_alone(metric):
    # float64 (no cast, so a careless in-place error would overwrite x) and a transposed view
    x = torch.arange(12.0, dtype=torch.float64).reshape(3, 4).T
    x_hat = x + 0.5
    before = x.clone()
    metric.update(x, x_hat)
    assert torch.equal(x, before)
    error, squares = 12 * 0.25, (before**2).sum().item()
    if isinstance(metric, NormalizedMSE):
        assert metric.compute().item() == pytest.approx(error / squares, rel=1e-12)
    else:
        total = ((before - before.mean(0)) ** 2).sum().item()
        assert metric.compute().item() == pytest.approx(1 - error / total, rel=1e-12)


def test_collection_routes_keyword_arguments():
    collection = MetricCollection(
        {"l0": L0(), "ev": ExplainedVariance(2), "nmse": NormalizedMSE(2)}
    )
    collection.update(x=X, x_hat=X_HAT, feature_acts=ACTS)
    values = collection.compute()
    assert values["l0"].item() == pytest.approx(5 / 3)
    assert set(values) == {"l0", "ev", "nmse"}


def test_leading_dimensions_are_tokens():
    metric = L0()
    metric.update(ACTS.reshape(1, 3, 4))
    assert metric.compute().item() == pytest.approx(5 / 3)


@pytest.mark.parametrize(
    ("build", "message"),
    [(lambda: ExplainedVariance(0), "d_in"), (lambda: FeatureDensity(-1), "d_sae")],
)
def test_bad_sizes(build, message):
    with pytest.raises(ValueError, match=message):
        build()


def test_shape_mismatch():
    with pytest.raises(ValueError, match="same shape"):
        ExplainedVariance(2).update(X, X_HAT[:, :1])


@pytest.mark.slow
def test_two_processes_equal_one_process_on_the_union():
    """Real gloo process group, 2 ranks with different shard sizes, run as its own process."""
    script = Path(__file__).parent / "scripts" / "ddp_metrics.py"
    result = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stdout + result.stderr
    lines = [line for line in result.stdout.splitlines() if line.startswith("METRIC ")]
    assert len(lines) == 5, result.stdout
    for line in lines:
        _, name, distributed, single = line.split()
        np.testing.assert_allclose(float(distributed), float(single), rtol=1e-9, err_msg=name)


def test_shared_count_pass_equals_direct_updates():
    from lightning_sae.metrics import active_counts

    counts = active_counts(ACTS)
    assert counts.tolist() == [1, 1, 0, 3, 3]
    direct, shared = L0(), L0()
    direct.update(ACTS)
    shared.update(active_counts=counts)
    assert direct.compute() == shared.compute()
    density = FeatureDensity(4)
    density.update(active_counts=counts)
    assert density.compute().tolist() == pytest.approx([1 / 3, 1 / 3, 0.0, 1.0])
    with pytest.raises(ValueError, match="exactly one"):
        L0().update(ACTS, active_counts=counts)


def test_active_counts_of_sparse_csr_equal_dense_and_skip_stored_zeros():
    from lightning_sae.metrics import active_counts

    sparse = ACTS.to_sparse_csr()
    # Store an explicit zero (a selected latent whose ReLU is 0) in row 2, column 0.
    crow, cols, values = sparse.crow_indices(), sparse.col_indices(), sparse.values()
    crow = torch.cat([crow[:-1], crow[-1:] + 1])
    cols = torch.cat([cols[:-1], torch.tensor([0, 3])])
    values = torch.cat([values[:-1], torch.tensor([0.0, 5.0])])
    with_zero = torch.sparse_csr_tensor(crow, cols, values, ACTS.shape)
    assert torch.equal(with_zero.to_dense(), ACTS)
    assert with_zero.values().numel() == sparse.values().numel() + 1
    assert active_counts(with_zero).tolist() == active_counts(ACTS).tolist() == [1, 1, 0, 3, 3]
