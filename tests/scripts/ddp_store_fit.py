"""2-rank DDP fits of a TopKSAE from an activation store through ``ActivationDataModule``.

``python ddp_store_fit.py STORE OUT_DIR`` (the store of ``cache_write.py``: 1,024 tokens, 64
blocks of 16). Each rank writes to ``OUT_DIR/rank<r>.json`` the rows of its first epoch (8 batches
of 64 tokens: litdata shards the blocks over 2 ranks x 2 workers), and whether a run stopped at
step 4 and resumed from its checkpoint read the batches of an uninterrupted 12-step run (past the
epoch's end) and ended with its weights. Run as a standalone script: ``strategy="ddp"`` relaunches
the running script as rank 1, which must not be pytest.
"""

import hashlib
import json
import sys
from datetime import timedelta
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies import DDPStrategy

from lightning_sae import ActivationDataModule, TopKSAE

HOOK, BATCH, WORKERS = "blocks.0.hook_resid_post", 64, 2


class RecordBatches(Callback):
    def __init__(self) -> None:
        self.batches: list[torch.Tensor] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.batches.append(batch.detach().clone())


def digest(tensor: torch.Tensor) -> str:
    return hashlib.sha256(tensor.detach().contiguous().numpy().tobytes()).hexdigest()


def fit(store: str, max_steps: int, ckpt_path: Path | None = None):
    recorder = RecordBatches()
    trainer = L.Trainer(
        accelerator="cpu", devices=2, strategy=DDPStrategy(timeout=timedelta(seconds=60)),
        max_steps=max_steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, callbacks=[recorder],
    )  # fmt: skip
    data = ActivationDataModule(
        cache_dir=store, hook_names=HOOK, batch_size=BATCH, num_workers=WORKERS
    )
    module = TopKSAE(d_in=16, d_sae=32, k=4, seed=0)
    trainer.fit(module, datamodule=data, ckpt_path=ckpt_path)
    return trainer, module, recorder.batches


def main(store: str, out: Path) -> None:
    torch.set_num_threads(1)
    trainer, straight, batches = fit(store, 12)
    interrupted, _, first = fit(store, 4)
    interrupted.save_checkpoint(out / "step4.ckpt")
    _, resumed, rest = fit(store, 12, out / "step4.ckpt")
    record = {
        "global_step": trainer.global_step,
        "epoch_rows": [digest(row) for row in torch.cat(batches[:8])],
        "resumed_batches": len(rest),
        "resumed_equal": len(first + rest) == len(batches)
        and all(torch.equal(a, b) for a, b in zip(first + rest, batches, strict=True)),
        "weights": digest(resumed.sae.W_enc),
        "straight_weights": digest(straight.sae.W_enc),
    }
    (out / f"rank{trainer.global_rank}.json").write_text(json.dumps(record))
    trainer.strategy.barrier()  # rank 0 (the process the test waits for) exits after rank 1 wrote


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]))
