"""The offline default: real SmolLM2-135M (from the GGUF wheel) on real Shakespeare."""

from itertools import islice

import pytest
import torch

from lightning_sae import ActivationDataModule
from lightning_sae.data import shakespeare_documents, smollm2_path

HOOKS = ["model.layers.3", "model.layers.5"]


def test_shakespeare_scenes_are_plain_text():
    documents = shakespeare_documents()
    assert len(documents) == 777 and sum(map(len, documents)) > 4_500_000
    assert documents[0].startswith("Enter THESEUS, HIPPOLYTA")
    assert not any(marker in doc for doc in documents for marker in ("**", "_", "\\", "#"))


@pytest.mark.slow
def test_smollm2_module_hooks_equal_hidden_states():
    assert (smollm2_path() / "config.json").is_file()  # converted once, then cached
    dm = ActivationDataModule(
        model="smollm2-135m", hook_names=HOOKS, dataset=shakespeare_documents()[:12],
        context_size=64, batch_size=256, shuffle=False, holdout_documents=2,
        shuffle_buffer_tokens=512,
    )  # fmt: skip
    dm.setup("fit")
    assert dm.d_in == 576
    assert dm.hooked_model.model_class_name == "AutoModelForCausalLM"  # read by module path
    metadata = dm.sae_metadata()  # recorded under the transformer-lens name
    assert metadata["model_name"] == "smollm2-135m"
    assert metadata["model_class_name"] == "HookedTransformer"
    assert metadata["hook_name"] == "blocks.3.hook_resid_post"
    assert metadata["dataset_path"] == "lightning_sae.data.shakespeare_documents"
    hf = dm.hooked_model.model.model
    later_calls = []
    hf.model.layers[6].register_forward_hook(lambda *args: later_calls.append(1))
    got = list(islice(dm._batches(0), 2))
    assert not later_calls  # the forward stopped after model.layers.5
    rows = torch.stack(list(islice(dm.token_rows(), 8)))
    assert (rows[:, 0] == dm.hooked_model.bos_token_id).all()
    with torch.no_grad():
        hidden = hf(rows, output_hidden_states=True).hidden_states
    for layer, hook in zip((3, 5), HOOKS, strict=True):
        expected = hidden[layer + 1].flatten(0, 1)
        torch.testing.assert_close(torch.cat([b[hook] for b in got]), expected)
