"""Activation cache: round trip equals the live model, shuffled and resumable, clear mismatches."""

import json
from itertools import islice

import pytest
import torch

from lightning_sae import ActivationDataModule

HOOKS = ["blocks.1.hook_resid_post", "blocks.0.hook_mlp_out"]


@pytest.fixture
def live(model, documents) -> ActivationDataModule:
    dm = ActivationDataModule(
        model=model, hook_names=HOOKS, dataset=documents, context_size=32, batch_size=128,
        shuffle_buffer_tokens=512, shuffle=False, holdout_documents=4,
    )  # fmt: skip
    dm.setup("fit")
    return dm


def test_round_trip_equals_live_model(live, tmp_path):
    path = live.write_cache(tmp_path / "cache", n_tokens=2048, tokens_per_file=512)
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["n_tokens"] == 2048 and [f["n_tokens"] for f in manifest["files"]] == [512] * 4
    assert manifest["hook_names"] == HOOKS and manifest["d_in"] == dict.fromkeys(HOOKS, 32)
    assert manifest["dtype"] == "float32" and manifest["context_size"] == 32
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary left

    cached = ActivationDataModule(cache_dir=path, batch_size=128, shuffle=False)
    cached.setup("fit")
    assert cached.d_in == 32 and cached.sae_metadata() == live.sae_metadata()
    live_batches = list(islice(live._batches(0), 16))
    for a, b in zip(live_batches, islice(cached._batches(0), 16), strict=True):
        for hook in HOOKS:
            torch.testing.assert_close(a[hook], b[hook])
    torch.testing.assert_close(cached.sample_activations(300), live.sample_activations(300))


def test_cache_is_shuffled_sharded_and_resumable(live, tmp_path):
    path = live.write_cache(tmp_path / "cache", n_tokens=2048, tokens_per_file=512)
    dm = ActivationDataModule(cache_dir=path, hook_names=HOOKS[0], batch_size=128)
    dm.setup("fit")
    full = list(islice(dm._batches(0), 20))  # 20 batches > 16 per epoch: cycles
    assert isinstance(full[0], torch.Tensor)
    for start in (3, 17):
        for a, b in zip(full[start:], islice(dm._batches(start), 20 - start), strict=True):
            torch.testing.assert_close(a, b)
    epoch = torch.cat(full[:16])
    plain = torch.cat([b[HOOKS[0]] for b in islice(live._batches(0), 16)])
    assert not torch.equal(epoch, plain)
    torch.testing.assert_close(epoch.sort(0).values, plain.sort(0).values)
    # Two ranks read disjoint files that together cover the cache.
    dm._world_size = 2
    ranks = []
    for rank in (0, 1):
        dm._rank = rank
        ranks.append(torch.cat(list(islice(dm._batches(0), 8))))
    both = torch.cat(ranks)
    torch.testing.assert_close(both.sort(0).values, plain.sort(0).values)


def test_manifest_mismatch_is_a_clear_error(live, tmp_path):
    path = live.write_cache(tmp_path / "cache", n_tokens=512, holdout_tokens=0)
    with pytest.raises(ValueError, match="holds activations of model"):
        ActivationDataModule(cache_dir=path, model="gpt2")
    with pytest.raises(
        ValueError, match=r"no activations for hooks \['blocks.2.hook_resid_post'\]"
    ):
        ActivationDataModule(cache_dir=path, hook_names="blocks.2.hook_resid_post")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        live.write_cache(path, n_tokens=512)
    with pytest.raises(FileNotFoundError, match="not an activation cache"):
        ActivationDataModule(cache_dir=tmp_path)
