"""Data-path throughput on this machine: model forward vs end-to-end training vs cache reads.

Measures, on the offline default (SmolLM2-135M hooked at ``model.layers.15``, Shakespeare,
context 256), in tokens per second:

- ``model_forward``: the hooked forward alone (stops after layer 15), no DataModule;
- ``train_live``: ``Trainer.fit`` of a BatchTopK SAE streaming from the live DataModule
  (tokenise, forward, mix, SAE step), timed from the first batch to the last;
- ``cache_read``: batches read from an activation cache (safetensors files, shuffled);
- ``train_cache``: the same fit, reading the cache instead of running the model.

Writes ``benchmarks/results/data.json`` and ``data.md``.

    python benchmarks/bench_data.py [--tokens 4096] [--layer 15]
"""

import argparse
import json
import os
import platform
import tempfile
import time
from itertools import islice
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

from lightning_sae import ActivationDataModule, BatchTopKSAE
from lightning_sae.data import shakespeare_documents

RESULTS = Path(__file__).parent / "results"
BATCH = 1024


class FirstToLastBatch(Callback):
    """Time from the first training batch's start to the last batch's end (no set-up)."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx == 0:
            self.start = time.perf_counter()

    def on_train_end(self, trainer, pl_module):
        self.seconds = time.perf_counter() - self.start


def train_tokens_per_sec(dm: ActivationDataModule, steps: int) -> float:
    timer = FirstToLastBatch()
    trainer = L.Trainer(
        max_steps=steps + 1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=[timer],
    )  # fmt: skip
    trainer.fit(BatchTopKSAE(d_in=dm.d_in, d_sae=4 * dm.d_in, k=32, seed=0), datamodule=dm)
    # In the timed window the fit loop trains batches 0..steps and fetches batches 1..steps+1
    # (it prefetches one): steps + 1 batches of each, with one-batch mixing chunks.
    return (steps + 1) * BATCH / timer.seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=4096, help="tokens per measurement")
    parser.add_argument("--layer", type=int, default=15)
    args = parser.parse_args()
    hook = f"model.layers.{args.layer}"
    dm = ActivationDataModule(
        model="smollm2-135m", hook_names=hook, dataset=shakespeare_documents(), context_size=256,
        batch_size=BATCH, shuffle_buffer_tokens=BATCH, holdout_documents=16,
    )  # fmt: skip
    dm.setup("fit")
    model = dm.hooked_model
    rows = torch.stack(list(islice(dm.token_rows(), args.tokens // 256)))
    model.activations(rows[:2])  # warm-up
    start = time.perf_counter()
    for part in rows.split(16):
        model.activations(part)
    results = {"model_forward": args.tokens / (time.perf_counter() - start)}

    results["train_live"] = train_tokens_per_sec(dm, steps=args.tokens // BATCH)

    with tempfile.TemporaryDirectory() as tmp:
        path = dm.write_cache(Path(tmp) / "cache", args.tokens, holdout_tokens=0)
        cached = ActivationDataModule(cache_dir=path, batch_size=BATCH)
        cached.setup("fit")
        n_batches = 200
        start = time.perf_counter()
        for _ in islice(iter(cached.train_dataloader()), n_batches):
            pass
        results["cache_read"] = n_batches * BATCH / (time.perf_counter() - start)
        results["train_cache"] = train_tokens_per_sec(cached, steps=100)

    record = {
        "tokens_per_sec": {k: round(v, 1) for k, v in results.items()},
        "setup": {
            "model": "SmolLM2-135M-Instruct (fp32, from the GGUF)",
            "hook": hook,
            "context_size": 256,
            "batch_size": BATCH,
            "sae": "BatchTopKSAE d_sae=4*d_in k=32",
            "measured_tokens": args.tokens,
        },
        "machine": {
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "load_average_1min": round(os.getloadavg()[0], 2),
            "torch": torch.__version__,
            "platform": platform.platform(),
        },
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "data.json").write_text(json.dumps(record, indent=2) + "\n")
    lines = ["| path | tokens/s |", "| --- | ---: |"]
    lines += [f"| `{name}` | {value:,.0f} |" for name, value in results.items()]
    (RESULTS / "data.md").write_text("\n".join(lines) + "\n")
    print(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
