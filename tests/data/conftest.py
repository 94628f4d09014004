"""Fixtures for the data tests: a small BPE tokenizer, a tiny random HookedTransformer, a moto S3
server on loopback, and a folder written by sae-lens's own CacheActivationsRunner."""

import logging
import pydoc_data.topics
import urllib.request
from pathlib import Path
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


@pytest.fixture
def s3(monkeypatch) -> dict:
    """A moto S3 server on 127.0.0.1 with an empty bucket ``acts``; returns storage_options."""
    moto_server = pytest.importorskip("moto.server")
    boto3 = pytest.importorskip("boto3")
    for key, value in {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }.items():
        monkeypatch.setenv(key, value)
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    options = {
        "endpoint_url": f"http://{host}:{port}",
        "aws_access_key_id": "testing",
        "aws_secret_access_key": "testing",
    }
    boto3.client("s3", **options).create_bucket(Bucket="acts")
    yield options
    # The server's state lives in this process (moto's backends): empty it for the next test.
    reset = urllib.request.Request(f"{options['endpoint_url']}/moto-api/reset", method="POST")
    urllib.request.urlopen(reset).close()
    server.stop()


@pytest.fixture(scope="session")
def sae_lens_cache(tmp_path_factory) -> Path:
    """A cache written by sae-lens's own CacheActivationsRunner over a tiny random HF Llama."""
    from datasets import Dataset
    from sae_lens import CacheActivationsRunner, CacheActivationsRunnerConfig
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    folder = tmp_path_factory.mktemp("llama")
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.train_from_iterator(
        ["a tiny corpus", "of two lines"],
        trainers.BpeTrainer(vocab_size=64, special_tokens=["<bos>", "<eos>"], show_progress=False),
    )
    PreTrainedTokenizerFast(
        tokenizer_object=bpe, bos_token="<bos>", eos_token="<eos>"
    ).save_pretrained(folder)
    torch.manual_seed(0)
    llama = LlamaConfig(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=32,
    )
    LlamaForCausalLM(llama).save_pretrained(folder)
    rows = torch.randint(2, 64, (64, 16), generator=torch.Generator().manual_seed(0)).tolist()
    out = tmp_path_factory.mktemp("sae_lens") / "cache"
    config = CacheActivationsRunnerConfig(
        dataset_path="local", model_name=str(folder), model_class_name="AutoModelForCausalLM",
        hook_name="model.layers.0", d_in=16, training_tokens=64 * 16, context_size=16,
        model_batch_size=8, new_cached_activations_path=str(out), device="cpu",
        buffer_size_gb=32 * 16 * 16 * 4 / 1e9, shuffle=False, prepend_bos=False, streaming=False,
    )  # fmt: skip
    CacheActivationsRunner(config, override_dataset=Dataset.from_dict({"input_ids": rows})).run()
    return out
