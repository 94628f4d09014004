"""Activations on disk: the DataModule's stored source, and the previous cache format.

:class:`StoredSource` is what ``ActivationDataModule(cache_dir=...)`` reads: an activation store
(:class:`~lightning_sae.data.store.ActivationStore`, a litdata dataset in a folder or at an
object-store URL) or a folder of sae-lens's ``CacheActivationsRunner``
(:class:`~lightning_sae.data.sae_lens_cache.SaeLensCache`), both opened by
:func:`~lightning_sae.data.store.open_activations`.

The previous format (below: :func:`write_cache`, :class:`ActivationCache`) is read only to convert
it into a store (``python -m lightning_sae.data.store convert OLD NEW``); its writer stays for
that conversion's tests and the benchmark that compares the formats. Layout of such a folder::

    manifest.json                  model, hooks, d_in, context size, dtype, token counts, files
    activations_00000.safetensors  {hook_name: [n_tokens, d_in]} for every hook
    ...
    holdout.safetensors            held-out activations for ``sample_activations`` (optional)

The whole folder is written atomically (:func:`lightning_sae.io.atomic_folder`), so a crash or a
full disk leaves either the previous cache or none, never a half-written one. Reading trusts
nothing in the manifest: file names must be plain names inside the folder, and each file must
hold the token count the manifest states.
"""

import json
import os
from collections.abc import Iterable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

from safetensors.torch import load_file, save_file
from torch import Tensor

from lightning_sae.data.chunks import Chunk
from lightning_sae.data.store import open_activations
from lightning_sae.io import atomic_folder

MANIFEST = "manifest.json"
FORMAT = "lightning-sae-activation-cache"
VERSION = 1
HOLDOUT_FILE = "holdout.safetensors"
#: Manifest fields a reader needs (besides ``format`` and ``version``).
REQUIRED_FIELDS = (
    "model_name",
    "model_class_name",
    "hook_names",
    "d_in",
    "context_size",
    "prepend_bos",
    "dataset_path",
    "exclude_special_tokens",
    "files",
)


def write_cache(
    path: str | os.PathLike[str],
    chunks: Iterable[dict[str, Tensor]],
    holdout: dict[str, Tensor] | None,
    metadata: dict[str, Any],
    overwrite: bool = False,
) -> Path:
    """Write activation ``chunks`` (one safetensors file each) and a manifest atomically.

    Args:
        path: Cache folder to create.
        chunks: ``{hook_name: [n, d_in]}`` per file, every hook with the same ``n``.
        holdout: Held-out activations in the same form, or ``None``.
        metadata: Manifest fields describing the source (model, hooks, context size...).
        overwrite: Replace an existing cache at ``path``.

    Returns:
        The cache folder.

    """
    target = Path(path)
    if target.exists() and not overwrite:
        raise FileExistsError(f"{target} already exists: pass overwrite=True or another folder.")
    with atomic_folder(target) as tmp:
        files, dtype = [], None
        for index, chunk in enumerate(chunks):
            name = f"activations_{index:05d}.safetensors"
            save_file({k: v.contiguous().cpu() for k, v in chunk.items()}, tmp / name)
            files.append({"name": name, "n_tokens": next(iter(chunk.values())).shape[0]})
            dtype = str(next(iter(chunk.values())).dtype).removeprefix("torch.")
        if not files:
            raise ValueError("No activations to cache: n_tokens must be positive.")
        manifest = {
            "format": FORMAT,
            "version": VERSION,
            **metadata,
            "dtype": dtype,
            "n_tokens": sum(f["n_tokens"] for f in files),
            "files": files,
            "holdout": None,
        }
        if holdout is not None:
            save_file({k: v.contiguous().cpu() for k, v in holdout.items()}, tmp / HOLDOUT_FILE)
            n_holdout = next(iter(holdout.values())).shape[0]
            manifest["holdout"] = {"name": HOLDOUT_FILE, "n_tokens": n_holdout}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))
    return target


class ActivationCache:
    """A cache folder opened for reading; files are loaded on demand.

    Raises:
        FileNotFoundError: No manifest in ``path``.
        ValueError: The manifest is not a lightning-sae activation cache of a known version.

    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        manifest_path = self.path / MANIFEST
        if not manifest_path.is_file():
            raise FileNotFoundError(
                f"{manifest_path} not found: {self.path} is not an activation cache. Write one "
                "with ActivationDataModule(...).write_cache(path, n_tokens)."
            )
        try:
            self.manifest: dict[str, Any] = json.loads(manifest_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise ValueError(
                f"{manifest_path} is not valid JSON ({error}): the cache is corrupt; rewrite the "
                "cache."
            ) from error
        if not isinstance(self.manifest, dict):
            self.manifest = {}
        if self.manifest.get("format") != FORMAT or self.manifest.get("version") != VERSION:
            raise ValueError(
                f"{manifest_path} is not a version-{VERSION} lightning-sae activation cache "
                f"(format={self.manifest.get('format')!r}, "
                f"version={self.manifest.get('version')!r}); rewrite the cache."
            )
        missing = [key for key in REQUIRED_FIELDS if key not in self.manifest]
        if missing:
            raise ValueError(
                f"{manifest_path} lacks the field(s) {missing}: the cache is corrupt; rewrite the "
                "cache."
            )

    @property
    def file_tokens(self) -> list[int]:
        """Tokens in each activation file, in file order."""
        return [f["n_tokens"] for f in self.manifest["files"]]

    def load(self, index: int, hook_names: list[str]) -> dict[str, Tensor]:
        """Activations ``{hook: [n, d_in]}`` of file ``index``."""
        return self._load(self.manifest["files"][index], hook_names)

    def load_holdout(self, hook_names: list[str]) -> dict[str, Tensor] | None:
        """Load the held-out activations (``None`` when the cache has none)."""
        holdout = self.manifest.get("holdout")
        return None if holdout is None else self._load(holdout, hook_names)

    def _load(self, entry: dict[str, Any], hook_names: list[str]) -> dict[str, Tensor]:
        name = entry["name"]
        if not isinstance(name, str) or Path(name).name != name or name.startswith("."):
            raise ValueError(
                f"{self.path / MANIFEST} names file {name!r}, which is not a plain file name "
                "inside the cache folder; the manifest is corrupt or hostile: rewrite the cache."
            )
        try:
            tensors = load_file(self.path / name)
        except Exception as error:  # safetensors raises its own error types
            raise ValueError(
                f"Cannot read cache file {self.path / name} ({error}): the cache is corrupt; "
                "rewrite the cache."
            ) from error
        missing = [hook for hook in hook_names if hook not in tensors]
        if missing:
            raise ValueError(f"Cache file {self.path / name} has no activations for {missing}.")
        acts = {hook: tensors[hook] for hook in hook_names}
        wrong = {h: a.shape[0] for h, a in acts.items() if a.shape[0] != entry["n_tokens"]}
        if wrong:
            raise ValueError(
                f"Cache file {self.path / name} holds {wrong} tokens where {MANIFEST} states "
                f"{entry['n_tokens']}: the cache is corrupt; rewrite it."
            )
        return acts


class StoredSource:
    """Activations read from a store or a sae-lens cache instead of computed by a model.

    Training batches, their resume position and the held-out part are the store's own
    (:meth:`~lightning_sae.data.store.ActivationStore.train_dataloader`, ``state_dict``,
    ``sample_activations``); this adapter gives them the DataModule's source interface.

    Args:
        path: The store's folder or URL, or the sae-lens cache folder.
        hook_names: Hooks to read (all of them when empty).
        options: Passed to :func:`~lightning_sae.data.store.open_activations`
            (``storage_options`` and ``cache_dir`` of a remote store; ``metadata``,
            ``holdout_tokens`` of a sae-lens cache).

    """

    def __init__(self, path: str, hook_names: list[str], options: dict[str, Any]) -> None:
        self.path = path
        self.store = open_activations(path, hook_names or None, **options)
        manifest = self.store.manifest
        self.hook_names: list[str] = list(self.store.hook_names)
        self.context_size: int = manifest["context_size"]

    @property
    def d_in_per_hook(self) -> dict[str, int]:
        """Width of every hook's activations."""
        return dict(self.store.d_in_per_hook)

    def metadata(self) -> dict[str, Any]:
        """sae-lens metadata of these activations (every field but ``hook_name``)."""
        manifest = self.store.manifest
        return {
            "model_name": manifest.get("model_name"),
            "model_class_name": manifest.get("model_class_name"),
            "hook_head_index": None,
            "context_size": self.context_size,
            "prepend_bos": manifest.get("prepend_bos"),
            "dataset_path": manifest.get("dataset_path"),
            "exclude_special_tokens": manifest.get("exclude_special_tokens"),
        }

    def check(self, model_name: str | None) -> None:
        """Raise ``ValueError`` if the activations were not written for ``model_name``."""
        stored = self.store.manifest.get("model_name")
        if model_name is not None and model_name != stored:
            raise ValueError(
                f"The activation cache {self.path} holds activations of model {stored!r}, not "
                f"{model_name!r}: pass the model it was written with, or write a new cache."
            )

    def holdout_chunks(self) -> Iterator[Chunk]:
        """Yield the held-out part as one chunk (nothing when there is none)."""
        holdout = self.store.manifest.get("holdout")
        n_tokens = 0 if holdout is None else holdout["n_tokens"]
        if n_tokens:
            yield Chunk(n_tokens, partial(self._holdout, n_tokens))

    def _holdout(self, n_tokens: int) -> dict[str, Tensor]:
        return {h: self.store.sample_activations(n_tokens, h) for h in self.hook_names}

    def holdout_token_rows(self, n_rows: int) -> Tensor:
        """Token rows of the held-out part (a sae-lens cache keeps them; a store does not)."""
        rows = getattr(self.store, "holdout_token_rows", None)
        if rows is None:
            raise ValueError(
                f"The activation store {self.path} holds no token ids of held-out rows: "
                "evaluate with a DataModule that runs the model (model= and dataset=)."
            )
        return rows(n_rows)
