"""What lightning-sae writes and reads: SAE files are data, checkpoint writes replace nothing.

- Exports, imports (sae-lens folders, Gemma Scope ``params.npz``) and the activation cache never
  pickle or unpickle anything, on every architecture: ``torch.load``, ``torch.save``, ``pickle``
  and pickled ``np.load`` are made to fail while they run.
- A checkpoint write that fails part-way (a full disk) leaves the previous checkpoint and no
  partial file; the error names the path and the fix. (A real full disk is in ``test_faults.py``,
  where the machine allows mounting one.)
"""

import errno
import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import loader, quiet_trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from safetensors import safe_open

import lightning_sae.io
from lightning_sae import (
    ActivationDataModule,
    SAEModule,
    TopKSAE,
    available_architectures,
    export_to_sae_lens,
    load_from_sae_lens,
)
from lightning_sae.io import AtomicCheckpointIO


@pytest.fixture
def no_pickle(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make every way of reading or writing a pickle fail while the test runs."""

    def refuse(*args, **kwargs):
        raise AssertionError("a pickle was read or written")

    for owner, name in [
        (torch, "load"),
        (torch, "save"),
        (pickle, "load"),
        (pickle, "loads"),
        (pickle, "dump"),
        (pickle, "dumps"),
        (pickle, "Unpickler"),
        (pickle, "Pickler"),
    ]:
        monkeypatch.setattr(owner, name, refuse)
    load = np.load
    monkeypatch.setattr(
        np,
        "load",
        lambda *args, **kwargs: refuse() if kwargs.get("allow_pickle") else load(*args, **kwargs),
    )


def assert_data_only(folder: Path) -> None:
    """Every file of an export is JSON or safetensors."""
    for path in folder.iterdir():
        if path.suffix == ".json":
            json.loads(path.read_text())
        else:
            assert path.suffix == ".safetensors", path
            with safe_open(path, framework="pt"):
                pass


@pytest.mark.parametrize("architecture", available_architectures())
def test_export_and_import_never_pickle(architecture: str, tmp_path: Path, no_pickle: None):
    extra = {"k": 4} if "topk" in architecture else {}
    module = SAEModule(architecture=architecture, d_in=16, d_sae=32, seed=0, **extra)
    first = export_to_sae_lens(
        module, tmp_path / "a", {"hook_name": "h"}, calibration_activations=torch.randn(256, 16)
    )
    assert_data_only(first)
    again = export_to_sae_lens(load_from_sae_lens(first), tmp_path / "b")
    assert_data_only(again)


def test_gemma_scope_npz_and_the_cache_never_pickle(tmp_path: Path, no_pickle: None):
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    params = {"W_enc": np.zeros((16, 32), np.float32), "W_dec": np.zeros((32, 16), np.float32)}
    params |= {"b_enc": np.zeros(32, np.float32), "b_dec": np.zeros(16, np.float32)}
    np.savez(tmp_path / "params.npz", **params, threshold=np.zeros(32, np.float32))
    cfg = HookedTransformerConfig(
        n_layers=1, d_model=16, n_ctx=32, d_head=4, n_heads=4, d_mlp=32, d_vocab=50, act_fn="gelu"
    )
    dm = ActivationDataModule(
        model=HookedTransformer(cfg),
        hook_names="blocks.0.hook_resid_post",
        dataset=torch.randint(0, 50, (32, 40)),
        context_size=16,
        prepend_bos=False,
    )
    dm.write_cache(tmp_path / "cache", n_tokens=512)
    assert load_from_sae_lens(tmp_path / "params.npz").sae.cfg.d_sae == 32
    cached = ActivationDataModule(cache_dir=tmp_path / "cache", batch_size=128)
    assert next(iter(cached.train_dataloader())).shape == (128, 16)
    assert cached.sample_activations(64).shape == (64, 16)


def test_a_checkpoint_write_that_runs_out_of_space_replaces_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, synthetic_train: torch.Tensor
):
    module = TopKSAE(d_in=32, d_sae=64, k=4, seed=0)
    checkpoints = ModelCheckpoint(tmp_path, every_n_train_steps=1, save_last=True)
    trainer = quiet_trainer(max_steps=2, enable_checkpointing=True, callbacks=[checkpoints])
    trainer.fit(module, loader(synthetic_train[:2048]))
    assert isinstance(trainer.strategy.checkpoint_io, AtomicCheckpointIO)  # installed by default
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}

    save = torch.save

    def disk_fills_up(obj, handle, *args, **kwargs):
        save(obj, handle, *args, **kwargs)
        handle.truncate(handle.tell() // 2)  # half of it reached the disk
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(lightning_sae.io.torch, "save", disk_fills_up)
    with pytest.raises(
        OSError, match=r"last.ckpt \(No space left on device\); nothing was replaced"
    ):
        trainer.save_checkpoint(tmp_path / "last.ckpt")
    with pytest.raises(OSError, match="Free disk space"):
        trainer.save_checkpoint(tmp_path / "new.ckpt")
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


def test_a_swap_cut_between_its_two_renames_is_undone_by_the_next_write(tmp_path: Path):
    # A kill between "target -> .target.old-*" and ".target.tmp-* -> target" leaves no target.
    target = tmp_path / "sae"
    old = tmp_path / ".sae.old-0badf00d"
    old.mkdir()
    (old / "cfg.json").write_text("{}")
    (tmp_path / ".sae.tmp-0badf00d").mkdir()  # the new copy, cut short

    def refuse(path: Path) -> None:
        raise FileExistsError("the next write fails too")

    with pytest.raises(FileExistsError), lightning_sae.io.atomic_folder(target, check=refuse):
        pass
    assert (target / "cfg.json").read_text() == "{}"  # the previous folder is back
    assert [p.name for p in tmp_path.iterdir()] == ["sae"]


def test_resume_is_exact_for_the_density_window_and_dead_latents(tmp_path: Path):
    """sparsity.safetensors and the dead-latent counters of a resumed run equal an uninterrupted
    run's: the open window (its counts and token count) is in the checkpoint."""
    from reliability.cases import cache_data, fit, live_data, tiny_model

    torch.manual_seed(0)
    cache = live_data(tiny_model(), torch.randint(0, 50, (48, 40))).write_cache(
        tmp_path / "cache", n_tokens=1024, holdout_tokens=128
    )

    def module() -> TopKSAE:  # a window of 6 steps: one closes at step 6, another is open at 8
        return TopKSAE(d_in=16, d_sae=32, k=2, seed=0, dead_window_tokens=6 * 64)

    whole = module()
    fit(whole, tmp_path / "whole", cache_data(cache), max_steps=8)
    half = module()
    trainer = fit(half, tmp_path / "half", cache_data(cache), max_steps=3)
    trainer.save_checkpoint(tmp_path / "half.ckpt")
    resumed = module()
    fit(resumed, tmp_path / "resumed", cache_data(cache), tmp_path / "half.ckpt", max_steps=8)

    state, again = whole.state_dict(), resumed.state_dict()
    assert state.keys() == again.keys()
    for name in state:  # weights, Adam-fed parameters, counters, the window's metric state
        assert torch.equal(state[name], again[name]), name
    for path in (export_to_sae_lens(m, tmp_path / n) for m, n in [(whole, "a"), (resumed, "b")]):
        assert (path / "sparsity.safetensors").exists()
    sparsity = [(tmp_path / n / "sparsity.safetensors").read_bytes() for n in ("a", "b")]
    assert sparsity[0] == sparsity[1]
