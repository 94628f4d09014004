"""One latent-parallel training step per rank against the same step in one process.

Spawns ``--ranks`` processes (gloo on CPU, NCCL on CUDA). Every rank shards the same TopK or
BatchTopK SAE by latent (:func:`lightning_sae.parallel.shard_latents`) and times its step
(training pass + backward + ``Adam``) and measures its peak memory above what it held before;
rank 0 also times the unsharded step of the same SAE, alternating rounds with the sharded one, so
a busy machine slows both alike (the other ranks wait at a barrier meanwhile). Memory is given in
copies of one ``[B, d_sae]`` float32 tensor and in MiB (CPU: process RSS; CUDA: allocator).

    python benchmarks/bench_latent_parallel.py                    # d_in 576, d_sae 32768, B 4096
    python benchmarks/bench_latent_parallel.py --device cuda --ranks 2 --d-sae 262144

Writes ``benchmarks/results/latent_parallel.json`` (``--out`` to change the folder).
"""

import argparse
import json
import os
import socket
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from sae_lens.saes.sae import TrainStepInput
from torch.distributed.device_mesh import init_device_mesh

sys.path.insert(0, str(Path(__file__).parent))
from bench_step import Clock, peak_extra_bytes

from lightning_sae import SAEModule
from lightning_sae.parallel import shard_latents


def step_fn(module: SAEModule, x: torch.Tensor, dead: torch.Tensor):
    """One training step of ``module``'s SAE on ``x`` (pass, backward, Adam)."""
    sae = module.sae
    optimizer = torch.optim.Adam(sae.parameters(), lr=1e-4)

    def step() -> None:
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
        optimizer.step()
        optimizer.zero_grad(set_to_none=False)

    return step


def worker(rank: int, port: int, args: argparse.Namespace) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    device = torch.device(args.device, rank) if args.device == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(
        "nccl" if device.type == "cuda" else "gloo", rank=rank, world_size=args.ranks
    )
    torch.set_num_threads(args.threads)
    mesh = init_device_mesh(device.type, (args.ranks,))
    generator = torch.Generator().manual_seed(0)
    x = (torch.randn(args.batch, args.d_in, generator=generator) + 1).to(device)
    dead = torch.rand(args.d_sae, generator=generator) < args.dead_fraction
    dead = dead.to(device)

    def build() -> SAEModule:
        hparams = {"d_in": args.d_in, "d_sae": args.d_sae, "k": args.k, "seed": 0}
        return SAEModule(architecture=args.architecture, **hparams).to(device)

    sharded = build()
    shard_latents(sharded.unit, mesh)
    steps = {"latent_parallel": step_fn(sharded, x, dead)}
    if rank == 0:
        steps["one_process"] = step_fn(build(), x, dead)
    timer = Clock(device)
    times: dict[str, float] = {}
    memory: dict[str, int | None] = {}
    for name in ("one_process", "latent_parallel"):
        dist.barrier()
        if name in steps:
            steps[name]()  # warm-up (Adam's state, allocator)
            memory[name] = peak_extra_bytes(steps[name], device)
    for _ in range(args.repeats):
        for name in ("one_process", "latent_parallel"):
            dist.barrier()
            if name in steps:
                elapsed = timer(steps[name])
                times[name] = min(times.get(name, float("inf")), elapsed)
    unit = args.batch * args.d_sae * 4
    results = [None] * args.ranks
    dist.all_gather_object(results, {"rank": rank, "seconds": times, "peak_bytes": memory})
    if rank == 0:
        report = {
            "config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
            "load_average": os.getloadavg(),
            "B_x_d_sae_float32_bytes": unit,
            "ranks": results,
        }
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "latent_parallel.json").write_text(json.dumps(report, indent=2) + "\n")
        for result in results:
            for name, seconds in result["seconds"].items():
                peak = result["peak_bytes"][name]
                copies = f"{peak / unit:.2f} copies, {peak / 2**20:.0f} MiB" if peak else "n/a"
                print(f"rank {result['rank']} {name}: {seconds * 1e3:.0f} ms, peak +{copies}")
        print(f"load average {report['load_average']}")
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--architecture", default="topk", choices=["topk", "batchtopk"])
    parser.add_argument("--d-in", type=int, default=576)
    parser.add_argument("--d-sae", type=int, default=32768)
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dead-fraction", type=float, default=0.0)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(worker, args=(port, args), nprocs=args.ranks)


if __name__ == "__main__":
    main()
