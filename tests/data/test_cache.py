"""The DataModule on an activation store: written by ``write_cache`` / ``lightning-sae cache``, read
by ``cache_dir=``; exact round trip, litdata opens it, resume through a checkpoint, a killed write
resumes, object storage on loopback, sae-lens caches, old caches refused with the conversion."""

import hashlib
import json
import runpy
import subprocess
import sys
from collections import Counter
from itertools import islice
from pathlib import Path
from typing import Any

import lightning as L
import litdata
import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import Callback

from lightning_sae import ActivationDataModule, TopKSAE, export_to_sae_lens
from lightning_sae.cli import main as cli
from lightning_sae.data import cache as old_cache
from lightning_sae.data.store import INDEX, MANIFEST, PROGRESS, _Location

HOOKS = ["blocks.1.hook_resid_post", "blocks.0.hook_mlp_out"]
SCRIPTS = Path(__file__).parents[1] / "scripts"
#: 16-token blocks, 4 per chunk file (64 tokens; 2 hooks of d_in 32 + token ids), 512-token buffers.
STORE = {"block_tokens": 16, "chunk_bytes": 4 * 16 * (2 * 32 * 4 + 4)}


@pytest.fixture
def live(model, documents) -> ActivationDataModule:
    dm = ActivationDataModule(
        model=model, hook_names=HOOKS, dataset=documents, context_size=32, batch_size=128,
        shuffle_buffer_tokens=512, shuffle=False, holdout_documents=4,
    )  # fmt: skip
    dm.setup("fit")
    return dm


@pytest.fixture
def store(live, tmp_path) -> Path:
    """2,000 tokens (125 blocks) and 300 held-out tokens of the live stream."""
    live.write_cache(tmp_path / "store", n_tokens=2000, holdout_tokens=300, **STORE)
    return tmp_path / "store"


def table(ids: torch.Tensor, acts: dict[str, torch.Tensor]) -> torch.Tensor:
    """One row per token: its id and every hook's activations (exact in float32)."""
    return torch.cat([ids[:, None].float(), *(acts[h] for h in HOOKS)], 1)


def same_rows(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether ``a`` and ``b`` hold the same rows in any order (exactly)."""
    order = lambda x: np.lexsort(x.numpy().T[::-1])  # noqa: E731
    return a.shape == b.shape and torch.equal(a[order(a)], b[order(b)])


def test_store_round_trip_equals_the_live_model(live, store):
    # The live stream's first 2,000 tokens, in order, with their token ids.
    stream = list(islice(live._batches(0), 16))
    acts = {h: torch.cat([b[h] for b in stream])[:2000] for h in HOOKS}
    ids = torch.stack(list(islice(live.token_rows(), 63))).flatten()[:2000]
    # litdata opens the store as it is: 125 items of 16 tokens, mixed at write time.
    dataset = litdata.StreamingDataset(str(store))
    items = [dataset[i] for i in range(len(dataset))]
    assert len(items) == 125 and set(items[0]) == {*HOOKS, "token_ids"}
    stored = {k: torch.cat([item[k] for item in items]) for k in (*HOOKS, "token_ids")}
    assert same_rows(table(stored["token_ids"], stored), table(ids, acts))
    assert not torch.equal(stored["token_ids"], ids.to(torch.int32))  # shuffled on write

    cached = ActivationDataModule(cache_dir=store, batch_size=100)
    cached.setup("fit")
    manifest = cached.source.store.manifest
    assert (manifest["n_tokens"], manifest["input_tokens"], manifest["dtype"]) == (
        2000, 2000, "float32",
    )  # fmt: skip
    assert cached.hook_names == HOOKS and cached.d_in_per_hook == dict.fromkeys(HOOKS, 32)
    assert cached.sae_metadata() == live.sae_metadata()
    assert cached.sae_metadata(HOOKS[1]) == live.sae_metadata(HOOKS[1])
    torch.testing.assert_close(
        cached.sample_activations(300, HOOKS[1]), live.sample_activations(300, HOOKS[1]),
        rtol=0, atol=0,
    )  # fmt: skip
    with pytest.raises(ValueError, match="fewer than the 301"):
        cached.sample_activations(301)
    batches = list(islice(iter(cached.train_dataloader()), 19))  # 19 x 100 < one epoch
    read = {h: torch.cat([b[h] for b in batches]) for h in HOOKS}
    assert all(b[h].shape == (100, 32) for b in batches for h in HOOKS)
    # Within an epoch no token comes twice: the rows read are a sub-multiset of the stream's
    # (BOS positions repeat the same activations, so rows are counted, not collected in a set).
    known = Counter(map(tuple, torch.cat([acts[h] for h in HOOKS], 1).tolist()))
    got = Counter(map(tuple, torch.cat([read[h] for h in HOOKS], 1).tolist()))
    assert sum(got.values()) == 1900 and not got - known
    validation = list(iter(cached.val_dataloader()))
    assert sum(b[HOOKS[0]].shape[0] for b in validation) == 300
    one = ActivationDataModule(cache_dir=store, hook_names=HOOKS[0], batch_size=100)
    assert isinstance(next(iter(one.train_dataloader())), torch.Tensor)


def test_store_mismatches_and_old_caches_are_clear_errors(live, store, tmp_path):
    with pytest.raises(ValueError, match="holds activations of model"):
        ActivationDataModule(cache_dir=store, model="gpt2")
    with pytest.raises(ValueError, match=r"no activations for hooks \['blocks.2"):
        ActivationDataModule(cache_dir=store, hook_names="blocks.2.hook_resid_post")
    with pytest.raises(FileExistsError, match="append=True"):
        live.write_cache(store, n_tokens=512)
    with pytest.raises(FileNotFoundError, match="holds no store"):
        ActivationDataModule(cache_dir=tmp_path / "nothing")
    with pytest.raises(ValueError, match="cache_options apply to cache_dir"):
        ActivationDataModule(model=live.source.model_spec, hook_names=HOOKS, dataset=["a b"],
                             cache_options={"cache_dir": "x"})  # fmt: skip
    metadata = {**live.source.metadata(), "hook_names": HOOKS, "d_in": live.d_in_per_hook}
    chunks = [{h: torch.randn(64, 32) for h in HOOKS}]
    old = old_cache.write_cache(tmp_path / "old", chunks, None, metadata)
    with pytest.raises(ValueError, match=r"python -m lightning_sae\.data\.store convert"):
        ActivationDataModule(cache_dir=old)


def edit(store: Path, name: str, change: Any) -> None:
    """Change a JSON file of the store in place."""
    content = json.loads((store / name).read_text())
    change(content)
    (store / name).write_text(json.dumps(content))


@pytest.mark.parametrize(
    ("damage", "error", "message"),
    [
        (lambda s: (s / "chunk-0-0.bin").write_bytes(b"x" * 9), ValueError, "chunk-0-0.bin"),
        (lambda s: (s / "chunk-0-3.bin").unlink(), ValueError, "missing or corrupt"),
        (lambda s: (s / INDEX).write_text("{"), ValueError, "index.json is not valid JSON"),
        (lambda s: (s / MANIFEST).unlink(), FileNotFoundError, "without our lightning_sae.json"),
        (lambda s: (s / MANIFEST).write_text('{"version": 2}'), ValueError, "version=2"),
        (lambda s: (s / "holdout.safetensors").unlink(), ValueError, "holdout.safetensors"),
        (lambda s: edit(s, MANIFEST, lambda m: m.pop("d_in")), ValueError, "lacks .*'d_in'"),
        (lambda s: edit(s, MANIFEST, lambda m: m.update(n_tokens=9)), ValueError, "states 9"),
        (
            lambda s: edit(s, MANIFEST, lambda m: m["holdout"].update(file="../x")),
            ValueError,
            r"\['\.\./x'\] that are not plain names",
        ),
        (
            lambda s: edit(s, INDEX, lambda i: i["chunks"][0].update(filename="/etc/passwd")),
            ValueError,
            "not plain names",
        ),
    ],
    ids=[
        "corrupt-chunk",
        "missing-chunk",
        "bad-index",
        "no-manifest",
        "version-2",
        "no-holdout",
        "no-d_in",
        "overstated",
        "holdout-outside",
        "chunk-outside",
    ],
)
def test_a_damaged_store_is_an_error_naming_the_file_and_the_fix(store, damage, error, message):
    damage(store)
    with pytest.raises(error, match=message) as raised:
        dm = ActivationDataModule(cache_dir=store, batch_size=100)
        list(islice(iter(dm.train_dataloader()), 20))  # one epoch: every chunk file
        dm.sample_activations(300)
    assert "rewrite" in str(raised.value) or "write_cache(path, n_tokens)" in str(raised.value)


@pytest.mark.parametrize("killed", [False, True], ids=["whole", "killed-before-the-index"])
def test_append_continues_the_stream(live, store, killed, monkeypatch):
    if killed:  # the manifest already counts the append, the index does not: resume it
        write_text = _Location.write_text

        def killed_at_the_index(self, file: str, text: str) -> None:
            if file == INDEX:
                raise KeyboardInterrupt
            write_text(self, file, text)

        with monkeypatch.context() as patch:
            patch.setattr(_Location, "write_text", killed_at_the_index)
            with pytest.raises(KeyboardInterrupt):
                live.write_cache(store, n_tokens=1000, append=True, **STORE)
    live.write_cache(store, n_tokens=1000, append=True, **STORE)
    stream = list(islice(live._batches(0), 24))
    acts = {h: torch.cat([b[h] for b in stream])[:3000] for h in HOOKS}
    ids = torch.stack(list(islice(live.token_rows(), 94))).flatten()[:3000]
    manifest = json.loads((store / MANIFEST).read_text())
    assert (manifest["n_tokens"], manifest["input_tokens"]) == (2992, 3000)  # 8: no whole block
    assert manifest["holdout"]["n_tokens"] == 300  # kept
    dataset = litdata.StreamingDataset(str(store))
    stored = {k: torch.cat([dataset[i][k] for i in range(len(dataset))]) for k in dataset[0]}
    rows = Counter(map(tuple, table(stored["token_ids"], stored).tolist()))
    assert len(dataset) == 187 and sum(rows.values()) == 2992
    # The first 2,000 tokens of the stream, then 992 of the next 1,000 (not the first ones again).
    head = Counter(map(tuple, table(ids[:2000], {h: a[:2000] for h, a in acts.items()}).tolist()))
    assert not rows - Counter(map(tuple, table(ids, acts).tolist())) and not head - rows


class RecordBatches(Callback):
    def __init__(self) -> None:
        self.batches: list[torch.Tensor] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.batches.append(batch.detach().clone())


def fit(store: Path, steps: int, root: Path, ckpt: Path | None = None, **data: Any) -> tuple:
    recorder = RecordBatches()
    module = TopKSAE(d_in=32, d_sae=64, k=4, seed=0)
    trainer = L.Trainer(
        max_steps=steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, accelerator="cpu", default_root_dir=root, callbacks=[recorder],
    )  # fmt: skip
    dm = ActivationDataModule(cache_dir=store, hook_names=HOOKS[0], batch_size=100, **data)
    trainer.fit(module, datamodule=dm, ckpt_path=ckpt)
    return trainer, module, recorder.batches


@pytest.mark.slow
def test_fit_from_the_store_resumes_bit_exactly(store, tmp_path):
    _, straight, batches = fit(store, 22, tmp_path)  # past the first epoch (19 batches)
    trainer, _, first = fit(store, 7, tmp_path)
    trainer.save_checkpoint(tmp_path / "step7.ckpt")
    state = torch.load(tmp_path / "step7.ckpt", weights_only=True)["datamodule_hyper_parameters"]
    assert state["cache_dir"] == str(store)
    _, resumed, rest = fit(store, 22, tmp_path, tmp_path / "step7.ckpt")
    assert len(first) == 7 and len(rest) == 15
    assert all(torch.equal(a, b) for a, b in zip(first + rest, batches, strict=True))
    for name, value in straight.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[name]), name


@pytest.mark.slow
def test_two_ranks_fit_from_the_store_and_resume_exactly(tmp_path):
    write = runpy.run_path(str(SCRIPTS / "cache_write.py"))
    (tmp_path / "out").mkdir()
    write["main"](str(tmp_path / "store"), tmp_path / "out", None)
    result = subprocess.run(
        [sys.executable, str(SCRIPTS / "ddp_store_fit.py"), str(tmp_path / "store"), str(tmp_path)],
        capture_output=True, text=True, timeout=400, cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    records = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["global_step"] for r in records] == [12, 12]
    # The first epoch (8 batches of 64 per rank): the two ranks' rows together are the store's.
    dataset = litdata.StreamingDataset(str(tmp_path / "store"))
    stored = torch.cat([dataset[i]["blocks.0.hook_resid_post"] for i in range(len(dataset))])
    rows = [hashlib.sha256(row.numpy().tobytes()).hexdigest() for row in stored]
    assert [len(r["epoch_rows"]) for r in records] == [512, 512]
    assert Counter(records[0]["epoch_rows"]) + Counter(records[1]["epoch_rows"]) == Counter(rows)
    assert [(r["resumed_batches"], r["resumed_equal"]) for r in records] == [(8, True)] * 2
    assert records[0]["weights"] == records[1]["weights"]  # DDP: the same weights on both ranks
    assert records[0]["weights"] == records[0]["straight_weights"]  # resumed = uninterrupted


@pytest.mark.slow
def test_a_killed_write_resumes_where_it_stopped(tmp_path):
    script = str(SCRIPTS / "cache_write.py")
    for name in ("killed", "straight"):
        (tmp_path / f"{name}.out").mkdir()

    def run(name: str, *kill_at: str) -> subprocess.CompletedProcess:
        args = [sys.executable, script, str(tmp_path / name), str(tmp_path / f"{name}.out")]
        return subprocess.run([*args, *kill_at], capture_output=True, text=True, timeout=300)

    killed = run("killed", "4")  # model calls: chunk 0, held-out part, chunks 1, 2 (killed), 3
    assert killed.returncode == -9, killed.stderr[-2000:]
    progress = json.loads((tmp_path / "killed" / PROGRESS).read_text())
    assert progress["input_tokens"] == 512 and not (tmp_path / "killed" / INDEX).exists()
    with pytest.raises(FileNotFoundError, match="interrupted write"):
        ActivationDataModule(cache_dir=tmp_path / "killed")
    resumed = run("killed")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert json.loads((tmp_path / "killed.out" / "calls.json").read_text()) == 2  # chunks 2, 3
    assert run("straight").returncode == 0
    assert json.loads((tmp_path / "straight.out" / "calls.json").read_text()) == 5
    files = sorted(p.name for p in (tmp_path / "straight").iterdir())
    assert files == sorted(p.name for p in (tmp_path / "killed").iterdir())
    for name in files:
        if name != INDEX:  # its updated_at differs
            assert (tmp_path / "killed" / name).read_bytes() == (
                tmp_path / "straight" / name
            ).read_bytes(), name
    assert litdata.StreamingDataset(str(tmp_path / "killed"))[0].keys() == {
        "blocks.0.hook_resid_post", "blocks.1.hook_mlp_out", "token_ids",
    }  # fmt: skip


def test_object_store_on_a_loopback_server(live, store, s3, tmp_path):
    url = "s3://acts/datamodule"
    assert live.write_cache(url, 2000, 300, storage_options=s3, **STORE) == url
    options = {"storage_options": s3, "cache_dir": str(tmp_path / "chunks")}
    remote = ActivationDataModule(cache_dir=url, batch_size=100, cache_options=options)
    # The keys reach neither checkpoints (hparams) nor loggers (hparams_initial).
    for saved in (remote.hparams, remote.hparams_initial):
        assert saved["cache_options"] == {"cache_dir": str(tmp_path / "chunks")}
    local = ActivationDataModule(cache_dir=store, batch_size=100)
    assert remote.source.store.manifest == local.source.store.manifest
    pairs = zip(iter(remote.train_dataloader()), iter(local.train_dataloader()), strict=False)
    for a, b in islice(pairs, 25):
        assert all(torch.equal(a[h], b[h]) for h in HOOKS)
    torch.testing.assert_close(
        remote.sample_activations(300), local.sample_activations(300), rtol=0, atol=0
    )
    assert any((tmp_path / "chunks").rglob("chunk-*.bin"))  # downloaded to the local cache


def test_sae_lens_cache_trains_and_exports(sae_lens_cache, tmp_path):
    from datasets import load_from_disk

    acts = load_from_disk(str(sae_lens_cache)).with_format("torch")["model.layers.0"]
    options = {"metadata": {"model_name": "tiny-llama"}, "holdout_tokens": 64}
    dm = ActivationDataModule(cache_dir=sae_lens_cache, batch_size=48, cache_options=options)
    assert dm.hook_names == ["model.layers.0"] and dm.d_in == 16 and dm.context_size == 16
    torch.testing.assert_close(dm.sample_activations(64), acts[60:].flatten(0, 1), rtol=0, atol=0)
    assert dm.holdout_token_rows(4).shape == (4, 16)
    module = TopKSAE(d_in=16, d_sae=32, k=4, seed=0)
    trainer = L.Trainer(
        max_steps=3, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, accelerator="cpu",
    )  # fmt: skip
    trainer.fit(module, datamodule=dm)
    assert trainer.global_step == 3
    export = export_to_sae_lens(module, tmp_path / "sae")
    config = json.loads((export / "cfg.json").read_text())
    assert config["metadata"]["model_name"] == "tiny-llama"
    assert config["metadata"]["hook_name"] == "blocks.0.hook_resid_post"  # exported name


CONFIG = """\
trainer:
  max_steps: 2
  logger: false
  enable_checkpointing: false
  enable_progress_bar: false
  accelerator: cpu
model:
  class_path: lightning_sae.TopKSAE
  init_args:
    d_sae: 32
    k: 4
data:
  class_path: lightning_sae.ActivationDataModule
  init_args:
    model:
      class_path: transformer_lens.HookedTransformer
      init_args:
        cfg: {{n_layers: 1, d_model: 16, n_ctx: 32, d_head: 4, n_heads: 4, d_mlp: 32,
              d_vocab: 100, act_fn: gelu, seed: 0}}
    hook_names: blocks.0.hook_resid_post
    dataset: {tokens}
    context_size: 16
    prepend_bos: false
    batch_size: 64
    holdout_documents: 4
"""


def test_command_line_writes_a_store_and_trains_from_it(tmp_path, capsys):
    tokens = torch.randint(0, 100, (40, 40), generator=torch.Generator().manual_seed(0))
    (tmp_path / "tokens.jsonl").write_text("".join(json.dumps({"tokens": t}) + "\n"
                                                   for t in tokens.tolist()))  # fmt: skip
    config = tmp_path / "fit.yaml"
    config.write_text(CONFIG.format(tokens=tmp_path / "tokens.jsonl"))
    store = tmp_path / "store"
    command = ["cache", "--config", str(config), "--path", str(store), "--n_tokens", "1024",
               "--dtype", "bfloat16", "--holdout_tokens", "128",
               "--block_tokens", "16"]  # fmt: skip
    cli(command)
    assert capsys.readouterr().out.strip() == str(store)
    manifest = json.loads((store / MANIFEST).read_text())
    assert (manifest["dtype"], manifest["n_tokens"], manifest["holdout"]["n_tokens"]) == (
        "bfloat16", 1024, 128,
    )  # fmt: skip
    with pytest.raises(SystemExit) as exit_:  # writing it again: a usage error, not a traceback
        cli(command)
    assert exit_.value.code != 0
    cli(["fit", "--config", str(config), f"--trainer.default_root_dir={tmp_path}",
         f"--data.init_args.cache_dir={store}", "--data.init_args.model=null",
         "--data.init_args.dataset=null"])  # fmt: skip
    with pytest.raises(SystemExit) as exit_:
        cli(["cache", "--config", str(config), "--path", str(tmp_path / "x"), "--n_tokens", "0"])
    assert exit_.value.code == 2
    # A config may build Lightning components only: a function as the dataset is refused unrun.
    run_code = {"class_path": "os.system", "init_args": {"command": f"touch {tmp_path}/PWNED"}}
    with pytest.raises(SystemExit) as exit_:
        cli(["cache", "--config", str(config), "--path", str(tmp_path / "y"), "--n_tokens", "64",
             f"--data.init_args.dataset={json.dumps(run_code)}"])  # fmt: skip
    assert exit_.value.code == 2 and "is not allowed" in capsys.readouterr().err
    assert not (tmp_path / "PWNED").exists() and not (tmp_path / "y").exists()


def test_write_cache_warns_when_the_documents_run_out(model, documents, tmp_path) -> None:
    """A store asked for more tokens than the training documents hold says they repeat."""
    few = ActivationDataModule(
        model=model, hook_names=HOOKS, dataset=documents[:6], context_size=32, batch_size=128,
        shuffle_buffer_tokens=512, shuffle=False, holdout_documents=4,
    )  # fmt: skip
    few.setup("fit")
    enough = sum(len(text) for text in documents[4:6])  # more tokens than the two hold
    with pytest.warns(UserWarning, match="used up its training documents"):
        few.write_cache(tmp_path / "store", n_tokens=enough, holdout_tokens=0, **STORE)
    assert (tmp_path / "store" / INDEX).exists()
