"""SAELensExport: versioned exports during and at the end of fit, a ``latest`` pointer, rank 0."""

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from helpers import loader, quiet_trainer
from lightning import LightningDataModule, LightningModule
from sae_lens import SAE
from safetensors.torch import load_file
from torch.utils.data import DataLoader

from lightning_sae import BatchTopKSAE, MultiSAEModule, SAELensExport, StandardSAE
from lightning_sae.errors import ConfigurationError


def exported_steps(dirpath: Path) -> list[str]:
    return sorted(p.name for p in dirpath.iterdir() if p.name.startswith("step-"))


def test_exports_every_n_steps_and_at_fit_end(
    synthetic_train: torch.Tensor, tmp_path: Path
) -> None:
    module = StandardSAE(d_in=32, d_sae=64, seed=0, dead_window_tokens=2048)
    callback = SAELensExport(tmp_path / "exports", every_n_steps=10, metadata={"hook_name": "h"})
    trainer = quiet_trainer(max_steps=25, callbacks=[callback])
    trainer.fit(module, loader(synthetic_train[:8192], batch_size=256))

    dirpath = tmp_path / "exports"
    assert exported_steps(dirpath) == ["step-000010", "step-000020", "step-000025"]
    latest = dirpath / "latest"
    assert latest.is_symlink() and os.readlink(latest) == "step-000025"
    assert [p.name for p in dirpath.iterdir() if p.name.startswith(".")] == []
    sae = SAE.load_from_disk(latest)
    assert sae.cfg.metadata.hook_name == "h"
    final = load_file(latest / "sae_weights.safetensors")
    torch.testing.assert_close(final["b_dec"], module.sae.b_dec.detach() / module.activation_scale)
    assert (latest / "sparsity.safetensors").exists()


def test_gradient_accumulation_exports_once_per_step(
    synthetic_train: torch.Tensor, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[str] = []

    def fake_export(module, path, *args, **kwargs):
        calls.append(path.name)
        return path

    monkeypatch.setattr("lightning_sae.callbacks.export_to_sae_lens", fake_export)
    callback = SAELensExport(tmp_path, every_n_steps=2)
    module = StandardSAE(d_in=32, d_sae=64, seed=0, dead_window_tokens=2048)
    trainer = quiet_trainer(max_steps=4, accumulate_grad_batches=3, callbacks=[callback])
    trainer.fit(module, loader(synthetic_train[:8192], batch_size=128))
    # Steps 2 and 4 once each although 3 batches end on each, then the final export.
    assert calls == ["step-000002", "step-000004", "step-000004"]


class CalibrationDataModule(LightningDataModule):
    """A user's DataModule of one hook written for lightning-sae 0.1: no ``hook_name`` anywhere."""

    def __init__(self, activations: torch.Tensor) -> None:
        super().__init__()
        self.activations = activations

    def train_dataloader(self):
        return loader(self.activations, batch_size=256)

    def sae_metadata(self) -> dict:
        return {"model_name": "tiny", "hook_name": "blocks.0.hook_resid_post", "context_size": 16}

    def sample_activations(self, n_tokens: int) -> torch.Tensor:
        return self.activations[-n_tokens:]


def test_batchtopk_export_calibrates_from_the_datamodule(
    synthetic_train: torch.Tensor, synthetic_heldout: torch.Tensor, tmp_path: Path
) -> None:
    module = BatchTopKSAE(d_in=32, d_sae=64, k=4, seed=0, dead_window_tokens=2048)
    callback = SAELensExport(tmp_path, calibration_tokens=4096)
    trainer = quiet_trainer(max_steps=20, callbacks=[callback])
    trainer.fit(module, datamodule=CalibrationDataModule(synthetic_train[:8192]))

    cfg = json.loads((tmp_path / "latest" / "cfg.json").read_text())
    assert cfg["architecture"] == "jumprelu" and cfg["metadata"]["model_name"] == "tiny"
    sae = SAE.load_from_disk(tmp_path / "latest")
    with torch.no_grad():
        l0 = (sae.encode(synthetic_heldout) > 0).float().sum(-1).mean().item()
    assert abs(l0 / 4 - 1) <= 0.05


def test_calibration_batches_from_a_generator_serve_every_export(
    synthetic_train: torch.Tensor, tmp_path: Path
) -> None:
    module = BatchTopKSAE(d_in=32, d_sae=64, k=4, seed=0, dead_window_tokens=2048)
    batches = (chunk for chunk in synthetic_train[-8192:].split(2048))
    callback = SAELensExport(tmp_path, every_n_steps=5, calibration_activations=batches)
    quiet_trainer(max_steps=10, callbacks=[callback]).fit(module, loader(synthetic_train[:4096]))
    assert exported_steps(tmp_path) == ["step-000005", "step-000010"]


def test_only_global_rank_zero_writes(tmp_path: Path) -> None:
    module = StandardSAE(d_in=8, d_sae=16)
    callback = SAELensExport(tmp_path / "exports")
    other_rank = SimpleNamespace(global_step=5, is_global_zero=False, default_root_dir=tmp_path)
    callback.setup(other_rank, module, "fit")  # type: ignore[arg-type]
    assert callback.export(other_rank, module) is None  # type: ignore[arg-type]
    assert not (tmp_path / "exports").exists()


def test_default_folder_and_bad_arguments(tmp_path: Path) -> None:
    callback = SAELensExport()
    trainer = SimpleNamespace(default_root_dir=tmp_path, is_global_zero=True, datamodule=None)
    callback.setup(trainer, StandardSAE(d_in=8, d_sae=16), "fit")  # type: ignore[arg-type]
    assert callback.dirpath == tmp_path / "sae_lens"
    with pytest.raises(TypeError, match="lightning_sae SAE modules"):
        callback.setup(trainer, LightningModule(), "fit")  # type: ignore[arg-type]
    for name in ("every_n_steps", "keep_last_n", "calibration_tokens"):
        for bad in (0, -3, True):
            with pytest.raises(ValueError, match=f"{name} must be a positive integer"):
                SAELensExport(**{name: bad})


DDP_SCRIPT = """
import sys
from datetime import timedelta

import torch
from lightning import Trainer
from lightning.pytorch.strategies import DDPStrategy
from torch.utils.data import DataLoader, TensorDataset

from lightning_sae import SAELensExport, StandardSAE

torch.manual_seed(0)
data = DataLoader(TensorDataset(torch.randn(4096, 16)), batch_size=64)
module = StandardSAE(d_in=16, d_sae=32, seed=0, dead_window_tokens=512)
trainer = Trainer(
    accelerator="cpu",
    devices=2,
    strategy=DDPStrategy(timeout=timedelta(seconds=60)),
    max_steps=10,
    logger=False,
    enable_checkpointing=False,
    enable_progress_bar=False,
    enable_model_summary=False,
    callbacks=[SAELensExport(sys.argv[1], every_n_steps=5)],
)
trainer.fit(module, data)
print(f"RANK {trainer.global_rank} DONE")
"""


@pytest.mark.slow
def test_ddp_two_ranks_export_once_on_rank_zero(tmp_path: Path) -> None:
    """A real 2-rank gloo run, as its own script (``ddp`` relaunches the running script)."""
    script = tmp_path / "ddp_export.py"
    script.write_text(DDP_SCRIPT)
    dirpath = tmp_path / "exports"
    result = subprocess.run(
        [sys.executable, str(script), str(dirpath)],
        capture_output=True,
        text=True,
        timeout=180,
        cwd=tmp_path,
        env=os.environ | {"OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "RANK 0 DONE" in result.stdout
    assert exported_steps(dirpath) == ["step-000005", "step-000010"]
    assert os.readlink(dirpath / "latest") == "step-000010"
    assert SAE.load_from_disk(dirpath / "latest").cfg.d_in == 16


def test_multi_hook_exports_calibrate_each_hook_on_its_own_layer(synthetic_train, tmp_path):
    hooks = ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post"]
    data = DataLoader([{hook: synthetic_train[i * 256 : (i + 1) * 256] for hook in hooks}
                       for i in range(4)], batch_size=None)  # fmt: skip
    module = MultiSAEModule("batchtopk", hooks, d_in=32, d_sae=64, k=4, seed=0)
    with pytest.raises(ValueError, match="each hook on its own layer"):
        quiet_trainer(max_steps=1, callbacks=[
            SAELensExport(tmp_path, calibration_activations=synthetic_train[:512])
        ]).fit(module, data)  # fmt: skip
    calibration = {hook: synthetic_train[-512:] * (i + 1) for i, hook in enumerate(hooks)}
    exporter = SAELensExport(tmp_path / "ok", calibration_activations=calibration)
    quiet_trainer(max_steps=2, callbacks=[exporter]).fit(module, data)
    thresholds = []
    for hook in hooks:
        sae = SAE.load_from_disk(str(tmp_path / "ok" / "latest" / hook))
        assert sae.cfg.metadata.hook_name == hook
        thresholds.append(float(sae.threshold.mean()))
    assert thresholds[0] != pytest.approx(thresholds[1])  # calibrated on different activations


def test_keeps_only_the_newest_exports(synthetic_train: torch.Tensor, tmp_path: Path) -> None:
    # From an earlier run: a later step than this run reaches, and an interrupted deletion.
    (tmp_path / "step-000100").mkdir()
    (tmp_path / ".step-000001.tmp-0badf00d").mkdir()
    (tmp_path / ".latest.tmp-0badf00d").symlink_to("step-000100")
    module = StandardSAE(d_in=32, d_sae=64, seed=0, dead_window_tokens=2048)
    callback = SAELensExport(tmp_path, every_n_steps=2, keep_last_n=3)
    quiet_trainer(max_steps=9, callbacks=[callback]).fit(module, loader(synthetic_train[:8192]))
    # The export just written is always kept, with the newest others.
    assert exported_steps(tmp_path) == ["step-000008", "step-000009", "step-000100"]
    assert os.readlink(tmp_path / "latest") == "step-000009"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    assert SAE.load_from_disk(tmp_path / "step-000008").cfg.d_sae == 64


def test_too_few_calibration_tokens_stop_the_fit_at_its_start(
    synthetic_train: torch.Tensor, tmp_path: Path
) -> None:
    module = BatchTopKSAE(d_in=32, d_sae=64, k=4, seed=0)
    callback = SAELensExport(tmp_path, every_n_steps=5)  # draws 16,384 tokens by default
    trainer = quiet_trainer(max_steps=10, callbacks=[callback])
    with pytest.raises(
        ConfigurationError, match="gave \\(1024, 32\\), not \\[16384, d_in\\]"
    ) as info:
        trainer.fit(module, datamodule=CalibrationDataModule(synthetic_train[:1024]))
    assert "calibration_tokens is 16384: lower it" in str(info.value)
    assert trainer.global_step == 0
    assert list(tmp_path.iterdir()) == []
