"""The one way lightning-sae writes something a user relies on: atomically.

Exports, activation caches and the converted offline model are folders; Lightning checkpoints
and small text files are files. Each is written under a hidden temporary name beside its target,
flushed to disk and renamed into place, so a crash, a kill or a full disk leaves the previous
complete copy (or none), never a half-written one. Temporaries an interrupted write left behind
are removed by the next write of the same target.

>>> import tempfile
>>> from pathlib import Path
>>> target = Path(tempfile.mkdtemp()) / "out"
>>> with atomic_folder(target) as tmp:
...     _ = (tmp / "a.txt").write_text("hello")
>>> (target / "a.txt").read_text()
'hello'
"""

import contextlib
import fcntl
import os
import pickle
import shutil
import socket
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

import torch
from fsspec.implementations.local import LocalFileSystem
from lightning.fabric.plugins import TorchCheckpointIO
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch import Callback, LightningModule, Trainer

#: Prefix of every temporary name this module creates (``.<name>.tmp-<token>``).
TEMP_MARKER = ".tmp-"
OLD_MARKER = ".old-"


def _fsync_tree(folder: Path) -> None:
    """Flush every file of ``folder`` and the folder itself to disk before it is renamed."""
    for path in folder.rglob("*"):
        if path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
    _fsync_dir(folder)


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:  # some filesystems cannot fsync a directory
        pass
    finally:
        os.close(fd)


def _token() -> str:
    """Return a temporary name token: host and pid of its writer, so others see when it is stale."""
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


@contextlib.contextmanager
def _folder_lock(folder: Path) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``folder`` (advisory; between writers of this module)."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def _writer_is_gone(name: str, marker: str) -> bool:
    """Tell whether the writer of temporary ``name`` has ended.

    A name of lightning-sae 0.1 (no host and pid) is stale. Temporaries of other hosts (a shared
    filesystem) or of running processes of this one are never touched.
    """
    token = name.partition(marker)[2]
    host, _, rest = token.rpartition("-")[0].rpartition("-")
    if not host or not rest.isdigit():
        return True  # the 0.1 format: a bare random token
    if host != socket.gethostname():
        return False
    try:
        os.kill(int(rest), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def remove_stale_temporaries(target: Path) -> None:
    """Delete temporaries that interrupted writes of ``target`` left beside it.

    Only temporaries whose writer (a process of this host) has ended are touched. A previous
    complete folder left under its ``.old-`` name by a swap that died halfway is moved back into
    place when ``target`` itself is missing.
    """
    parent = target.parent
    if not parent.is_dir():
        return
    for stale in sorted(parent.glob(f".{target.name}{OLD_MARKER}*")):
        if not _writer_is_gone(stale.name, OLD_MARKER):
            continue
        if not target.exists():
            os.replace(stale, target)
        else:
            shutil.rmtree(stale, ignore_errors=True)
    for stale in parent.glob(f".{target.name}{TEMP_MARKER}*"):
        if _writer_is_gone(stale.name, TEMP_MARKER):
            _remove(stale)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_folder(
    target: str | os.PathLike[str], check: Callable[[Path], None] | None = None
) -> Iterator[Path]:
    """Yield an empty temporary folder beside ``target``; on success it replaces ``target``.

    On an exception the temporary folder is removed and ``target`` is untouched. When ``target``
    exists it is swapped out with two renames; should the process die between them, the old
    folder is left as ``.<name>.old-*`` and :func:`remove_stale_temporaries` (run at the start of
    every write of the same target) moves it back. Concurrent writers of one target each write
    their own temporary and swap in turn (a lock on the parent folder): the last to finish wins,
    and none removes another's temporary.

    Args:
        target: The folder to create or replace.
        check: Called with ``target`` just before the swap (the folder may have changed while
            the temporary one was written); raise to abort.

    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    with _folder_lock(target.parent):
        remove_stale_temporaries(target)
    token = _token()
    tmp = target.parent / f".{target.name}{TEMP_MARKER}{token}"
    tmp.mkdir()
    try:
        yield tmp
        _fsync_tree(tmp)
        with _folder_lock(target.parent):  # one swap at a time: concurrent writers take turns
            if check is not None:
                check(target)
            if target.exists():
                old = target.parent / f".{target.name}{OLD_MARKER}{token}"
                os.replace(target, old)
                try:
                    os.replace(tmp, target)
                except OSError:
                    os.replace(old, target)  # put the previous folder back before failing
                    raise
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, target)
            _fsync_dir(target.parent)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike[str]) -> Iterator[BinaryIO]:
    """Yield a binary file opened beside ``path``; on success it replaces ``path``.

    The bytes reach the disk (``fsync``) before the rename. On an exception (a full disk
    included) the temporary file is removed and ``path`` is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path)
    tmp = path.parent / f".{path.name}{TEMP_MARKER}{_token()}"
    try:
        with open(tmp, "wb") as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` through a temporary file and a rename."""
    with atomic_file(path) as handle:
        handle.write(text.encode("utf-8"))


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoints (``torch.save``), written atomically on local disks.

    Lightning's own writer serialises to memory, writes to the system temporary folder and moves
    the file into place; on another filesystem the move is a copy, which a full disk or a kill
    cuts short, leaving a truncated ``.ckpt``. Here the file is written beside its target and
    renamed (:func:`atomic_file`), and the temporaries of interrupted checkpoint writes in the
    folder are removed. Remote paths (``s3://``...) keep Lightning's writer.

    Loading names the file and the fix when it is not a readable checkpoint. Lightning
    checkpoints are pickles: load only files you trust.
    """

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None
    ) -> None:
        """Write ``checkpoint`` to ``path`` atomically (see the class)."""
        if storage_options is not None or not isinstance(get_filesystem(path), LocalFileSystem):
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        path = Path(path)
        if path.parent.is_dir():  # other checkpoints' temporaries: a kill or a full disk
            for stale in path.parent.glob(f".*{path.suffix}{TEMP_MARKER}*"):
                stale.unlink(missing_ok=True)
        try:
            with atomic_file(path) as handle:
                torch.save(checkpoint, handle)
        except OSError as error:
            raise OSError(
                error.errno,
                f"Could not write checkpoint {path} ({error.strerror or error}); nothing was "
                "replaced and earlier checkpoints are intact. Free disk space (or raise "
                "ModelCheckpoint's every_n_train_steps / lower save_top_k) and resume from the "
                "last checkpoint.",
            ) from error

    def load_checkpoint(self, path: Any, *args: Any, **kwargs: Any) -> dict[str, Any]:
        """Load a checkpoint; a file that is not one is a ``ValueError`` naming it."""
        return read_checkpoint(
            path, lambda: super(AtomicCheckpointIO, self).load_checkpoint(path, *args, **kwargs)
        )


def read_checkpoint(path: Any, load: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """Return ``load()``, the checkpoint at ``path``, or raise an error that names the file.

    Raises:
        FileNotFoundError: Nothing at ``path``.
        ValueError: ``path`` is not a readable Lightning checkpoint (truncated, another file).

    """
    is_path = isinstance(path, str | os.PathLike)
    if is_path and isinstance(get_filesystem(path), LocalFileSystem) and not Path(path).is_file():
        kind = "a folder" if Path(path).is_dir() else "missing"
        raise FileNotFoundError(
            f"Checkpoint {path} is {kind}: pass the path of a .ckpt file, such as "
            "<default_root_dir>/lightning_logs/version_N/checkpoints/last.ckpt."
        )
    try:
        checkpoint = load()
    except pickle.UnpicklingError as error:
        # A real checkpoint that names a class torch's safe loader does not allow, or garbage.
        refused = [line for line in str(error).splitlines() if "Unsupported global" in line]
        if not refused:
            raise _not_a_checkpoint(path, error) from error
        raise ValueError(
            f"{path} holds objects torch's safe loader (weights_only=True) refuses "
            f"({refused[0].strip()}). Checkpoints are pickles: only if you trust the file, "
            "load it with weights_only=False (Trainer.fit(..., weights_only=False), "
            "load_from_checkpoint(..., weights_only=False))."
        ) from error
    except Exception as error:  # torch.load raises many types for a file that is not one
        raise _not_a_checkpoint(path, error) from error
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise ValueError(
            f"{path} loads, but as {type(checkpoint).__name__} without a 'state_dict': it is not a "
            "Lightning checkpoint. Pass a .ckpt written by ModelCheckpoint or "
            "trainer.save_checkpoint."
        )
    return checkpoint


def _not_a_checkpoint(path: Any, error: Exception) -> ValueError:
    return ValueError(
        f"{path} is not a readable Lightning checkpoint ({type(error).__name__}: "
        f"{str(error).splitlines()[0] if str(error) else ''}): it is truncated or another "
        "kind of file. Pass a .ckpt written by Lightning (ModelCheckpoint or "
        "trainer.save_checkpoint), e.g. the previous one in the same folder."
    )


class AtomicCheckpoints(Callback):
    """Install :class:`AtomicCheckpointIO` on the Trainer, unless it was given its own.

    Every lightning-sae module returns this from ``configure_callbacks``, so a ``Trainer`` that
    trains one writes its checkpoints atomically with no setting.
    """

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        """Replace Lightning's default ``TorchCheckpointIO`` (only that exact class)."""
        strategy = trainer.strategy
        if type(strategy.checkpoint_io) is TorchCheckpointIO:
            strategy.checkpoint_io = AtomicCheckpointIO()
