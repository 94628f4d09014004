"""``ActivationDataModule``: text in, shuffled activation batches out, on every rank, resumable.

How a rank's stream is built, and why:

1. **Documents.** A :class:`~lightning_sae.data.sources.TokenSource` has a fixed order. The first
   ``holdout_documents`` are reserved for :meth:`ActivationDataModule.sample_activations`; of the
   rest, shard ``s = global_rank * W + worker_id`` of ``S = world_size * W`` (``W`` dataloader
   workers, at least 1) reads documents ``s, s + S, ...``, so shards are disjoint and cover the
   source. Every shard cycles through its documents forever; ``max_steps`` ends the run and every
   rank yields the same number of batches, so no collective waits on a finished rank.
2. **Chunks.** Documents are tokenised and packed into ``context_size`` rows (in the workers),
   and rows are grouped into chunks of ``shuffle_buffer_tokens`` tokens. A rank takes chunks from
   its workers in turn.
3. **Activations.** The main process runs the language model on each chunk, on
   ``trainer.strategy.root_device``, in eval mode without gradients, stopping after the last
   hook; BOS/EOS/PAD positions are dropped when ``exclude_special_tokens`` is set. The chunk's
   activations are permuted with a seed derived from ``(seed, shard, chunk index)``: this is the
   mixing buffer, so a batch draws tokens from every document of the chunk.
4. **Batches.** The permuted chunks are concatenated and cut into ``batch_size`` activations:
   a ``[batch_size, d_in]`` tensor for one hook (every ``SAEModule`` trains from it unchanged), or
   ``{hook_name: [batch_size, d_in]}`` for several, all from one forward pass.

The model runs inside the dataset iterator rather than in ``on_after_batch_transfer``: one forward
of a chunk feeds many training batches, which a hook that maps one loader batch to one training
batch cannot do. The dataloader therefore has no workers of its own (``num_workers`` parallelises
tokenisation one level down); the model is built in :meth:`~ActivationDataModule.setup` on the
rank's device, is no submodule of the LightningModule, so it is neither wrapped by DDP nor saved
in checkpoints, and is not pickled by ``ddp_spawn`` (it is dropped from the pickled state and
rebuilt in ``setup``).

**Resume.** Batch ``b`` of a rank is a pure function of the source, the configuration and ``b``.
:meth:`~ActivationDataModule.state_dict` stores the batches consumed
(``global_step * accumulate_grad_batches``); on resume the stream replays the *tokens* of the
skipped chunks (cheap: no model forward) to count their activations and runs the model only from
the chunk holding the next batch. torchdata's ``StatefulDataLoader`` is not used: it skips the
batch that Lightning's fit loop prefetched.
"""

import hashlib
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from itertools import count, islice
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import LightningDataModule
from sae_lens.util import str_to_dtype
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from lightning_sae.data.cache import ActivationCache, write_cache
from lightning_sae.data.models import (
    HookedModel,
    _guess_class_name,
    exported_hook,
    load_hooked_model,
    transformer_lens_hook_name,
)
from lightning_sae.data.offline import SMOLLM2_NAME, smollm2_path
from lightning_sae.data.sources import TokenSource, pack

Batch = Tensor | dict[str, Tensor]


@dataclass
class _Chunk:
    """A mixing-buffer's worth of activations, counted before it is computed."""

    #: Activations the chunk yields; known without running the model (resume skips by it).
    n_tokens: int
    #: Computes ``{hook: [n_tokens, d_in]}``, already permuted.
    load: Callable[[], dict[str, Tensor]]


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
        while True:  # one pass over the shard's documents per epoch, forever
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


class _ActivationStream(IterableDataset):
    """The rank's endless stream of activation batches, starting at batch ``start_batch``."""

    def __init__(self, datamodule: "ActivationDataModule", start_batch: int) -> None:
        self.datamodule, self.start_batch = datamodule, start_batch

    def __iter__(self) -> Iterator[Batch]:
        return self.datamodule._batches(self.start_batch)

    def __getstate__(self) -> dict[str, Any]:
        raise TypeError(
            "The activation stream runs the language model in the main process: keep the "
            "DataLoader's num_workers=0 (ActivationDataModule's num_workers parallelises "
            "tokenisation)."
        )


class ActivationDataModule(LightningDataModule):
    """Stream a language model's activations at one or more hooks, or read them from a cache.

    >>> dm = ActivationDataModule(model="smollm2-135m", hook_names="model.layers.15",
    ...                           dataset=shakespeare_documents(), context_size=256,
    ...                           batch_size=4096)  # doctest: +SKIP
    >>> trainer.fit(BatchTopKSAE(d_in=dm.d_in, d_sae=4608, k=32), datamodule=dm)  # doctest: +SKIP

    Args:
        model: A transformer-lens model name, a Hugging Face model name or local folder,
            ``"smollm2-135m"`` (the offline default), or a model instance (``HookedTransformer``,
            sae-lens ``HookedProxyLM`` or Hugging Face ``PreTrainedModel``). Optional with
            ``cache_dir``, where it is checked against the cache's manifest.
        hook_names: One hook name or several: transformer-lens hook points
            (``blocks.6.hook_resid_post``) or Hugging Face module paths (``model.layers.6``).
            With ``cache_dir``, default: every hook in the cache.
        dataset: The token source (see :class:`~lightning_sae.data.sources.TokenSource`): a
            dataset name or local path, a ``datasets`` dataset, a 2-D tensor of token ids, or an
            iterable of strings / token ids.
        context_size: Tokens per row fed to the model (at most the model's maximum).
        batch_size: Activations (tokens) per training batch, per rank.
        prepend_bos: Start every row with BOS and separate packed documents with BOS.
        shuffle_buffer_tokens: Tokens per mixing chunk; each batch is drawn from a whole chunk.
        shuffle: Permute the activations of each chunk (off: token order, for inspection).
        exclude_special_tokens: Drop BOS/EOS/PAD/SEP positions from the activations.
        model_dtype: Dtype of a model loaded by name (``float32``, ``bfloat16``...).
        model_class_name: ``HookedTransformer`` or ``AutoModelForCausalLM``; guessed from the
            hook names when not given.
        tokenizer: Tokenizer to use instead of the model's.
        dataset_column: Column of text or token ids (default: ``text``, ``tokens``,
            ``input_ids``).
        dataset_split: Split of a dataset loaded by name.
        streaming: Stream a dataset loaded by name.
        holdout_documents: Leading documents never trained on, reserved for
            :meth:`sample_activations` (threshold calibration, evaluation).
        model_batch_size: Rows per model forward (bounds activation memory).
        num_workers: Dataloader workers that tokenise and pack, each its own shard.
        seed: Seed of the mixing permutations.
        cache_dir: Train from an activation cache written by :meth:`write_cache` instead of
            running the model.
        trust_remote_code: Allow a Hugging Face model's own code; off unless asked for.

    """

    def __init__(
        self,
        model: str | torch.nn.Module | None = None,
        hook_names: str | list[str] | None = None,
        dataset: Any = None,
        context_size: int = 128,
        batch_size: int = 4096,
        prepend_bos: bool = True,
        shuffle_buffer_tokens: int = 65_536,
        shuffle: bool = True,
        exclude_special_tokens: bool = False,
        model_dtype: str = "float32",
        model_class_name: str | None = None,
        tokenizer: Any = None,
        dataset_column: str | None = None,
        dataset_split: str = "train",
        streaming: bool = False,
        holdout_documents: int = 8,
        model_batch_size: int = 32,
        num_workers: int = 0,
        seed: int = 0,
        cache_dir: str | Path | None = None,
        trust_remote_code: bool = False,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["model", "dataset", "tokenizer"])
        for name in ("context_size", "batch_size", "shuffle_buffer_tokens", "model_batch_size"):
            value = locals()[name]
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}.")
        for name in ("holdout_documents", "num_workers", "seed"):
            if locals()[name] < 0:
                raise ValueError(f"{name} must be >= 0, got {locals()[name]!r}.")
        self.hook_names = [hook_names] if isinstance(hook_names, str) else list(hook_names or [])
        self.context_size, self.batch_size = context_size, batch_size
        self.prepend_bos, self.shuffle, self.seed = prepend_bos, shuffle, seed
        self.exclude_special_tokens = exclude_special_tokens
        self.holdout_documents, self.num_workers = holdout_documents, num_workers
        self.model_batch_size = model_batch_size
        self.rows_per_chunk = max(1, shuffle_buffer_tokens // context_size)
        self._model_spec, self._tokenizer = model, tokenizer
        self._model_dtype = str_to_dtype(model_dtype)
        self._model_class_name = model_class_name
        self._trust_remote_code = trust_remote_code
        self._hooked: HookedModel | None = None
        self._rank, self._world_size, self._start_batch = 0, 1, 0

        self.cache: ActivationCache | None = None
        self.source: TokenSource | None = None
        if cache_dir is not None:
            if dataset is not None:
                raise ValueError("Pass either dataset (run the model) or cache_dir, not both.")
            self.cache = ActivationCache(cache_dir)
            manifest = self.cache.manifest
            self.hook_names = self.hook_names or list(manifest["hook_names"])
            self.cache.check(self._spec_model_name(), self.hook_names)
            self.context_size, self.prepend_bos = manifest["context_size"], manifest["prepend_bos"]
            self.exclude_special_tokens = manifest["exclude_special_tokens"]
            return
        if model is None or dataset is None:
            raise ValueError("Pass model= and dataset= (or cache_dir= to train from a cache).")
        if not self.hook_names:
            raise ValueError("Pass hook_names: one hook name or a list of them.")
        self.source = TokenSource(dataset, dataset_column, dataset_split, streaming)
        if self.source.is_empty(holdout_documents):
            raise ValueError(
                f"The dataset is empty: no document is left for training after the "
                f"{holdout_documents} held-out ones. Pass more documents or lower "
                "holdout_documents."
            )
        if isinstance(model, torch.nn.Module):
            self._build_model(_device_of(model) or "cpu")  # wrap and probe: d_in known now

    # ------------------------------------------------------------------ model
    def _spec_model_name(self) -> str | None:
        spec = self._model_spec
        if spec is None:
            return None
        if self._hooked is not None:
            return self._hooked.model_name
        if isinstance(spec, str):
            return spec
        return load_hooked_model(spec, self.hook_names, tokenizer=self._tokenizer).model_name

    def _build_model(self, device: torch.device | str) -> HookedModel:
        if self._hooked is None:
            self._hooked = load_hooked_model(
                self._model_spec,  # type: ignore[arg-type]
                self.hook_names,
                model_class_name=self._model_class_name,
                dtype=self._model_dtype,
                device=device,
                tokenizer=self._tokenizer,
                trust_remote_code=self._trust_remote_code,
            )
            if self._tokenizer is not None:
                self._hooked.tokenizer = self._tokenizer
            max_context = self._hooked.max_context
            if max_context is not None and self.context_size > max_context:
                raise ValueError(
                    f"context_size={self.context_size} is above the model's maximum context "
                    f"of {max_context} tokens: lower context_size."
                )
            if self.prepend_bos and self._hooked.bos_token_id is None:
                raise ValueError(
                    "prepend_bos=True but the model's tokenizer has no BOS token: pass "
                    "prepend_bos=False or a tokenizer with a bos_token."
                )
        self._hooked.to(device)
        return self._hooked

    @property
    def hooked_model(self) -> HookedModel:
        """The hooked language model (built on the CPU on first use when ``setup`` has not run)."""
        if self.cache is not None:
            raise RuntimeError("A DataModule reading an activation cache runs no model.")
        return self._hooked if self._hooked is not None else self._build_model("cpu")

    @property
    def d_in(self) -> int:
        """Width of the first hook's activations (read from the model or the cache manifest)."""
        return self.d_in_per_hook[self.hook_names[0]]

    @property
    def d_in_per_hook(self) -> dict[str, int]:
        """Width of every hook's activations."""
        if self.cache is not None:
            return {h: self.cache.manifest["d_in"][h] for h in self.hook_names}
        return dict(self.hooked_model.d_in)

    def __getstate__(self) -> dict[str, Any]:
        """Drop a model built from a name (rebuilt by ``setup`` after ``ddp_spawn``)."""
        state = self.__dict__.copy()
        if isinstance(self._model_spec, str):
            state["_hooked"] = None
        return state

    # ------------------------------------------------------------------ Lightning hooks
    def prepare_data(self) -> None:
        """Convert the offline default model once per node, before any rank loads it."""
        if self._model_spec == SMOLLM2_NAME:
            smollm2_path()

    def setup(self, stage: str | None = None) -> None:
        """Read this rank's place in the world and build the model on its device."""
        device: torch.device | str = "cpu"
        if self.trainer is not None:
            self._rank = self.trainer.global_rank
            self._world_size = self.trainer.world_size
            device = self.trainer.strategy.root_device
        if self.cache is None:
            self._build_model(device)

    def train_dataloader(self) -> DataLoader:
        """Return an endless loader of activation batches, from the restored batch count on."""
        return DataLoader(_ActivationStream(self, self._start_batch), batch_size=None)

    def state_dict(self) -> dict[str, Any]:
        """Batches this rank consumed, and what the stream's positions depend on."""
        consumed = self._start_batch
        if self.trainer is not None:
            consumed = self.trainer.global_step * self.trainer.accumulate_grad_batches
        return {
            "batches_consumed": consumed,
            "world_size": self._world_size,
            "batch_size": self.batch_size,
            "num_workers": self.num_workers,
            "seed": self.seed,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Resume the stream after the batches the checkpoint consumed."""
        self._start_batch = int(state_dict["batches_consumed"])
        changed = {
            key: (state_dict[key], value)
            for key, value in self.state_dict().items()
            if key != "batches_consumed" and key in state_dict and state_dict[key] != value
        }
        if changed:
            warnings.warn(
                f"Resuming with a different stream layout {changed} (saved, now): training "
                "continues after the same number of batches, but not with the exact tokens an "
                "uninterrupted run would have seen.",
                stacklevel=2,
            )

    # ------------------------------------------------------------------ exporter contract
    def sae_metadata(self, hook_name: str | None = None) -> dict[str, Any]:
        """Return the sae-lens ``metadata`` fields this data determines, for the exporter.

        ``hook_name`` (default: the first hook) is this DataModule's name of the hook or the name
        an earlier call returned. A Hugging Face decoder layer (``model.layers.6``) is recorded
        under its transformer-lens name (``blocks.6.hook_resid_post``) with
        ``model_class_name="HookedTransformer"``, the name transformer-lens-based tools attach an
        SAE to (:func:`~lightning_sae.data.models.exported_hook`).
        """
        hook = self._own_hook_name(hook_name)
        if self.cache is not None:
            manifest = self.cache.manifest
            model_name, class_name = manifest["model_name"], manifest["model_class_name"]
            dataset_path = manifest["dataset_path"]
        else:
            assert self.source is not None
            model_name = self._spec_model_name()
            class_name = (
                self._hooked.model_class_name
                if self._hooked is not None
                else self._model_class_name or _guess_class_name(self.hook_names)
            )
            dataset_path = self.source.dataset_path
        exported_name, class_name = exported_hook(hook, class_name)
        return {
            "model_name": model_name,
            "model_class_name": class_name,
            "hook_name": exported_name,
            "hook_head_index": None,
            "context_size": self.context_size,
            "prepend_bos": self.prepend_bos,
            "dataset_path": dataset_path,
            "exclude_special_tokens": self.exclude_special_tokens,
        }

    def _own_hook_name(self, hook_name: str | None) -> str:
        """Return this DataModule's name of a hook given by its own name or its exported one."""
        if hook_name is None or hook_name in self.hook_names:
            return hook_name or self.hook_names[0]
        for hook in self.hook_names:
            if transformer_lens_hook_name(hook) == hook_name:
                return hook
        raise ValueError(
            f"hook_name {hook_name!r} is not one of this DataModule's {self.hook_names}."
        )

    def holdout_token_rows(self, n_rows: int) -> Tensor:
        """``[n, context_size]`` token rows of the held-out documents (``n <= n_rows``), in order.

        These are the rows :meth:`sample_activations` runs the model on; nothing here is trained
        on. A cache stores activations, not tokens, so it has no rows to give.
        """
        if self.cache is not None:
            raise ValueError(
                "An activation cache holds no token ids: evaluate with a DataModule that runs the "
                "model (model= and dataset=)."
            )
        assert self.source is not None
        documents = islice(self.source.documents(), self.holdout_documents)
        model = self.hooked_model
        bos = model.bos_token_id if self.prepend_bos else None
        rows = list(islice(pack(documents, model.tokenizer, self.context_size, bos), n_rows))
        if not rows:
            raise ValueError(
                f"The {self.holdout_documents} held-out documents hold no complete "
                f"{self.context_size}-token row: raise holdout_documents."
            )
        return torch.stack(rows)

    def sample_activations(self, n_tokens: int, hook_name: str | None = None) -> Tensor:
        """``[n_tokens, d_in]`` activations of held-out documents, on the CPU.

        The documents are the ``holdout_documents`` never used for training (or the cache's
        held-out file); the training stream is not advanced.

        Raises:
            ValueError: The held-out documents hold fewer than ``n_tokens`` tokens.

        """
        hook = self._own_hook_name(hook_name)
        if self.cache is not None:
            held_out = self.cache.load_holdout([hook])
            acts = held_out[hook] if held_out is not None else torch.empty(0)
        else:
            chunks = self._holdout_chunks()
            parts, total = [], 0
            for chunk in chunks:
                if total >= n_tokens:
                    break
                parts.append(chunk.load()[hook])
                total += parts[-1].shape[0]
            acts = torch.cat(parts) if parts else torch.empty(0)
        if acts.shape[0] < n_tokens:
            raise ValueError(
                f"The held-out data gives {acts.shape[0]} tokens, fewer than the {n_tokens} "
                "asked for: raise holdout_documents (or rewrite the cache), or ask for fewer."
            )
        return acts[:n_tokens].cpu()

    # ------------------------------------------------------------------ cache
    def write_cache(
        self,
        path: str | Path,
        n_tokens: int,
        tokens_per_file: int = 262_144,
        holdout_tokens: int = 16_384,
        overwrite: bool = False,
    ) -> Path:
        """Write the activations of the first ``n_tokens`` training tokens to a cache folder.

        Reads every training document in order (one shard, unshuffled; reading the cache
        shuffles), on the model's current device, and writes atomically.

        Args:
            path: Folder to create.
            n_tokens: Activations (tokens) to write per hook.
            tokens_per_file: Tokens per safetensors file; files are the unit of sharding.
            holdout_tokens: Held-out activations stored for :meth:`sample_activations` (fewer if
                the held-out documents hold fewer).
            overwrite: Replace an existing cache.

        Returns:
            The cache folder.

        """
        if n_tokens <= 0:
            raise ValueError(f"n_tokens must be positive, got {n_tokens}.")
        model = self.hooked_model
        files = _regroup(self._live_chunks(0, 1, shuffle=False), tokens_per_file, n_tokens)
        holdout = _take(self._holdout_chunks(), holdout_tokens) if holdout_tokens else None
        metadata = {
            **{k: v for k, v in self.sae_metadata().items() if k != "hook_name"},
            # The class that read the hooks (sae_metadata gives the exported one).
            "model_class_name": model.model_class_name,
            "hook_names": self.hook_names,
            "d_in": dict(model.d_in),
        }
        return write_cache(path, files, holdout, metadata, overwrite=overwrite)

    # ------------------------------------------------------------------ the stream
    def token_rows(self) -> Iterator[Tensor]:
        """Yield the ``context_size`` token rows this rank feeds the model, in order."""
        for _, _, tokens in self._token_chunks(self._rank, self._world_size):
            yield from tokens

    def _token_chunks(self, rank: int, world_size: int) -> Iterator[tuple[int, int, Tensor]]:
        model = self.hooked_model
        dataset = _TokenChunks(
            self.source,  # type: ignore[arg-type]
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

    def _live_chunks(self, rank: int, world_size: int, shuffle: bool) -> Iterator[_Chunk]:
        special = torch.tensor(self.hooked_model.special_token_ids(), dtype=torch.long)
        for shard, index, tokens in self._token_chunks(rank, world_size):
            keep = ~torch.isin(tokens, special) if self.exclude_special_tokens else None
            n_tokens = tokens.numel() if keep is None else int(keep.sum())
            key = (shard, index) if shuffle else None
            yield _Chunk(n_tokens, partial(self._activations, tokens, keep, key))

    def _holdout_chunks(self) -> Iterator[_Chunk]:
        """Chunks of the held-out documents, in order, one pass."""
        assert self.source is not None
        documents = islice(self.source.documents(), self.holdout_documents)
        model = self.hooked_model
        bos = model.bos_token_id if self.prepend_bos else None
        rows = pack(documents, model.tokenizer, self.context_size, bos)
        special = torch.tensor(model.special_token_ids(), dtype=torch.long)
        while chunk := list(islice(rows, self.rows_per_chunk)):
            tokens = torch.stack(chunk)
            keep = ~torch.isin(tokens, special) if self.exclude_special_tokens else None
            n_tokens = tokens.numel() if keep is None else int(keep.sum())
            yield _Chunk(n_tokens, partial(self._activations, tokens, keep, None))

    def _activations(
        self, tokens: Tensor, keep: Tensor | None, key: tuple[int, ...] | None
    ) -> dict[str, Tensor]:
        """Activations of a chunk of token rows, special positions dropped, permuted by ``key``."""
        model = self.hooked_model
        parts = [model.activations(rows) for rows in tokens.split(self.model_batch_size)]
        acts = {h: torch.cat([p[h] for p in parts]).flatten(0, 1) for h in self.hook_names}
        if keep is not None:
            mask = keep.flatten().to(model.device)
            acts = {h: a[mask] for h, a in acts.items()}
        return _permuted(acts, key, self.seed)

    def _cache_chunks(self) -> Iterator[_Chunk]:
        """Cycle through the rank's cache files (file ``i`` belongs to rank ``i % world_size``)."""
        cache = self.cache
        assert cache is not None
        files = list(range(self._rank, len(cache.file_tokens), self._world_size))
        if not files:
            raise ValueError(
                f"The activation cache has {len(cache.file_tokens)} files, fewer than the "
                f"{self._world_size} ranks: rewrite it with a smaller tokens_per_file."
            )
        for epoch in count():
            for index in files:
                key = (index, epoch) if self.shuffle else None
                load = partial(_load_permuted, cache, index, self.hook_names, key, self.seed)
                yield _Chunk(cache.file_tokens[index], load)

    def _batches(self, start_batch: int) -> Iterator[Batch]:
        """Cut the rank's chunks into ``batch_size`` batches, from batch ``start_batch`` on."""
        if self.cache is not None:
            chunks = self._cache_chunks()
        else:
            chunks = self._live_chunks(self._rank, self._world_size, self.shuffle)
        skip = start_batch * self.batch_size
        rest: dict[str, Tensor] | None = None
        for chunk in chunks:
            if chunk.n_tokens <= skip:  # resume: count the chunk, never compute it
                skip -= chunk.n_tokens
                continue
            acts = {h: a[skip:] for h, a in chunk.load().items()}
            skip = 0
            if rest is not None:
                acts = {h: torch.cat([rest[h], a]) for h, a in acts.items()}
            n_available = next(iter(acts.values())).shape[0]
            n_full = n_available // self.batch_size * self.batch_size
            for start in range(0, n_full, self.batch_size):
                batch = {h: a[start : start + self.batch_size] for h, a in acts.items()}
                yield batch[self.hook_names[0]] if len(self.hook_names) == 1 else batch
            rest = {h: a[n_full:] for h, a in acts.items()}


def _device_of(model: torch.nn.Module) -> torch.device | None:
    parameter = next(model.parameters(), None)
    return None if parameter is None else parameter.device


def _permuted(acts: dict[str, Tensor], key: tuple[int, ...] | None, seed: int) -> dict[str, Tensor]:
    """Permute every hook's rows by the same permutation, seeded by ``(seed, *key)``."""
    if key is None:
        return acts
    n = next(iter(acts.values())).shape[0]
    # A stable digest, not hash(): resuming must give the same order on any Python version.
    digest = hashlib.blake2b(repr((seed, *key)).encode(), digest_size=8).digest()
    generator = torch.Generator().manual_seed(int.from_bytes(digest, "little") % 2**63)
    order = torch.randperm(n, generator=generator)
    return {h: a[order.to(a.device)] for h, a in acts.items()}


def _load_permuted(
    cache: ActivationCache,
    index: int,
    hook_names: list[str],
    key: tuple[int, ...] | None,
    seed: int,
) -> dict[str, Tensor]:
    return _permuted(cache.load(index, hook_names), key, seed)


def _take(chunks: Iterator[_Chunk], n_tokens: int) -> dict[str, Tensor] | None:
    """Return the first ``n_tokens`` activations of ``chunks`` (fewer if they run out)."""
    return next(_regroup(chunks, n_tokens, n_tokens), None)


def _regroup(
    chunks: Iterator[_Chunk], group_tokens: int, total_tokens: int
) -> Iterator[dict[str, Tensor]]:
    """Re-cut chunks into groups of ``group_tokens`` activations, ``total_tokens`` in all."""
    parts: list[dict[str, Tensor]] = []
    held, remaining = 0, total_tokens
    for chunk in chunks:
        acts = chunk.load()
        parts.append(acts)
        held += next(iter(acts.values())).shape[0]
        while held >= min(group_tokens, remaining):
            merged = {h: torch.cat([p[h] for p in parts]) for h in acts}
            size = min(group_tokens, remaining)
            yield {h: a[:size].cpu() for h, a in merged.items()}
            parts = [{h: a[size:] for h, a in merged.items()}]
            held, remaining = held - size, remaining - size
            if remaining == 0:
                return
    if parts and held:
        yield {h: torch.cat([p[h] for p in parts]).cpu() for h in parts[0]}
