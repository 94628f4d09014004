"""``ActivationDataModule``: text in, shuffled activation batches out, on every rank, resumable.

One interface over two sources of activations: :class:`~lightning_sae.data.live.LiveSource` (a
hooked language model run on a token source, on the rank's device) and
:class:`~lightning_sae.data.cache.StoredSource` (an activation store written once by
:meth:`write_cache`, a litdata dataset in a folder or at an object-store URL, or a folder of
sae-lens's ``CacheActivationsRunner``). The live source yields
:class:`~lightning_sae.data.chunks.Chunk` s of activations, which the DataModule cuts into
batches; a store's own loader (litdata's ``StreamingDataLoader``) cuts its batches:

- **Training**: an endless stream of ``[batch_size, d_in]`` tensors for one hook (every
  ``SAEModule`` trains from it unchanged), or ``{hook_name: [batch_size, d_in]}`` for several,
  all from one forward pass. Every rank yields the same number of batches, so no collective
  waits on a finished rank.
- **Validation/test**: the held-out documents (or the store's held-out part), ``val_tokens``
  activations, so ``Trainer.validate``/``test`` and validation during fit work.
- **Exporter/evaluation**: :class:`~lightning_sae.data.protocol.ExportData` and
  :class:`~lightning_sae.data.protocol.EvaluationData` (metadata, held-out activations and
  token rows).

The model runs inside the dataset iterator rather than in ``on_after_batch_transfer``: one forward
of a chunk feeds many training batches. The dataloader therefore has no workers of its own
(``num_workers`` parallelises tokenisation one level down); the model is built in
:meth:`~ActivationDataModule.setup` on the rank's device, is no submodule of the LightningModule,
so it is neither wrapped by DDP nor saved in checkpoints, and is not pickled by ``ddp_spawn``.

**Resume.** :meth:`~ActivationDataModule.state_dict` stores the batches consumed
(``global_step * accumulate_grad_batches``), not the batches the loader yielded: Lightning's fit
loop has prefetched one more (torchdata's ``StatefulDataLoader`` is not used: it skips that
batch). Live, batch ``b`` of a rank is a pure function of the source, the configuration and
``b``: on resume the stream counts the *tokens* of the skipped chunks (cheap: no model forward)
and computes only from the chunk holding the next batch. From a store, the state also holds
litdata's loader state at that batch (:meth:`~lightning_sae.data.store.ActivationStore.state_dict`).
"""

import os
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import LightningDataModule, Trainer
from lightning.pytorch.callbacks import Timer
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_warn
from sae_lens.util import str_to_dtype
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset

from lightning_sae.data.cache import StoredSource
from lightning_sae.data.chunks import Batch, Chunk, batches, take
from lightning_sae.data.live import LiveSource
from lightning_sae.data.models import HookedModel, exported_hook, transformer_lens_hook_name
from lightning_sae.data.sources import TokenSource
from lightning_sae.data.store import TOKEN_IDS, stored_input_tokens, write_store
from lightning_sae.errors import ConfigurationError
from lightning_sae.modules.validation import check_positive_ints


class _Batches(IterableDataset):
    """Batches of the DataModule, made when iterated (the stream is endless for training)."""

    def __init__(self, make: Any) -> None:
        self.make = make

    def __iter__(self) -> Iterator[Batch]:
        return self.make()

    def __getstate__(self) -> dict[str, Any]:
        raise TypeError(
            "The activation stream runs the language model in the main process: keep the "
            "DataLoader's num_workers=0 (ActivationDataModule's num_workers parallelises "
            "tokenisation)."
        )


class _HeldOut:
    """The held-out activations computed so far, extended chunk by chunk as more are asked for.

    Validation, calibration and ``sample_activations`` share them, so the model runs over the
    held-out documents once per process (a ``ddp_spawn`` pickle starts afresh).
    """

    def __init__(self) -> None:
        self.parts: list[dict[str, Tensor]] = []
        self.n_tokens = 0
        self.chunks: Iterator[Any] | None = None
        self.exhausted = False

    def first(self, source: Any, n_tokens: int) -> dict[str, Tensor]:
        """Return the first ``n_tokens`` held-out activations per hook (or all there are)."""
        while self.n_tokens < n_tokens and not self.exhausted:
            if self.chunks is None:
                self.chunks = source.holdout_chunks()
            chunk = next(self.chunks, None)
            if chunk is None:
                self.exhausted = True
                break
            part = {h: a.cpu() for h, a in chunk.load().items()}
            self.parts.append(part)
            self.n_tokens += next(iter(part.values())).shape[0]
        if not self.parts:
            return {h: torch.empty(0, d) for h, d in source.d_in_per_hook.items()}
        if len(self.parts) > 1:
            self.parts = [{h: torch.cat([p[h] for p in self.parts]) for h in self.parts[0]}]
        return {h: a[:n_tokens] for h, a in self.parts[0].items()}

    def __getstate__(self) -> dict[str, Any]:
        return _HeldOut().__dict__


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
            ``cache_dir``, where it is checked against the store's manifest.
        hook_names: One hook name or several: transformer-lens hook points
            (``blocks.6.hook_resid_post``) or Hugging Face module paths (``model.layers.6``).
            With ``cache_dir``, default: every hook in the store.
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
        holdout_documents: Leading documents never trained on: the validation/test data, and what
            :meth:`sample_activations` and :meth:`holdout_token_rows` give (threshold calibration,
            LM evaluation).
        model_batch_size: Rows per model forward (bounds activation memory).
        num_workers: Dataloader workers that tokenise and pack (from a store: litdata's loader
            workers), each its own shard.
        seed: Seed of the mixing permutations.
        cache_dir: Train from stored activations instead of running the model: an activation
            store written by :meth:`write_cache` (a folder, or an ``s3://``/``gs://``/``r2://``
            URL), or a folder written by sae-lens's ``CacheActivationsRunner``.
        cache_options: Options of ``cache_dir``: ``storage_options`` (object-store endpoint and
            keys; left out of the saved hyper-parameters, so of checkpoints and loggers) and
            ``cache_dir`` (local folder for a remote store's chunks); for a sae-lens folder
            ``metadata`` (what it does not record: ``model_name``...) and ``holdout_tokens``.
        trust_remote_code: Allow a Hugging Face model's own code; off unless asked for.
        val_tokens: Held-out activations (tokens) per validation or test run. Every rank evaluates
            all of them (no sharding: a rank without a batch would stall the metric sync).

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
        cache_options: dict[str, Any] | None = None,
        trust_remote_code: bool = False,
        val_tokens: int = 16_384,
    ) -> None:
        super().__init__()
        # A str, not a Path: checkpoints hold the hyper-parameters, and torch's safe loader
        # (weights_only=True, the default) refuses a pathlib object, so a run could not resume.
        cache_dir = None if cache_dir is None else os.fspath(cache_dir)
        # Object-store keys reach neither checkpoints nor loggers: the saved hyper-parameters
        # keep the other options (save_hyperparameters reads these local names).
        options = dict(cache_options or {})
        cache_options = {k: v for k, v in options.items() if k != "storage_options"} or None
        # "seed" is the SAE module's name too: Lightning refuses to log two different values.
        self.save_hyperparameters(ignore=["model", "dataset", "tokenizer", "seed"])
        check_positive_ints(
            {
                "context_size": context_size,
                "batch_size": batch_size,
                "shuffle_buffer_tokens": shuffle_buffer_tokens,
                "model_batch_size": model_batch_size,
                "val_tokens": val_tokens,
            }
        )
        for name in ("holdout_documents", "num_workers", "seed"):
            if locals()[name] < 0:
                raise ValueError(f"{name} must be >= 0, got {locals()[name]!r}.")
        hooks = [hook_names] if isinstance(hook_names, str) else list(hook_names or [])
        self.batch_size, self.shuffle, self.seed = batch_size, shuffle, seed
        self.num_workers, self.val_tokens = num_workers, val_tokens
        self._rank, self._world_size, self._start_batch = 0, 1, 0
        self._holdout = _HeldOut()
        self.shuffle_buffer_tokens = shuffle_buffer_tokens
        self.source: LiveSource | StoredSource
        if cache_dir is not None:
            if dataset is not None:
                raise ValueError("Pass either dataset (run the model) or cache_dir, not both.")
            self.source = StoredSource(cache_dir, hooks, options)
            if model is not None:
                self.source.check(
                    LiveSource.model_name_of(model, self.source.hook_names, tokenizer)
                )
            return
        if options:
            raise ValueError("cache_options apply to cache_dir: pass cache_dir too, or drop them.")
        if model is None or dataset is None:
            raise ValueError("Pass model= and dataset= (or cache_dir= to train from a cache).")
        if not hooks:
            raise ValueError("Pass hook_names: one hook name or a list of them.")
        self.source = LiveSource(
            model,
            hooks,
            TokenSource(dataset, dataset_column, dataset_split, streaming),
            context_size=context_size,
            prepend_bos=prepend_bos,
            exclude_special_tokens=exclude_special_tokens,
            rows_per_chunk=max(1, shuffle_buffer_tokens // context_size),
            holdout_documents=holdout_documents,
            model_batch_size=model_batch_size,
            num_workers=num_workers,
            model_options={
                "model_class_name": model_class_name,
                "dtype": str_to_dtype(model_dtype),
                "tokenizer": tokenizer,
                "trust_remote_code": trust_remote_code,
            },
        )

    # ------------------------------------------------------------------ what the data is
    @property
    def hook_names(self) -> list[str]:
        """The hooks whose activations this DataModule yields."""
        return self.source.hook_names

    @property
    def context_size(self) -> int:
        """Tokens per row fed to the model."""
        return self.source.context_size

    @property
    def d_in(self) -> int:
        """Width of the first hook's activations (read from the model or the cache manifest)."""
        return self.d_in_per_hook[self.hook_names[0]]

    @property
    def d_in_per_hook(self) -> dict[str, int]:
        """Width of every hook's activations."""
        return self.source.d_in_per_hook

    @property
    def hooked_model(self) -> HookedModel:
        """The hooked language model (built on the CPU on first use when ``setup`` has not run)."""
        if not isinstance(self.source, LiveSource):
            raise RuntimeError(
                "A DataModule reading an activation cache runs no model: pass model= and dataset= "
                "to evaluate on the language model."
            )
        return self.source.hooked_model

    def token_rows(self) -> Iterator[Tensor]:
        """Yield the ``context_size`` token rows this rank feeds the model, in order."""
        if not isinstance(self.source, LiveSource):
            raise RuntimeError("An activation cache holds no token ids.")
        return self.source.token_rows(self._rank, self._world_size)

    # ------------------------------------------------------------------ Lightning hooks
    def prepare_data(self) -> None:
        """Convert the offline default model once per node, before any rank loads it."""
        if isinstance(self.source, LiveSource):
            self.source.prepare()

    def setup(self, stage: str | None = None) -> None:
        """Read this rank's place in the world and build the model on its device.

        Raises:
            ConfigurationError: ``fit`` with neither ``max_steps`` nor ``max_time``: the training
                stream is endless, so the run would never end.

        """
        device: torch.device | str = "cpu"
        if self.trainer is not None:
            if stage == "fit":
                _check_run_ends(self.trainer)
            # The strategy's data-parallel rank: latent-parallel ranks share one stream.
            sampler = getattr(self.trainer.strategy, "distributed_sampler_kwargs", None) or {}
            self._rank = sampler.get("rank", self.trainer.global_rank)
            self._world_size = sampler.get("num_replicas", self.trainer.world_size)
            device = self.trainer.strategy.root_device
        if isinstance(self.source, LiveSource):
            self.source.build(device)

    def train_dataloader(self) -> DataLoader:
        """Return an endless loader of activation batches, from the restored position on."""
        if isinstance(self.source, StoredSource):
            stream = self.source.store.train_dataloader(
                self.batch_size, self.seed, self.shuffle, self.num_workers
            )
            return DataLoader(_Batches(lambda: map(self._unwrap, stream)), batch_size=None)
        start = self._start_batch
        return DataLoader(_Batches(lambda: self._batches(start)), batch_size=None)

    def val_dataloader(self) -> DataLoader:
        """Return the held-out activations (``val_tokens`` of them) in batches."""
        return DataLoader(_Batches(self._holdout_batches), batch_size=None)

    def test_dataloader(self) -> DataLoader:
        """Return the held-out activations, as :meth:`val_dataloader`."""
        return self.val_dataloader()

    def state_dict(self) -> dict[str, Any]:
        """Batches this rank consumed, what the stream's positions depend on, a store's position."""
        consumed = self._start_batch
        if self.trainer is not None:
            consumed = self.trainer.global_step * self.trainer.accumulate_grad_batches
        state = {
            "batches_consumed": consumed,
            "world_size": self._world_size,
            "batch_size": self.batch_size,
            "num_workers": self.num_workers,
            "seed": self.seed,
        }
        if isinstance(self.source, StoredSource):
            state["store"] = self.source.store.state_dict(batches_consumed=consumed)
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Resume the stream after the batches the checkpoint consumed."""
        self._start_batch = int(state_dict["batches_consumed"])
        if isinstance(self.source, StoredSource):
            if "store" not in state_dict:
                raise ValueError(
                    "The checkpoint's data state is not a store's (it was written by a run "
                    "without cache_dir): resume with the data it was written with."
                )
            self.source.store.load_state_dict(state_dict["store"])  # warns on another layout
            return
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

    # ------------------------------------------------------------------ exporter and evaluation
    def sae_metadata(self, hook_name: str | None = None) -> dict[str, Any]:
        """Return the sae-lens ``metadata`` fields this data determines for one hook.

        ``hook_name`` (default: the first hook) is this DataModule's name of the hook or the name
        an earlier call returned. A Hugging Face decoder layer (``model.layers.6``) is recorded
        under its transformer-lens name (``blocks.6.hook_resid_post``) with
        ``model_class_name="HookedTransformer"``, the name transformer-lens-based tools attach an
        SAE to (:func:`~lightning_sae.data.models.exported_hook`).
        """
        metadata = self.source.metadata()
        hook, class_name = exported_hook(self._hook(hook_name), metadata["model_class_name"])
        return {**metadata, "hook_name": hook, "model_class_name": class_name}

    def sample_activations(self, n_tokens: int, hook_name: str | None = None) -> Tensor:
        """``[n_tokens, d_in]`` activations of held-out documents, on the CPU.

        The documents are the ``holdout_documents`` never used for training (or the store's
        held-out part); the training stream is not advanced. Computed once and kept.

        Raises:
            ValueError: The held-out documents hold fewer than ``n_tokens`` tokens.

        """
        hook = self._hook(hook_name)
        acts = self._holdout.first(self.source, n_tokens)[hook].clone()
        if acts.shape[0] < n_tokens:
            raise ValueError(
                f"The held-out data gives {acts.shape[0]} tokens, fewer than the {n_tokens} "
                "asked for: raise holdout_documents (or write the store with a larger "
                "holdout_tokens), or ask for fewer."
            )
        return acts[:n_tokens]

    def holdout_token_rows(self, n_rows: int) -> Tensor:
        """``[n, context_size]`` token rows of the held-out documents (``n <= n_rows``), in order.

        These are the rows :meth:`sample_activations` runs the model on; nothing here is trained
        on. A sae-lens cache keeps its rows; our store keeps activations only, so it has none.
        """
        return self.source.holdout_token_rows(n_rows)

    def _hook(self, hook_name: str | None) -> str:
        """Return this DataModule's name of a hook given by its own or its exported name."""
        if hook_name is None or hook_name in self.hook_names:
            return hook_name or self.hook_names[0]
        for hook in self.hook_names:
            if transformer_lens_hook_name(hook) == hook_name:
                return hook
        raise ValueError(
            f"hook_name {hook_name!r} is not one of this DataModule's {self.hook_names}."
        )

    # ------------------------------------------------------------------ cache
    def write_cache(
        self,
        path: str | Path,
        n_tokens: int,
        holdout_tokens: int = 16_384,
        dtype: str | None = None,
        append: bool = False,
        resume: bool = True,
        storage_options: dict[str, Any] | None = None,
        block_tokens: int = 128,
        chunk_bytes: int = 32 << 20,
        device: str | None = None,
    ) -> str:
        """Write the activations of ``n_tokens`` training tokens to an activation store.

        Reads the training documents in order (one shard, unshuffled), runs the model and
        writes every hook's activations and the token ids through
        :func:`~lightning_sae.data.store.write_store`: mixed over ``shuffle_buffer_tokens`` with
        ``seed``, in blocks of ``block_tokens``. A write that was killed resumes where it
        stopped when called again with the same arguments (the model runs only from there);
        ``append`` adds the next ``n_tokens`` of the stream to a complete store.
        ``ActivationDataModule(cache_dir=path)`` and ``litdata.StreamingDataset(path)`` read it.
        Call it in one process (``lightning-sae cache``), not on every rank of a DDP run.

        Args:
            path: Local folder (empty or absent) or object-store URL (``s3://``, ``gs://``,
                ``r2://``).
            n_tokens: Activations (tokens) to write per hook.
            holdout_tokens: Held-out activations stored for :meth:`sample_activations` (fewer if
                the held-out documents hold fewer); none when appending.
            dtype: Stored dtype (``float32``, ``bfloat16``, ``float16``); default: the model's.
            append: Add to the complete store at ``path`` (same model, hooks and settings).
            resume: Continue an interrupted write at ``path``; ``False`` discards it.
            storage_options: Object-store options (``endpoint_url``, keys...).
            block_tokens: Tokens per litdata item (the unit shuffled and sharded on reading).
            chunk_bytes: Bytes per chunk file (the unit of download).
            device: Where to run the model (``cuda``, ``cpu``...); default: where it is (the
                CPU, or the rank's device after :meth:`setup`).

        Returns:
            The store's path or URL.

        """
        check_positive_ints({"n_tokens": n_tokens})
        source = self.source
        if not isinstance(source, LiveSource):
            raise ValueError(
                "This DataModule reads stored activations: write a store from a live model "
                "(model= and dataset=)."
            )
        if device is not None:
            source.build(device)

        # The source is the whole stream: an append continues after the tokens already stored.
        end = n_tokens + (stored_input_tokens(path, storage_options) if append else 0)

        def chunks(start: int) -> Iterator[dict[str, Tensor]]:
            return _stream_tokens(source, start, end - start)

        def holdout() -> dict[str, Tensor] | None:
            return take(source.holdout_chunks(), holdout_tokens) if holdout_tokens else None

        return write_store(
            os.fspath(path),
            chunks,
            None if append else holdout,
            source.metadata(),
            dtype=dtype,
            storage_options=storage_options,
            resume=resume,
            append=append,
            block_tokens=block_tokens,
            chunk_bytes=chunk_bytes,
            shuffle_buffer_tokens=self.shuffle_buffer_tokens,
            seed=self.seed,
        )

    # ------------------------------------------------------------------ the streams
    def _batches(self, start_batch: int) -> Iterator[Batch]:
        chunks = self.source.chunks(self._rank, self._world_size, self.shuffle, self.seed)
        for batch in batches(chunks, self.batch_size, start_batch):
            yield self._unwrap(batch)

    def _holdout_batches(self) -> Iterator[Batch]:
        """Held-out batches, computed as they are asked for (a sanity check runs two)."""
        for start in range(0, self.val_tokens, self.batch_size):
            stop = min(start + self.batch_size, self.val_tokens)
            held_out = self._holdout.first(self.source, stop)
            n = next(iter(held_out.values())).shape[0]
            if n == 0:
                message = (
                    "There are no held-out activations to validate on: raise holdout_documents "
                    "(or write the store with holdout_tokens > 0)."
                )
                fitting = self.trainer is not None and self.trainer.state.fn == TrainerFn.FITTING
                if not fitting:
                    raise ValueError(message)
                rank_zero_warn(f"{message} Validation during fit is skipped.")
            if n <= start:
                return
            yield self._unwrap({h: a[start:stop] for h, a in held_out.items()})

    def _unwrap(self, batch: dict[str, Tensor]) -> Batch:
        return batch[self.hook_names[0]] if len(self.hook_names) == 1 else batch


def _stream_tokens(source: LiveSource, start: int, n_tokens: int) -> Iterator[dict[str, Tensor]]:
    """``n_tokens`` activations and token ids of the training stream from token ``start`` on.

    The stream is rank 0 of 1, unshuffled, so it is the same in every process; chunks before
    ``start`` are counted, not computed.
    """
    if n_tokens <= 0:
        return
    rows = source.token_rows(0, 1)
    special = torch.tensor(source.hooked_model.special_token_ids(), dtype=torch.long)
    chunk: Chunk
    for chunk in source.chunks(0, 1, shuffle=False, seed=0):
        tokens = torch.stack([next(rows) for _ in range(source.rows_per_chunk)]).flatten()
        if source.exclude_special_tokens:
            tokens = tokens[~torch.isin(tokens, special)]
        if chunk.n_tokens <= start:
            start -= chunk.n_tokens
            continue
        acts = {TOKEN_IDS: tokens, **chunk.load()}
        stop = min(chunk.n_tokens, start + n_tokens)
        yield {k: v[start:stop] for k, v in acts.items()}
        n_tokens -= stop - start
        start = 0
        if n_tokens == 0:
            return


def _check_run_ends(trainer: Trainer) -> None:
    """Refuse a fit on the endless stream that only ``max_steps`` or ``max_time`` can end."""
    timed = any(
        isinstance(callback, Timer) and callback.time_remaining() is not None
        for callback in trainer.callbacks
    )
    if (trainer.max_steps is None or trainer.max_steps < 0) and not timed:
        raise ConfigurationError(
            f"Trainer max_steps={trainer.max_steps}: the activation stream is endless (one "
            "epoch never ends), so this run would train forever. Set Trainer(max_steps=N) "
            "(--trainer.max_steps N on the command line), or max_time."
        )
