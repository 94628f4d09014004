"""Two-rank DDP runs of the ``lightning-sae`` CLI on CPU (gloo); run by ``tests/test_ddp_cli.py``.

``python ddp_cli.py OUT_DIR CONFIG`` runs, in one pair of processes (Lightning relaunches this
script as rank 1, which then runs the same sequence):

1. ``full``: ``CONFIG`` for 6 steps (a CSV log of the synced metrics in ``OUT_DIR/full``);
2. ``half``: the same for 3 steps, with a checkpoint;
3. ``resumed``: ``--ckpt_path`` of that checkpoint, on to 6 steps;
4. ``batchtopk``: ``CONFIG`` with ``--model BatchTopKSAE`` for 6 steps;
5. ``atm``: ``CONFIG`` with ``--model ATMSAE``, masking from step 2, for 6 steps;
6. ``jumprelu``: ``CONFIG`` with ``--model JumpReLUSAE`` and a target L0 (its controller on).

Each rank writes its weights after each run to ``OUT_DIR/<run>_rank<r>.pt``. ``CONFIG`` must set
the strategy to DDP with a short timeout, so that a hang fails in seconds.
"""

import sys
import warnings
from pathlib import Path

import torch

from lightning_sae.cli import SAECLI


def fit(out: Path, run: str, config: str, *args: str) -> None:
    """Run ``lightning-sae fit`` and save this rank's weights as ``<run>_rank<r>.pt``."""
    cli = SAECLI(args=["fit", "--config", config, f"--trainer.default_root_dir={out / run}", *args])
    rank = cli.trainer.global_rank
    state = {name: tensor.detach().clone() for name, tensor in cli.model.state_dict().items()}
    torch.save(state, out / f"{run}_rank{rank}.pt")


def main(out: Path, config: str) -> None:
    torch.set_num_threads(1)  # two ranks share the machine's cores
    # Lightning relaunches rank 1 from sys.argv, so it must keep OUT_DIR and CONFIG.
    warnings.filterwarnings("ignore", message=".*args parameter is intended to run from within")
    fit(
        out,
        "full",
        config,
        "--trainer.logger=CSVLogger",
        f"--trainer.logger.save_dir={out / 'full'}",
        "--trainer.enable_checkpointing=false",
    )
    fit(out, "half", config, "--trainer.max_steps=3", "--trainer.logger=false")
    (checkpoint,) = (out / "half").rglob("*.ckpt")
    fit(out, "resumed", config, f"--ckpt_path={checkpoint}", "--trainer.logger=false")
    fit(out, "batchtopk", config, "--model=BatchTopKSAE", "--model.init_args.k=4")
    fit(out, "atm", config, "--model=ATMSAE", "--model.init_args.atm_warm_up_steps=2")
    fit(out, "jumprelu", config, "--model=JumpReLUSAE", "--model.init_args.target_l0=2")


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2])
