"""ActivationDataModule on a tiny random HookedTransformer and real text (CPython's docs)."""

import pickle
from itertools import islice
from typing import Any

import datasets
import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from torch import Tensor

from lightning_sae import ActivationDataModule, BatchTopKSAE

HOOK = "blocks.1.hook_resid_post"
HOOKS = [HOOK, "blocks.0.hook_mlp_out"]


def make_dm(model: Any, documents: list[str], **kwargs: Any) -> ActivationDataModule:
    options: dict[str, Any] = {
        "hook_names": HOOK,
        "context_size": 32,
        "batch_size": 128,
        "shuffle_buffer_tokens": 512,
        "holdout_documents": 4,
    }
    dm = ActivationDataModule(model=model, dataset=documents, **(options | kwargs))
    dm.setup("fit")
    return dm


def batches(dm: ActivationDataModule, n: int, start: int = 0) -> list[Any]:
    return list(islice(dm._batches(start), n))


def test_activations_equal_run_with_cache(model, tokenizer, documents):
    dm = make_dm(model, documents, hook_names=HOOKS, shuffle=False)
    got = batches(dm, 3)
    n_rows = 3 * 128 // 32
    rows = torch.stack(list(islice(dm.token_rows(), n_rows)))
    # No silent shift: row 0 is BOS and then the first training document's first tokens.
    first = tokenizer(documents[4], add_special_tokens=False)["input_ids"]
    assert rows[0].tolist() == [tokenizer.bos_token_id, *first[:31]]
    _, cache = model.run_with_cache(rows, names_filter=HOOKS)
    for hook in HOOKS:
        expected = cache[hook].flatten(0, 1)
        torch.testing.assert_close(torch.cat([b[hook] for b in got]), expected)


def test_one_hook_batches_are_tensors_and_specials_are_dropped(model, tokenizer, documents):
    dm = make_dm(model, documents, shuffle=False, exclude_special_tokens=True)
    got = torch.cat(batches(dm, 2))
    assert got.shape == (256, dm.d_in)
    rows = torch.stack(list(islice(dm.token_rows(), 12)))
    _, cache = model.run_with_cache(rows, names_filter=[HOOK])
    kept = cache[HOOK][rows != tokenizer.bos_token_id]
    torch.testing.assert_close(got, kept[:256])


def test_shuffle_mixes_within_chunks_and_is_deterministic(model, documents):
    plain = torch.cat(batches(make_dm(model, documents, shuffle=False), 4))
    mixed = torch.cat(batches(make_dm(model, documents), 4))
    assert not torch.equal(plain, mixed)
    # the same tokens, reordered within each 512-token chunk
    for chunk in range(0, 512, 512):
        a, b = plain[chunk : chunk + 512], mixed[chunk : chunk + 512]
        torch.testing.assert_close(a.sort(0).values, b.sort(0).values)
    torch.testing.assert_close(mixed, torch.cat(batches(make_dm(model, documents), 4)))


def test_stream_restarts_at_any_batch(model, documents):
    dm = make_dm(model, documents, exclude_special_tokens=True, batch_size=96)
    full = batches(dm, 9)
    for start in (1, 5, 8):
        torch.testing.assert_close(batches(dm, 9 - start, start), full[start:])


class RecordBatches(Callback):
    def __init__(self) -> None:
        self.batches: list[Tensor] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.batches.append(batch.detach().clone())


def fit(dm: ActivationDataModule, max_steps: int, ckpt_path: str | None = None, **kwargs: Any):
    recorder = RecordBatches()
    trainer = L.Trainer(
        max_steps=max_steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, callbacks=[recorder], accelerator="cpu", **kwargs,
    )  # fmt: skip
    module = BatchTopKSAE(d_in=dm.d_in, d_sae=64, k=4, seed=0)
    trainer.fit(module, datamodule=dm, ckpt_path=ckpt_path)
    return trainer, module, recorder.batches


def test_interrupted_and_resumed_run_sees_the_same_activations(model, documents, tmp_path):
    options = {"exclude_special_tokens": True, "batch_size": 96}
    _, straight, seen = fit(make_dm(model, documents, **options), 8)
    trainer, _, first = fit(make_dm(model, documents, **options), 3)
    trainer.save_checkpoint(tmp_path / "step3.ckpt")
    _, resumed, rest = fit(make_dm(model, documents, **options), 8, str(tmp_path / "step3.ckpt"))
    assert len(first) == 3 and len(rest) == 5
    for a, b in zip(seen, first + rest, strict=True):
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(straight.sae.W_enc, resumed.sae.W_enc)


def test_exporter_contract(model, documents):
    dm = make_dm(model, documents, hook_names=HOOKS, dataset_column=None)
    assert dm.d_in == 32 and dm.d_in_per_hook == dict.fromkeys(HOOKS, 32)
    assert dm.sae_metadata() == {
        "model_name": model.cfg.model_name,
        "model_class_name": "HookedTransformer",
        "hook_name": HOOK,
        "hook_head_index": None,
        "context_size": 32,
        "prepend_bos": True,
        "dataset_path": None,
        "exclude_special_tokens": False,
    }
    before = batches(dm, 2)
    held_out = dm.sample_activations(100, hook_name="blocks.0.hook_mlp_out")
    assert held_out.shape == (100, 32) and held_out.device.type == "cpu"
    for a, b in zip(before, batches(dm, 2), strict=True):
        torch.testing.assert_close(a, b)
    with pytest.raises(ValueError, match="holdout_documents"):
        dm.sample_activations(10**7)


def test_token_sources_agree(model, tokenizer, documents, tmp_path):
    """Text, datasets (streaming or not), jsonl, token lists and a 2-D tensor give the same rows."""
    texts = documents[:12]
    ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    path = tmp_path / "docs.jsonl"
    datasets.Dataset.from_dict({"text": texts}).to_json(path)
    sources = [
        texts,
        datasets.Dataset.from_dict({"text": texts}),
        datasets.Dataset.from_dict({"input_ids": ids}),
        str(path),
        datasets.load_dataset("json", data_files=str(path), split="train", streaming=True),
        [torch.tensor(i) for i in ids],
    ]
    expected = None
    for source in sources:
        dm = make_dm(model, source, holdout_documents=0)
        rows = torch.stack(list(islice(dm.token_rows(), 8)))
        expected = rows if expected is None else expected
        torch.testing.assert_close(rows, expected)
    # A 2-D tensor is one document per row; rows that already start with BOS pass unchanged.
    dm = make_dm(model, expected, holdout_documents=0)
    torch.testing.assert_close(torch.stack(list(islice(dm.token_rows(), 8))), expected)


# ---------------------------------------------------------------------- clear errors
def test_unknown_hook_name_lists_close_matches(model, documents):
    with pytest.raises(ValueError, match=r"blocks\.1\.hook_resid_post"):
        make_dm(model, documents, hook_names="blocks.1.hook_resid_pots")


def test_context_size_above_model_maximum(model, documents):
    with pytest.raises(ValueError, match="maximum context of 64"):
        make_dm(model, documents, context_size=65)


def test_empty_dataset(model):
    with pytest.raises(ValueError, match="empty"):
        make_dm(model, [])
    with pytest.raises(ValueError, match="empty"):
        make_dm(model, ["only", "held", "out"], holdout_documents=3)


def test_missing_text_column(model):
    with pytest.raises(ValueError, match=r"no column .*'content'"):
        make_dm(model, datasets.Dataset.from_dict({"content": ["a b c"]}))
    with pytest.raises(ValueError, match="'body'"):
        make_dm(model, datasets.Dataset.from_dict({"text": ["a"]}), dataset_column="body")


@pytest.mark.parametrize(
    ("name", "hook"), [("gpt2", "blocks.0.hook_resid_post"), ("no-such/model", "model.layers.0")]
)
def test_model_that_cannot_be_loaded_offline(name, hook, documents):
    dm = ActivationDataModule(model=name, hook_names=hook, dataset=documents)
    with pytest.raises(OSError, match="local folder"):
        dm.setup("fit")


def test_without_bos_rows_are_the_documents_tokens(model, tokenizer, documents):
    dm = make_dm(model, documents, prepend_bos=False, shuffle=False)
    rows = torch.stack(list(islice(dm.token_rows(), 4)))
    first = tokenizer(documents[4], add_special_tokens=False)["input_ids"]
    assert rows.flatten()[:64].tolist() == first[:64]
    _, cache = model.run_with_cache(rows, names_filter=[HOOK])
    torch.testing.assert_close(batches(dm, 1)[0], cache[HOOK].flatten(0, 1))


def test_pickles_for_ddp_spawn(model, documents):
    dm = make_dm(model, documents)
    clone = pickle.loads(pickle.dumps(dm))
    torch.testing.assert_close(batches(clone, 2), batches(dm, 2))


def test_module_and_data_seeds_may_differ_with_a_logger(model, documents, tmp_path):
    from lightning.pytorch.loggers import CSVLogger

    dm = make_dm(model, documents, seed=2)
    module = BatchTopKSAE(d_in=dm.d_in, d_sae=32, k=4, seed=1)
    trainer = L.Trainer(
        max_steps=1, logger=CSVLogger(tmp_path), enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
    )  # fmt: skip
    trainer.fit(module, datamodule=dm)  # Lightning logs both modules' hyper-parameters
    assert trainer.global_step == 1
