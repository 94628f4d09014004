"""The litdata activation store: exact round trips, shuffled epochs, exact resume, crash-resumable
and appendable writes, object storage on a loopback server, old caches and sae-lens caches.

Synthetic activations carry their own token index in column 0 (``acts[t, 0] == t``), so any batch
says which tokens it holds: coverage and order are checked by exact equality, not by statistics.
"""

import json
import pickle
import runpy
import shutil
import subprocess
import sys
from itertools import islice
from pathlib import Path

import litdata
import numpy as np
import pytest
import torch

from lightning_sae.data import cache as old_cache
from lightning_sae.data.sae_lens_cache import SaeLensCache, _CacheStream
from lightning_sae.data.store import (
    HOLDOUT,
    INDEX,
    MANIFEST,
    PROGRESS,
    ActivationStore,
    convert_cache,
    main,
    open_activations,
    write_store,
)

HERE = Path(__file__).parent
HOOKS = ["blocks.1.hook_resid_post", "blocks.0.hook_mlp_out"]
METADATA = {"model_name": "synthetic", "model_class_name": "HookedTransformer", "context_size": 16}


def source(n_tokens: int, first: int = 0, chunk_tokens: int = 100) -> list[dict[str, torch.Tensor]]:
    """Chunks of two hooks (d_in 8 and 4) and token ids; token ``t`` has ``acts[t, 0] == t``."""
    tokens = torch.arange(first, first + n_tokens)
    generator = torch.Generator().manual_seed(first)
    acts = {
        HOOKS[0]: torch.randn(n_tokens, 8, generator=generator),
        HOOKS[1]: torch.randn(n_tokens, 4, generator=generator),
    }
    for hook in HOOKS:
        acts[hook][:, 0] = tokens.float()
    acts["token_ids"] = tokens * 3
    return [
        {k: v[i : i + chunk_tokens] for k, v in acts.items()}
        for i in range(0, n_tokens, chunk_tokens)
    ]


def rows_of(chunks: list[dict[str, torch.Tensor]], hook: str) -> torch.Tensor:
    return torch.cat([c[hook] for c in chunks])


#: 16-token blocks, 5 blocks per chunk file, mixed 4 chunk files (320 tokens) at a time.
SMALL = {"block_tokens": 16, "chunk_bytes": 5 * 16 * (12 * 4 + 4), "shuffle_buffer_tokens": 320}


@pytest.fixture
def store_path(tmp_path) -> Path:
    """960 tokens = 60 blocks: 20 loader batches of 3 blocks (batch_size 40) an epoch, no drop."""
    holdout = {k: v for k, v in source(64, first=10_000)[0].items() if k != "token_ids"}
    write_store(tmp_path / "store", source(960), holdout, METADATA, **SMALL)
    return tmp_path / "store"


def test_round_trip_exact_batches_every_token_once_per_epoch(store_path):
    reference = rows_of(source(960), HOOKS[0])
    store = ActivationStore(store_path)
    assert store.manifest["n_tokens"] == 960 and store.d_in_per_hook == {HOOKS[0]: 8, HOOKS[1]: 4}
    assert {k: store.manifest[k] for k in METADATA} == METADATA
    batches = list(islice(iter(store.train_dataloader(batch_size=40, seed=0)), 48))  # 2 epochs
    assert all(b[h].shape == (40, store.d_in_per_hook[h]) for b in batches for h in HOOKS)
    epochs = [torch.cat([b[HOOKS[0]] for b in batches[i : i + 24]]) for i in (0, 24)]
    for epoch in epochs:
        ids = epoch[:, 0].long()
        assert torch.equal(ids.sort().values, torch.arange(960))  # each token exactly once
        assert torch.equal(epoch, reference[ids])  # values exact
    assert all(torch.equal(b[HOOKS[0]][:, 0], b[HOOKS[1]][:, 0]) for b in batches)  # same tokens
    assert not torch.equal(epochs[0][:, 0], epochs[1][:, 0])  # a new order every epoch
    # Mixed at write time: a chunk file holds tokens from all over its 320-token buffer.
    dataset = litdata.StreamingDataset(str(store_path))
    assert len(dataset) == 60 and set(dataset[0]) == {*HOOKS, "token_ids"}
    first_chunk = torch.cat([dataset[i]["token_ids"] for i in range(5)]) // 3
    assert first_chunk.max() - first_chunk.min() > 80 and first_chunk.max() < 320
    assert dataset[0]["token_ids"].dtype == torch.int32
    torch.testing.assert_close(
        dataset[0][HOOKS[1]], rows_of(source(960), HOOKS[1])[dataset[0]["token_ids"].long() // 3]
    )
    # Held-out part, exact; beyond it a clear error.
    torch.testing.assert_close(
        store.sample_activations(50, HOOKS[1]),
        source(64, first=10_000)[0][HOOKS[1]][:50],
        rtol=0,
        atol=0,
    )
    with pytest.raises(ValueError, match="holds 64 tokens, fewer than the 65"):
        store.sample_activations(65)


def test_resume_from_state_dict_is_bit_exact(store_path, tmp_path):
    moved = shutil.copytree(store_path, tmp_path / "moved")  # copied to another folder or node
    store = ActivationStore(store_path, hook_names=[HOOKS[1]])
    stream = iter(store.train_dataloader(batch_size=40, seed=3))
    straight, states = [], {}
    for n in range(40):  # past the first epoch (24 batches)
        straight.append(next(stream))
        if n - 1 in (0, 7, 23, 25):  # as in Lightning: one batch prefetched past the checkpoint
            states[n - 1] = store.state_dict(batches_consumed=n - 1)
    assert set(straight[0]) == {HOOKS[1]}
    for (n, state), where in zip(states.items(), [store_path, moved] * 2, strict=True):
        resumed = ActivationStore(where, hook_names=[HOOKS[1]])
        resumed.load_state_dict(json.loads(json.dumps(state)))  # survives a checkpoint's trip
        again = list(islice(iter(resumed.train_dataloader(batch_size=40, seed=3)), 40 - n))
        assert all(
            torch.equal(a[HOOKS[1]], b[HOOKS[1]]) for a, b in zip(again, straight[n:], strict=True)
        )
    # Another layout warns, then continues past the epoch's end (litdata itself refuses another
    # seed or shuffle, and its elastic resume may leave nothing of the resumed epoch).
    for other in ({"batch_size": 20}, {"seed": 4}, {"shuffle": False}, {"num_workers": 2}):
        layout = {"batch_size": 40, "seed": 3, **other}
        with pytest.warns(UserWarning, match="another layout"):
            batches = resumed.train_dataloader(**layout)
        read = list(islice(iter(batches), 960 // layout["batch_size"] + 1))
        assert all(b[HOOKS[1]].shape == (layout["batch_size"], 4) for b in read)


def test_bfloat16_is_stored_as_its_int16_bits(tmp_path):
    # Token indices below 256 are exact in bfloat16.
    chunks = [{k: v for k, v in c.items() if k != "token_ids"} for c in source(256)]
    write_store(tmp_path / "bf16", chunks, None, METADATA, dtype="bfloat16", **SMALL)
    store = ActivationStore(tmp_path / "bf16")
    assert store.manifest["dtype"] == "bfloat16" and not store.manifest["has_token_ids"]
    assert litdata.StreamingDataset(str(tmp_path / "bf16"))[0][HOOKS[0]].dtype == torch.int16
    batches = islice(iter(store.train_dataloader(64, seed=0)), 4)  # one epoch
    epoch = torch.cat([b[HOOKS[0]] for b in batches])
    assert epoch.dtype == torch.bfloat16
    ids = epoch[:, 0].float().long()
    assert torch.equal(ids.sort().values, torch.arange(256))
    assert torch.equal(epoch, rows_of(chunks, HOOKS[0]).to(torch.bfloat16)[ids])
    with pytest.raises(ValueError, match="holds 0 tokens"):
        store.sample_activations(1)


def test_append_adds_chunks_and_refuses_mismatches(store_path, tmp_path):
    with pytest.raises(FileExistsError, match="append=True"):
        write_store(store_path, source(320), None, METADATA, **SMALL)
    with pytest.raises(ValueError, match="metadata differs"):
        write_store(
            store_path, source(320), None, {**METADATA, "model_name": "other"}, append=True, **SMALL
        )
    with pytest.raises(KeyboardInterrupt):  # an append stopped mid-way leaves the store readable
        write_store(
            store_path, _stopping(source(320, first=960), 2), None, METADATA, append=True, **SMALL
        )
    with pytest.warns(UserWarning, match="append .* was interrupted"):
        assert ActivationStore(store_path).n_tokens == 960
    write_store(store_path, source(320, first=960), None, METADATA, append=True, **SMALL)
    store = ActivationStore(store_path)
    assert store.n_tokens == 1280 and len(litdata.StreamingDataset(str(store_path))) == 80
    batches = islice(iter(store.train_dataloader(batch_size=80, seed=0)), 16)  # one epoch
    ids = torch.cat([b[HOOKS[0]] for b in batches])[:, 0].long()
    assert torch.equal(ids.sort().values, torch.arange(1280))
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not empty"):
        write_store(tmp_path / "other", source(320), None, METADATA)


def test_an_append_killed_before_its_index_and_discarded_restarts_from_the_store(
    store_path, monkeypatch
):
    """Killed between the manifest and the index, then ``resume=False``: the store as it was."""
    from lightning_sae.data.store import _Location

    write_text = _Location.write_text

    def killed_at_the_index(self, file: str, text: str) -> None:
        if file == INDEX:
            raise KeyboardInterrupt
        write_text(self, file, text)

    with monkeypatch.context() as patch:
        patch.setattr(_Location, "write_text", killed_at_the_index)
        with pytest.raises(KeyboardInterrupt):
            write_store(store_path, source(320, first=960), None, METADATA, append=True, **SMALL)
    assert json.loads((store_path / MANIFEST).read_text())["n_tokens"] == 1280  # index: 960
    starts = []

    def from_token(start: int) -> list[dict[str, torch.Tensor]]:
        starts.append(start)
        return source(1280 - start, first=start)

    write_store(store_path, from_token, None, METADATA, resume=False, append=True, **SMALL)
    store = ActivationStore(store_path)
    assert starts == [960] and store.n_tokens == 1280
    batches = islice(iter(store.train_dataloader(batch_size=80, seed=0)), 16)  # one epoch
    ids = torch.cat([b[HOOKS[0]] for b in batches])[:, 0].long()
    assert torch.equal(ids.sort().values, torch.arange(1280))


def _stopping(chunks, at: int):
    """The chunks, interrupted (as by Ctrl-C) when chunk ``at`` is asked for."""
    for index, chunk in enumerate(chunks):
        if index == at:
            raise KeyboardInterrupt
        yield chunk


def test_an_interrupted_write_resumes_only_with_the_same_arguments(tmp_path):
    path = tmp_path / "store"
    with pytest.raises(KeyboardInterrupt):
        write_store(path, _stopping(source(960), 5), None, METADATA, **SMALL)
    with pytest.raises(ValueError, match="interrupted write of another source or with other"):
        write_store(path, source(960), None, METADATA, seed=1, **SMALL)
    write_store(path, source(960), None, METADATA, seed=1, resume=False, **SMALL)
    store = ActivationStore(path)
    batches = islice(iter(store.train_dataloader(batch_size=40, seed=0)), 24)
    ids = torch.cat([b[HOOKS[0]] for b in batches])[:, 0].long()
    assert torch.equal(ids.sort().values, torch.arange(960))
    assert not (path / PROGRESS).exists() and len(list(path.glob("chunk-*.bin"))) == 12


def test_bad_inputs_are_clear_errors(store_path, tmp_path):
    bad = source(200)
    bad[1][HOOKS[0]][3, 2] = float("nan")
    with pytest.raises(ValueError, match="NaN or inf"):
        write_store(tmp_path / "nan", bad, None, METADATA, **SMALL)
    with pytest.raises(ValueError, match="every chunk must hold the same hooks"):
        write_store(
            tmp_path / "hooks", [source(100)[0], {HOOKS[0]: torch.zeros(5, 8)}], None, METADATA
        )
    with pytest.raises(
        ValueError, match=r"no activations for hooks \['blocks.9.hook_resid_post'\]"
    ):
        ActivationStore(store_path, hook_names=["blocks.9.hook_resid_post"])
    with pytest.raises(FileNotFoundError, match="holds no store"):
        ActivationStore(tmp_path)
    with pytest.raises(ValueError, match="fewer than one batch"):
        ActivationStore(store_path).train_dataloader(batch_size=961, seed=0)


@pytest.mark.slow
def test_killed_write_resumes_where_it_stopped(tmp_path):
    script = HERE / "killed_write.py"
    killed = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "killed"), "7"],
        capture_output=True,
        timeout=120,
    )
    assert killed.returncode == -9, killed.stderr[-2000:]
    progress = json.loads((tmp_path / "killed" / PROGRESS).read_text())
    assert progress["input_tokens"] == 600 and not (tmp_path / "killed" / INDEX).exists()
    with pytest.raises(FileNotFoundError, match="interrupted write"):
        ActivationStore(tmp_path / "killed")
    with pytest.raises(Exception, match=INDEX):
        litdata.StreamingDataset(str(tmp_path / "killed"))
    write = runpy.run_path(str(script))["write"]
    starts: list[int] = []
    write(str(tmp_path / "killed"), starts=starts)
    assert starts == [600]  # the source restarted where the write stopped, not at token 0
    write(str(tmp_path / "straight"))
    for name in ("killed", "straight"):
        index = json.loads((tmp_path / name / INDEX).read_text())
        assert len(index["chunks"]) == 24 and not (tmp_path / name / PROGRESS).exists()
    assert (
        json.loads((tmp_path / "killed" / INDEX).read_text())["chunks"]
        == json.loads((tmp_path / "straight" / INDEX).read_text())["chunks"]
    )
    assert (tmp_path / "killed" / MANIFEST).read_text() == (
        tmp_path / "straight" / MANIFEST
    ).read_text()
    for chunk in (tmp_path / "straight").glob("chunk-*.bin"):
        assert chunk.read_bytes() == (tmp_path / "killed" / chunk.name).read_bytes()
    assert sorted(p.name for p in (tmp_path / "killed").iterdir()) == sorted(
        p.name for p in (tmp_path / "straight").iterdir()
    )


def test_object_store_on_a_loopback_server(s3, store_path, tmp_path):
    url = "s3://acts/run1/store"
    holdout = {k: v for k, v in source(64, first=10_000)[0].items() if k != "token_ids"}

    with pytest.raises(KeyboardInterrupt):  # stopped after the first 320-token buffer
        write_store(
            url,
            lambda start: _stopping(source(960), 5),
            holdout,
            METADATA,
            storage_options=s3,
            **SMALL,
        )
    starts: list[int] = []

    def resumed(start):
        starts.append(start)
        return _skip(source(960), start)

    assert write_store(url, resumed, holdout, METADATA, storage_options=s3, **SMALL) == url
    assert starts == [320]
    remote = ActivationStore(url, storage_options=s3, cache_dir=tmp_path / "chunks")
    local = ActivationStore(store_path)
    assert remote.manifest == local.manifest
    remote_batches = iter(remote.train_dataloader(40, seed=0))
    pairs = zip(remote_batches, iter(local.train_dataloader(40, seed=0)), strict=False)
    for a, b in islice(pairs, 30):
        assert all(torch.equal(a[h], b[h]) for h in HOOKS)
    torch.testing.assert_close(
        remote.sample_activations(64), local.sample_activations(64), rtol=0, atol=0
    )


def _skip(chunks, n_tokens):
    for chunk in chunks:
        size = chunk[HOOKS[0]].shape[0]
        if size <= n_tokens:
            n_tokens -= size
            continue
        yield {k: v[n_tokens:] for k, v in chunk.items()}
        n_tokens = 0


def test_old_cache_converts_in_one_line(tmp_path):
    chunks = [
        {k: v for k, v in c.items() if k != "token_ids"} for c in source(640, chunk_tokens=320)
    ]
    holdout = {h: torch.randn(32, d) for h, d in zip(HOOKS, (8, 4), strict=True)}
    metadata = {
        **METADATA,
        "hook_names": HOOKS,
        "d_in": dict(zip(HOOKS, (8, 4), strict=True)),
        "prepend_bos": True,
        "dataset_path": None,
        "exclude_special_tokens": False,
    }
    old = old_cache.write_cache(tmp_path / "old", chunks, holdout, metadata)
    with pytest.raises(ValueError, match="convert_cache"):
        ActivationStore(old)
    convert_cache(old, tmp_path / "new", **SMALL)
    main(["convert", str(old), str(tmp_path / "bf16"), "--dtype", "bfloat16"])
    store = ActivationStore(tmp_path / "new")
    assert store.manifest["prepend_bos"] is True and store.n_tokens == 640
    assert ActivationStore(tmp_path / "bf16").manifest["dtype"] == "bfloat16"
    ids = torch.cat([b[HOOKS[0]] for b in islice(iter(store.train_dataloader(64, seed=0)), 10)])
    assert torch.equal(ids[:, 0].long().sort().values, torch.arange(640))
    torch.testing.assert_close(
        store.sample_activations(32, HOOKS[1]), holdout[HOOKS[1]], rtol=0, atol=0
    )


def test_sae_lens_cache_trains_through_the_same_interface(sae_lens_cache):
    from datasets import load_from_disk

    reference = load_from_disk(str(sae_lens_cache)).with_format("torch")
    acts, ids = reference["model.layers.0"], reference["token_ids"]  # [64, 16, 16], [64, 16]
    cache = open_activations(
        sae_lens_cache, holdout_tokens=64, metadata={"model_name": "tiny-llama"}
    )
    assert isinstance(cache, SaeLensCache) and cache.manifest["model_name"] == "tiny-llama"
    assert cache.hook_names == ["model.layers.0"] and cache.d_in_per_hook == {"model.layers.0": 16}
    assert cache.context_size == 16 and cache.n_tokens == 60 * 16  # the last 4 rows held out
    torch.testing.assert_close(
        cache.sample_activations(64), acts[60:].flatten(0, 1), rtol=0, atol=0
    )
    assert torch.equal(cache.holdout_token_rows(10), ids[60:].long())
    train = acts[:60].flatten(0, 1)
    epochs = list(islice(iter(cache.train_dataloader(batch_size=48, seed=1)), 40))  # 20 per epoch
    for first in (0, 20):
        epoch = torch.cat([b["model.layers.0"] for b in epochs[first : first + 20]])
        assert _same_rows(epoch, train)  # every training token exactly once, values exact
    # Two ranks: disjoint shards that cover the training rows; resume is bit-exact.
    shards = [
        torch.cat(
            [b["model.layers.0"] for b in islice(iter(_CacheStream(cache, 48, 1, True, r, 2)), 10)]
        )
        for r in (0, 1)
    ]
    assert _same_rows(torch.cat(shards), train)
    state = cache.state_dict(batches_consumed=13)
    again = pickle.loads(pickle.dumps(SaeLensCache(sae_lens_cache, holdout_tokens=64)))
    again.load_state_dict(state)
    resumed = list(islice(iter(again.train_dataloader(batch_size=48, seed=1)), 27))
    assert all(
        torch.equal(a["model.layers.0"], b["model.layers.0"])
        for a, b in zip(resumed, epochs[13:], strict=True)
    )


def _same_rows(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether ``a`` and ``b`` hold the same rows, in any order (exactly)."""
    order = lambda x: np.lexsort(x.numpy().T[::-1])  # noqa: E731
    return a.shape == b.shape and torch.equal(a[order(a)], b[order(b)])


@pytest.mark.slow
def test_two_ranks_shard_and_resume_exactly_through_lightning(tmp_path):
    tokens = torch.arange(1280)
    acts = torch.randn(1280, 8, generator=torch.Generator().manual_seed(0))
    acts[:, 0] = tokens.float()
    chunks = [{"blocks.0.hook_resid_post": acts[i : i + 128]} for i in range(0, 1280, 128)]
    write_store(
        tmp_path / "store",
        chunks,
        None,
        METADATA,
        block_tokens=16,
        chunk_bytes=10 * 16 * 32,
        shuffle_buffer_tokens=640,
    )
    result = subprocess.run(
        [sys.executable, str(HERE / "ddp_store.py"), str(tmp_path / "store"), str(tmp_path)],
        capture_output=True, text=True, timeout=400, cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    records = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["global_step"] for r in records] == [24, 24]
    shards = [set(r["epoch_tokens"]) for r in records]
    assert all(
        len(r["epoch_tokens"]) == len(s) == 640 for r, s in zip(records, shards, strict=True)
    )
    assert shards[0].isdisjoint(shards[1]) and shards[0] | shards[1] == set(range(1280))
    assert [(r["resumed_batches"], r["resumed_equal"]) for r in records] == [(16, True)] * 2
    assert not any(p.name == HOLDOUT for p in (tmp_path / "store").iterdir())
