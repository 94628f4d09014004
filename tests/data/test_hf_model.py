"""Hugging Face models by module path, on a tiny random Llama (SmolLM2 is in test_offline)."""

from itertools import islice

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from lightning_sae import ActivationDataModule

HOOKS = ["model.layers.0", "model.layers.2"]


@pytest.fixture
def llama(tokenizer) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )  # fmt: skip
    return LlamaForCausalLM(config).eval()


def test_module_path_hooks_equal_hidden_states(llama, tokenizer, documents):
    dm = ActivationDataModule(
        model=llama, tokenizer=tokenizer, hook_names=HOOKS, dataset=documents, context_size=32,
        batch_size=128, shuffle=False, shuffle_buffer_tokens=256,
    )  # fmt: skip
    dm.setup("fit")
    assert dm.d_in == 32 and dm.hooked_model.model_class_name == "AutoModelForCausalLM"
    later = []
    llama.model.layers[3].register_forward_hook(lambda *args: later.append(1))
    got = list(islice(dm._batches(0), 2))
    assert not later  # stopped after model.layers.2
    rows = torch.stack(list(islice(dm.token_rows(), 8)))
    with torch.no_grad():
        hidden = llama(rows, output_hidden_states=True).hidden_states
    for layer, hook in ((0, HOOKS[0]), (2, HOOKS[1])):
        torch.testing.assert_close(
            torch.cat([b[hook] for b in got]), hidden[layer + 1].flatten(0, 1)
        )


def test_unknown_module_path_lists_close_matches(llama, tokenizer, documents):
    with pytest.raises(ValueError, match=r"model\.layers\.1"):
        ActivationDataModule(
            model=llama, tokenizer=tokenizer, hook_names="model.layer.1", dataset=documents
        )


def test_context_size_above_max_positions(llama, tokenizer, documents):
    with pytest.raises(ValueError, match="maximum context of 64"):
        ActivationDataModule(
            model=llama, tokenizer=tokenizer, hook_names="model.layers.0", dataset=documents,
            context_size=128,
        )  # fmt: skip
