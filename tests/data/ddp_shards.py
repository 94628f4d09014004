"""2-rank DDP fits from ActivationDataModule: the ranks' token shards, and an exact resume.

Run as a standalone script (``python ddp_shards.py OUT_DIR``): ``strategy="ddp"`` relaunches the
running script as rank 1, which must not be pytest. Rows are pre-tokenised, one document each,
and row ``i`` is filled with token ``i``, so a row's first token names its document. Each rank
writes the rows of its shards, and whether the batches of a run interrupted at step 4 and resumed
from its checkpoint equal those of an uninterrupted run.
"""

import json
import sys
from datetime import timedelta
from itertools import islice
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies import DDPStrategy
from transformer_lens import HookedTransformer, HookedTransformerConfig

from lightning_sae import ActivationDataModule, BatchTopKSAE

N_DOCS, CONTEXT, WORKERS, WORLD = 40, 8, 2, 2


class RecordBatches(Callback):
    def __init__(self) -> None:
        self.batches: list[torch.Tensor] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.batches.append(batch.detach().clone())


def make_dm() -> ActivationDataModule:
    cfg = HookedTransformerConfig(
        n_layers=2, d_model=16, n_ctx=CONTEXT, d_head=4, n_heads=4, d_vocab=N_DOCS,
        act_fn="gelu", seed=0,
    )  # fmt: skip
    documents = torch.arange(N_DOCS).repeat_interleave(CONTEXT).view(N_DOCS, CONTEXT)
    return ActivationDataModule(
        model=HookedTransformer(cfg), hook_names="blocks.0.hook_resid_post", dataset=documents,
        context_size=CONTEXT, batch_size=32, prepend_bos=False, shuffle_buffer_tokens=5 * CONTEXT,
        holdout_documents=0, num_workers=WORKERS,
    )  # fmt: skip


def fit(dm: ActivationDataModule, max_steps: int, ckpt_path: Path | None = None):
    recorder = RecordBatches()
    trainer = L.Trainer(
        accelerator="cpu", devices=WORLD, strategy=DDPStrategy(timeout=timedelta(seconds=60)),
        max_steps=max_steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, callbacks=[recorder],
    )  # fmt: skip
    trainer.fit(
        BatchTopKSAE(d_in=dm.d_in, d_sae=32, k=4, seed=0), datamodule=dm, ckpt_path=ckpt_path
    )
    return trainer, recorder.batches


def main(out: Path) -> None:
    dm = make_dm()
    trainer, straight = fit(dm, 12)
    rows_per_rank = N_DOCS // WORLD
    rows = [int(row[0]) for row in islice(dm.token_rows(), rows_per_rank)]

    interrupted, first = fit(make_dm(), 4)
    interrupted.save_checkpoint(out / "step4.ckpt")
    _, rest = fit(make_dm(), 12, out / "step4.ckpt")
    resumed_equal = len(first + rest) == len(straight) and all(
        torch.equal(a, b) for a, b in zip(first + rest, straight, strict=False)
    )
    record = {
        "rank": trainer.global_rank,
        "rows": rows,
        "global_step": trainer.global_step,
        "resumed_batches": len(rest),
        "resumed_equal": resumed_equal,
    }
    (out / f"rank{trainer.global_rank}.json").write_text(json.dumps(record))
    trainer.strategy.barrier()  # rank 0 (the process the test waits for) exits after rank 1 wrote


if __name__ == "__main__":
    main(Path(sys.argv[1]))
