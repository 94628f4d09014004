"""Token sources: documents from a dataset, files or memory, packed into ``context_size`` rows.

A :class:`TokenSource` reads documents in a fixed order, so that document ``i`` is the same on
every rank and every run: shards (``i % num_shards == shard``) are then disjoint, cover the source,
and can be replayed exactly on resume. Packing is sae-lens's ``concat_and_batch_sequences`` with
its default BOS handling: BOS opens every row and separates concatenated documents.
"""

import itertools
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from sae_lens.tokenization_and_batching import concat_and_batch_sequences
from torch import Tensor

#: Columns read when ``column`` is not given, in order: text, then pre-tokenised ids.
DEFAULT_COLUMNS = ("text", "tokens", "input_ids")
_DATASET_FILE_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}

Document = str | Tensor


class TokenSource:
    """An ordered, re-readable sequence of documents (strings or 1-D token ids).

    Args:
        dataset: One of: a Hugging Face dataset name or local folder (loaded with
            ``datasets.load_dataset``); a local ``.txt`` file (one document) or
            ``.jsonl``/``.json``/``.parquet``/``.csv`` file (one document per row); a
            ``datasets.Dataset``/``IterableDataset``; a 2-D tensor of token ids (one document per
            row); or any iterable of strings, token tensors or lists of ids (kept in memory).
        column: Column holding the text or token ids; default: the first of ``text``,
            ``tokens``, ``input_ids`` that exists.
        split: Dataset split to load by name.
        streaming: Stream a named dataset instead of downloading it whole.

    Raises:
        ValueError: The column is missing (the message lists those that exist).

    """

    def __init__(
        self,
        dataset: Any,
        column: str | None = None,
        split: str = "train",
        streaming: bool = False,
    ) -> None:
        self.dataset_path = _dataset_path(dataset)
        self.column: str | None = None
        if isinstance(dataset, str | os.PathLike):
            path = Path(dataset)
            if path.suffix == ".txt" and path.is_file():
                dataset = [path.read_text(encoding="utf-8")]
            else:
                dataset = _load_dataset(str(dataset), split=split, streaming=streaming)
        if isinstance(dataset, Tensor):
            if dataset.ndim not in (1, 2) or dataset.is_floating_point():
                raise ValueError(
                    f"A tensor dataset must hold integer token ids of shape [docs, tokens] or "
                    f"[tokens], got {dataset.dtype} {tuple(dataset.shape)}."
                )
            self._data: Any = list(dataset.long()) if dataset.ndim == 2 else [dataset.long()]
        elif _is_hf_dataset(dataset):
            self.column = _pick_column(_column_names(dataset), column)
            self._data = dataset
        elif isinstance(dataset, Iterable):
            self._data = list(dataset)
            if self._data and isinstance(self._data[0], dict):
                self.column = _pick_column(list(self._data[0]), column)
        else:
            raise TypeError(
                f"Unsupported dataset {type(dataset).__name__}: pass a dataset name or path, a "
                "datasets.Dataset, a tensor of token ids or an iterable of strings/token ids."
            )

    def documents(self, start: int = 0, step: int = 1) -> Iterator[Document]:
        """Documents ``start, start + step, ...`` of one pass over the source."""
        data = self._data
        rows: Iterable[Any]
        if isinstance(data, list):
            rows = data[start::step]
        elif hasattr(data, "select"):  # a map-style datasets.Dataset: random access
            rows = data.select(range(start, len(data), step))
        else:  # a streaming datasets.IterableDataset
            rows = itertools.islice(data, start, None, step)
        for row in rows:
            yield _as_document(row[self.column] if self.column is not None else row)

    def is_empty(self, start: int = 0) -> bool:
        """Whether the source holds no document at index ``start`` or later."""
        return next(self.documents(start), None) is None


def _dataset_path(dataset: Any) -> str | None:
    if isinstance(dataset, str | os.PathLike):
        return str(dataset)
    if isinstance(getattr(dataset, "dataset_path", None), str):  # offline.Documents
        return dataset.dataset_path
    info = getattr(dataset, "info", None)
    return getattr(info, "dataset_name", None) if info is not None else None


def _is_hf_dataset(dataset: Any) -> bool:
    return type(dataset).__module__.startswith("datasets.")


def _column_names(dataset: Any) -> list[str]:
    names = getattr(dataset, "column_names", None)
    if names is None:  # a streaming dataset without declared features: peek at one row
        first = next(iter(dataset), None)
        names = [] if first is None else list(first)
    return list(names)


def _pick_column(names: list[str], column: str | None) -> str:
    candidates = (column,) if column is not None else DEFAULT_COLUMNS
    for name in candidates:
        if name in names:
            return name
    wanted = repr(column) if column is not None else f"any of {list(DEFAULT_COLUMNS)}"
    raise ValueError(
        f"The dataset has no column {wanted}; its columns are {names}. Pass "
        "dataset_column=<name> (TokenSource: column=<name>) of the column holding text or token "
        "ids."
    )


def _load_dataset(name: str, split: str, streaming: bool) -> Any:
    import datasets

    builder = _DATASET_FILE_BUILDERS.get(Path(name).suffix)
    try:
        if builder is not None and Path(name).is_file():
            return datasets.load_dataset(builder, data_files=name, split=split, streaming=streaming)
        return datasets.load_dataset(name, split=split, streaming=streaming)
    except (OSError, ConnectionError, datasets.exceptions.DatasetNotFoundError) as error:
        raise OSError(
            f"Could not load dataset {name!r}: it is not a local file or folder and downloading "
            "it failed (offline, or no such dataset on the Hugging Face hub). Pass a local "
            "path, a datasets.Dataset, or an in-memory list of strings. "
            f"Cause: {type(error).__name__}: {error}"
        ) from error


def _as_document(value: Any) -> Document:
    if isinstance(value, str):
        return value
    return torch.as_tensor(value, dtype=torch.long).flatten()


def tokenize(document: Document, tokenizer: Any) -> Tensor:
    """1-D token ids of a document; text is tokenised without special tokens (packing adds BOS)."""
    if isinstance(document, Tensor):
        return document
    if tokenizer is None:
        raise ValueError(
            "The dataset holds text but the model has no tokenizer: pass tokenizer=..., or "
            "pre-tokenised documents (token id tensors)."
        )
    ids = tokenizer(document, add_special_tokens=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def pack(
    documents: Iterable[Document],
    tokenizer: Any,
    context_size: int,
    bos_token_id: int | None,
) -> Iterator[Tensor]:
    """Rows of exactly ``context_size`` tokens packed from ``documents``.

    With ``bos_token_id`` set, every row starts with BOS and BOS separates documents inside a row
    (sae-lens's defaults); a document that already starts with BOS does not get a second one.
    The last, incomplete row is dropped.
    """
    tokens = (t for t in (tokenize(doc, tokenizer) for doc in documents) if t.numel())
    return concat_and_batch_sequences(
        tokens,
        context_size,
        begin_batch_token_id=bos_token_id,
        sequence_separator_token_id=bos_token_id,
    )
