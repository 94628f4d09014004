"""DDP through the ``lightning-sae`` CLI: 2 CPU ranks (gloo) against one process on the same data.

Design: the data are the real :class:`~lightning_sae.ActivationDataModule` over a tiny random
``HookedTransformer`` (built from YAML), fed 16 pre-tokenised documents of exactly ``CONTEXT``
tokens, unshuffled, one document per mixing chunk. Rank ``r`` reads documents ``r, r + 2, ...``
(the DataModule's shards), so with ``batch_size = CONTEXT`` its batch ``i`` is document
``2i + r``. The single-process run uses ``batch_size = 2 * CONTEXT`` over the same documents, so
its batch ``i`` is documents ``2i`` and ``2i + 1``: exactly the union of the ranks' batches ``i``.
DDP averages the ranks' gradients of per-token-mean losses, which is the single process's
gradient of the mean over the union, so weights and every synced metric agree up to float
summation order. ``StandardSAE`` is compared (its loss is a per-token mean); BatchTopK takes its
top-k per rank by design, so it is only checked for identical weights and threshold on both
ranks. The 2-rank runs share one pair of processes (``tests/scripts/ddp_cli.py``), because
starting Python with torch, Lightning and sae-lens dominates their cost.
"""

import csv
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from helpers import tiny_transformer_lens

from lightning_sae.cli import SAECLI

SCRIPT = Path(__file__).parent / "scripts" / "ddp_cli.py"
CONTEXT, N_DOCUMENTS = 16, 16
#: Metrics synced over ranks (torchmetrics with summed statistics), logged every 2 steps.
SYNCED_METRICS = ("train/l0", "train/explained_variance", "train/nmse")


def config(devices: int) -> dict:
    """A 6-step StandardSAE run on ``devices`` CPU processes, one document per rank per step."""
    documents = [[(7 * d + 3 * t) % 61 + 1 for t in range(CONTEXT)] for d in range(N_DOCUMENTS)]
    # A hung collective fails after 3 min, not DDP's default 30. The timeout also bounds the
    # rendezvous, which waits for rank 1 to start Python and import torch, Lightning and sae-lens:
    # over a minute on a busy 2-core machine.
    strategy = {
        "class_path": "lightning.pytorch.strategies.DDPStrategy",
        "init_args": {"timeout": "0:03:00", "process_group_backend": "gloo"},
    }
    tiny_lm = tiny_transformer_lens(CONTEXT)
    return {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "cpu",
            "devices": devices,
            "strategy": strategy if devices > 1 else "auto",
            "max_steps": 6,
            "log_every_n_steps": 2,
            "enable_progress_bar": False,
            "enable_model_summary": False,
        },
        "model": {
            "class_path": "lightning_sae.StandardSAE",
            "init_args": {"d_sae": 32, "lr": 0.01, "seed": 0},
        },
        "data": {
            "class_path": "lightning_sae.ActivationDataModule",
            "init_args": {
                "model": tiny_lm,
                "hook_names": "blocks.0.hook_resid_post",
                "dataset": documents,
                "context_size": CONTEXT,
                "batch_size": CONTEXT * 2 // devices,
                "prepend_bos": False,
                "shuffle": False,
                "shuffle_buffer_tokens": CONTEXT,
                "holdout_documents": 0,
            },
        },
    }


def logged(folder: Path) -> list[dict[str, float]]:
    (path,) = folder.rglob("metrics.csv")
    with path.open() as file:
        return [{k: float(v) for k, v in row.items() if v} for row in csv.DictReader(file)]


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Run the 2-rank script once; its outputs serve every test below."""
    out = tmp_path_factory.mktemp("ddp")
    (out / "ddp.yaml").write_text(yaml.safe_dump(config(devices=2)))
    # Six short fits after two Python start-ups; a hang is caught by DDP's timeout first.
    result = subprocess.run(
        [sys.executable, str(SCRIPT), str(out), str(out / "ddp.yaml")],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=out,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return out


def weights(out: Path, run: str, rank: int) -> dict[str, torch.Tensor]:
    return torch.load(out / f"{run}_rank{rank}.pt", weights_only=True)


@pytest.mark.slow
@pytest.mark.parametrize("run", ["full", "half", "resumed", "batchtopk", "atm", "jumprelu"])
def test_weights_identical_on_both_ranks(two_ranks: Path, run: str):
    rank0, rank1 = weights(two_ranks, run, 0), weights(two_ranks, run, 1)
    assert rank0.keys() == rank1.keys()
    for name in rank0:
        assert torch.equal(rank0[name], rank1[name]), name


@pytest.mark.slow
def test_batchtopk_threshold_identical_on_both_ranks(two_ranks: Path):
    thresholds = [
        weights(two_ranks, "batchtopk", rank)["unit.sae.topk_threshold"] for rank in (0, 1)
    ]
    assert thresholds[0] > 0  # the EMA moved off its initial 0
    assert torch.equal(*thresholds)


@pytest.mark.slow
def test_atm_importance_emas_identical_and_masking_on_both_ranks(two_ranks: Path):
    states = [weights(two_ranks, "atm", rank) for rank in (0, 1)]
    for name in ("unit.sae.ema_magnitude", "unit.sae.ema_frequency", "unit.sae.ema_contribution"):
        assert torch.equal(states[0][name], states[1][name]), name
        assert states[0][name].abs().sum() > 0, name


@pytest.mark.slow
def test_jumprelu_controller_state_identical_and_acting_on_both_ranks(two_ranks: Path):
    """The ranks see different batches, so only the averaged controller keeps them together."""
    states = [weights(two_ranks, "jumprelu", rank) for rank in (0, 1)]
    names = ("threshold", "previous_threshold", "log_l0_coefficient_scale", "log_threshold_step")
    for name in (f"unit.sae.{name}" for name in names):
        assert torch.equal(states[0][name], states[1][name]), name
    assert states[0]["unit.sae.log_l0_coefficient_scale"] != 0  # the controller acted
    assert states[0]["unit.sae.log_threshold_step"] != 0


@pytest.mark.slow
def test_resumed_run_continues_exactly(two_ranks: Path):
    """Weights, activation scale, dead-latent counters and the density window equal the
    uninterrupted run's (the open window is checkpointed, so the exported density is too)."""
    full, resumed = weights(two_ranks, "full", 0), weights(two_ranks, "resumed", 0)
    half = weights(two_ranks, "half", 0)
    assert not torch.equal(half["unit.sae.W_enc"], full["unit.sae.W_enc"])
    for name in full:
        assert torch.equal(full[name], resumed[name]), name


@pytest.mark.slow
def test_two_ranks_equal_one_process_over_the_union(two_ranks, tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["lightning-sae"])
    (tmp_path / "one.yaml").write_text(yaml.safe_dump(config(devices=1)))
    cli = SAECLI(
        args=[
            "fit",
            "--config",
            str(tmp_path / "one.yaml"),
            f"--trainer.default_root_dir={tmp_path}",
            "--trainer.logger=CSVLogger",
            f"--trainer.logger.save_dir={tmp_path}",
        ]
    )
    single = cli.model.state_dict()
    distributed = weights(two_ranks, "full", 0)
    for name in ("W_enc", "W_dec", "b_enc", "b_dec"):
        name = f"unit.sae.{name}"
        torch.testing.assert_close(distributed[name], single[name], rtol=1e-5, atol=1e-6)
    for name in ("unit.normalizer.scale",):
        torch.testing.assert_close(distributed[name], single[name], rtol=1e-5, atol=1e-6)
    counters = "unit.statistics.tokens_since_fired"
    assert torch.equal(distributed[counters], single[counters])

    rows_2, rows_1 = logged(two_ranks / "full"), logged(tmp_path)
    assert [row["step"] for row in rows_2] == [row["step"] for row in rows_1] == [1, 3, 5]
    for row_2, row_1 in zip(rows_2, rows_1, strict=True):
        for name in SYNCED_METRICS:
            assert row_2[name] == pytest.approx(row_1[name], rel=1e-5, abs=1e-6), name
