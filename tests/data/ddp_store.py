"""2-rank DDP fits from an activation store: the ranks' litdata shards, and an exact resume.

Run as a standalone script (``python ddp_store.py STORE OUT_DIR``): ``strategy="ddp"`` relaunches
the running script as rank 1, which must not be pytest. The plain DataModule below tests
:class:`~lightning_sae.data.store.ActivationStore`'s own contract (``ActivationDataModule`` follows
it; ``tests/scripts/ddp_store_fit.py`` tests that): build the loader in ``train_dataloader``
(after the process group exists), and save the position of the batches *consumed*
(``global_step * accumulate_grad_batches``; the fit loop has prefetched one more).
Token ``t`` of the store has ``acts[t, 0] == t``. Each rank writes the tokens of its first epoch,
and whether the batches of a run interrupted at step 8 and resumed from its checkpoint equal
those of an uninterrupted run (24 steps: past the end of the first epoch, at step 20).
"""

import json
import sys
from datetime import timedelta
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies import DDPStrategy

from lightning_sae.data.store import ActivationStore

HOOK, BATCH, WORKERS, WORLD = "blocks.0.hook_resid_post", 32, 2, 2


class StoreData(L.LightningDataModule):
    def __init__(self, path: str) -> None:
        super().__init__()
        self.store = ActivationStore(path)

    def train_dataloader(self):
        return self.store.train_dataloader(BATCH, seed=0, num_workers=WORKERS)

    def on_after_batch_transfer(self, batch, dataloader_idx):
        return batch[HOOK]

    def state_dict(self):
        consumed = self.trainer.global_step * self.trainer.accumulate_grad_batches
        return self.store.state_dict(batches_consumed=consumed)

    def load_state_dict(self, state_dict):
        self.store.load_state_dict(state_dict)


class Linear(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(8, 8)

    def training_step(self, batch, batch_idx):
        return (self.layer(batch) - batch).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=1e-6)


class RecordBatches(Callback):
    def __init__(self) -> None:
        self.batches: list[torch.Tensor] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.batches.append(batch.detach().clone())


def fit(path: str, max_steps: int, ckpt_path: Path | None = None):
    recorder = RecordBatches()
    trainer = L.Trainer(
        accelerator="cpu", devices=WORLD, strategy=DDPStrategy(timeout=timedelta(seconds=60)),
        max_steps=max_steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, callbacks=[recorder],
    )  # fmt: skip
    trainer.fit(Linear(), datamodule=StoreData(path), ckpt_path=ckpt_path)
    return trainer, recorder.batches


def main(path: str, out: Path) -> None:
    torch.set_num_threads(1)
    trainer, straight = fit(path, 24)
    epoch = torch.cat(straight[:20])[:, 0].long().tolist()
    interrupted, first = fit(path, 8)
    interrupted.save_checkpoint(out / "step8.ckpt")
    _, rest = fit(path, 24, out / "step8.ckpt")
    resumed_equal = len(first + rest) == len(straight) and all(
        torch.equal(a, b) for a, b in zip(first + rest, straight, strict=False)
    )
    record = {
        "epoch_tokens": epoch,
        "global_step": trainer.global_step,
        "resumed_batches": len(rest),
        "resumed_equal": resumed_equal,
    }
    (out / f"rank{trainer.global_rank}.json").write_text(json.dumps(record))
    trainer.strategy.barrier()  # rank 0 (the process the test waits for) exits after rank 1 wrote


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]))
