"""Fixtures for the data tests: a small BPE tokenizer and a tiny random HookedTransformer."""

import pydoc_data.topics
from typing import Any

import huggingface_hub.constants
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformer_lens import HookedTransformer, HookedTransformerConfig
from transformers import AutoTokenizer, PreTrainedTokenizerFast

SPECIAL = ["<bos>", "<eos>", "<pad>"]


@pytest.fixture(scope="session")
def documents() -> list[str]:
    """Python's own documentation topics: real text that ships with CPython (79 documents)."""
    return list(pydoc_data.topics.topics.values())


@pytest.fixture(scope="session")
def tokenizer(documents: list[str], tmp_path_factory: pytest.TempPathFactory) -> Any:
    """A 400-token BPE trained on the documents (BOS id 0, EOS 1, PAD 2), in about a second.

    Saved and reloaded from a folder: transformer-lens reloads a tokenizer by its name_or_path.
    """
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.train_from_iterator(
        documents, trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIAL, show_progress=False)
    )
    folder = tmp_path_factory.mktemp("tokenizer")
    PreTrainedTokenizerFast(
        tokenizer_object=bpe, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>"
    ).save_pretrained(folder)
    return AutoTokenizer.from_pretrained(folder)


def tiny_model(tokenizer: Any, seed: int = 0) -> HookedTransformer:
    cfg = HookedTransformerConfig(
        n_layers=3, d_model=32, n_ctx=64, d_head=8, n_heads=4, d_mlp=64,
        d_vocab=len(tokenizer), act_fn="gelu", seed=seed,
    )  # fmt: skip
    return HookedTransformer(cfg, tokenizer=tokenizer).eval()


@pytest.fixture
def model(tokenizer: Any) -> HookedTransformer:
    return tiny_model(tokenizer)


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """The hub is unreachable here: fail at once instead of retrying for a minute."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # read at import
    torch.set_num_threads(min(torch.get_num_threads(), 2))
