"""Activation store throughput: litdata store vs the previous cache vs the language model.

Measures in tokens per second, in one process, on synthetic activations (d_in 576, SmolLM2's
width; random values: the store does not compress), batches of 4096 tokens:

- ``store_write_<dtype>``: :func:`~lightning_sae.data.store.write_store` to a local folder
  (mixing, litdata chunks, fsync, progress after every buffer);
- ``store_read_<dtype>``: one epoch of ``ActivationDataModule(cache_dir=store)``'s training
  loader, the path ``fit`` reads (litdata ``StreamingDataset`` + ``StreamingDataLoader``,
  shuffled, exact-size batches);
- ``cache_write_<dtype>`` / ``cache_read_<dtype>``: the previous format
  (:mod:`lightning_sae.data.cache`: safetensors files), read the way ``ActivationDataModule``
  read it before the store (a whole file, permuted, cut into batches);
- ``lm_forward``: SmolLM2-135M (fp32, the offline default) up to ``model.layers.15`` at context
  256: the rate at which activations are produced in the first place.

With ``--sweep``, also the fp32 store read for several ``block_tokens`` (the default is chosen by
it). Figures move several-fold with other jobs on the machine: the 1-minute load average is
recorded before and after; compare ratios within one run. One torch thread by default: on a
2-core machine with other jobs, 2 threads made litdata's collate (``torch.stack``) 20x slower
(its parallel copies wait for a descheduled thread); DataLoader workers always use one.

Writes ``benchmarks/results/store.json`` and ``store.md``.

    python benchmarks/bench_store.py [--tokens 262144] [--lm-tokens 2048] [--sweep]
"""

import argparse
import json
import os
import platform
import tempfile
import time
from itertools import islice
from pathlib import Path

import torch

from lightning_sae import ActivationDataModule
from lightning_sae.data import cache
from lightning_sae.data.models import load_hooked_model
from lightning_sae.data.store import write_store

RESULTS = Path(__file__).parent / "results"
HOOK, D_IN, BATCH, CHUNK = "model.layers.15", 576, 4096, 65_536
METADATA = {
    "model_name": "synthetic",
    "model_class_name": "AutoModelForCausalLM",
    "context_size": 256,
    "prepend_bos": True,
    "dataset_path": None,
    "exclude_special_tokens": False,
}
#: What the previous format's manifest also records.
CACHE_METADATA = {**METADATA, "hook_names": [HOOK], "d_in": {HOOK: D_IN}}


def chunks(n_tokens: int, dtype: torch.dtype) -> list[dict[str, torch.Tensor]]:
    """The activations to write, made before any timing starts."""
    generator = torch.Generator().manual_seed(0)
    sizes = [min(CHUNK, n_tokens - start) for start in range(0, n_tokens, CHUNK)]
    return [{HOOK: torch.randn(n, D_IN, generator=generator).to(dtype)} for n in sizes]


def rate(n_tokens: int, seconds: float) -> float:
    return n_tokens / seconds


def timed(fn, *args, **kwargs) -> float:
    start = time.perf_counter()
    fn(*args, **kwargs)
    return time.perf_counter() - start


def store_read(path: Path, n_tokens: int, workers: int) -> float:
    data = ActivationDataModule(cache_dir=path, batch_size=BATCH, num_workers=workers)
    batches = data.train_dataloader()
    n_batches = n_tokens // BATCH - 1  # one epoch (drop_last may drop the last blocks)
    return rate(n_batches * BATCH, timed(list, islice(iter(batches), n_batches)))


def cache_read(path: Path) -> float:
    """Read every file, permute it and cut it into batches, as ``ActivationDataModule`` did."""
    old = cache.ActivationCache(path)

    def read() -> int:
        n = 0
        for index in range(len(old.file_tokens)):
            acts = old.load(index, [HOOK])[HOOK]
            acts = acts[torch.randperm(acts.shape[0])]
            n += sum(b.shape[0] for b in acts.split(BATCH))
        return n

    start = time.perf_counter()
    n = read()
    return rate(n, time.perf_counter() - start)


def lm_forward(n_tokens: int) -> float:
    model = load_hooked_model("smollm2-135m", [HOOK])
    rows = torch.randint(0, 49_152, (max(1, n_tokens // 256), 256))
    model.activations(rows[:1])  # warm-up
    start = time.perf_counter()
    for part in rows.split(8):
        model.activations(part)
    return rate(rows.numel(), time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=262_144, help="tokens written and read")
    parser.add_argument("--lm-tokens", type=int, default=2048, help="tokens through the LM")
    parser.add_argument("--workers", type=int, default=0, help="dataloader workers (store)")
    parser.add_argument("--sweep", action="store_true", help="also sweep block_tokens")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (more stall under a busy machine)"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    results: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for dtype in (torch.float32, torch.bfloat16):
            name, data = str(dtype).removeprefix("torch."), chunks(args.tokens, dtype)
            store, old = Path(tmp) / f"store-{name}", Path(tmp) / f"cache-{name}"
            seconds = timed(write_store, store, data, None, METADATA)
            results[f"store_write_{name}"] = rate(args.tokens, seconds)
            results[f"store_read_{name}"] = store_read(store, args.tokens, args.workers)
            seconds = timed(cache.write_cache, old, data, None, CACHE_METADATA)
            results[f"cache_write_{name}"] = rate(args.tokens, seconds)
            results[f"cache_read_{name}"] = cache_read(old)
        if args.sweep:
            data = chunks(args.tokens, torch.float32)
            for block in (64, 128, 256, 512):
                store = Path(tmp) / f"store-block{block}"
                write_store(store, data, None, METADATA, block_tokens=block)
                key = f"store_read_float32_block{block}"
                results[key] = store_read(store, args.tokens, args.workers)
    results["lm_forward"] = lm_forward(args.lm_tokens)
    record = {
        "tokens_per_sec": {k: round(v, 1) for k, v in results.items()},
        "setup": {
            "d_in": D_IN,
            "batch_size": BATCH,
            "tokens": args.tokens,
            "dataloader_workers": args.workers,
            "store_defaults": "block_tokens=128, chunk_bytes=32 MiB, shuffle_buffer_tokens=131072",
            "lm": f"SmolLM2-135M fp32 to {HOOK}, context 256, {args.lm_tokens} tokens",
        },
        "machine": {
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "load_average_1_5_15min_before": [round(x, 2) for x in load_before],
            "load_average_1_5_15min_after": [round(x, 2) for x in os.getloadavg()],
            "torch": torch.__version__,
            "platform": platform.platform(),
        },
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "store.json").write_text(json.dumps(record, indent=2) + "\n")
    machine = record["machine"]
    lines = [
        f"Load average (1, 5, 15 min) {machine['load_average_1_5_15min_before']} before, "
        f"{machine['load_average_1_5_15min_after']} after, on {machine['cpu_count']} CPUs; "
        f"{args.tokens:,} tokens of d_in {D_IN}, batches of {BATCH}.",
        "",
        "| path | tokens/s |",
        "| --- | ---: |",
    ]
    lines += [f"| `{name}` | {value:,.0f} |" for name, value in results.items()]
    lines += ["", "Ratios (same process): " + ", ".join(
        f"{what} {dtype} / LM forward {results[f'{what}_{dtype}'] / results['lm_forward']:,.0f}x"
        for what in ("store_write", "store_read") for dtype in ("float32", "bfloat16")
    ) + "."]  # fmt: skip
    (RESULTS / "store.md").write_text("\n".join(lines) + "\n")
    print(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
