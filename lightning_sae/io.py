"""The one way lightning-sae writes something a user relies on: atomically.

Exports, activation caches and the converted offline model are folders. Each is written under a
hidden temporary name beside its target and renamed into place, so a crash, a kill or a full disk
leaves the previous complete folder (or none), never a half-written one.

>>> import tempfile
>>> from pathlib import Path
>>> target = Path(tempfile.mkdtemp()) / "out"
>>> with atomic_folder(target) as tmp:
...     _ = (tmp / "a.txt").write_text("hello")
>>> (target / "a.txt").read_text()
'hello'
"""

import contextlib
import os
import shutil
import socket
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

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


def _writer_is_gone(name: str, marker: str) -> bool:
    """Tell whether the writer of temporary ``name`` was a process of this host that has ended.

    Temporaries of other hosts (a shared filesystem) or of running processes are never touched.
    """
    host, _, rest = name.partition(marker)[2].rpartition("-")[0].rpartition("-")
    if host != socket.gethostname() or not rest.isdigit():
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
            shutil.rmtree(stale, ignore_errors=True)


@contextlib.contextmanager
def atomic_folder(
    target: str | os.PathLike[str], check: Callable[[Path], None] | None = None
) -> Iterator[Path]:
    """Yield an empty temporary folder beside ``target``; on success it replaces ``target``.

    On an exception the temporary folder is removed and ``target`` is untouched. When ``target``
    exists it is swapped out with two renames; should the process die between them, the old
    folder is left as ``.<name>.old-*`` and :func:`remove_stale_temporaries` (run at the start of
    every write of the same target) moves it back. Concurrent writers of one target each write
    their own temporary; the last to finish wins, and none removes another's.

    Args:
        target: The folder to create or replace.
        check: Called with ``target`` just before the swap (the folder may have changed while
            the temporary one was written); raise to abort.

    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(target)
    token = _token()
    tmp = target.parent / f".{target.name}{TEMP_MARKER}{token}"
    tmp.mkdir()
    try:
        yield tmp
        _fsync_tree(tmp)
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


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename."""
    path = Path(path)
    tmp = path.parent / f".{path.name}{TEMP_MARKER}{_token()}"
    try:
        with open(tmp, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
