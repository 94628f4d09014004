"""One latent-parallel training pass on two gloo ranks against the dense pass, per architecture.

``python latent_parallel_step.py OUT_FILE`` spawns two ranks; each shards the same SAE by latent
(:func:`~lightning_sae.parallel.shard_latents`), runs one pass with a third of the latents dead
(AuxK on), and rank 0 saves the loss terms, outputs, gathered gradients and the dense pass's
ones (computed in the same process on the unsharded weights) to ``OUT_FILE``. Run by
``tests/test_parallel.py``.
"""

import os
import socket
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from sae_lens.saes.sae import TrainStepInput
from torch.distributed.device_mesh import init_device_mesh

from lightning_sae import SAEModule
from lightning_sae.parallel import shard_latents

D_IN, D_SAE, BATCH = 16, 64, 24
#: Architectures and settings: k = 3 gives a fractional BatchTopK total; dtype float64 too.
CASES = {
    "topk": {"k": 3},
    "batchtopk": {"k": 3},
    "batchtopk_fractional": {"k": 2.5},
    "topk_no_rescale": {"k": 3, "rescale_acts_by_decoder_norm": False},
    "topk_wide_k": {"k": 40},  # k above a rank's 32 latents: each lists all of its own
}


def one_pass(sae, x: torch.Tensor, dead: torch.Tensor) -> dict:
    output = sae.training_forward_pass(
        TrainStepInput(
            sae_in=x,
            coefficients={},
            dead_neuron_mask=dead,
            n_training_steps=0,
            is_logging_step=False,
        )
    )
    output.loss.backward()
    grads = {}
    for name, param in sae.named_parameters():
        grad = param.grad
        grads[name] = grad.full_tensor() if hasattr(grad, "full_tensor") else grad
    return {
        "loss": output.loss.detach(),
        "losses": {k: v.detach() for k, v in output.losses.items()},
        "sae_out": output.sae_out.detach(),
        "feature_acts": output.feature_acts.to_dense(),
        "grads": grads,
    }


def worker(rank: int, port: int, path: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    torch.set_num_threads(1)
    mesh = init_device_mesh("cpu", (2,))
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(BATCH, D_IN, generator=generator) * 2 + 1
    dead = torch.zeros(D_SAE, dtype=torch.bool)
    dead[torch.randperm(D_SAE, generator=generator)[: D_SAE // 3]] = True
    results = {}
    for dtype in (torch.float32, torch.float64):
        for name, hparams in CASES.items():
            architecture = name.split("_")[0]
            dense = SAEModule(architecture=architecture, d_in=D_IN, d_sae=D_SAE, seed=1, **hparams)
            dense = dense.to(dtype)
            with torch.no_grad():  # a trained-looking SAE: non-zero biases
                dense.sae.b_dec.normal_(generator=generator)
                dense.sae.b_enc.normal_(generator=generator)
            sharded = SAEModule(architecture=architecture, d_in=D_IN, d_sae=D_SAE, **hparams)
            sharded = sharded.to(dtype)
            sharded.load_state_dict(dense.state_dict())
            shard_latents(sharded.unit, mesh)
            inputs = x.to(dtype)
            results[(name, str(dtype))] = {
                "dense": one_pass(dense.sae, inputs, dead),
                "sharded": one_pass(sharded.sae, inputs, dead),
            }
    if rank == 0:
        torch.save(results, path)
    dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


if __name__ == "__main__":
    mp.spawn(worker, args=(free_port(), sys.argv[1]), nprocs=2)
