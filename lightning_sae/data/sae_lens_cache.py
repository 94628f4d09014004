"""Train on the activations sae-lens's ``CacheActivationsRunner`` already wrote.

Such a folder is a Hugging Face ``datasets`` folder (``save_to_disk``)::

    dataset_info.json              features: {hook_name: Array2D [context, d_in], token_ids}
    state.json                     the arrow files, in order
    data-0000N-of-0000M.arrow      rows of one context each, in the order the model read them

:class:`SaeLensCache` memory-maps the arrow files (no copy, no conversion) and serves them through
the interface of :class:`~lightning_sae.data.store.ActivationStore`. The rows are stored
unshuffled (sae-lens shuffles only an index it does not save), so the reader shuffles: every
epoch permutes the training rows (seeded by ``(seed, epoch)``), rank ``r`` of ``W`` takes rows
``r, r + W, ...`` of the permutation (the same count on every rank), and each window of
``shuffle_buffer_tokens`` tokens is permuted before it is cut into batches of exactly
``batch_size`` tokens. Batch ``b`` of a rank is a function of the cache, the layout and ``b``, so a
resumed run reads exactly the batches an uninterrupted one would. The last ``holdout_tokens``
tokens' rows are never trained on: they serve :meth:`SaeLensCache.sample_activations`.
"""

import json
import os
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch
import torch.distributed as dist
from torch import Tensor

from lightning_sae.data.store import TOKEN_IDS, _take
from lightning_sae.modules.validation import check_positive_ints

FORMAT = "sae-lens-cached-activations"
#: Written beside the dataset by sae-lens when it pushes a cache to the hub.
RUNNER_CONFIG = "cache_activations_runner_cfg.json"
_ARROW_TO_TORCH = {"float32": torch.float32, "float16": torch.float16, "float64": torch.float64}


def is_sae_lens_cache(path: str | os.PathLike[str]) -> bool:
    """Tell whether ``path`` is a local ``datasets`` folder holding at least one Array2D column."""
    if "://" in os.fspath(path):
        return False
    info = Path(path) / "dataset_info.json"
    if not info.is_file() or not (Path(path) / "state.json").is_file():
        return False
    features = json.loads(info.read_text()).get("features", {})
    return any(f.get("_type") == "Array2D" for f in features.values() if isinstance(f, dict))


class SaeLensCache:
    """A sae-lens activation cache opened for training, with the ``ActivationStore`` interface.

    >>> cache = SaeLensCache("activations/", metadata={"model_name": "gpt2"})  # doctest: +SKIP
    >>> next(iter(cache.train_dataloader(batch_size=4096, seed=0)))  # doctest: +SKIP

    Args:
        path: The folder ``CacheActivationsRunner`` wrote (``new_cached_activations_path``).
        hook_names: Hooks to read (default: every Array2D column).
        metadata: Manifest fields the folder does not record (``model_name``,
            ``model_class_name``, ``prepend_bos``, ``dataset_path``...); read from sae-lens's
            ``cache_activations_runner_cfg.json`` when the folder has one.
        holdout_tokens: Tokens (rounded up to whole rows, taken from the end) kept out of
            training for :meth:`sample_activations`; 0 for none.
        shuffle_buffer_tokens: Tokens permuted together before they are cut into batches.

    Raises:
        FileNotFoundError: ``path`` is not such a folder.
        ValueError: Unknown hooks, an unsupported dtype, or too few rows.

    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        hook_names: list[str] | None = None,
        metadata: dict[str, Any] | None = None,
        holdout_tokens: int = 16_384,
        shuffle_buffer_tokens: int = 65_536,
    ) -> None:
        self.path = Path(path)
        if not is_sae_lens_cache(self.path):
            raise FileNotFoundError(
                f"{self.path} is not a sae-lens activation cache (a datasets folder with "
                "dataset_info.json, state.json and Array2D activation columns)."
            )
        if holdout_tokens < 0:
            raise ValueError(f"holdout_tokens must be >= 0, got {holdout_tokens}.")
        check_positive_ints({"shuffle_buffer_tokens": shuffle_buffer_tokens})
        features = json.loads((self.path / "dataset_info.json").read_text())["features"]
        available = [k for k, f in features.items() if f.get("_type") == "Array2D"]
        self.hook_names: list[str] = list(hook_names or available)
        missing = [h for h in self.hook_names if h not in available]
        if missing:
            raise ValueError(
                f"The sae-lens cache {self.path} has no activations for hooks {missing}; it "
                f"holds {available}."
            )
        shapes = {h: tuple(features[h]["shape"]) for h in self.hook_names}
        dtypes = {features[h]["dtype"] for h in self.hook_names}
        if len(dtypes) != 1 or not dtypes <= set(_ARROW_TO_TORCH):
            raise ValueError(
                f"Activations of dtype {sorted(dtypes)} are not supported: one of "
                f"{sorted(_ARROW_TO_TORCH)} for every hook."
            )
        self.dtype = _ARROW_TO_TORCH[dtypes.pop()]
        contexts = {shape[0] for shape in shapes.values()}
        if len(contexts) != 1:
            raise ValueError(f"Hooks with different context sizes: {shapes}.")
        self.context_size: int = contexts.pop()
        self.d_in_per_hook: dict[str, int] = {h: shape[1] for h, shape in shapes.items()}
        self._parts = self._map_arrow_files(TOKEN_IDS in features)
        self._offsets = np.cumsum([0] + [len(next(iter(p.values()))) for p in self._parts])
        n_rows = int(self._offsets[-1])
        holdout_rows = -(-holdout_tokens // self.context_size)
        self.train_rows = n_rows - holdout_rows
        if self.train_rows < 1:
            raise ValueError(
                f"The cache holds {n_rows} rows of {self.context_size} tokens: none is left for "
                f"training after holdout_tokens={holdout_tokens}. Lower holdout_tokens."
            )
        self.window_rows = max(1, shuffle_buffer_tokens // self.context_size)
        runner = self.path / RUNNER_CONFIG
        recorded = json.loads(runner.read_text()) if runner.is_file() else {}
        described = {
            k: recorded.get(k)
            for k in ("model_name", "model_class_name", "prepend_bos", "dataset_path")
        }
        self.manifest: dict[str, Any] = {
            "format": FORMAT,
            **described,
            "exclude_special_tokens": False,
            **(metadata or {}),
            "hook_names": self.hook_names,
            "d_in": self.d_in_per_hook,
            "has_token_ids": TOKEN_IDS in features,
            "context_size": self.context_size,
            "dtype": str(self.dtype).removeprefix("torch."),
            "n_tokens": self.train_rows * self.context_size,
            "holdout": {"rows": holdout_rows, "n_tokens": holdout_rows * self.context_size},
        }
        self._start_batch = 0
        self._layout: dict[str, Any] | None = None
        self._saved: dict[str, Any] | None = None
        self._stream: _CacheStream | None = None

    def __getstate__(self) -> dict[str, Any]:
        """Pickle without the mapped arrays (``ddp_spawn``): they are mapped again on load."""
        return {**self.__dict__, "_parts": None}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._parts = self._map_arrow_files(self.manifest["has_token_ids"])

    def _map_arrow_files(self, with_token_ids: bool) -> list[dict[str, np.ndarray]]:
        """Memory-map every record batch as ``{hook: [rows, context, d_in]}`` numpy views."""
        state = json.loads((self.path / "state.json").read_text())
        columns = self.hook_names + ([TOKEN_IDS] if with_token_ids else [])
        parts = []
        for data_file in state["_data_files"]:
            path = self.path / data_file["filename"]
            try:
                batches = list(pa.ipc.open_stream(pa.memory_map(str(path))))
            except (OSError, pa.ArrowInvalid) as error:
                raise ValueError(f"Cannot read the arrow file {path}: {error}") from error
            for batch in batches:
                part = {}
                for name in columns:
                    column = batch.column(batch.schema.get_field_index(name))
                    values = getattr(column, "storage", column).flatten()
                    if name != TOKEN_IDS:
                        values = values.flatten()
                    width = (self.context_size, self.d_in_per_hook.get(name, 1))
                    array = values.to_numpy(zero_copy_only=True)
                    if array.size != len(batch) * width[0] * width[1]:
                        raise ValueError(f"Column {name!r} of {path} is not [rows, {width}].")
                    shape = (len(batch), *width) if name != TOKEN_IDS else (len(batch), width[0])
                    part[name] = array.reshape(shape)
                parts.append(part)
        return parts

    def _rows(self, rows: np.ndarray, names: list[str]) -> dict[str, np.ndarray]:
        """Gather rows (global indices) of the named columns into new arrays, in that order."""
        part_of = np.searchsorted(self._offsets, rows, side="right") - 1
        out = {n: np.empty((len(rows), *self._parts[0][n].shape[1:]), self._parts[0][n].dtype)
               for n in names}  # fmt: skip
        for part in np.unique(part_of):
            where = np.flatnonzero(part_of == part)
            local = rows[where] - self._offsets[part]
            for name in names:
                out[name][where] = self._parts[part][name][local]
        return out

    @property
    def n_tokens(self) -> int:
        """Training tokens per hook (the held-out rows excluded)."""
        return self.manifest["n_tokens"]

    def train_dataloader(
        self, batch_size: int, seed: int, shuffle: bool = True, num_workers: int = 0
    ) -> "_CacheStream":
        """Return an endless iterable of this rank's ``{hook: [batch_size, d_in]}`` batches.

        The rows are memory-mapped and gathered in the main process: ``num_workers`` is
        accepted for the common interface and not used.
        """
        check_positive_ints({"batch_size": batch_size})
        initialised = dist.is_available() and dist.is_initialized()
        rank, ranks = (dist.get_rank(), dist.get_world_size()) if initialised else (0, 1)
        if self.train_rows < ranks:
            raise ValueError(f"{self.train_rows} training rows cannot be shared by {ranks} ranks.")
        self._layout = {
            "world_size": ranks,
            "batch_size": batch_size,
            "seed": seed,
            "shuffle": shuffle,
            "window_rows": self.window_rows,
            "train_rows": self.train_rows,
        }
        if self._saved is not None and self._saved != self._layout:
            warnings.warn(
                f"Resuming the sae-lens cache with another layout: {self._saved} (saved) vs "
                f"{self._layout} (now). Training continues after the same number of batches, "
                "not with the tokens an uninterrupted run would have read.",
                stacklevel=2,
            )
        self._stream = _CacheStream(self, batch_size, seed, shuffle, rank, ranks)
        return self._stream

    def state_dict(self, batches_consumed: int | None = None) -> dict[str, Any]:
        """Return the batches consumed (default: yielded) and the layout they depend on."""
        if batches_consumed is None:
            batches_consumed = self._start_batch if self._stream is None else self._stream.yielded
        return {"batches": batches_consumed, "layout": self._layout}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume after ``state["batches"]`` batches when the loader next iterates."""
        if "batches" not in state or "layout" not in state:
            raise ValueError(f"Not a SaeLensCache state: {sorted(state)}.")
        self._start_batch = int(state["batches"])
        self._saved = state["layout"]

    def sample_activations(self, n_tokens: int, hook_name: str | None = None) -> Tensor:
        """Return ``[n_tokens, d_in]`` activations of the held-out rows, in order, on the CPU."""
        hook = hook_name or self.hook_names[0]
        if hook not in self.hook_names:
            raise ValueError(f"hook_name {hook!r} is not one of {self.hook_names}.")
        available = self.manifest["holdout"]["n_tokens"]
        if available < n_tokens:
            raise ValueError(
                f"The held-out rows hold {available} tokens, fewer than the {n_tokens} asked "
                "for: open the cache with a larger holdout_tokens, or ask for fewer."
            )
        rows = np.arange(self.train_rows, self.train_rows + -(-n_tokens // self.context_size))
        acts = self._rows(rows, [hook])[hook].reshape(-1, self.d_in_per_hook[hook])
        return torch.from_numpy(acts[:n_tokens])

    def holdout_token_rows(self, n_rows: int) -> Tensor:
        """Return the token ids ``[n, context_size]`` (``n <= n_rows``) of the held-out rows."""
        if not self.manifest["has_token_ids"]:
            raise ValueError(f"The sae-lens cache {self.path} stores no token_ids.")
        n = min(n_rows, self.manifest["holdout"]["rows"])
        rows = np.arange(self.train_rows, self.train_rows + n)
        return torch.from_numpy(self._rows(rows, [TOKEN_IDS])[TOKEN_IDS].astype(np.int64))


class _CacheStream:
    """A rank's endless batches of a sae-lens cache, from the restored batch on."""

    def __init__(
        self, cache: SaeLensCache, batch_size: int, seed: int, shuffle: bool, rank: int, ranks: int
    ) -> None:
        self.cache, self.batch_size, self.seed, self.shuffle = cache, batch_size, seed, shuffle
        self.rank, self.ranks = rank, ranks
        self.rows_per_rank = cache.train_rows // ranks
        self.yielded = cache._start_batch

    def _windows(self, epoch: int, first: int) -> Iterator[dict[str, Tensor]]:
        """Yield the rank's token windows of ``epoch`` from window ``first``, each permuted."""
        cache = self.cache
        rows = np.arange(cache.train_rows)
        if self.shuffle:
            rows = np.random.default_rng([self.seed, epoch]).permutation(cache.train_rows)
        mine = rows[self.rank :: self.ranks][: self.rows_per_rank]
        for window in range(first, -(-len(mine) // cache.window_rows)):
            start = window * cache.window_rows
            chosen = np.sort(mine[start : start + cache.window_rows])
            acts = cache._rows(chosen, cache.hook_names)
            tokens = {h: a.reshape(-1, a.shape[-1]) for h, a in acts.items()}
            if self.shuffle:
                key = [self.seed, epoch, self.rank, window]
                order = np.random.default_rng(key).permutation(len(chosen) * cache.context_size)
                tokens = {h: a[order] for h, a in tokens.items()}
            yield {h: torch.from_numpy(a) for h, a in tokens.items()}

    def __iter__(self) -> Iterator[dict[str, Tensor]]:
        cache, size = self.cache, self.batch_size
        self.yielded = cache._start_batch
        epoch_tokens = self.rows_per_rank * cache.context_size
        window_tokens = cache.window_rows * cache.context_size
        epoch, skip = divmod(self.yielded * size, epoch_tokens)
        first_window, skip = divmod(skip, window_tokens)
        parts: list[dict[str, Tensor]] = []
        held = 0
        while True:
            for acts in self._windows(epoch, first_window):
                if skip:
                    acts, skip = {h: a[skip:] for h, a in acts.items()}, 0
                parts.append(acts)
                held += next(iter(acts.values())).shape[0]
                while held >= size:
                    out, parts = _take(parts, size)
                    held -= size
                    self.yielded += 1
                    yield out
            epoch, first_window = epoch + 1, 0
