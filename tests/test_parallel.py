"""Latent-parallel and FSDP2 training on ``ModelParallelStrategy`` against one process.

``tests/scripts/model_parallel.py`` trains on two gloo processes (one pair of processes for all
runs: starting Python with torch, Lightning and sae-lens dominates their cost); each run here is
repeated in this process on the same batches and compared.

Tolerance: float32 weights after 6 Adam steps (lr 1e-2, clipped) agree to ``ATOL``/``RTOL``. The
two runs differ only in float summation order (the reconstruction is a sum of the ranks' partial
decodes; FSDP2 averages the ranks' gradients), ≤ 1.5e-8 per gradient step in float32 as the issue
measured; Adam's normalised steps carry such differences through, hence 1e-5.
"""

import csv
import subprocess
import sys
from pathlib import Path

import pytest
import sae_lens
import torch

sys.path.insert(0, str(Path(__file__).parent / "scripts"))
import model_parallel as mp
from helpers import tiny_transformer_lens

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


def one_process(
    architecture: str, tokens: torch.Tensor, batch: int, steps: int, root: Path, **options
):
    """The same fit in this process."""
    module = mp.module(architecture, **mp.FSDP_ARCHITECTURES[architecture])
    mp.trainer(steps, 1, 1, root, **options).fit(module, mp.loader(tokens, batch))
    return module


def logged(folder: Path) -> list[dict[str, float]]:
    """Rows of a CSV log, ``train/tokens_per_sec`` (a timing) left out."""
    with (folder / "version_0" / "metrics.csv").open() as file:
        rows = [{k: float(v) for k, v in row.items() if v} for row in csv.DictReader(file)]
    return [{k: v for k, v in row.items() if k != "train/tokens_per_sec"} for row in rows]


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
    """Weights, statistics (dead-latent counters, density window), logged metrics and export."""
    reference = one_process(
        architecture, mp.activations()[: 3 * mp.BATCH], mp.BATCH, 6, tmp_path, log="log"
    )
    assert bool(reference.dead_latent_mask.any()), "AuxK never engaged: the test proves less"
    assert_same_state(reference.state_dict(), torch.load(runs / f"latent_{architecture}.pt"))
    expected, actual = logged(tmp_path / "log"), logged(runs / f"latent_{architecture}_log")
    assert {"train/l0", "train/explained_variance", "train/dead_latent_rate"} <= set(actual[-1])
    assert len(expected) == len(actual)
    for want, got in zip(expected, actual, strict=True):
        assert want.keys() == got.keys()
        for name, value in want.items():
            assert got[name] == pytest.approx(value, rel=RTOL, abs=ATOL), name
    from lightning_sae import export_to_sae_lens

    export_to_sae_lens(
        reference,
        tmp_path / "export",
        {"hook_name": "blocks.0.hook_resid_post"},
        calibration_activations=None if architecture == "topk" else mp.activations(),
    )
    assert_same_export(tmp_path / "export", runs / f"latent_{architecture}_export")


def test_sharded_module_refuses_one_rank_export_and_inference(runs: Path):
    export, inference = (runs / "refusals.txt").read_text().splitlines()
    assert export.startswith("ValueError") and "gathered_module" in export
    assert inference.startswith("RuntimeError") and "gathered_module" in inference
    assert not (runs / "refused_export").exists()


def test_latent_parallel_refuses_other_architectures():
    from lightning_sae.saes import FastMatryoshkaBatchTopKTrainingSAE
    from lightning_sae.saes.latent_parallel import latent_parallel_class

    for cls in (
        FastMatryoshkaBatchTopKTrainingSAE,
        type(SAEModule(architecture="standard", d_in=4, d_sae=8).sae),
    ):
        with pytest.raises(TypeError, match="FSDP2"):
            latent_parallel_class(cls)


@pytest.mark.parametrize(
    ("checkpoint", "resumed"),
    [("half_topk.ckpt", "resumed_topk.pt"), ("gathered_topk.ckpt", "resumed_gathered_topk.pt")],
)
def test_latent_parallel_resumes_from_a_checkpoint(
    runs: Path, tmp_path: Path, checkpoint: str, resumed: str
):
    """3 steps, a sharded or gathered checkpoint, a resumed fit to 6: as one process does.

    Weights (Adam steps from the restored state) and statistics, the open density window too.
    (Lightning restarts a finished epoch of a plain DataLoader on resume, so the resumed run's
    batches are not the uninterrupted run's: the reference resumes too.)
    """
    # Sharded: one shard file per rank, plus metadata; gathered: one file.
    assert (runs / checkpoint).is_dir() == (checkpoint == "half_topk.ckpt")
    tokens = mp.activations()[: 3 * mp.BATCH]
    trainer = mp.trainer(3, 1, 1, tmp_path)
    trainer.fit(mp.module("topk", k=mp.K), mp.loader(tokens, mp.BATCH))
    trainer.save_checkpoint(tmp_path / "half.ckpt")
    reference = mp.module("topk", k=mp.K)
    mp.trainer(6, 1, 1, tmp_path).fit(
        reference, mp.loader(tokens, mp.BATCH), ckpt_path=tmp_path / "half.ckpt"
    )
    assert_same_state(reference.state_dict(), torch.load(runs / resumed))


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


def test_fsdp2_validates_like_one_process(runs: Path, tmp_path: Path):
    """Validation (inference encode/decode) gathers the FSDP2 shards: same metrics."""
    reference = one_process("topk", mp.activations()[: 6 * mp.BATCH], 2 * mp.BATCH, 6, tmp_path)
    held_out = mp.loader(mp.activations()[6 * mp.BATCH : 8 * mp.BATCH], mp.BATCH)
    (expected,) = mp.trainer(1, 1, 1, tmp_path).validate(reference, held_out, verbose=False)
    actual = torch.load(runs / "fsdp_topk_val.pt")
    assert {"val/l0", "val/explained_variance"} <= set(actual)
    assert actual == pytest.approx(expected, rel=RTOL, abs=ATOL)


@pytest.mark.parametrize("architecture", mp.DDP_TWINS)
def test_fsdp2_matches_ddp(runs: Path, architecture: str):
    """Where no one-process run is the same (per-rank selection, rank-averaged statistics,
    JumpReLU's in-place threshold writes), FSDP2 matches DDP on the same per-rank batches."""
    assert_same_state(
        torch.load(runs / f"ddp_{architecture}.pt"), torch.load(runs / f"fsdp_{architecture}.pt")
    )


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


EXAMPLE = Path(__file__).parents[1] / "examples" / "topk_latent_parallel.yaml"
CONTEXT, N_DOCUMENTS = 16, 16


def example_overrides(root: Path, documents: list[list[int]], devices: int) -> dict:
    """Shrink the example (4 steps, 64 latents) and train on a tiny transformer-lens model.

    One document (``CONTEXT`` tokens) per step: with 2 latent-parallel devices both ranks read
    the same stream (the DataModule shards by the strategy's data-parallel rank), so the
    one-process run reads the same documents.
    """
    tiny_lm = tiny_transformer_lens(CONTEXT)
    return {
        "trainer": {
            "accelerator": "cpu",
            "devices": devices,
            "max_steps": 4,
            "default_root_dir": str(root),
            "enable_progress_bar": False,
            "enable_model_summary": False,
        },
        "model": {
            "class_path": "lightning_sae.TopKSAE",
            "init_args": {"d_sae": 64, "k": 4, "lr_warm_up_steps": 0, "lr_decay_steps": 0},
        },
        "data": {
            "class_path": "lightning_sae.ActivationDataModule",
            "init_args": {
                "model": tiny_lm,
                "hook_names": "blocks.0.hook_resid_post",
                "dataset": documents,
                "context_size": CONTEXT,
                "batch_size": CONTEXT,
                "prepend_bos": False,
                "shuffle": False,
                "shuffle_buffer_tokens": CONTEXT,
                "holdout_documents": 0,
            },
        },
    }


def test_example_config_trains_on_two_devices_like_one_process(tmp_path: Path):
    """``lightning-sae fit --config examples/topk_latent_parallel.yaml --trainer.devices 2``.

    Its gathered ``last.ckpt`` loads in one process and exports a plain sae-lens folder equal
    (``ATOL``/``RTOL``) to the export of a one-process run on the same batches.
    """
    import yaml

    from lightning_sae import export_to_sae_lens
    from lightning_sae.cli import SAECLI

    documents = [[(7 * d + 3 * t) % 61 + 1 for t in range(CONTEXT)] for d in range(N_DOCUMENTS)]
    two = tmp_path / "two"
    override = tmp_path / "two.yaml"
    override.write_text(yaml.safe_dump(example_overrides(two, documents, 2)))
    command = [
        str(Path(sys.executable).parent / "lightning-sae"),
        "fit",
        f"--config={EXAMPLE}",
        f"--config={override}",
        "--trainer.devices=2",
        "--trainer.strategy.init_args.timeout=0:03:00",  # a hung collective fails in minutes
        "--trainer.callbacks.every_n_train_steps=4",  # ModelCheckpoint: last.ckpt at the end
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-5000:]
    (last,) = two.rglob("last.ckpt")
    assert last.is_file()  # gathered (save_distributed_checkpoint: false), one file
    metadata = {"hook_name": "blocks.0.hook_resid_post"}
    export_to_sae_lens(SAEModule.load_from_checkpoint(last), tmp_path / "two_sae", metadata)

    one = tmp_path / "one"
    (tmp_path / "one.yaml").write_text(yaml.safe_dump(example_overrides(one, documents, 1)))
    cli = SAECLI(
        args=[
            "fit",
            f"--config={EXAMPLE}",
            f"--config={tmp_path / 'one.yaml'}",
            "--trainer.strategy=auto",
            "--trainer.callbacks.every_n_train_steps=4",
        ]
    )
    export_to_sae_lens(cli.model, tmp_path / "one_sae", metadata)
    assert_same_export(tmp_path / "one_sae", tmp_path / "two_sae")
    # SAELensExport gathered the sharded SAE onto rank 0 during the 2-device run.
    assert_same_export(tmp_path / "one_sae", two / "sae_lens" / "latest")
