"""ATMSAE: defaults, validation, Trainer.fit with falling loss, and a plain sae-lens export."""

import subprocess
import sys
import textwrap

import lightning as L
import pytest
import torch
from helpers import D_IN, loader, quiet_trainer
from safetensors.torch import load_file, save_file

from lightning_sae import ATMSAE, SAEModule, export_to_sae_lens, get_module_class
from lightning_sae.saes.atm import ATM_STATISTICS


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices on a shared 2-core machine
    yield
    torch.set_num_threads(threads)


def test_defaults_alone_build_an_atm_module():
    module = ATMSAE(d_in=16, d_sae=64)
    cfg = module.sae.cfg
    assert cfg.architecture() == "atm"
    assert cfg.get_inference_config_class().architecture() == "standard"
    assert (cfg.l1_coefficient, cfg.atm_ema_decay, cfg.atm_threshold_c) == (5.0, 0.99, 0.0)
    assert (cfg.atm_mask_rate, cfg.atm_warm_up_steps, cfg.atm_mask_granularity) == (
        1.0,
        1000,
        "token",
    )
    assert type(SAEModule(architecture="atm", d_in=16, d_sae=64)) is ATMSAE
    assert get_module_class("ATMSAE") is ATMSAE


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"atm_ema_decay": 1.5}, "atm_ema_decay must be in"),
        ({"atm_mask_rate": 0.0}, "atm_mask_rate"),
        ({"atm_threshold_c": float("inf")}, "atm_threshold_c must be a finite number"),
        ({"l1_coefficient": -1.0}, "l1_coefficient must be positive"),
    ],
)
def test_bad_arguments_fail_at_construction(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ATMSAE(d_in=16, d_sae=64, **kwargs)


def test_emas_stay_float32_under_bf16_and_are_in_the_checkpoint():
    module = ATMSAE(d_in=16, d_sae=64).to(torch.bfloat16)
    assert module.sae.W_enc.dtype == torch.bfloat16
    state = module.state_dict()
    for name in ATM_STATISTICS:
        assert state[f"unit.sae.{name}"].dtype == torch.float32


class LossRecorder(L.Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(outputs["loss"]))


@pytest.fixture(scope="module")
def trained(synthetic_train: torch.Tensor) -> tuple[ATMSAE, LossRecorder]:
    L.seed_everything(0, verbose=False)
    module = ATMSAE(d_in=D_IN, d_sae=64, l1_coefficient=1.0, lr=3e-3, atm_warm_up_steps=10, seed=0)
    recorder = LossRecorder()
    quiet_trainer(max_steps=80, callbacks=[recorder]).fit(
        module, loader(synthetic_train, batch_size=512, shuffle=True)
    )
    return module, recorder


def test_trains_under_fit_with_falling_loss_and_masks(trained):
    module, recorder = trained
    losses = recorder.losses
    assert len(losses) == 80
    assert sum(losses[-10:]) / 10 < 0.7 * sum(losses[:10]) / 10
    assert all(torch.isfinite(torch.tensor(losses)))
    assert module.sae.ema_frequency.sum() > 0  # statistics were tracked
    assert (module.sae.masking_probability() > 0).any()  # and some latents are being masked


PLAIN_SAE_LENS = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    import torch
    from safetensors.torch import load_file, save_file
    from sae_lens import SAE

    root = Path(sys.argv[1])
    sae = SAE.load_from_disk(root / "sae")
    x = load_file(root / "x.safetensors")["x"]
    with torch.no_grad():
        latents = sae.encode(x)
        decoded = sae.decode(latents)
    assert "lightning_sae" not in sys.modules, "the check must run without lightning_sae"
    assert type(sae).__name__ == "StandardSAE", type(sae)
    save_file({"latents": latents, "decoded": decoded}, root / "out.safetensors")
    """
)


def test_export_is_a_plain_standard_sae(trained, synthetic_heldout, tmp_path):
    module, _ = trained
    module.eval()
    export_to_sae_lens(module, tmp_path / "sae")
    x = synthetic_heldout[:512].contiguous()
    save_file({"x": x}, tmp_path / "x.safetensors")
    # A fresh interpreter, cwd outside the repo, that never imports lightning_sae.
    subprocess.run(
        [sys.executable, "-c", PLAIN_SAE_LENS, str(tmp_path)],
        check=True,
        cwd=tmp_path,
        timeout=120,
    )
    out = load_file(tmp_path / "out.safetensors")
    with torch.no_grad():
        latents = module.encode(x)
        decoded = module.decode(latents)
    # The export folds the activation scale into the weights, so it takes raw activations.
    torch.testing.assert_close(out["latents"], latents, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out["decoded"], decoded, rtol=1e-4, atol=1e-4)


def test_checkpoint_restores_the_atm_module_and_its_emas(synthetic_train, tmp_path):
    module = ATMSAE(d_in=D_IN, d_sae=64, atm_threshold_c=-0.5, atm_warm_up_steps=2, seed=0)
    trainer = quiet_trainer(max_steps=5)
    trainer.fit(module, loader(synthetic_train[:2560], batch_size=512))
    trainer.save_checkpoint(tmp_path / "atm.ckpt")
    restored = SAEModule.load_from_checkpoint(tmp_path / "atm.ckpt")
    assert type(restored) is ATMSAE
    assert restored.sae.cfg.atm_threshold_c == -0.5
    for name in ATM_STATISTICS:
        assert getattr(module.sae, name).sum() > 0
        torch.testing.assert_close(getattr(restored.sae, name), getattr(module.sae, name))
