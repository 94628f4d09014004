"""A process for the fault tests to kill: it writes checkpoints, exports or a cache in a loop.

    python fault_worker.py fit <root> <max_steps>     train, checkpoint and export every step,
                                                     resuming from <root>/checkpoints/last.ckpt
    python fault_worker.py export <root> <n>          replace the export <root>/sae n times
    python fault_worker.py cache <root> <n>           rewrite the cache <root>/cache n times
    python fault_worker.py enospc <root>              checkpoint every step into <root>, a small
                                                     filesystem, until it is full; report

Each prints ``READY`` (flushed) once the writing starts, so a test kills it mid-write, not while
it imports. Everything is tiny: a few hundred kilobytes a write.
"""

import json
import sys
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader, TensorDataset

from lightning_sae import ActivationDataModule, SAELensExport, TopKSAE, export_to_sae_lens

D_IN, D_SAE = 16, 64


class Ready(L.Callback):
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        print("READY", flush=True)


def trainer(max_steps: int, callbacks: list[L.Callback], root: Path) -> L.Trainer:
    return L.Trainer(
        accelerator="cpu",
        max_steps=max_steps,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=root,
        callbacks=[Ready(), *callbacks],
    )


def activations() -> DataLoader:
    torch.manual_seed(0)
    return DataLoader(TensorDataset(torch.randn(4096, D_IN)), batch_size=64, drop_last=True)


def fit(root: Path, max_steps: int) -> None:
    checkpoints = ModelCheckpoint(root / "checkpoints", every_n_train_steps=1, save_last=True)
    exports = SAELensExport(root / "exports", every_n_steps=1, keep_last_n=2)
    last = root / "checkpoints" / "last.ckpt"
    trainer(max_steps, [checkpoints, exports], root).fit(
        TopKSAE(D_IN, D_SAE, k=4, seed=0),
        activations(),
        ckpt_path=last if last.exists() else None,
    )


def export(root: Path, n: int) -> None:
    print("READY", flush=True)
    for i in range(n):
        module = TopKSAE(D_IN, D_SAE, k=4, seed=i)
        export_to_sae_lens(module, root / "sae", {"hook_name": "blocks.0.hook_resid_post"})


def cache(root: Path, n: int) -> None:
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    cfg = HookedTransformerConfig(
        n_layers=1, d_model=D_IN, n_ctx=32, d_head=4, n_heads=4, d_mlp=32, d_vocab=50, seed=0,
        act_fn="gelu",
    )  # fmt: skip
    torch.manual_seed(0)
    dm = ActivationDataModule(
        model=HookedTransformer(cfg),
        hook_names="blocks.0.hook_resid_post",
        dataset=torch.randint(0, 50, (64, 40)),
        context_size=16,
        prepend_bos=False,
        shuffle_buffer_tokens=256,
    )
    print("READY", flush=True)
    for _ in range(n):  # the first call writes (or resumes a killed write); later ones append
        append = (root / "cache" / "lightning_sae.json").exists()
        dm.write_cache(root / "cache", n_tokens=2048, append=append)


def enospc(root: Path) -> None:
    """Checkpoint every step until the (small) filesystem of ``root`` is full; report as JSON."""
    checkpoints = ModelCheckpoint(root, every_n_train_steps=1, save_top_k=-1)
    error = None
    try:
        trainer(10_000, [checkpoints], root).fit(TopKSAE(D_IN, D_SAE, k=4, seed=0), activations())
    except OSError as raised:
        error = f"{type(raised).__name__}: {raised}"
    loadable = {}
    for path in sorted(root.iterdir()):
        try:
            torch.load(path, weights_only=True)
            loadable[path.name] = True
        except Exception:
            loadable[path.name] = False
    print(json.dumps({"error": error, "files": loadable}), flush=True)


if __name__ == "__main__":
    mode, folder, *rest = sys.argv[1:]
    {"fit": fit, "export": export, "cache": cache, "enospc": enospc}[mode](
        Path(folder), *map(int, rest)
    )
