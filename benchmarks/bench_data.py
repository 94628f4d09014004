"""Data-path throughput on this machine: model forward vs end-to-end training vs cache reads.

Measures, on the offline default (SmolLM2-135M, Shakespeare, context 256, batch 1024), in tokens
per second:

- ``model_forward``: the hooked forward alone (stops after the last hook, ``--model-batch-size``
  rows per forward, as the live DataModule runs it), no DataModule; once with the one hook
  ``model.layers.<layer>`` and once with the four hooks ``--hooks`` (the same depth);
- ``train_live`` (one ``BatchTopKSAE``) and ``train_live_4_hooks`` (``MultiSAEModule`` of four
  BatchTopK SAEs from one forward): ``Trainer.fit`` streaming from the live DataModule
  (tokenise, forward, mix, SAE step). Two figures each, as fractions of the matching
  ``model_forward``: ``first_to_last_batch`` (the loop, no set-up, no first buffer fill) and
  ``whole_fit`` (the whole ``Trainer.fit`` call, set-up and every buffer fill included: what a
  run gets; validation off). ``model_forward`` is measured right before and right after each fit
  and the ratios use the mean of the two, so a load change between them shows (both are
  recorded);
- ``cache_read``: batches read from an activation cache (safetensors files, shuffled);
- ``train_cache``: the one-SAE fit reading the cache instead of running the model.

Each fit's seconds are split into the model's forward inside the fit, the SAE steps (training
step, backward, Adam) and the rest, with its first and median step. ``whole_fit ÷ in-fit
forward`` divides the whole fit's throughput by the model's own speed inside that fit (tokens
forwarded ÷ forward seconds): both come from the same window, so other jobs' load changes it less
than the ratio to the separately measured forward; it still is no quiet-machine figure, because a
loaded machine slows the SAE steps' many small parallel regions more than the model's large
products. Every figure has the 1-min load average at its start and end beside it.

SAEs: d_sae ``4 · d_in`` (2304), k 32. The fits cover ``--tokens`` in mixing buffers of
``--buffer-tokens``; they stop one batch short of the last buffer's end, so the batch the fit loop
prefetches never starts a buffer that is not trained on. Writes ``benchmarks/results/data.json``
and ``data.md`` with the load average.

    python benchmarks/bench_data.py [--tokens 65536] [--buffer-tokens 16384] [--layer 12]
    python benchmarks/bench_data.py --fits four --out /tmp/data   # the four-SAE fit alone
"""

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from itertools import islice
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

from lightning_sae import ActivationDataModule, BatchTopKSAE, MultiSAEModule
from lightning_sae.data import shakespeare_documents
from lightning_sae.data.live import LiveSource
from lightning_sae.io import atomic_write_text

RESULTS = Path(__file__).parent / "results"
FITS = ("one", "four", "cache")
BATCH = 1024
CONTEXT = 256


class FitTimer(Callback):
    """Times a fit's first batch's start to the end, and its training steps."""

    def __init__(self) -> None:
        self.steps: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.step_start = time.perf_counter()
        if batch_idx == 0:
            self.first_batch = self.step_start

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.steps.append(time.perf_counter() - self.step_start)

    def on_train_end(self, trainer, pl_module):
        self.end = time.perf_counter()


class ForwardTimer:
    """Wraps a hooked model's ``activations`` to add up the time spent in the model."""

    def __init__(self, model) -> None:
        self.model, self.activations, self.seconds = model, model.activations, 0.0
        model.activations = self

    def __call__(self, *args, **kwargs):
        start = time.perf_counter()
        try:
            return self.activations(*args, **kwargs)
        finally:
            self.seconds += time.perf_counter() - start

    def remove(self) -> None:
        del self.model.activations


def train_tokens_per_sec(
    dm: ActivationDataModule, module: L.LightningModule, batches: int, forwarded_tokens: int = 0
) -> tuple[dict, dict]:
    """Tokens per second of a ``batches``-step fit: whole fit, first to last batch, breakdown.

    The breakdown splits the whole fit's seconds into the model's forward (live source only), the
    training steps (training step, backward, Adam) and the rest (set-up of the loop, batching,
    mixing, Lightning's own work between steps), and gives the first and the median step. With
    ``forwarded_tokens`` (the tokens the fit runs the model on), the speed also includes
    ``in_fit_forward``, the model's own tokens per second inside the fit.
    """
    timer = FitTimer()
    forward = ForwardTimer(dm.hooked_model) if isinstance(dm.source, LiveSource) else None
    trainer = L.Trainer(
        max_steps=batches, logger=False, enable_checkpointing=False, limit_val_batches=0,
        enable_progress_bar=False, enable_model_summary=False, callbacks=[timer],
    )  # fmt: skip
    start = time.perf_counter()
    try:
        trainer.fit(module, datamodule=dm)
    finally:
        if forward is not None:
            forward.remove()
    # Whole fit: the call, set-up and every buffer fill included. The loop trains batches
    # 0..n-1 and fetches batch n too (it prefetches one); the window from batch 0's start misses
    # batch 0's fetch: n batches fetched in either window.
    whole = time.perf_counter() - start
    model = forward.seconds if forward is not None else 0.0
    speeds = {
        "whole_fit": batches * BATCH / whole,
        "first_to_last_batch": batches * BATCH / (timer.end - timer.first_batch),
    }
    if forward is not None and forwarded_tokens:
        speeds["in_fit_forward"] = forwarded_tokens / model
    steps = sum(timer.steps)
    seconds = {"whole_fit": whole, "model_forward": model, "sae_steps": steps}
    seconds["other"] = whole - model - steps
    seconds["first_step"] = timer.steps[0]
    seconds["median_step"] = statistics.median(timer.steps)
    return speeds, {name: round(value, 3) for name, value in seconds.items()}


def forward_tokens_per_sec(dm: ActivationDataModule, args: argparse.Namespace) -> float:
    """The hooked model's forward alone over ``--tokens`` tokens, as the live source batches it."""
    model, tokens = dm.hooked_model, args.tokens
    rows = torch.stack(list(islice(dm.token_rows(), tokens // CONTEXT)))
    model.activations(rows[:2])  # warm-up
    start = time.perf_counter()
    for part in rows.split(args.model_batch_size):
        model.activations(part)
    return tokens / (time.perf_counter() - start)


def data_module(hooks: list[str], args: argparse.Namespace) -> ActivationDataModule:
    dm = ActivationDataModule(
        model="smollm2-135m", hook_names=hooks if len(hooks) > 1 else hooks[0],
        dataset=shakespeare_documents(), context_size=CONTEXT, batch_size=BATCH,
        shuffle_buffer_tokens=args.buffer_tokens, model_batch_size=args.model_batch_size,
        holdout_documents=16,
    )  # fmt: skip
    dm.setup("fit")
    return dm


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    # The first steps of a fit pay one-off costs (~1 s each for the first three on this CPU):
    # enough steps that they do not dominate the whole-fit figure.
    parser.add_argument("--tokens", type=int, default=65536, help="tokens per measurement")
    parser.add_argument("--buffer-tokens", type=int, default=16384, help="mixing buffer")
    parser.add_argument("--model-batch-size", type=int, default=32, help="rows per forward")
    parser.add_argument("--layer", type=int, default=12)
    parser.add_argument("--hooks", type=int, nargs="+", default=[3, 6, 9, 12], help="layers")
    parser.add_argument("--cache-tokens", type=int, default=4096)
    parser.add_argument(
        "--fits", nargs="+", choices=FITS, default=list(FITS),
        help="measurements to run: the one-SAE fit, the four-SAE fit, the cache read and fit",
    )  # fmt: skip
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder of data.json/.md")
    args = parser.parse_args()
    if args.tokens % args.buffer_tokens or args.buffer_tokens % BATCH:
        parser.error(f"--tokens must be a multiple of --buffer-tokens, itself of {BATCH}")
    hook = f"model.layers.{args.layer}"
    hooks = [f"model.layers.{layer}" for layer in args.hooks]
    batches = args.tokens // BATCH - 1
    results: dict[str, float | dict] = {}
    breakdown: dict[str, dict] = {}
    loads: dict[str, list[float]] = {}

    def measured(name: str, measure, *arguments):
        """Run ``measure(*arguments)``, keeping the 1-min load average at its start and end."""
        start = os.getloadavg()[0]
        value = measure(*arguments)
        loads[name] = [round(start, 2), round(os.getloadavg()[0], 2)]
        return value

    def forward_around_fit(name: str, dm: ActivationDataModule, module: L.LightningModule) -> str:
        """The forward alone right before and after the fit ``name``; return their mean's name."""
        forward = "model_forward" + name.removeprefix("train_live")
        results[forward] = {}  # listed before the fit
        before = measured(f"{forward}_before", forward_tokens_per_sec, dm, args)
        results[name], breakdown[name] = measured(
            name, train_tokens_per_sec, dm, module, batches, args.tokens
        )
        after = measured(f"{forward}_after", forward_tokens_per_sec, dm, args)
        results[forward] |= {"before": before, "after": after, "mean": (before + after) / 2}
        return forward

    dm = data_module([hook], args)
    forwards = {}
    if "one" in args.fits:
        sae = BatchTopKSAE(d_in=dm.d_in, d_sae=4 * dm.d_in, k=32, seed=0)
        forwards["train_live"] = forward_around_fit("train_live", dm, sae)
    if "four" in args.fits:
        multi_dm = data_module(hooks, args)
        multi = MultiSAEModule(
            "batchtopk", hooks, d_in=multi_dm.d_in_per_hook, d_sae=4 * dm.d_in, k=32, seed=0
        )
        forwards["train_live_4_hooks"] = forward_around_fit("train_live_4_hooks", multi_dm, multi)
    ratios = {}
    for name, forward in forwards.items():
        speeds = results[name]
        for window in ("whole_fit", "first_to_last_batch"):
            ratios[f"{name}_{window}"] = round(speeds[window] / results[forward]["mean"], 3)
        ratios[f"{name}_whole_fit_vs_in_fit_forward"] = round(
            speeds["whole_fit"] / speeds["in_fit_forward"], 3
        )

    if "cache" in args.fits:
        with tempfile.TemporaryDirectory() as tmp:
            path = dm.write_cache(Path(tmp) / "cache", args.cache_tokens, holdout_tokens=0)
            cached = ActivationDataModule(cache_dir=path, batch_size=BATCH)
            cached.setup("fit")
            n_batches = 200

            def read() -> float:
                start = time.perf_counter()
                for _ in islice(iter(cached.train_dataloader()), n_batches):
                    pass
                return n_batches * BATCH / (time.perf_counter() - start)

            results["cache_read"] = measured("cache_read", read)
            sae = BatchTopKSAE(d_in=dm.d_in, d_sae=4 * dm.d_in, k=32, seed=0)
            results["train_cache"], breakdown["train_cache"] = measured(
                "train_cache", train_tokens_per_sec, cached, sae, 100
            )

    def rounded(value: float | dict) -> float | dict:
        if isinstance(value, dict):
            return {key: round(item, 1) for key, item in value.items()}
        return round(value, 1)

    record = {
        "tokens_per_sec": {name: rounded(value) for name, value in results.items()},
        "fraction_of_forward": ratios,
        "fit_seconds": breakdown,
        "setup": {
            "model": "SmolLM2-135M-Instruct (fp32, from the GGUF)",
            "hook": hook,
            "hooks_4": hooks,
            "context_size": CONTEXT,
            "batch_size": BATCH,
            "buffer_tokens": args.buffer_tokens,
            "model_batch_size": args.model_batch_size,
            "sae": "BatchTopKSAE d_sae=4*d_in k=32 (four: MultiSAEModule of them)",
            "measured_tokens": args.tokens,
            "trained_batches": batches,
        },
        "machine": {
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "load_average_1min_start_end": loads,
            "torch": torch.__version__,
            "platform": platform.platform(),
        },
    }
    previous = previous_record(args.out, record["setup"])
    if previous is not None:  # a partial run (--fits) replaces only its own figures
        for section in ("tokens_per_sec", "fraction_of_forward", "fit_seconds"):
            record[section] = previous[section] | record[section]
        key = "load_average_1min_start_end"
        record["machine"][key] = previous["machine"][key] | record["machine"][key]
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out / "data.json", json.dumps(record, indent=2) + "\n")
    atomic_write_text(args.out / "data.md", render_markdown(record))
    print(json.dumps(record, indent=2))


def previous_record(out: Path, setup: dict) -> dict | None:
    """The ``data.json`` already in ``out`` if it was measured with the same ``setup``."""
    path = out / "data.json"
    if not path.exists():
        return None
    previous = json.loads(path.read_text())
    return previous if previous.get("setup") == setup else None


def render_markdown(record: dict) -> str:
    """``data.md``: the figures of ``record`` (``data.json``) with each one's load average."""
    speeds, ratios = record["tokens_per_sec"], record["fraction_of_forward"]
    machine, setup = record["machine"], record["setup"]
    loads = machine["load_average_1min_start_end"]
    every_load = [load for pair in loads.values() for load in pair]
    lines = [
        f"Tokens per second, {setup['measured_tokens']} tokens per measurement, mixing buffers "
        f"of {setup['buffer_tokens']}, {machine['torch_threads']} torch threads; 1-min load "
        f"average {min(every_load):.2f}–{max(every_load):.2f} (each figure's start–end beside "
        "it). Fits: whole fit (the whole `Trainer.fit` call, buffer fills included) and first to "
        "last batch, as a fraction of the matching model forward (the mean of the forward-only "
        "figures right before and after the fit), and the whole fit as a fraction of the "
        "model's own speed inside that fit.",
        "",
        "| path | tokens/s | × forward | load |",
        "| --- | ---: | ---: | ---: |",
    ]

    def load_of(name: str) -> str:
        start, end = loads[name]
        return f"{start:.2f}–{end:.2f}"

    for name, value in speeds.items():
        if name.startswith("model_forward"):
            for when in ("before", "after"):
                load = load_of(f"{name}_{when}")
                lines.append(f"| `{name}` {when} the fit | {value[when]:,.0f} | | {load} |")
        elif isinstance(value, dict):
            for window, speed in value.items():
                ratio = ratios.get(f"{name}_{window}", "")
                if window == "in_fit_forward":
                    window = "model forward inside the fit"
                    ratio = f"whole fit: {ratios[f'{name}_whole_fit_vs_in_fit_forward']}"
                lines.append(f"| `{name}` {window} | {speed:,.0f} | {ratio} | {load_of(name)} |")
        else:
            lines.append(f"| `{name}` | {value:,.0f} | | {load_of(name)} |")
    lines += [
        "",
        "Where a fit's seconds go (model forward inside the fit, training steps, the rest; the "
        "first and the median step):",
        "",
        "| fit | whole fit s | model forward s | SAE steps s | other s | first step s "
        "| median step s | load |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, seconds in record["fit_seconds"].items():
        cells = " | ".join(str(value) for value in seconds.values())
        lines.append(f"| `{name}` | {cells} | {load_of(name)} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
