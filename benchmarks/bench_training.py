"""Training throughput: lightning-sae's Trainer.fit against sae-lens's own SAETrainer.

Both train the same BatchTopK SAE (same initial weights, same in-memory activations, same steps),
so the difference is the training loop: Lightning, our metrics and dead-latent bookkeeping versus
sae-lens's loop. Writes ``benchmarks/results/training.json``.

    python benchmarks/bench_training.py [--d-in 512 --d-sae 8192 --k 32 --batch 4096 --steps 12]
"""

import argparse
import copy
import itertools
import json
import platform
import time
from pathlib import Path

import lightning as L
import torch
from sae_lens.config import SAETrainerConfig
from sae_lens.training.sae_trainer import SAETrainer
from torch.utils.data import DataLoader, TensorDataset

from lightning_sae import BatchTopKSAE

RESULTS = Path(__file__).parent / "results" / "training.json"


class StepTimer(L.Callback):
    """Wall time of the steps after ``warm_up`` (the first steps pay one-off costs)."""

    def __init__(self, warm_up: int) -> None:
        self.warm_up = warm_up
        self.start: float | None = None
        self.elapsed = 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if batch_idx == self.warm_up:
            self.start = time.perf_counter()

    def on_train_end(self, trainer, pl_module) -> None:
        self.elapsed = time.perf_counter() - self.start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--d-in", type=int, default=512)
    parser.add_argument("--d-sae", type=int, default=8192)
    parser.add_argument("--k", type=float, default=32)
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warm-up", type=int, default=2)
    args = parser.parse_args()

    torch.manual_seed(0)
    data = torch.randn(args.batch * 4, args.d_in)
    module = BatchTopKSAE(
        d_in=args.d_in, d_sae=args.d_sae, k=args.k, normalize_activations=False, seed=0
    )
    reference = copy.deepcopy(module.sae)
    timed = args.steps - args.warm_up

    timer = StepTimer(args.warm_up)
    L.Trainer(
        accelerator="cpu",
        max_steps=args.steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        gradient_clip_val=1.0,
        callbacks=[timer],
    ).fit(module, DataLoader(TensorDataset(data), batch_size=args.batch))
    ours = timed * args.batch / timer.elapsed

    batches = itertools.cycle(data.split(args.batch))
    config = SAETrainerConfig(
        total_training_samples=args.warm_up * args.batch,
        train_batch_size_samples=args.batch,
        lr_end=3e-4,
    )
    trainer = SAETrainer(cfg=config, sae=reference, data_provider=batches)
    trainer.fit()  # warm-up steps
    trainer.cfg.total_training_samples = args.steps * args.batch
    start = time.perf_counter()
    while trainer.n_training_samples < trainer.cfg.total_training_samples:
        trainer.step(next(batches))  # advances n_training_samples
        trainer.n_training_steps += 1
    theirs = timed * args.batch / (time.perf_counter() - start)

    result = {
        "config": vars(args),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads",
        "torch": torch.__version__,
        "lightning_sae_tokens_per_sec": round(ours),
        "sae_lens_trainer_tokens_per_sec": round(theirs),
        "ratio": round(ours / theirs, 3),
    }
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
