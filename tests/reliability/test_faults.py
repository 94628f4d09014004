"""Kill real processes while they write (SIGKILL at random moments) and fill a real disk.

Each scenario runs ``tests/scripts/fault_worker.py`` in a subprocess, kills it a few times at
seeded random delays after it starts writing, and checks after every kill that what was written
before is still whole (checkpoints load, exports load in plain sae-lens, the cache reads), then
that the next run succeeds and leaves no temporaries behind. Tiny sizes; still several process
starts each, hence ``slow``.
"""

import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from sae_lens import SAE

from lightning_sae import ActivationDataModule

WORKER = Path(__file__).parents[1] / "scripts" / "fault_worker.py"
KILLS = 3
HOOK = "blocks.0.hook_resid_post"


def worker(mode: str, root: Path, *args: int) -> subprocess.Popen:
    env = os.environ | {"OMP_NUM_THREADS": "1", "TMPDIR": str(root / "tmp")}
    (root / "tmp").mkdir(parents=True, exist_ok=True)
    return subprocess.Popen(
        [sys.executable, str(WORKER), mode, str(root), *map(str, args)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


def kill_while_writing(process: subprocess.Popen, delay: float) -> None:
    """Wait until the worker writes, then SIGKILL it ``delay`` seconds later."""
    assert process.stdout is not None
    for line in process.stdout:
        if line.strip() == "READY":
            break
    else:
        raise AssertionError(f"the worker ended before writing: {process.stderr.read()}")
    time.sleep(delay)
    process.kill()
    process.wait(timeout=60)


def finish(process: subprocess.Popen) -> None:
    stdout, stderr = process.communicate(timeout=600)
    assert process.returncode == 0, stdout + stderr


def temporaries(root: Path) -> list[str]:
    """Temporaries of interrupted writes under ``root``: hidden ones, and files in its tmp/.

    tmp/ is the workers' system temporary folder (``TMPDIR``), where Lightning's own checkpoint
    writer would leave a full-size file per killed write (other libraries leave folders there).
    """
    hidden = [p for p in root.rglob(".*") if ".tmp-" in p.name or ".old-" in p.name]
    system = [p for p in (root / "tmp").iterdir() if p.is_file()]
    return sorted(str(p.relative_to(root)) for p in [*hidden, *system])


def check_fit_files(root: Path) -> int | None:
    """Every checkpoint loads and every export loads in sae-lens; return last.ckpt's step."""
    for path in (root / "checkpoints").glob("*.ckpt"):
        torch.load(path, map_location="cpu", weights_only=True)
    exports = root / "exports"
    for folder in exports.glob("step-*") if exports.exists() else []:
        SAE.load_from_disk(folder)
    if (exports / "latest").exists():
        SAE.load_from_disk(exports / "latest")
    last = root / "checkpoints" / "last.ckpt"
    return torch.load(last, weights_only=True)["global_step"] if last.exists() else None


@pytest.mark.slow
def test_killed_fit_keeps_checkpoints_and_exports_whole_and_resumes(tmp_path: Path):
    rng = random.Random(0)
    for _ in range(KILLS):
        kill_while_writing(worker("fit", tmp_path, 10_000), rng.uniform(0.0, 1.5))
        check_fit_files(tmp_path)
    step = check_fit_files(tmp_path) or 0
    finish(worker("fit", tmp_path, step + 3))  # resumes from last.ckpt
    assert check_fit_files(tmp_path) == step + 3
    assert os.readlink(tmp_path / "exports" / "latest") == f"step-{step + 3:06d}"
    assert len(list((tmp_path / "exports").glob("step-*"))) <= 2  # keep_last_n
    assert temporaries(tmp_path) == []


@pytest.mark.slow
def test_killed_export_keeps_the_previous_export(tmp_path: Path):
    rng = random.Random(1)
    for _ in range(KILLS):
        kill_while_writing(worker("export", tmp_path, 10_000), rng.uniform(0.0, 1.0))
        assert SAE.load_from_disk(tmp_path / "sae").cfg.metadata.hook_name == HOOK
    finish(worker("export", tmp_path, 1))
    assert SAE.load_from_disk(tmp_path / "sae").cfg.d_sae == 64
    assert temporaries(tmp_path) == []


@pytest.mark.slow
def test_killed_cache_write_resumes_and_never_shows_a_partial_store(tmp_path: Path):
    rng = random.Random(2)
    stored = []
    for _ in range(KILLS):
        kill_while_writing(worker("cache", tmp_path, 10_000), rng.uniform(0.0, 1.0))
        try:  # a complete store (every append whole), or none yet: never a partial one
            data = ActivationDataModule(cache_dir=tmp_path / "cache", batch_size=64)
        except FileNotFoundError:
            assert not stored
            continue
        stored.append(data.source.store.n_tokens)
        assert stored[-1] % 2048 == 0 and stored == sorted(stored)
    finish(worker("cache", tmp_path, 1))
    data = ActivationDataModule(cache_dir=tmp_path / "cache", batch_size=64)
    assert data.source.store.n_tokens == (stored[-1] + 2048 if stored else 2048)
    assert not (tmp_path / "cache" / ".lightning_sae_staging").exists()
    assert temporaries(tmp_path) == []


def _can_mount_a_small_disk() -> bool:
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(["unshare", "-rm", "true"], capture_output=True)
    return probe.returncode == 0


@pytest.mark.slow
@pytest.mark.skipif(not _can_mount_a_small_disk(), reason="needs unprivileged user namespaces")
def test_full_disk_during_checkpointing_leaves_only_whole_checkpoints(tmp_path: Path):
    """A real ENOSPC: checkpoints go to a 400 KiB tmpfs (its own filesystem, as a mounted volume
    would be), the system temporary folder stays on the big disk."""
    disk = tmp_path / "disk"
    disk.mkdir()
    script = (
        f"mount -t tmpfs -o size=400k tmpfs {disk} && exec {sys.executable} {WORKER} enospc {disk}"
    )
    result = subprocess.run(
        ["unshare", "-rm", "sh", "-c", script],
        capture_output=True,
        text=True,
        timeout=600,
        env=os.environ | {"OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert "No space left on device" in report["error"]
    assert "earlier checkpoints are intact" in report["error"]
    assert len(report["files"]) >= 2, report  # several checkpoints fitted before the disk filled
    assert all(report["files"].values()), report  # each loads: no truncated file beside them
    assert not [name for name in report["files"] if name.startswith(".")], report


DDP_NAN_SCRIPT = """
from datetime import timedelta

import torch
from lightning import Callback, Trainer
from lightning.pytorch.strategies import DDPStrategy
from torch.utils.data import DataLoader, TensorDataset

from lightning_sae import TopKSAE


class NaNOnRankOne(Callback):
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_rank == 1 and trainer.global_step == 2:
            batch[0][0, 0] = float("nan")


torch.manual_seed(0)
trainer = Trainer(
    accelerator="cpu",
    devices=2,
    strategy=DDPStrategy(timeout=timedelta(seconds=60)),
    max_steps=8,
    log_every_n_steps=2,
    logger=False,
    enable_checkpointing=False,
    enable_progress_bar=False,
    enable_model_summary=False,
    callbacks=[NaNOnRankOne()],
)
try:
    trainer.fit(TopKSAE(16, 32, k=4, seed=0), DataLoader(TensorDataset(torch.randn(4096, 16)), 64))
except FloatingPointError as error:
    print(f"RANK {trainer.global_rank} STOPPED AT {trainer.global_step}: {error}", flush=True)
    raise
"""


@pytest.mark.slow
def test_nan_on_one_rank_stops_every_rank_on_the_same_step(tmp_path: Path):
    """The device-side record is reduced over ranks on logging steps: no rank trains on alone."""
    script = tmp_path / "ddp_nan.py"
    script.write_text(DDP_NAN_SCRIPT)
    result = subprocess.run(
        [sys.executable, str(script)],
        capture_output=True,
        text=True,
        timeout=400,
        cwd=tmp_path,
        env=os.environ | {"OMP_NUM_THREADS": "1"},
    )
    assert result.returncode != 0
    for rank in (0, 1):
        # Found on logging step 3 (log_every_n_steps=2), naming the bad step of rank 1.
        assert f"RANK {rank} STOPPED AT 3: The SAE: the training batch of global step 2" in (
            result.stdout
        ), result.stdout + result.stderr[-3000:]
