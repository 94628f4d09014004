"""The one atomic folder writer: nothing half-written, concurrent writers, interrupted swaps."""

import os
import threading
from pathlib import Path

import pytest

from lightning_sae.io import OLD_MARKER, TEMP_MARKER, atomic_folder, atomic_write_text


def write(target: Path, text: str, barrier: threading.Barrier | None = None) -> None:
    with atomic_folder(target) as tmp:
        (tmp / "a.txt").write_text(text)
        if barrier is not None:
            barrier.wait(timeout=10)  # both writers hold a temporary at the same time
        (tmp / "b.txt").write_text(text)


def test_a_failed_write_leaves_the_previous_folder(tmp_path):
    target = tmp_path / "out"
    write(target, "one")
    with pytest.raises(RuntimeError), atomic_folder(target) as tmp:
        (tmp / "a.txt").write_text("two")
        raise RuntimeError("killed")
    assert (target / "a.txt").read_text() == "one"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_concurrent_writers_never_destroy_each_other(tmp_path):
    target = tmp_path / "out"
    barrier = threading.Barrier(2)
    errors: list[BaseException] = []

    def run(text: str) -> None:
        try:
            write(target, text, barrier)
        except BaseException as error:
            errors.append(error)

    threads = [threading.Thread(target=run, args=(text,)) for text in ("x", "y")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    assert (target / "a.txt").read_text() == (target / "b.txt").read_text()  # one whole write
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_a_swap_interrupted_between_its_renames_is_repaired(tmp_path):
    target = tmp_path / "out"
    write(target, "one")
    # A writer that died (a pid that is not running) after moving the old folder aside.
    dead = f"{os.uname().nodename}-999999-deadbeef"
    os.replace(target, tmp_path / f".out{OLD_MARKER}{dead}")
    (tmp_path / f".out{TEMP_MARKER}{dead}").mkdir()
    write(target, "two")
    assert (target / "a.txt").read_text() == "two"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_atomic_write_text(tmp_path):
    atomic_write_text(tmp_path / "f.txt", "hello")
    assert (tmp_path / "f.txt").read_text() == "hello"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.txt"]
