"""Two-rank DDP fit with LMEvaluation on CPU (gloo); run by ``tests/evaluation/test_ddp.py``.

``python ddp_evaluation.py TOKENIZER_DIR OUT_DIR`` fits a TopK SAE on a tiny random
HookedTransformer (seed 0 on both ranks) with ``strategy="ddp"``; Lightning relaunches this script
as rank 1. Every rank writes its evaluation history to ``OUT_DIR/rank<r>.json``; rank 0 also
writes the final SAE evaluated on all the held-out rows in this one process to
``OUT_DIR/single.json``.
"""

import json
import pydoc_data.topics
import sys
import warnings
from datetime import timedelta
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.strategies import DDPStrategy
from transformer_lens import HookedTransformer, HookedTransformerConfig
from transformers import AutoTokenizer

from lightning_sae import ActivationDataModule, TopKSAE
from lightning_sae.evaluation import LMEvaluation, evaluation_sums

HOOK = "blocks.1.hook_resid_post"
N_ROWS = 5  # odd: the ranks evaluate 3 and 2 rows


def main(tokenizer_dir: str, out: Path) -> None:
    torch.set_num_threads(1)  # two ranks share the machine's cores
    warnings.filterwarnings("ignore")
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    cfg = HookedTransformerConfig(
        n_layers=3, d_model=32, n_ctx=64, d_head=8, n_heads=4, d_mlp=64,
        d_vocab=len(tokenizer), act_fn="gelu", seed=0,
    )  # fmt: skip
    model = HookedTransformer(cfg, tokenizer=tokenizer).eval()
    documents = list(pydoc_data.topics.topics.values())
    dm = ActivationDataModule(
        model=model, hook_names=HOOK, dataset=documents, context_size=32, batch_size=64,
        holdout_documents=4, exclude_special_tokens=True,
    )  # fmt: skip
    module = TopKSAE(d_in=32, d_sae=64, k=4, seed=0)
    evaluation = LMEvaluation(every_n_steps=2, n_rows=N_ROWS, batch_rows=2)
    trainer = L.Trainer(
        max_steps=3, accelerator="cpu", devices=2,
        strategy=DDPStrategy(timeout=timedelta(seconds=60)), logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        callbacks=[evaluation],
    )  # fmt: skip
    trainer.fit(module, datamodule=dm)
    (out / f"rank{trainer.global_rank}.json").write_text(json.dumps(evaluation.history))
    if trainer.global_rank == 0:
        rows = dm.holdout_token_rows(N_ROWS)
        single = evaluation_sums(dm.hooked_model, {HOOK: module}, rows.cpu(), batch_rows=2)
        (out / "single.json").write_text(json.dumps(single.metrics()[HOOK]))


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]))
