"""The live activation source: a hooked language model run on a token source.

How a rank's chunks are built, and why:

1. **Documents.** A :class:`~lightning_sae.data.sources.TokenSource` has a fixed order. The first
   ``holdout_documents`` are held out (validation, calibration, evaluation); of the rest, shard
   ``s = global_rank * W + worker_id`` of ``S = world_size * W`` (``W`` dataloader workers, at
   least 1) reads documents ``s, s + S, ...``, so shards are disjoint and cover the source. Every
   shard cycles through its documents forever (warning once when it first starts over);
   ``max_steps`` ends the run.
2. **Chunks.** Documents are tokenised and packed into ``context_size`` rows (in the workers), and
   rows are grouped into chunks of ``rows_per_chunk`` rows. A rank takes chunks from its workers in
   turn.
3. **Activations.** The model runs on each chunk in eval mode without gradients, stopping after
   the last hook; BOS/EOS/PAD positions are dropped when ``exclude_special_tokens`` is set. The
   chunk's activations are permuted with a seed derived from ``(seed, shard, chunk index)``: this
   is the mixing buffer, so a batch draws tokens from every document of the chunk.
"""

import warnings
from collections.abc import Iterator
from functools import partial
from itertools import count, islice
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from lightning_sae.data.chunks import Chunk, permuted
from lightning_sae.data.models import (
    HookedModel,
    _guess_class_name,
    load_hooked_model,
)
from lightning_sae.data.offline import SMOLLM2_NAME, smollm2_path
from lightning_sae.data.sources import TokenSource, pack


class _TokenChunks(IterableDataset):
    """Token chunks ``(shard, index, [rows, context_size])`` of a rank, per worker shard."""

    def __init__(
        self,
        source: TokenSource,
        tokenizer: Any,
        context_size: int,
        bos_token_id: int | None,
        rows_per_chunk: int,
        first_document: int,
        rank: int,
        world_size: int,
        num_workers: int,
    ) -> None:
        self.source, self.tokenizer = source, tokenizer
        self.context_size, self.bos_token_id = context_size, bos_token_id
        self.rows_per_chunk, self.first_document = rows_per_chunk, first_document
        self.rank, self.world_size, self.num_workers = rank, world_size, max(num_workers, 1)

    def __iter__(self) -> Iterator[tuple[int, int, Tensor]]:
        info = get_worker_info()
        shard = self.rank * self.num_workers + (info.id if info is not None else 0)
        rows = self._rows(shard, self.world_size * self.num_workers)
        for index in count():
            yield shard, index, torch.stack(list(islice(rows, self.rows_per_chunk)))

    def _rows(self, shard: int, num_shards: int) -> Iterator[Tensor]:
        for epoch in count():  # one pass over the shard's documents per epoch, forever
            documents = self.source.documents(self.first_document + shard, num_shards)
            n_rows = 0
            for row in pack(documents, self.tokenizer, self.context_size, self.bos_token_id):
                n_rows += 1
                yield row
            if n_rows == 0:
                raise ValueError(
                    f"Shard {shard} of {num_shards} (rank x dataloader worker) holds no complete "
                    f"{self.context_size}-token row: the dataset is too small for "
                    f"{num_shards} shards. Use fewer ranks/workers, a smaller context_size, or "
                    "more data."
                )
            if epoch == 0:
                warnings.warn(
                    f"Shard {shard} of {num_shards} (rank x dataloader worker) used up its "
                    f"training documents after {n_rows} rows of {self.context_size} tokens: the "
                    "stream starts over, so activations repeat from here on (a store written "
                    "now holds repeated tokens). Use more documents, or fewer tokens/steps.",
                    stacklevel=2,
                )


class LiveSource:
    """Activations computed by a hooked language model from a token source.

    Args:
        model: A model name/folder, ``"smollm2-135m"``, or a model instance (see
            :func:`~lightning_sae.data.models.load_hooked_model`).
        hook_names: Hooks to read.
        source: The documents.
        context_size: Tokens per row fed to the model.
        prepend_bos: Start every row with BOS and separate packed documents with BOS.
        exclude_special_tokens: Drop BOS/EOS/PAD/SEP positions from the activations.
        rows_per_chunk: Rows per mixing chunk.
        holdout_documents: Leading documents never trained on.
        model_batch_size: Rows per model forward.
        num_workers: Dataloader workers that tokenise and pack, each its own shard.
        model_options: ``model_class_name``, ``dtype``, ``tokenizer``, ``trust_remote_code``
            for :func:`~lightning_sae.data.models.load_hooked_model`.

    """

    def __init__(
        self,
        model: str | torch.nn.Module,
        hook_names: list[str],
        source: TokenSource,
        context_size: int,
        prepend_bos: bool,
        exclude_special_tokens: bool,
        rows_per_chunk: int,
        holdout_documents: int,
        model_batch_size: int,
        num_workers: int,
        model_options: dict[str, Any],
    ) -> None:
        self.model_spec, self.hook_names, self.source = model, hook_names, source
        self.context_size, self.prepend_bos = context_size, prepend_bos
        self.exclude_special_tokens = exclude_special_tokens
        self.rows_per_chunk, self.holdout_documents = rows_per_chunk, holdout_documents
        self.model_batch_size, self.num_workers = model_batch_size, num_workers
        self.model_options = model_options
        self._hooked: HookedModel | None = None
        if source.is_empty(holdout_documents):
            raise ValueError(
                f"The dataset is empty: no document is left for training after the "
                f"{holdout_documents} held-out ones. Pass more documents or lower "
                "holdout_documents."
            )
        if isinstance(model, torch.nn.Module):
            self.build(_device_of(model) or "cpu")  # wrap and probe: d_in known now

    # ------------------------------------------------------------------ model
    def build(self, device: torch.device | str) -> HookedModel:
        """Build (once) the hooked model, check it against the settings, move it to ``device``."""
        if self._hooked is None:
            options = self.model_options
            hooked = load_hooked_model(self.model_spec, self.hook_names, device=device, **options)
            if options.get("tokenizer") is not None:
                hooked.tokenizer = options["tokenizer"]
            max_context = hooked.max_context
            if max_context is not None and self.context_size > max_context:
                raise ValueError(
                    f"context_size={self.context_size} is above the model's maximum context "
                    f"of {max_context} tokens: lower context_size."
                )
            if self.prepend_bos and hooked.bos_token_id is None:
                raise ValueError(
                    "prepend_bos=True but the model's tokenizer has no BOS token: pass "
                    "prepend_bos=False or a tokenizer with a bos_token."
                )
            self._hooked = hooked
        self._hooked.to(device)
        return self._hooked

    @property
    def hooked_model(self) -> HookedModel:
        """The hooked model (built on the CPU on first use when ``build`` has not run)."""
        return self._hooked if self._hooked is not None else self.build("cpu")

    @property
    def d_in_per_hook(self) -> dict[str, int]:
        """Width of every hook's activations."""
        return dict(self.hooked_model.d_in)

    def model_name(self) -> str:
        """Return the model's name as exports record it."""
        if self._hooked is not None:
            return self._hooked.model_name
        return self.model_name_of(self.model_spec, self.hook_names, self.model_options["tokenizer"])

    @staticmethod
    def model_name_of(model: str | torch.nn.Module, hook_names: list[str], tokenizer: Any) -> str:
        """Return the name exports record for ``model`` (a name, or an instance's own)."""
        if isinstance(model, str):
            return model  # what rebuilds it (``smollm2-135m`` is the offline default's name)
        return load_hooked_model(model, hook_names, tokenizer=tokenizer).model_name

    def metadata(self) -> dict[str, Any]:
        """sae-lens metadata of these activations (every field but ``hook_name``)."""
        class_name = (
            self._hooked.model_class_name
            if self._hooked is not None
            else self.model_options.get("model_class_name") or _guess_class_name(self.hook_names)
        )
        return {
            "model_name": self.model_name(),
            "model_class_name": class_name,
            "hook_head_index": None,
            "context_size": self.context_size,
            "prepend_bos": self.prepend_bos,
            "dataset_path": self.source.dataset_path,
            "exclude_special_tokens": self.exclude_special_tokens,
        }

    def prepare(self) -> None:
        """Convert the offline default model once per node, before any rank loads it."""
        if self.model_spec == SMOLLM2_NAME:
            smollm2_path()

    def __getstate__(self) -> dict[str, Any]:
        """Drop a model built from a name (rebuilt by ``build`` after ``ddp_spawn``)."""
        state = self.__dict__.copy()
        if isinstance(self.model_spec, str):
            state["_hooked"] = None
        return state

    # ------------------------------------------------------------------ chunks
    def chunks(self, rank: int, world_size: int, shuffle: bool, seed: int) -> Iterator[Chunk]:
        """Yield the rank's endless chunks of training activations."""
        special = self._special_ids()
        for shard, index, tokens in self._token_chunks(rank, world_size):
            keep = ~torch.isin(tokens, special) if self.exclude_special_tokens else None
            n_tokens = tokens.numel() if keep is None else int(keep.sum())
            key = (shard, index) if shuffle else None
            yield Chunk(n_tokens, partial(self._activations, tokens, keep, key, seed))

    def holdout_chunks(self) -> Iterator[Chunk]:
        """Chunks of the held-out documents, in order, one pass."""
        rows = self._holdout_rows()
        special = self._special_ids()
        while chunk := list(islice(rows, self.rows_per_chunk)):
            tokens = torch.stack(chunk)
            keep = ~torch.isin(tokens, special) if self.exclude_special_tokens else None
            n_tokens = tokens.numel() if keep is None else int(keep.sum())
            yield Chunk(n_tokens, partial(self._activations, tokens, keep, None, 0))

    def holdout_token_rows(self, n_rows: int) -> Tensor:
        """Token rows ``[n, context_size]`` (``n <= n_rows``) of the held-out documents."""
        rows = list(islice(self._holdout_rows(), n_rows))
        if not rows:
            raise ValueError(
                f"The {self.holdout_documents} held-out documents hold no complete "
                f"{self.context_size}-token row: raise holdout_documents."
            )
        return torch.stack(rows)

    def token_rows(self, rank: int, world_size: int) -> Iterator[Tensor]:
        """Yield the ``context_size`` token rows this rank feeds the model, in order."""
        for _, _, tokens in self._token_chunks(rank, world_size):
            yield from tokens

    def _holdout_rows(self) -> Iterator[Tensor]:
        documents = islice(self.source.documents(), self.holdout_documents)
        model = self.hooked_model
        bos = model.bos_token_id if self.prepend_bos else None
        return pack(documents, model.tokenizer, self.context_size, bos)

    def _special_ids(self) -> Tensor:
        return torch.tensor(self.hooked_model.special_token_ids(), dtype=torch.long)

    def _token_chunks(self, rank: int, world_size: int) -> Iterator[tuple[int, int, Tensor]]:
        model = self.hooked_model
        dataset = _TokenChunks(
            self.source,
            model.tokenizer,
            self.context_size,
            model.bos_token_id if self.prepend_bos else None,
            self.rows_per_chunk,
            self.holdout_documents,
            rank,
            world_size,
            self.num_workers,
        )
        if self.num_workers == 0:
            return iter(dataset)
        return iter(DataLoader(dataset, batch_size=None, num_workers=self.num_workers))

    def _activations(
        self, tokens: Tensor, keep: Tensor | None, key: tuple[int, ...] | None, seed: int
    ) -> dict[str, Tensor]:
        """Activations of a chunk of token rows, special positions dropped, permuted by ``key``."""
        model = self.hooked_model
        _check_token_ids(tokens, _vocab_size(model))
        parts = [model.activations(rows) for rows in tokens.split(self.model_batch_size)]
        acts = {h: torch.cat([p[h] for p in parts]).flatten(0, 1) for h in self.hook_names}
        if keep is not None:
            mask = keep.flatten().to(model.device)
            acts = {h: a[mask] for h, a in acts.items()}
        return permuted(acts, key, seed)


def _device_of(model: torch.nn.Module) -> torch.device | None:
    parameter = next(model.parameters(), None)
    return None if parameter is None else parameter.device


def _vocab_size(model: HookedModel) -> int | None:
    """Return how many token ids the model embeds (``None`` when it does not say)."""
    cfg = getattr(model.model, "cfg", None)  # transformer-lens
    if isinstance(getattr(cfg, "d_vocab", None), int):
        return cfg.d_vocab
    inner = getattr(model.model, "model", None)  # sae-lens HookedProxyLM wraps a HF model
    embeddings = getattr(inner, "get_input_embeddings", lambda: None)()
    return getattr(embeddings, "num_embeddings", None)


def _check_token_ids(tokens: Tensor, vocab_size: int | None) -> None:
    """Refuse token ids the model cannot embed (on a GPU they end in a device-side assert)."""
    if vocab_size is None or tokens.numel() == 0:
        return
    low, high = int(tokens.min()), int(tokens.max())
    if low < 0 or high >= vocab_size:
        bad = low if low < 0 else high
        raise ValueError(
            f"Token id {bad} is outside the model's vocabulary of {vocab_size} ids: the dataset's "
            "token ids were made by another tokenizer. Pass text (tokenised with the model's own "
            "tokenizer), or token ids of this model."
        )
