"""A 2-rank DDP fit from ActivationDataModule; each rank writes the token rows of its shards.

Run as a standalone script (``python ddp_shards.py OUT_DIR``): ``strategy="ddp"`` relaunches the
running script as rank 1, which must not be pytest. Rows are pre-tokenised, one document each,
and row ``i`` is filled with token ``i``, so a row's first token names its document.
"""

import json
import sys
from datetime import timedelta
from itertools import islice
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.strategies import DDPStrategy
from transformer_lens import HookedTransformer, HookedTransformerConfig

from lightning_sae import ActivationDataModule, BatchTopKSAE

N_DOCS, CONTEXT, WORKERS, WORLD = 40, 8, 2, 2


def main(out: Path) -> None:
    cfg = HookedTransformerConfig(
        n_layers=2, d_model=16, n_ctx=CONTEXT, d_head=4, n_heads=4, d_vocab=N_DOCS,
        act_fn="gelu", seed=0,
    )  # fmt: skip
    documents = torch.arange(N_DOCS).repeat_interleave(CONTEXT).view(N_DOCS, CONTEXT)
    dm = ActivationDataModule(
        model=HookedTransformer(cfg), hook_names="blocks.0.hook_resid_post", dataset=documents,
        context_size=CONTEXT, batch_size=32, prepend_bos=False, shuffle_buffer_tokens=5 * CONTEXT,
        holdout_documents=0, num_workers=WORKERS,
    )  # fmt: skip
    trainer = L.Trainer(
        accelerator="cpu", devices=WORLD, strategy=DDPStrategy(timeout=timedelta(seconds=60)),
        max_steps=12, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False,
    )  # fmt: skip
    trainer.fit(BatchTopKSAE(d_in=dm.d_in, d_sae=32, k=4, seed=0), datamodule=dm)
    rows_per_rank = N_DOCS // WORLD
    rows = [int(row[0]) for row in islice(dm.token_rows(), rows_per_rank)]
    record = {"rank": trainer.global_rank, "rows": rows, "global_step": trainer.global_step}
    (out / f"rank{trainer.global_rank}.json").write_text(json.dumps(record))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
