"""Two-rank ``ModelParallelStrategy`` fits on CPU (gloo); run by ``tests/test_parallel.py``.

``python model_parallel.py OUT_DIR`` runs, in one pair of processes (Lightning relaunches this
script as rank 1, which then runs the same sequence), on :func:`activations` in order:

1. ``latent_<arch>`` for TopK and BatchTopK: latent-parallel (``tensor_parallel_size=2``),
   6 steps of 32 tokens (rank 1's loader gives other tokens: rank 0's batches are the group's),
   AuxK active from step 2, the logged
   metrics in ``latent_<arch>_log/version_0/metrics.csv``;
2. ``half_topk`` (3 steps, a sharded checkpoint) and ``resumed_topk`` (on to 6 steps from it);
3. ``gathered_topk``: 3 steps saving a gathered checkpoint (one file), and
   ``resumed_gathered_topk`` (on to 6 steps from it);
4. ``fsdp_<arch>`` for every architecture: FSDP2 (``data_parallel_size=2``), 6 steps of 32
   tokens per rank (rank ``r`` takes rows ``r, r + 2, …``: the union of the ranks' batches
   ``i`` is rows ``64i … 64i + 63``, one process's batch ``i`` of 64), validated on 64 other
   tokens during the fit; TopK's validation metrics afterwards in ``fsdp_topk_val.pt``;
5. ``ddp_<arch>`` for the architectures whose FSDP2 run has no one-process twin (per-rank
   selection or rank-averaged statistics): the same runs under DDP.

After each run every rank gathers the module (:func:`~lightning_sae.parallel.gathered_module`),
rank 0 saves its state as ``<run>.pt`` and exports it to ``<run>_export/``.
"""

import sys
import warnings
from datetime import timedelta
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.strategies import DDPStrategy, ModelParallelStrategy
from torch.utils.data import DataLoader, TensorDataset

from lightning_sae import SAEModule, export_to_sae_lens
from lightning_sae.parallel import gathered_module

D_IN, D_SAE, K, BATCH = 16, 64, 4, 32
#: FSDP2 runs: every architecture, with its own hyper-parameters.
FSDP_ARCHITECTURES = {
    "topk": {"k": K},
    "batchtopk": {"k": K},
    "matryoshka_batchtopk": {"k": K},
    "standard": {},
    "gated": {},
    "jumprelu": {"target_l0": 8.0},
    "atm": {},
}

#: FSDP2 runs compared with DDP (no one-process twin: per-rank top-k, rank-averaged statistics).
DDP_TWINS = ("batchtopk", "matryoshka_batchtopk", "jumprelu", "atm")


def activations() -> torch.Tensor:
    """Fixed activations with a large mean (so AuxK's residuals matter), 384 tokens."""
    generator = torch.Generator().manual_seed(0)
    return torch.randn(12 * BATCH, D_IN, generator=generator) * 2 + 1


def module(architecture: str, **hparams) -> SAEModule:
    """The SAE every run trains (same seed: same initial weights)."""
    return SAEModule(
        architecture=architecture,
        d_in=D_IN,
        d_sae=D_SAE,
        lr=1e-2,
        seed=0,
        dead_window_tokens=2 * BATCH,  # latents silent for 2 steps are dead: AuxK engages
        **hparams,
    )


def trainer(
    steps: int,
    data: int,
    latents: int,
    root: Path,
    ddp: bool = False,
    log: str | None = None,
    **strategy,
) -> L.Trainer:
    """A CPU Trainer on ``ModelParallelStrategy`` (or one process when ``data * latents == 1``).

    With ``ddp``, Lightning's ``DDPStrategy`` on ``data`` processes instead; with ``log``, a CSV
    log of the metrics in ``root/<log>/``.
    """
    timeout = timedelta(minutes=3)  # a hung collective fails in minutes
    parallel = (
        DDPStrategy(timeout=timeout, process_group_backend="gloo")
        if ddp
        else ModelParallelStrategy(
            data_parallel_size=data, tensor_parallel_size=latents, timeout=timeout, **strategy
        )
    )
    return L.Trainer(
        accelerator="cpu",
        devices=data * latents,
        strategy=parallel if data * latents > 1 else "auto",
        max_steps=steps,
        logger=CSVLogger(root, name=log, version=0) if log else False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        gradient_clip_val=1.0,
        log_every_n_steps=2,
        default_root_dir=root,
        use_distributed_sampler=False,  # batches in order; each run shards them itself
    )


def loader(tokens: torch.Tensor, batch: int) -> DataLoader:
    """Batches in order (no shuffle), 3 per epoch so a resume starts on an epoch boundary."""
    return DataLoader(TensorDataset(tokens), batch_size=batch)


def save(out: Path, run: str, fitted: SAEModule, rank: int) -> None:
    """Gather (every rank), then save the state and an sae-lens export (rank 0)."""
    whole = gathered_module(fitted)
    if rank == 0:
        torch.save(
            {k: v.detach().clone() for k, v in whole.state_dict().items()}, out / f"{run}.pt"
        )
        calibration = activations() if fitted.architecture != "topk" else None
        export_to_sae_lens(
            whole,
            out / f"{run}_export",
            {"hook_name": "blocks.0.hook_resid_post"},
            calibration_activations=calibration,
        )


def record_refusals(out: Path, sharded: SAEModule) -> None:
    """Write what one rank gets for exporting or running a sharded SAE (``refusals.txt``)."""
    messages = []
    for attempt in (
        lambda: export_to_sae_lens(sharded, out / "refused_export"),
        lambda: sharded(activations()[:2]),
    ):
        try:
            attempt()
            messages.append("no error")
        except (ValueError, RuntimeError) as error:
            messages.append(f"{type(error).__name__}: {error}")
    (out / "refusals.txt").write_text("\n".join(messages))


def main(out: Path) -> None:
    torch.set_num_threads(1)  # two ranks share the machine's cores
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    x = activations()
    latent_data = x[: 3 * BATCH]  # 3 batches per epoch, 2 epochs
    for architecture in ("topk", "batchtopk"):
        fitted = module(architecture, k=K)
        run = trainer(6, 1, 2, out, log=f"latent_{architecture}_log")
        # Rank 1 is given other tokens: the group must train on rank 0's batches (broadcast).
        mine = latent_data if run.global_rank == 0 else x[3 * BATCH : 6 * BATCH]
        run.fit(fitted, loader(mine, BATCH))
        if run.global_rank == 0:
            record_refusals(out, fitted)
        save(out, f"latent_{architecture}", fitted, run.global_rank)

    fitted = module("topk", k=K)
    run = trainer(3, 1, 2, out)
    run.fit(fitted, loader(latent_data, BATCH))
    run.save_checkpoint(out / "half_topk.ckpt")  # a folder: every rank writes its shards
    resumed = module("topk", k=K)
    run = trainer(6, 1, 2, out)
    run.fit(resumed, loader(latent_data, BATCH), ckpt_path=out / "half_topk.ckpt")
    save(out, "resumed_topk", resumed, run.global_rank)

    fitted = module("topk", k=K)
    run = trainer(3, 1, 2, out, save_distributed_checkpoint=False)
    run.fit(fitted, loader(latent_data, BATCH))
    run.save_checkpoint(out / "gathered_topk.ckpt")  # one file, written by rank 0
    resumed = module("topk", k=K)
    run = trainer(6, 1, 2, out, save_distributed_checkpoint=False)
    run.fit(resumed, loader(latent_data, BATCH), ckpt_path=out / "gathered_topk.ckpt")
    save(out, "resumed_gathered_topk", resumed, run.global_rank)

    for architecture, hparams in FSDP_ARCHITECTURES.items():
        fitted = module(architecture, **hparams)
        run = trainer(6, 2, 1, out)
        held_out = loader(x[6 * BATCH : 8 * BATCH], BATCH)  # validated during fit (and sanity)
        run.fit(fitted, loader(x[run.global_rank : 6 * BATCH : 2], BATCH), held_out)
        save(out, f"fsdp_{architecture}", fitted, run.global_rank)
        if architecture == "topk":
            (metrics,) = run.validate(fitted, held_out, verbose=False)
            if run.global_rank == 0:
                torch.save(metrics, out / "fsdp_topk_val.pt")
        if architecture in DDP_TWINS:
            fitted = module(architecture, **hparams)
            run = trainer(6, 2, 1, out, ddp=True)
            run.fit(fitted, loader(x[run.global_rank : 6 * BATCH : 2], BATCH))
            if run.global_rank == 0:
                torch.save(fitted.state_dict(), out / f"ddp_{architecture}.pt")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
