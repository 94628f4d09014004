"""Two gloo ranks update every metric on their own shard; rank 0 prints the synced values beside
the values of one process on the union. Run by tests/test_metrics.py as its own process."""

import os
import socket
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lightning_sae.metrics import (
    L0,
    ExplainedVariance,
    FeatureDensity,
    NormalizedMSE,
)

D_IN, D_SAE = 6, 10


def data() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(300, D_IN, generator=generator) + 2.0
    x_hat = x + 0.5 * torch.randn(300, D_IN, generator=generator)
    acts = torch.relu(torch.randn(300, D_SAE, generator=generator) - 1.0)
    acts[:, 3] = 0.0  # latent 3 never fires; latent 7 fires only on rank 1's shard
    acts[:200, 7] = 0.0
    acts[250, 7] = 1.0
    return x, x_hat, acts


def metrics(**kwargs) -> dict:
    return {
        "l0": L0(**kwargs),
        "explained_variance": ExplainedVariance(D_IN, **kwargs),
        "nmse": NormalizedMSE(D_IN, **kwargs),
        "density_sum": FeatureDensity(D_SAE, **kwargs),
        # Dead = density 0 over the window: a latent that fired on any rank is alive.
        "dead_fraction": FeatureDensity(D_SAE, **kwargs),
    }


def update(all_metrics: dict, x, x_hat, acts) -> None:
    for name, metric in all_metrics.items():
        if name in ("explained_variance", "nmse"):
            metric.update(x, x_hat)
        else:
            metric.update(acts)


def value(name: str, metric) -> float:
    result = metric.compute()
    if name == "dead_fraction":
        return float((result == 0).double().mean())
    return float(result.sum()) if name == "density_sum" else float(result)


def worker(rank: int, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    x, x_hat, acts = data()
    shard = slice(0, 120) if rank == 0 else slice(120, 300)  # unequal shards on purpose
    distributed = metrics()
    for start in range(shard.start, shard.stop, 50):  # several updates per rank
        stop = min(start + 50, shard.stop)
        update(distributed, x[start:stop], x_hat[start:stop], acts[start:stop])
    values = {name: value(name, metric) for name, metric in distributed.items()}
    if rank == 0:
        single = metrics(sync_on_compute=False)  # the reference: one process, all the data
        update(single, x, x_hat, acts)
        for name, metric in single.items():
            print(f"METRIC {name} {values[name]!r} {value(name, metric)!r}")
    dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


if __name__ == "__main__":
    mp.spawn(worker, args=(free_port(),), nprocs=2, join=True)
    sys.exit(0)
