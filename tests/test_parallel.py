"""Latent-parallel and FSDP2 training on ``ModelParallelStrategy`` against one process.

``tests/scripts/model_parallel.py`` trains on two gloo processes (one pair of processes for all
runs: starting Python with torch, Lightning and sae-lens dominates their cost); each run here is
repeated in this process on the same batches and compared.

Tolerance: float32 weights after 6 Adam steps (lr 1e-2, clipped) agree to ``ATOL``/``RTOL``. The
two runs differ only in float summation order (the reconstruction is a sum of the ranks' partial
decodes; FSDP2 averages the ranks' gradients), ≤ 1.5e-8 per gradient step in float32 as the issue
measured; Adam's normalised steps carry such differences through, hence 1e-5.
"""

import subprocess
import sys
from pathlib import Path

import pytest
import sae_lens
import torch

sys.path.insert(0, str(Path(__file__).parent / "scripts"))
import model_parallel as mp

from lightning_sae import SAEModule

SCRIPT = Path(__file__).parent / "scripts" / "model_parallel.py"
ATOL, RTOL = 1e-5, 1e-5
#: FSDP2 runs whose loss is a per-token mean: 2 ranks of 32 tokens = one process on 64.
FSDP_EXACT = ("topk", "standard", "gated")

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Run every two-rank fit once; return the folder of their states and exports."""
    out = tmp_path_factory.mktemp("model_parallel")
    result = subprocess.run(
        [sys.executable, str(SCRIPT), str(out)], capture_output=True, text=True, timeout=900
    )
    assert result.returncode == 0, result.stderr[-5000:]
    return out


def one_process(architecture: str, tokens: torch.Tensor, batch: int, steps: int, root: Path):
    """The same fit in this process."""
    module = mp.module(architecture, **mp.FSDP_ARCHITECTURES[architecture])
    mp.trainer(steps, 1, 1, root).fit(module, mp.loader(tokens, batch))
    return module


def assert_same_state(expected: dict, actual: dict) -> None:
    assert expected.keys() == actual.keys()
    for name, tensor in expected.items():
        if tensor.is_floating_point():
            torch.testing.assert_close(actual[name], tensor, atol=ATOL, rtol=RTOL, msg=name)
        else:
            assert torch.equal(actual[name], tensor), name


def assert_same_export(expected: Path, actual: Path) -> None:
    """Both folders load in plain sae-lens and hold the same weights."""
    a, b = sae_lens.SAE.load_from_disk(str(expected)), sae_lens.SAE.load_from_disk(str(actual))
    assert type(a) is type(b)
    for name, tensor in a.state_dict().items():
        torch.testing.assert_close(b.state_dict()[name], tensor, atol=ATOL, rtol=RTOL, msg=name)


@pytest.mark.parametrize("architecture", ["topk", "batchtopk"])
def test_latent_parallel_matches_one_process(runs: Path, tmp_path: Path, architecture: str):
    reference = one_process(architecture, mp.activations()[: 3 * mp.BATCH], mp.BATCH, 6, tmp_path)
    assert bool(reference.dead_latent_mask.any()), "AuxK never engaged: the test proves less"
    assert_same_state(reference.state_dict(), torch.load(runs / f"latent_{architecture}.pt"))
    from lightning_sae import export_to_sae_lens

    export_to_sae_lens(
        reference,
        tmp_path / "export",
        {"hook_name": "blocks.0.hook_resid_post"},
        calibration_activations=None if architecture == "topk" else mp.activations(),
    )
    assert_same_export(tmp_path / "export", runs / f"latent_{architecture}_export")


def test_latent_parallel_resumes_from_a_sharded_checkpoint(runs: Path, tmp_path: Path):
    """3 steps, a sharded checkpoint, a resumed fit to 6: as one process does the same.

    (Lightning restarts a finished epoch of a plain DataLoader on resume, so the resumed run's
    batches are not the uninterrupted run's: the reference resumes too.)
    """
    assert (runs / "half_topk.ckpt").is_dir()  # one shard file per rank, plus metadata
    tokens = mp.activations()[: 3 * mp.BATCH]
    trainer = mp.trainer(3, 1, 1, tmp_path)
    trainer.fit(mp.module("topk", k=mp.K), mp.loader(tokens, mp.BATCH))
    trainer.save_checkpoint(tmp_path / "half.ckpt")
    reference = mp.module("topk", k=mp.K)
    mp.trainer(6, 1, 1, tmp_path).fit(
        reference, mp.loader(tokens, mp.BATCH), ckpt_path=tmp_path / "half.ckpt"
    )
    assert_same_state(reference.state_dict(), torch.load(runs / "resumed_topk.pt"))


def test_gathered_checkpoint_loads_in_one_process(runs: Path, tmp_path: Path):
    reference = one_process("topk", mp.activations()[: 3 * mp.BATCH], mp.BATCH, 3, tmp_path)
    loaded = SAEModule.load_from_checkpoint(runs / "gathered_topk.ckpt")
    assert type(loaded) is type(reference)
    assert_same_state(reference.state_dict(), loaded.state_dict())


@pytest.mark.parametrize("architecture", FSDP_EXACT)
def test_fsdp2_matches_one_process(runs: Path, tmp_path: Path, architecture: str):
    reference = one_process(
        architecture, mp.activations()[: 6 * mp.BATCH], 2 * mp.BATCH, 6, tmp_path
    )
    assert_same_state(reference.state_dict(), torch.load(runs / f"fsdp_{architecture}.pt"))


@pytest.mark.parametrize("architecture", sorted(mp.FSDP_ARCHITECTURES))
def test_fsdp2_exports_load_in_sae_lens(runs: Path, architecture: str):
    sae = sae_lens.SAE.load_from_disk(str(runs / f"fsdp_{architecture}_export"))
    x = mp.activations()[:8]
    assert torch.isfinite(sae(x)).all()


def test_latent_parallel_pass_is_the_dense_pass(tmp_path: Path):
    """Loss terms, outputs, latents and gradients of one sharded pass equal the dense pass's.

    Same selection (the exact global top-k), so the latents and losses agree to rounding; the
    gradients within 1e-7 relative in float32 and 1e-14 in float64 (summation order only).
    """
    path = tmp_path / "step.pt"
    script = Path(__file__).parent / "scripts" / "latent_parallel_step.py"
    result = subprocess.run(
        [sys.executable, str(script), str(path)], capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-5000:]
    tolerance = {"torch.float32": (1e-6, 1e-6), "torch.float64": (1e-13, 1e-13)}
    for (case, dtype), pair in torch.load(path).items():
        dense, sharded = pair["dense"], pair["sharded"]
        atol, rtol = tolerance[dtype]
        assert dense["losses"]["auxiliary_reconstruction_loss"] > 0, "AuxK must be on"
        for name in ("loss", "sae_out", "feature_acts"):
            torch.testing.assert_close(sharded[name], dense[name], atol=atol, rtol=rtol)
        for name, grad in dense["grads"].items():
            torch.testing.assert_close(
                sharded["grads"][name], grad, atol=atol * grad.abs().max(), rtol=rtol, msg=case
            )
