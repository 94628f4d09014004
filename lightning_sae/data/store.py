"""The activation store: activations written once as a litdata dataset, streamed by every rank.

Layout of a store (a local folder, or an object-store prefix such as ``s3://bucket/acts``)::

    index.json                     litdata's index: chunk files, item counts, item layout
    chunk-0-N.bin                  litdata chunks; one item is a block of ``block_tokens``
                                   tokens: {hook_name: [block_tokens, d_in], "token_ids": [...]}
    lightning_sae.json             our manifest: model, hooks, d_in, context size, dtype, tokens
    holdout.safetensors            held-out activations for ``sample_activations`` (optional)
    lightning_sae.progress.json    only while a write is under way: where to resume

``litdata.StreamingDataset(path)`` opens a store as it is. bfloat16 activations are stored as
their int16 bit pattern (litdata has no bfloat16 serializer): ``.view(torch.bfloat16)`` restores
them; the manifest's ``dtype`` says which.

**Writing** (:func:`write_store`). Incoming activations fill a mixing buffer of
``shuffle_buffer_tokens`` tokens; each full buffer is permuted (seeded by the seed and the
buffer's first chunk index, so a resumed write produces the same store) and cut into blocks
written as whole chunks. litdata shuffles only chunk order and items within a chunk, so this
mixing is what puts tokens of many documents into every chunk. After each buffer the chunks are
in place (renamed into the folder, or uploaded) and a progress file records how many input tokens
they hold: a killed write resumes from there (the input is skipped, not recomputed, when
``chunks`` is a callable that starts at a token offset). ``index.json`` is written last, so a
half-written store is never readable, and an append keeps the previous index readable until the
new one replaces it.

**Reading** (:class:`ActivationStore`). ``StreamingDataset(shuffle=True, drop_last=True)`` +
``StreamingDataLoader`` shard the items over ranks and dataloader workers, reshuffle every epoch
and keep a local chunk cache for remote stores. Their batches of items are re-cut into batches of
exactly ``batch_size`` tokens; epochs follow each other without end, and every rank gets the same
number of items per epoch. Resume is litdata's own loader state, taken at the loader batch that
holds the next unconsumed token, plus the tokens to skip inside it.
"""

import argparse
import copy
import json
import os
import shutil
import tempfile
import time
import warnings
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import numpy as np
import torch
from sae_lens.util import str_to_dtype
from safetensors.torch import load_file, save_file
from torch import Tensor

from lightning_sae.distributed import world_size
from lightning_sae.io import atomic_write_text
from lightning_sae.modules.validation import check_positive_ints

FORMAT = "lightning-sae-activation-store"
VERSION = 1
MANIFEST = "lightning_sae.json"
PROGRESS = "lightning_sae.progress.json"
HOLDOUT = "holdout.safetensors"
INDEX = "index.json"  # litdata's
TOKEN_IDS = "token_ids"
#: Object-store schemes whose files litdata can upload and download (its ``fs_provider``).
REMOTE_SCHEMES = ("s3", "gs", "r2")
#: Positions kept for :meth:`ActivationStore.state_dict` behind the last batch yielded (Lightning
#: prefetches one batch; a checkpoint asks for the position of the batches consumed).
_POSITIONS_KEPT = 64
_INSTALL = (
    "Install litdata without its dependencies (it pins nothing, and its torchvision requirement "
    "would replace your torch): pip install --no-deps litdata==0.2.76 && pip install "
    "'lightning-sae[store]'"
)

Chunks = Iterable[dict[str, Tensor]] | Callable[[int], Iterable[dict[str, Tensor]]]


def _litdata() -> Any:
    try:
        import litdata
    except ImportError as error:
        raise ImportError(f"The activation store needs litdata. {_INSTALL}") from error
    return litdata


def _allow_plain_http(storage_options: dict[str, Any]) -> None:
    """Let litdata's obstore downloads reach an ``http://`` endpoint (MinIO, a loopback server).

    litdata 0.2.76 builds its obstore clients with fixed client options that omit
    ``allow_http``, so any http endpoint fails with "builder error"; https is unaffected.
    """
    if str(storage_options.get("endpoint_url", "")).startswith("http://"):
        from litdata.streaming import downloader

        options = getattr(downloader, "_OBSTORE_CLIENT_OPTIONS", None)
        if isinstance(options, dict):
            options["allow_http"] = "true"


class _Location:
    """A store's folder: a local directory or an object-store prefix, as litdata addresses it."""

    def __init__(
        self, path: str | os.PathLike[str], storage_options: dict[str, Any] | None
    ) -> None:
        text = os.fspath(path)
        self.storage_options = dict(storage_options or {})
        self.remote = "://" in text
        if self.remote:
            scheme = urlparse(text).scheme
            if scheme not in REMOTE_SCHEMES:
                raise ValueError(
                    f"Unsupported store location {text!r}: stores live in local folders or at "
                    f"{', '.join(s + '://' for s in REMOTE_SCHEMES)} URLs."
                )
            _litdata()
            from litdata.streaming.fs_provider import _get_fs_provider

            self.url = text.rstrip("/")
            self._fs = _get_fs_provider(self.url, self.storage_options)
            _allow_plain_http(self.storage_options)
        else:
            self.url = str(Path(text).absolute())
            self.folder = Path(self.url)

    def __str__(self) -> str:
        return self.url

    def name(self, file: str) -> str:
        return f"{self.url}/{file}"

    def exists(self, file: str) -> bool:
        return self._fs.exists(self.name(file)) if self.remote else (self.folder / file).exists()

    def is_empty(self) -> bool:
        if self.remote:
            return self._fs.is_empty(self.url)
        return not self.folder.exists() or not any(self.folder.iterdir())

    def read_text(self, file: str) -> str | None:
        """Return the file's text, or ``None`` when it does not exist."""
        if not self.remote:
            path = self.folder / file
            return path.read_text() if path.is_file() else None
        if not self.exists(file):
            return None
        with tempfile.TemporaryDirectory() as tmp:
            self._fs.download_file(self.name(file), os.path.join(tmp, file))
            return Path(tmp, file).read_text()

    def write_text(self, file: str, text: str) -> None:
        """Replace ``file`` in one step (a rename locally, one object PUT remotely)."""
        if not self.remote:
            self.folder.mkdir(parents=True, exist_ok=True)
            atomic_write_text(self.folder / file, text)
            return
        with tempfile.TemporaryDirectory() as tmp:
            local = Path(tmp, file)
            local.write_text(text)
            self._fs.upload_file(str(local), self.name(file))

    def put(self, local: Path, file: str) -> None:
        """Move a finished local file into the store (flushed and renamed, or uploaded)."""
        if self.remote:
            self._fs.upload_file(str(local), self.name(file))
            local.unlink()
            return
        with open(local, "rb") as handle:
            os.fsync(handle.fileno())
        self.folder.mkdir(parents=True, exist_ok=True)
        os.replace(local, self.folder / file)

    def get(self, file: str, local_dir: Path) -> Path:
        """Return a local path holding ``file`` (itself, or a download into ``local_dir``)."""
        if not self.remote:
            return self.folder / file
        local_dir.mkdir(parents=True, exist_ok=True)
        local = local_dir / file
        self._fs.download_file(self.name(file), str(local))
        return local

    def delete(self, file: str) -> None:
        if self.remote:
            self._fs.delete_file_or_directory(self.name(file))
        else:
            (self.folder / file).unlink(missing_ok=True)

    def remove_chunks(self) -> None:
        """Delete the chunk files of a discarded write (local; remote ones are overwritten)."""
        if not self.remote:
            for path in self.folder.glob("chunk-*.bin"):
                path.unlink()

    def staging(self) -> Path:
        """Create a local folder for chunks to be written in before they move into the store."""
        if self.remote:
            return Path(tempfile.mkdtemp(prefix="lightning-sae-store-"))
        path = self.folder / ".lightning_sae_staging"
        shutil.rmtree(path, ignore_errors=True)
        path.mkdir(parents=True)
        return path


# ---------------------------------------------------------------------------------- writing
def write_store(
    path: str | os.PathLike[str],
    chunks: Chunks,
    holdout: dict[str, Tensor] | Callable[[], dict[str, Tensor] | None] | None,
    metadata: dict[str, Any],
    dtype: str | torch.dtype | None = None,
    storage_options: dict[str, Any] | None = None,
    resume: bool = True,
    append: bool = False,
    block_tokens: int = 128,
    chunk_bytes: int = 32 << 20,
    shuffle_buffer_tokens: int = 1 << 17,
    seed: int = 0,
) -> str:
    """Write activation chunks to a store: resumable after a crash, appendable, local or remote.

    >>> write_store("acts", [{"blocks.6.hook_resid_post": x}], None,
    ...             {"model_name": "gpt2", "context_size": 128})  # doctest: +SKIP

    Args:
        path: Local folder or object-store URL (``s3://``, ``gs://``, ``r2://``).
        chunks: Activations ``{hook_name: [n, d_in]}`` (every hook the same ``n``; optionally
            ``"token_ids": [n]``), in stream order; or a callable ``start_token -> chunks`` that
            yields the source from token ``start_token`` on, so a resumed write skips the
            input without recomputing it (a plain iterable is consumed up to that point). A
            callable is the whole source: an append asks it for the tokens after those the
            store already holds (the manifest's ``input_tokens``).
        holdout: Held-out activations in the same form, for ``sample_activations``, or ``None``;
            or a callable returning them, called only when a write starts (not on resume).
        metadata: Manifest fields describing the source (``model_name``, ``model_class_name``,
            ``context_size``, ``prepend_bos``, ``dataset_path``, ``exclude_special_tokens``...).
        dtype: Stored dtype (``float32``, ``bfloat16``, ``float16``); default: the input's.
        storage_options: Object-store options passed to litdata (``endpoint_url``, keys...).
        resume: Continue an interrupted write of the same source at ``path``; ``False``
            discards it and starts again.
        append: Add the chunks to the complete store at ``path`` (same model, hooks, dtype).
        block_tokens: Tokens per item: the unit litdata shuffles and shards.
        chunk_bytes: Target bytes per chunk file: the unit of download and of the in-chunk
            shuffle.
        shuffle_buffer_tokens: Tokens mixed together before they are cut into blocks (rounded
            up to whole chunks; memory: this many tokens of every hook).
        seed: Seed of the mixing permutations.

    Returns:
        The store's path or URL.

    Raises:
        FileExistsError: ``path`` holds a complete store (and ``append`` is off) or other files.
        ValueError: Inconsistent chunks, non-finite activations, or a resumed write whose
            source or settings differ.

    """
    location = _Location(path, storage_options)
    _litdata()
    check_positive_ints(
        {
            "block_tokens": block_tokens,
            "chunk_bytes": chunk_bytes,
            "shuffle_buffer_tokens": shuffle_buffer_tokens,
        }
    )
    if dtype is not None and not str_to_dtype(dtype).is_floating_point:
        raise ValueError(f"dtype must be a float type (float32, bfloat16...), not {dtype}.")
    request = {
        "dtype": None if dtype is None else str(str_to_dtype(dtype)).removeprefix("torch."),
        "block_tokens": block_tokens,
        "chunk_bytes": chunk_bytes,
        "shuffle_buffer_tokens": shuffle_buffer_tokens,
        "seed": seed,
        "append": append,
        "metadata": _jsonable(metadata),
    }
    progress = _load_json(location, PROGRESS) if resume else None
    if progress is not None and progress["request"] != request:
        raise ValueError(
            f"{location} holds an interrupted write of another source or with other settings "
            f"({progress['request']}): pass the same arguments to resume it, or resume=False "
            "to discard it."
        )
    if callable(chunks):
        if progress is not None:
            start = progress["base"]["input_tokens"] + progress["input_tokens"]
        else:
            start = _stored_input_tokens(location) if append else 0
        source: Iterable[dict[str, Tensor]] = chunks(start)
    else:
        source = chunks
    stream = iter(source)
    if progress is None:
        first = next(stream, None)
        if first is None:
            raise ValueError("No activations to store: the chunks are empty.")
        progress = _start_write(location, first, holdout, request)
        stream = _chain(first, stream)
    elif not callable(chunks):
        stream = _skip_tokens(stream, progress["input_tokens"])
    _write_buffers(location, stream, progress)
    return _finish_write(location, progress)


def stored_input_tokens(
    path: str | os.PathLike[str], storage_options: dict[str, Any] | None = None
) -> int:
    """Source tokens the complete store at ``path`` was written from (0 when there is none).

    An append with a callable source starts there; a caller that bounds its source needs it.
    """
    return _stored_input_tokens(_Location(path, storage_options))


def _stored_input_tokens(location: _Location) -> int:
    complete = _complete_store(location)
    return 0 if complete is None else complete["input_tokens"]


def _complete_store(location: _Location) -> dict[str, Any] | None:
    """Return the complete store at ``location`` as a write's base (chunks, tokens, held-out).

    ``None`` when there is none. An interrupted append recorded the store it started from; its
    manifest may already count chunks the index does not list, so discarding the append
    (``resume=False``) starts again from that record, not from the manifest.
    """
    progress = _load_json(location, PROGRESS)
    if progress is not None:
        return progress["base"] if progress["request"]["append"] else None
    manifest = _load_json(location, MANIFEST)
    if manifest is None:
        return None
    index = _load_json(location, INDEX) or {}
    n_tokens = manifest.get("n_tokens", 0)  # an append checks the manifest (_check_append)
    return {
        "chunks": index.get("chunks", []),
        "n_tokens": n_tokens,
        "input_tokens": manifest.get("input_tokens", n_tokens),
        "holdout": manifest.get("holdout"),
    }


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


def _load_json(location: _Location, file: str) -> dict[str, Any] | None:
    text = location.read_text(file)
    if text is None:
        return None
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(
            f"{location.name(file)} is not valid JSON ({error}): the store is corrupt; rewrite it "
            "(lightning-sae cache; resume=False discards an interrupted write)."
        ) from error


def _chain(first: dict[str, Tensor], rest: Iterator[dict[str, Tensor]]) -> Iterator[dict]:
    yield first
    yield from rest


def _layout(chunk: dict[str, Tensor]) -> tuple[list[str], dict[str, int], bool, torch.dtype]:
    """Hooks, d_in per hook, whether token ids come along, and the activations' dtype."""
    hooks = [key for key in chunk if key != TOKEN_IDS]
    if not hooks:
        raise ValueError(f"A chunk holds no activations, only {list(chunk)}.")
    bad = [h for h in hooks if chunk[h].ndim != 2 or not chunk[h].is_floating_point()]
    if bad:
        raise ValueError(f"Activations must be float [n, d_in] tensors; {bad} are not.")
    dtypes = {chunk[h].dtype for h in hooks}
    if len(dtypes) > 1:
        raise ValueError(f"All hooks must share one dtype, got {sorted(map(str, dtypes))}.")
    return hooks, {h: chunk[h].shape[1] for h in hooks}, TOKEN_IDS in chunk, dtypes.pop()


def _check_chunk(chunk: dict[str, Tensor], settings: dict[str, Any], holdout: bool = False) -> int:
    """Validate a chunk (or the hold-out part: token ids optional) against the store's layout.

    Returns:
        The chunk's number of tokens.

    """
    with_ids = settings["has_token_ids"] and (not holdout or TOKEN_IDS in chunk)
    expected = {*settings["hook_names"], *([TOKEN_IDS] if with_ids else [])}
    if set(chunk) != expected:
        raise ValueError(
            f"A chunk holds {sorted(chunk)}, the store {sorted(expected)}: every chunk must "
            "hold the same hooks (and token_ids in all or none)."
        )
    n = chunk[settings["hook_names"][0]].shape[0]
    for hook in settings["hook_names"]:
        acts = chunk[hook]
        if acts.shape != (n, settings["d_in"][hook]):
            raise ValueError(
                f"Chunk activations of {hook!r} have shape {tuple(acts.shape)}, expected "
                f"({n}, {settings['d_in'][hook]}): every hook needs the same number of tokens."
            )
        if not torch.isfinite(acts).all():
            raise ValueError(f"Activations of {hook!r} hold NaN or inf: fix the source model.")
    if with_ids and chunk[TOKEN_IDS].shape != (n,):
        raise ValueError(f"token_ids must have shape ({n},), got {tuple(chunk[TOKEN_IDS].shape)}.")
    return n


def _start_write(
    location: _Location,
    first: dict[str, Tensor],
    holdout: dict[str, Tensor] | None,
    request: dict[str, Any],
) -> dict[str, Any]:
    """Check the target, write the hold-out part, and record the write's settings."""
    hooks, d_in, token_ids, input_dtype = _layout(first)
    dtype = str_to_dtype(request["dtype"]) if request["dtype"] else input_dtype
    block = request["block_tokens"]
    item_bytes = block * (sum(d_in.values()) * dtype.itemsize + (4 if token_ids else 0))
    items_per_chunk = max(1, request["chunk_bytes"] // item_bytes)
    chunk_tokens = items_per_chunk * block
    settings = {
        "hook_names": hooks,
        "d_in": d_in,
        "has_token_ids": token_ids,
        "block_tokens": block,
        "dtype": str(dtype).removeprefix("torch."),
        "items_per_chunk": items_per_chunk,
        "buffer_tokens": -(-request["shuffle_buffer_tokens"] // chunk_tokens) * chunk_tokens,
    }
    complete = _complete_store(location)
    base: dict[str, Any] = {"chunks": [], "n_tokens": 0, "input_tokens": 0, "holdout": None}
    if request["append"]:
        if complete is None:
            raise FileNotFoundError(f"append=True but {location} holds no complete store.")
        if holdout is not None:
            raise ValueError("append=True keeps the store's held-out part: pass holdout=None.")
        manifest = _load_json(location, MANIFEST)
        _check_append(location, manifest, request["metadata"], settings)
        base = complete
    elif complete is not None:
        raise FileExistsError(
            f"{location} already holds an activation store: pass append=True to add to it, or "
            "write to another path."
        )
    elif location.exists(PROGRESS):  # an interrupted write, discarded (resume=False)
        location.remove_chunks()
    elif not location.is_empty():
        raise FileExistsError(
            f"{location} is not empty and holds no activation store: write to an empty path."
        )
    if callable(holdout):
        holdout = holdout()
    if holdout is not None:
        base["holdout"] = _write_holdout(location, holdout, settings)
    progress = {
        "format": FORMAT,
        "request": request,
        "settings": settings,
        "base": base,
        "chunks": [],
        "config": None,
        "input_tokens": 0,
    }
    location.write_text(PROGRESS, json.dumps(progress))
    return progress


def _check_append(
    location: _Location, manifest: dict[str, Any], metadata: dict[str, Any], settings: dict
) -> None:
    _check_manifest(manifest, location)
    stored = {
        k: manifest[k]
        for k in ("hook_names", "d_in", "has_token_ids", "block_tokens", "dtype", "items_per_chunk")
    }
    new = {k: settings[k] for k in stored}
    if stored != new:
        raise ValueError(
            f"Cannot append to {location}: it stores {stored}, the new chunks give {new}."
        )
    differing = {k: (manifest.get(k), v) for k, v in metadata.items() if manifest.get(k) != v}
    if differing:
        raise ValueError(
            f"Cannot append to {location}: its metadata differs {differing} (stored, new)."
        )


def _write_holdout(
    location: _Location, holdout: dict[str, Tensor], settings: dict[str, Any]
) -> dict[str, Any]:
    n_tokens = _check_chunk(holdout, settings, holdout=True)
    dtype = str_to_dtype(settings["dtype"])
    tensors = {
        k: (v.to(torch.int32) if k == TOKEN_IDS else v.to(dtype)).contiguous().cpu()
        for k, v in holdout.items()
    }
    staging = Path(tempfile.mkdtemp(prefix="lightning-sae-holdout-"))
    try:
        save_file(tensors, staging / HOLDOUT)
        location.put(staging / HOLDOUT, HOLDOUT)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return {"file": HOLDOUT, "n_tokens": n_tokens}


def _skip_tokens(chunks: Iterator[dict[str, Tensor]], n_tokens: int) -> Iterator[dict]:
    """Yield the chunks from token ``n_tokens`` on."""
    for chunk in chunks:
        n = next(v.shape[0] for k, v in chunk.items() if k != TOKEN_IDS)
        if n <= n_tokens:
            n_tokens -= n
            continue
        yield {k: v[n_tokens:] for k, v in chunk.items()}
        n_tokens = 0


def _buffers(chunks: Iterator[dict[str, Tensor]], size: int, settings: dict) -> Iterator[dict]:
    """Re-cut the chunks into buffers of ``size`` tokens (the last one may be shorter), on CPU."""
    parts: list[dict[str, Tensor]] = []
    held = 0
    dtype = str_to_dtype(settings["dtype"])
    for chunk in chunks:
        n = _check_chunk(chunk, settings)
        parts.append(
            {k: v.cpu().to(torch.int32 if k == TOKEN_IDS else dtype) for k, v in chunk.items()}
        )
        held += n
        while held >= size:
            merged = _concat(parts)
            yield {k: v[:size] for k, v in merged.items()}
            parts, held = [{k: v[size:] for k, v in merged.items()}], held - size
    if held:
        yield _concat(parts)


def _concat(parts: list[dict[str, Tensor]]) -> dict[str, Tensor]:
    if len(parts) == 1:
        return parts[0]
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}


def _mixed_items(buffer: dict[str, Tensor], settings: dict, key: int, seed: int) -> list[dict]:
    """Permute a buffer's tokens and cut them into items of ``block_tokens`` (tail dropped)."""
    n = next(iter(buffer.values())).shape[0]
    order = torch.from_numpy(np.random.default_rng([seed, key]).permutation(n))
    block = settings["block_tokens"]
    mixed = {}
    for k, v in buffer.items():
        v = v[order]
        mixed[k] = v.view(torch.int16) if v.dtype == torch.bfloat16 else v
    return [{k: v[i : i + block] for k, v in mixed.items()} for i in range(0, n - block + 1, block)]


def _write_buffers(location: _Location, chunks: Iterator[dict], progress: dict) -> None:
    """Write the chunks buffer by buffer, recording progress after each."""
    from litdata.streaming.writer import BinaryWriter

    settings = progress["settings"]
    staging = location.staging()
    try:
        for buffer in _buffers(chunks, settings["buffer_tokens"], settings):
            n_input = next(iter(buffer.values())).shape[0]
            first_chunk = len(progress["base"]["chunks"]) + len(progress["chunks"])
            items = _mixed_items(buffer, settings, first_chunk, progress["request"]["seed"])
            if items:
                writer = BinaryWriter(
                    str(staging), chunk_size=settings["items_per_chunk"], chunk_index=first_chunk
                )
                for index, item in enumerate(items):
                    writer.add_item(index, item)
                writer.done()
                index_file = staging / f"{writer.rank}.{INDEX}"
                written = json.loads(index_file.read_text())
                index_file.unlink()
                for chunk in written["chunks"]:
                    location.put(staging / chunk["filename"], chunk["filename"])
                progress["chunks"].extend(written["chunks"])
                progress["config"] = written["config"]
            progress["input_tokens"] += n_input
            location.write_text(PROGRESS, json.dumps(progress))
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _finish_write(location: _Location, progress: dict) -> str:
    """Write the manifest, then litdata's index (the store becomes readable), then clean up."""
    base, settings, request = progress["base"], progress["settings"], progress["request"]
    block = settings["block_tokens"]
    new_tokens = sum(c["chunk_size"] for c in progress["chunks"]) * block
    if not base["chunks"] and not new_tokens:
        raise ValueError(f"No complete {block}-token block to store: pass more activations.")
    config = progress["config"]
    if base["chunks"]:
        config = config or json.loads(location.read_text(INDEX) or "{}")["config"]
    manifest = {
        "format": FORMAT,
        "version": VERSION,
        **request["metadata"],
        **{
            k: settings[k] for k in ("hook_names", "d_in", "has_token_ids", "dtype", "block_tokens")
        },
        "items_per_chunk": settings["items_per_chunk"],
        "n_tokens": base["n_tokens"] + new_tokens,
        "input_tokens": base["input_tokens"] + progress["input_tokens"],
        "holdout": base["holdout"],
    }
    index = {
        "chunks": base["chunks"] + progress["chunks"],
        "config": config,
        "updated_at": str(time.time()),
    }
    location.write_text(MANIFEST, json.dumps(manifest, indent=2))
    location.write_text(INDEX, json.dumps(index, sort_keys=True))
    location.delete(PROGRESS)
    return location.url


# ---------------------------------------------------------------------------------- reading
def _check_manifest(manifest: Any, where: Any) -> None:
    fields = manifest if isinstance(manifest, dict) else {}
    if fields.get("format") != FORMAT or fields.get("version") != VERSION:
        raise ValueError(
            f"{where}/{MANIFEST} is not the manifest of a version-{VERSION} lightning-sae "
            f"activation store (format={fields.get('format')!r}, "
            f"version={fields.get('version')!r}): rewrite the store (lightning-sae cache)."
        )


#: Manifest fields a reader needs (besides ``format`` and ``version``).
REQUIRED_FIELDS = ("hook_names", "d_in", "has_token_ids", "dtype", "block_tokens", "n_tokens",
                   "holdout", "context_size")  # fmt: skip


def _check_contents(
    manifest: dict[str, Any], index: Any, location: _Location, appending: bool
) -> None:
    """Refuse missing manifest fields, file names outside the store and a wrong token count.

    A corrupt (or hostile) store fails when opened, not mid-run. While an append is under way
    (``appending``) the manifest may already count the new chunks the index does not list yet.
    """
    fix = "the store is corrupt; rewrite it (lightning-sae cache)."
    missing = [k for k in REQUIRED_FIELDS if k not in manifest]
    if missing:
        raise ValueError(f"{location.name(MANIFEST)} lacks the field(s) {missing}: {fix}")
    chunks = index.get("chunks") if isinstance(index, dict) else None
    if not isinstance(chunks, list) or not all(isinstance(c, dict) for c in chunks):
        raise ValueError(f"{location.name(INDEX)} lists no chunks: {fix}")
    names = [c.get("filename") for c in chunks]
    if manifest["holdout"] is not None:
        names.append(manifest["holdout"].get("file"))
    bad = [n for n in names if not isinstance(n, str) or Path(n).name != n or n.startswith(".")]
    if bad:
        raise ValueError(
            f"{location} names files {bad} that are not plain names inside the store: {fix}"
        )
    held = sum(int(c.get("chunk_size", 0)) for c in chunks) * manifest["block_tokens"]
    if held != manifest["n_tokens"] and not appending:
        raise ValueError(
            f"{location.name(MANIFEST)} states {manifest['n_tokens']} tokens, its {INDEX} holds "
            f"{held}: {fix}"
        )


class ActivationStore:
    """A store opened for training: exact-size shuffled batches per rank, resumable.

    >>> store = ActivationStore("s3://bucket/acts", storage_options={...})  # doctest: +SKIP
    >>> batches = store.train_dataloader(batch_size=4096, seed=0)  # doctest: +SKIP
    >>> next(iter(batches))["blocks.6.hook_resid_post"].shape  # doctest: +SKIP
    torch.Size([4096, 576])

    Args:
        path_or_url: The store's folder or URL (any scheme litdata reads).
        hook_names: Hooks to read (default: every hook in the store).
        storage_options: Object-store options for litdata (``endpoint_url``, keys...).
        cache_dir: Local folder for the chunks of a remote store (litdata's default otherwise).

    Raises:
        FileNotFoundError: No complete store at ``path_or_url``.
        ValueError: The manifest is not ours, or asks for hooks the store does not hold.

    """

    def __init__(
        self,
        path_or_url: str | os.PathLike[str],
        hook_names: list[str] | None = None,
        storage_options: dict[str, Any] | None = None,
        cache_dir: str | os.PathLike[str] | None = None,
    ) -> None:
        _litdata()
        self.location = _Location(path_or_url, storage_options)
        self.cache_dir = None if cache_dir is None else str(cache_dir)
        manifest = _load_json(self.location, MANIFEST)
        index = _load_json(self.location, INDEX)
        if manifest is None or index is None:
            if _load_json(self.location, "manifest.json") is not None:
                raise ValueError(
                    f"{self.location} is an activation cache of the previous format: convert it "
                    "with lightning_sae.data.store.convert_cache(old, new) (or python -m "
                    "lightning_sae.data.store convert OLD NEW)."
                )
            if index is not None:
                what = f"a litdata dataset without our {MANIFEST} (not written by lightning-sae)"
            elif self.location.exists(PROGRESS):
                what = "an interrupted write"
            else:
                what = "no store"
            raise FileNotFoundError(
                f"{self.location} holds {what}: write one with ActivationDataModule(...)"
                ".write_cache(path, n_tokens) or lightning-sae cache (an interrupted write "
                "resumes when run again with the same arguments)."
            )
        _check_manifest(manifest, self.location)
        appending = self.location.exists(PROGRESS)
        _check_contents(manifest, index, self.location, appending)
        if appending:
            warnings.warn(
                f"An append to {self.location} was interrupted before it finished: call "
                "write_store again with the same arguments to finish it.",
                stacklevel=2,
            )
        self.manifest: dict[str, Any] = manifest
        self.hook_names: list[str] = list(hook_names or manifest["hook_names"])
        missing = [h for h in self.hook_names if h not in manifest["hook_names"]]
        if missing:
            raise ValueError(
                f"The store {self.location} has no activations for hooks {missing}; it holds "
                f"{manifest['hook_names']}. Ask for those, or write a new store."
            )
        self.d_in_per_hook: dict[str, int] = {h: manifest["d_in"][h] for h in self.hook_names}
        self.dtype = str_to_dtype(manifest["dtype"])
        self.block_tokens: int = manifest["block_tokens"]
        self._start: dict[str, Any] = {"litdata": None, "skip_tokens": 0, "batches": 0}
        self._layout: dict[str, Any] | None = None
        self._saved: dict[str, Any] | None = None  # layout of a loaded state, checked on use
        self._relayout = False  # the loaded state's layout differs from the loader's
        self._stream: _StoreStream | None = None

    @property
    def n_tokens(self) -> int:
        """Tokens stored per hook."""
        return self.manifest["n_tokens"]

    def train_dataloader(
        self, batch_size: int, seed: int, shuffle: bool = True, num_workers: int = 0
    ) -> Iterable[dict[str, Tensor]]:
        """Return an endless iterable of this rank's ``{hook: [batch_size, d_in]}`` batches.

        Call it once the process group is initialised (``DataModule.setup``): litdata reads
        the rank and world size when the dataset is built. The batches come in the stored
        dtype; the position restored by :meth:`load_state_dict` is where it starts.
        """
        check_positive_ints({"batch_size": batch_size})
        items = -(-batch_size // self.block_tokens)
        ranks = world_size()
        n_items = self.n_tokens // self.block_tokens
        if n_items // items // ranks < 1:
            raise ValueError(
                f"The store holds {n_items} blocks of {self.block_tokens} tokens: fewer than one "
                f"batch of {items} blocks per rank on {ranks} ranks. Lower batch_size, or store "
                "more tokens."
            )
        self._layout = {
            "world_size": ranks,
            "batch_size": batch_size,
            "num_workers": num_workers,
            "seed": seed,
            "shuffle": shuffle,
        }
        now = {"layout": self._layout, "n_tokens": self.n_tokens}
        # litdata refuses a state of another seed or shuffle unless told to override it.
        self._relayout = (
            self._saved is not None and self._saved["layout"] is not None and self._saved != now
        )
        if self._relayout:
            warnings.warn(
                f"Resuming the activation store with another layout: {self._saved} (saved) vs "
                f"{now} (now). Training continues after the same number of tokens, but not in "
                "the order an uninterrupted run would have read.",
                stacklevel=2,
            )
        self._stream = _StoreStream(self, batch_size, items, seed, shuffle, num_workers)
        return self._stream

    def _loader(self, items: int, seed: int, shuffle: bool, num_workers: int) -> Any:
        litdata = _litdata()
        dataset = litdata.StreamingDataset(
            self.location.url,
            cache_dir=self.cache_dir,
            shuffle=shuffle,
            drop_last=True,
            seed=seed,
            storage_options=self.location.storage_options,
            force_override_state_dict=self._relayout,
        )
        return litdata.StreamingDataLoader(dataset, batch_size=items, num_workers=num_workers)

    def _unpack(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """Turn a loader batch into ``{hook: [items * block_tokens, d_in]}`` (stored dtype)."""
        out = {h: batch[h].flatten(0, 1) for h in self.hook_names}
        if self.dtype == torch.bfloat16:
            out = {h: a.view(torch.bfloat16) for h, a in out.items()}
        return out

    def state_dict(self, batches_consumed: int | None = None) -> dict[str, Any]:
        """Return the stream's position after ``batches_consumed`` batches of the last loader.

        Args:
            batches_consumed: Batches the training consumed (Lightning: ``global_step *
                accumulate_grad_batches``), which may lag the batches yielded (the fit loop
                prefetches one). Default: the batches yielded so far.

        """
        if self._stream is None or self._stream.records is None:
            position = dict(self._start)
        else:
            consumed = self._stream.yielded if batches_consumed is None else batches_consumed
            position = self._stream.position(consumed)
        return {**copy.deepcopy(position), "layout": self._layout, "n_tokens": self.n_tokens}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume at ``state``'s position when the loader of :meth:`train_dataloader` iterates.

        Call it before :meth:`train_dataloader` (Lightning restores the DataModule first). A
        different world size, batch size, worker count, seed or shuffle, or a store that grew,
        resumes after the same tokens but not in the exact order: :meth:`train_dataloader` warns.
        """
        missing = {"litdata", "skip_tokens", "batches", "layout"} - set(state)
        if missing:
            raise ValueError(f"Not an ActivationStore state: it lacks {sorted(missing)}.")
        self._start = {k: copy.deepcopy(state[k]) for k in ("litdata", "skip_tokens", "batches")}
        self._saved = {"layout": state["layout"], "n_tokens": state.get("n_tokens")}

    def sample_activations(self, n_tokens: int, hook_name: str | None = None) -> Tensor:
        """``[n_tokens, d_in]`` held-out activations of ``hook_name``, on the CPU (stored dtype).

        Raises:
            ValueError: The store's held-out part holds fewer than ``n_tokens`` tokens.

        """
        hook = hook_name or self.hook_names[0]
        if hook not in self.hook_names:
            raise ValueError(f"hook_name {hook!r} is not one of {self.hook_names}.")
        holdout = self.manifest["holdout"]
        available = 0 if holdout is None else holdout["n_tokens"]
        if available < n_tokens:
            raise ValueError(
                f"The store's held-out part holds {available} tokens, fewer than the {n_tokens} "
                "asked for: ask for fewer, or rewrite the store with a larger holdout."
            )
        name = self.location.name(holdout["file"])
        try:
            with tempfile.TemporaryDirectory() as tmp:
                tensors = load_file(self.location.get(holdout["file"], Path(tmp)))
            return tensors[hook][:n_tokens]
        except Exception as error:  # missing file, safetensors' own errors, a missing hook
            raise ValueError(
                f"Cannot read the held-out part {name} ({type(error).__name__}: {error}): the "
                "store is incomplete or corrupt; rewrite it (lightning-sae cache)."
            ) from error


class _StoreStream:
    """The loader Lightning iterates: a rank's endless batches, and where each one starts."""

    def __init__(
        self,
        store: ActivationStore,
        batch_size: int,
        items: int,
        seed: int,
        shuffle: bool,
        num_workers: int,
    ) -> None:
        self.store, self.batch_size, self.items = store, batch_size, items
        self.seed, self.shuffle, self.num_workers = seed, shuffle, num_workers
        #: (token position of a loader batch's first token, litdata state just before it).
        self.records: deque[tuple[int, dict[str, Any] | None]] | None = None
        self.yielded = 0

    def position(self, n_batches: int) -> dict[str, Any]:
        """Resume point of batch ``n_batches``: a litdata state and the tokens to skip after it."""
        assert self.records is not None
        if n_batches > self.yielded + 1:
            raise ValueError(f"Batch {n_batches} is ahead of the {self.yielded} batches yielded.")
        target = n_batches * self.batch_size
        found = [(pos, state) for pos, state in self.records if pos <= target]
        if not found:
            raise ValueError(
                f"The position of batch {n_batches} is no longer known: the store keeps the "
                f"last {_POSITIONS_KEPT} batches behind the {self.yielded} yielded."
            )
        pos, state = found[-1]
        return {"litdata": state, "skip_tokens": target - pos, "batches": n_batches}

    def __iter__(self) -> Iterator[dict[str, Tensor]]:
        start = copy.deepcopy(self.store._start)
        loader = self.store._loader(self.items, self.seed, self.shuffle, self.num_workers)
        if start["litdata"] is not None:
            loader.load_state_dict(_pointed_here(start["litdata"], loader.dataset))
        size = self.batch_size
        self.yielded = start["batches"]
        pos = self.yielded * size - start["skip_tokens"]
        self.records = deque([(pos, start["litdata"])])
        skip = start["skip_tokens"]
        parts: list[dict[str, Tensor]] = []
        held = 0
        # A resumed epoch may have nothing left (litdata's elastic resume after another batch
        # size or worker count, near the epoch's end); a fresh one must yield.
        resumed = start["litdata"] is not None
        while True:
            empty = True
            for batch in _readable(loader, self.store.location):
                empty = False
                acts = self.store._unpack(batch)
                n = next(iter(acts.values())).shape[0]
                pos += n
                self.records.append((pos, copy.deepcopy(loader.state_dict())))
                if skip >= n:
                    skip -= n
                    continue
                if skip:
                    acts, n, skip = {h: a[skip:] for h, a in acts.items()}, n - skip, 0
                parts.append(acts)
                held += n
                while held >= size:
                    out, parts = _take(parts, size)
                    held -= size
                    self.yielded += 1
                    keep_from = (self.yielded - _POSITIONS_KEPT) * size
                    while len(self.records) > 1 and self.records[1][0] <= keep_from:
                        self.records.popleft()
                    yield out
            if empty and not resumed:
                raise RuntimeError("The store's loader yielded no batch in an epoch.")
            resumed = False


def _pointed_here(state: dict[str, Any], dataset: Any) -> dict[str, Any]:
    """Return litdata's loader ``state`` with the paths of the store as it is opened now.

    litdata refuses a state whose folder, URL or chunk cache differ from the dataset's; a store
    copied to another folder or node, or read through another local chunk cache, holds the same
    items, so the run resumes at the same position (the store's token count is checked apart).
    """
    state = copy.deepcopy(state)
    state["dataset"].update(
        input_dir_path=dataset.input_dir.path,
        input_dir_url=dataset.input_dir.url,
        cache_dir_path=dataset.cache_dir.path,
    )
    return state


def _readable(loader: Any, location: _Location) -> Iterator[dict[str, Tensor]]:
    """Iterate litdata's loader; a missing or corrupt chunk is an error naming the store's fix."""
    batches = iter(loader)
    while True:
        try:
            batch = next(batches)
        except StopIteration:
            return
        except Exception as error:  # litdata's own types: RuntimeError, ChunkWaitTimeoutError...
            raise ValueError(
                f"Cannot read the activation store {location} ({type(error).__name__}: {error}): "
                "a chunk file is missing or corrupt; rewrite the store (lightning-sae cache)."
            ) from error
        yield batch


def _take(parts: list[dict[str, Tensor]], n: int) -> tuple[dict[str, Tensor], list[dict]]:
    """Split the first ``n`` tokens off ``parts`` (which hold at least ``n``)."""
    taken, rest, need = [], list(parts), n
    while need:
        part = rest.pop(0)
        m = next(iter(part.values())).shape[0]
        if m > need:
            taken.append({h: a[:need] for h, a in part.items()})
            rest.insert(0, {h: a[need:] for h, a in part.items()})
            break
        taken.append(part)
        need -= m
    return _concat(taken), rest


# ---------------------------------------------------------------------------------- conversion
def convert_cache(
    old: str | os.PathLike[str], new: str | os.PathLike[str], **write_options: Any
) -> str:
    """Rewrite an activation cache of the previous format (manifest.json + safetensors) as a store.

    >>> convert_cache("old_cache", "s3://bucket/acts", storage_options={...})  # doctest: +SKIP

    Args:
        old: The cache folder written by ``ActivationDataModule.write_cache`` before the store.
        new: The store's folder or URL.
        **write_options: Passed to :func:`write_store` (``dtype``, ``storage_options``...).

    """
    from lightning_sae.data.cache import ActivationCache

    cache = ActivationCache(old)
    manifest = cache.manifest
    hooks = manifest["hook_names"]
    described = ("format", "version", "dtype", "n_tokens", "files", "holdout", "hook_names", "d_in")
    metadata = {k: v for k, v in manifest.items() if k not in described}
    chunks = (cache.load(index, hooks) for index in range(len(cache.file_tokens)))
    return write_store(new, chunks, cache.load_holdout(hooks), metadata, **write_options)


def open_activations(
    path_or_url: str | os.PathLike[str],
    hook_names: list[str] | None = None,
    storage_options: dict[str, Any] | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    **sae_lens_options: Any,
) -> "ActivationStore | Any":
    """Open stored activations: our store, or a folder of sae-lens's ``CacheActivationsRunner``.

    Args:
        path_or_url: The store or the sae-lens cache folder.
        hook_names: Hooks to read (default: all).
        storage_options: Object-store options (stores only).
        cache_dir: Local chunk cache of a remote store.
        **sae_lens_options: Passed to :class:`~lightning_sae.data.sae_lens_cache.SaeLensCache`
            (``metadata``, ``holdout_tokens``, ``shuffle_buffer_tokens``).

    """
    from lightning_sae.data.sae_lens_cache import SaeLensCache, is_sae_lens_cache

    if is_sae_lens_cache(path_or_url):
        return SaeLensCache(path_or_url, hook_names, **sae_lens_options)
    if sae_lens_options:
        raise ValueError(f"{sorted(sae_lens_options)} apply to sae-lens caches only.")
    return ActivationStore(path_or_url, hook_names, storage_options, cache_dir)


def main(argv: list[str] | None = None) -> None:
    """``python -m lightning_sae.data.store convert OLD NEW [--dtype bfloat16]``."""
    parser = argparse.ArgumentParser(prog="python -m lightning_sae.data.store")
    commands = parser.add_subparsers(dest="command", required=True)
    convert = commands.add_parser("convert", help="rewrite an old activation cache as a store")
    convert.add_argument("old", help="cache folder of the previous format (manifest.json)")
    convert.add_argument("new", help="store folder or URL to write")
    convert.add_argument("--dtype", default=None, help="stored dtype (default: the cache's)")
    args = parser.parse_args(argv)
    print(convert_cache(args.old, args.new, dtype=args.dtype))


if __name__ == "__main__":
    main()
