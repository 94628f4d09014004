"""Hook naming across transformer-lens and Hugging Face, on tiny random Llama and GPT-2 models.

transformer-lens builds each model from the Hugging Face weights (no hub access), and its
``blocks.N.hook_resid_post`` must equal the output of Hugging Face decoder layer ``N`` (the module
path an export then records under the transformer-lens name).
"""

from pathlib import Path

import pytest
import torch
from transformer_lens import HookedTransformer
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from lightning_sae import ActivationDataModule
from lightning_sae.data.models import (
    build_hooked_transformer,
    exported_hook,
    load_hooked_model,
    transformer_lens_hook_name,
)


def tiny_llama(tokenizer) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )  # fmt: skip
    return LlamaForCausalLM(config).eval()


def tiny_gpt2(tokenizer) -> GPT2LMHeadModel:
    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=len(tokenizer), n_embd=32, n_layer=3, n_head=4, n_positions=64, n_ctx=64,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )  # fmt: skip
    return GPT2LMHeadModel(config).eval()


@pytest.fixture
def llama_folder(tokenizer, tmp_path) -> Path:
    """A tiny random Llama saved as a local Hugging Face folder, as a user's model would be."""
    folder = tmp_path / "tiny-llama"
    tiny_llama(tokenizer).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_module_path_mapping():
    assert transformer_lens_hook_name("model.layers.12") == "blocks.12.hook_resid_post"
    assert transformer_lens_hook_name("transformer.h.0") == "blocks.0.hook_resid_post"
    assert transformer_lens_hook_name("gpt_neox.layers.3") == "blocks.3.hook_resid_post"
    for other in ("model.layers.1.mlp", "model.embed_tokens", "blocks.1.hook_resid_post"):
        assert transformer_lens_hook_name(other) is None
    assert exported_hook("model.layers.2", "AutoModelForCausalLM") == (
        "blocks.2.hook_resid_post",
        "HookedTransformer",
    )
    assert exported_hook("model.layers.2.mlp", "AutoModelForCausalLM") == (
        "model.layers.2.mlp",
        "AutoModelForCausalLM",
    )
    assert exported_hook("blocks.2.hook_z", "HookedTransformer") == (
        "blocks.2.hook_z",
        "HookedTransformer",
    )


@pytest.mark.parametrize(
    ("build", "layers"), [(tiny_llama, "model.layers"), (tiny_gpt2, "transformer.h")],
    ids=["llama", "gpt2"],
)  # fmt: skip
def test_transformer_lens_resid_post_equals_the_decoder_layer_output(build, layers, tokenizer):
    hf = build(tokenizer)
    paths = [f"{layers}.{n}" for n in range(3)]
    by_module_path = load_hooked_model(hf, paths, tokenizer=tokenizer)
    hooked = build_hooked_transformer(hf, tokenizer=tokenizer)
    assert isinstance(hooked, HookedTransformer)
    tokens = torch.randint(3, len(tokenizer), (2, 16))
    expected = by_module_path.activations(tokens)
    with torch.no_grad():
        _, cache = hooked.run_with_cache(tokens)
        torch.testing.assert_close(hooked(tokens), hf(tokens).logits, rtol=1e-4, atol=1e-5)
    for path in paths:
        got = cache[transformer_lens_hook_name(path)]
        torch.testing.assert_close(got, expected[path], rtol=1e-4, atol=1e-5)


def test_transformer_lens_hooks_on_a_local_hugging_face_folder(llama_folder, tokenizer, documents):
    """The DataModule builds the folder as a HookedTransformer for transformer-lens hook names."""
    dm = ActivationDataModule(
        model=str(llama_folder), hook_names="blocks.1.hook_resid_post", dataset=documents,
        context_size=32, batch_size=64, shuffle=False,
    )  # fmt: skip
    assert isinstance(dm.hooked_model.model, HookedTransformer)
    rows = dm.holdout_token_rows(2)
    hf = LlamaForCausalLM.from_pretrained(llama_folder).eval()
    with torch.no_grad():
        expected = hf(rows, output_hidden_states=True).hidden_states[2]
    got = dm.hooked_model.activations(rows)["blocks.1.hook_resid_post"]
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    assert dm.sae_metadata() | {"dataset_path": None} == {
        "model_name": str(llama_folder),
        "model_class_name": "HookedTransformer",
        "hook_name": "blocks.1.hook_resid_post",
        "hook_head_index": None,
        "context_size": 32,
        "prepend_bos": True,
        "dataset_path": None,
        "exclude_special_tokens": False,
    }


def test_module_path_hooks_export_transformer_lens_names(llama_folder, documents):
    dm = ActivationDataModule(
        model=str(llama_folder), hook_names=["model.layers.0", "model.layers.2.mlp"],
        dataset=documents, context_size=32, batch_size=64,
    )  # fmt: skip
    assert dm.hooked_model.model_class_name == "AutoModelForCausalLM"  # read by module path
    first = dm.sae_metadata()
    assert (first["hook_name"], first["model_class_name"]) == (
        "blocks.0.hook_resid_post",
        "HookedTransformer",
    )
    # Either name reaches the same hook; a module without a transformer-lens name keeps its own.
    assert dm.sae_metadata("blocks.0.hook_resid_post") == first
    mlp = dm.sae_metadata("model.layers.2.mlp")
    assert (mlp["hook_name"], mlp["model_class_name"]) == (
        "model.layers.2.mlp",
        "AutoModelForCausalLM",
    )
    torch.testing.assert_close(
        dm.sample_activations(50, hook_name="blocks.0.hook_resid_post"),
        dm.sample_activations(50, hook_name="model.layers.0"),
    )


def test_wrong_naming_scheme_is_a_short_message_about_hooks(tokenizer, model):
    llama = tiny_llama(tokenizer)
    with pytest.raises(ValueError, match="transformer-lens hook name") as error:
        load_hooked_model(
            llama, ["blocks.1.hook_resid_post"], model_class_name="AutoModelForCausalLM",
            tokenizer=tokenizer,
        )  # fmt: skip
    assert "model.layers.6" in str(error.value) and len(str(error.value)) < 600
    with pytest.raises(ValueError, match="Hugging Face module path") as error:
        load_hooked_model(model, ["model.layers.1"])
    assert "'blocks.1.hook_resid_post'" in str(error.value) and len(str(error.value)) < 600


def test_architecture_transformer_lens_cannot_build(tokenizer):
    from transformers import BertConfig, BertForMaskedLM

    config = BertConfig(
        vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
        intermediate_size=64,
    )  # fmt: skip
    bert = BertForMaskedLM(config)
    bert.config.architectures = ["NotARealArchitecture"]
    with pytest.raises(ValueError, match="module path instead"):
        build_hooked_transformer(bert, tokenizer=tokenizer)
