"""An export attaches to sae-lens's HookedSAETransformer with no workaround: its hook fires.

The model the export names is rebuilt by ``load_model_for_sae`` from the metadata alone: a local
Hugging Face folder (a tiny random Llama here) or the offline default SmolLM2-135M (slow).
"""

import lightning as L
import pytest
import torch
from sae_lens import SAE, HookedSAETransformer
from transformers import LlamaConfig, LlamaForCausalLM

from lightning_sae import ActivationDataModule, BatchTopKSAE, export_to_sae_lens
from lightning_sae.data import shakespeare_documents
from lightning_sae.evaluation import load_model_for_sae


def train_and_export(dm: ActivationDataModule, path, steps: int = 2) -> SAE:
    module = BatchTopKSAE(d_in=dm.d_in, d_sae=4 * dm.d_in, k=8, seed=0)
    L.Trainer(
        max_steps=steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, accelerator="cpu",
    ).fit(module, datamodule=dm)  # fmt: skip
    return SAE.load_from_disk(export_to_sae_lens(module, path, calibration_tokens=256))


def assert_attaches(sae: SAE, model: HookedSAETransformer, tokens: torch.Tensor) -> None:
    """The SAE is attached, runs on the hook (its latents are cached) and changes the loss."""
    hook = sae.cfg.metadata.hook_name
    clean = model(tokens, return_type="loss")
    model.add_sae(sae)
    assert hook in model.acts_to_saes  # sae-lens only logs "No hook found" when it is not
    _, cache = model.run_with_cache(tokens)
    latents = cache[f"{hook}.hook_sae_acts_post"]
    assert latents.shape == (*tokens.shape, sae.cfg.d_sae) and latents.count_nonzero() > 0
    assert not torch.isclose(model(tokens, return_type="loss"), clean, rtol=1e-4)
    model.reset_saes()
    torch.testing.assert_close(model(tokens, return_type="loss"), clean)


def test_module_path_export_attaches_to_a_rebuilt_hooked_sae_transformer(
    tokenizer, documents, tmp_path
):
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )  # fmt: skip
    folder = tmp_path / "tiny-llama"
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    dm = ActivationDataModule(
        model=str(folder), hook_names="model.layers.1", dataset=documents, context_size=32,
        batch_size=128, exclude_special_tokens=True,
    )  # fmt: skip
    sae = train_and_export(dm, tmp_path / "sae")
    metadata = sae.cfg.metadata
    assert (metadata.hook_name, metadata.model_class_name, metadata.model_name) == (
        "blocks.1.hook_resid_post",
        "HookedTransformer",
        str(folder),
    )
    model = load_model_for_sae(tmp_path / "sae")
    assert isinstance(model, HookedSAETransformer)
    rows = dm.holdout_token_rows(2)
    # The rebuilt hook sees the activations the SAE was trained on.
    _, cache = model.run_with_cache(rows, names_filter=[metadata.hook_name])
    torch.testing.assert_close(
        cache[metadata.hook_name], dm.hooked_model.activations(rows)["model.layers.1"],
        rtol=1e-4, atol=1e-5,
    )  # fmt: skip
    assert_attaches(sae, model, rows)


def test_export_without_model_name_is_a_clear_error(tmp_path):
    from lightning_sae import TopKSAE

    path = export_to_sae_lens(TopKSAE(d_in=8, d_sae=16, k=2), tmp_path / "sae")
    with pytest.raises(ValueError, match="names no model_name"):
        load_model_for_sae(path)


@pytest.mark.slow
def test_offline_default_export_attaches(tmp_path):
    """SmolLM2-135M by transformer-lens hook name, end to end, on a few hundred tokens."""
    dm = ActivationDataModule(
        model="smollm2-135m", hook_names="blocks.0.hook_resid_post",
        dataset=shakespeare_documents()[:10], context_size=64, batch_size=128, holdout_documents=2,
        shuffle_buffer_tokens=512, exclude_special_tokens=True,
    )  # fmt: skip
    sae = train_and_export(dm, tmp_path / "sae")
    metadata = sae.cfg.metadata
    assert metadata.model_name == "smollm2-135m" and metadata.context_size == 64
    assert metadata.dataset_path == "lightning_sae.data.shakespeare_documents"
    assert metadata.prepend_bos is True and metadata.model_class_name == "HookedTransformer"
    model = load_model_for_sae(sae)
    assert_attaches(sae, model, dm.holdout_token_rows(1)[:, :32])
