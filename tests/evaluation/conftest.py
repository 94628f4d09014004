"""The data tests' real pieces (BPE tokenizer on CPython's docs, tiny HookedTransformer, no hub)."""

from data.conftest import _offline, documents, model, tiny_model, tokenizer

__all__ = ["_offline", "documents", "model", "tiny_model", "tokenizer"]
