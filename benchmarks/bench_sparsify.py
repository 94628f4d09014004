"""EleutherAI sparsify's TopK training step beside ours, timed the way ``bench_step.py`` times.

Never a project dependency: install ``eai-sparsify`` outside the project and put it on the path,

    pip install --target /work/sparsify-pkgs --no-deps eai-sparsify natsort schedulefree
    PYTHONPATH=/work/sparsify-pkgs python benchmarks/bench_sparsify.py
    PYTHONPATH=/work/sparsify-pkgs python benchmarks/bench_sparsify.py --quick   # seconds

(sparsify's other imports — accelerate, datasets, einops, safetensors, simple-parsing,
transformers — come with the project's environment.) Without Triton sparsify decodes with
``embedding_bag``, as on any CPU.

sparsify's step is its trainer's, for one SAE and ``loss_fn="fvu"``: unit-norm the decoder,
``SparseCoder.forward`` (with ``dead_mask`` for AuxK), ``fvu + auxk_alpha·auxk_loss`` backward,
remove the gradient parallel to the decoder directions, ``Adam`` step (torch's default or
``fused=True``). Ours: ``FastTopKTrainingSAE`` + ``Adam(fused=True)``, as in ``bench_step.py``.
All on the same batch, in one process; each time is the best of ``--repeats`` rounds taken in turn,
in units of one encoder product ``[B, d_in] @ [d_in, d_sae]`` (with its bias) measured in the same
rounds, with the load average beside it. Writes ``benchmarks/results/sparsify.json`` and ``.md``.
"""

import argparse
import json
import os
import platform
from collections.abc import Callable
from pathlib import Path

import torch
from bench_step import Clock, build_config, make_step, peak_extra_bytes
from sae_lens.saes.sae import TrainStepInput

from lightning_sae.io import atomic_write_text
from lightning_sae.saes import TRAINING_CLASSES

RESULTS = Path(__file__).parent / "results"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--d-in", type=int, default=512)
    parser.add_argument("--d-sae", type=int, nargs="+", default=[8192, 32768])
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--dead-fraction", type=float, default=0.25)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, one repeat")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.d_in, args.d_sae, args.batch, args.k, args.repeats = 32, [256], 128, 4, 1
    return args


def sparsify_step(
    sae, optimizer: torch.optim.Optimizer, x: torch.Tensor, dead: torch.Tensor | None
) -> Callable[[], None]:
    """One step of sparsify's trainer (``loss_fn="fvu"``, ``auxk_alpha`` 1/32 with AuxK)."""

    def step() -> None:
        sae.set_decoder_norm_to_unit_norm()
        out = sae(x=x, y=x, dead_mask=dead)
        loss = out.fvu + (out.auxk_loss / 32 if dead is not None else 0)
        loss.backward()
        sae.remove_gradient_parallel_to_decoder_directions()
        optimizer.step()
        optimizer.zero_grad()

    return step


def measure(args: argparse.Namespace, d_sae: int, case: str) -> dict:
    from sparsify import SparseCoder, SparseCoderConfig

    device = torch.device(args.device)
    torch.manual_seed(0)
    x = torch.randn(args.batch, args.d_in, device=device)
    dead = torch.rand(d_sae, device=device) < args.dead_fraction if case == "AuxK" else None
    config = SparseCoderConfig(num_latents=d_sae, k=args.k)
    theirs = {
        name: SparseCoder(args.d_in, config, device=device)
        for name in ("sparsify Adam", "sparsify Adam fused")
    }
    ours = TRAINING_CLASSES["topk"](build_config("topk", args, d_sae)).to(device)
    step_input = TrainStepInput(
        sae_in=x,
        coefficients={},
        dead_neuron_mask=dead,
        n_training_steps=0,
        is_logging_step=False,
    )
    lr = 1e-6  # the weights barely move over the timed steps
    steps = {
        name: sparsify_step(
            sae, torch.optim.Adam(sae.parameters(), lr=lr, fused="fused" in name), x, dead
        )
        for name, sae in theirs.items()
    }
    steps["ours Adam fused"] = make_step(
        ours, torch.optim.Adam(ours.parameters(), lr=lr, fused=True), step_input
    )

    def unit() -> None:
        torch.addmm(ours.b_enc, x, ours.W_enc)

    clock = Clock(device)
    for fn in (unit, *steps.values()):  # warm-up: Adam state, first-call costs
        fn()
    times: dict[str, list[float]] = {name: [] for name in ("unit", *steps)}
    loads = [os.getloadavg()[0]]
    for _ in range(args.repeats):
        times["unit"].append(clock(unit))
        for name, fn in steps.items():
            times[name].append(clock(fn))
        loads.append(os.getloadavg()[0])
    unit_time = min(times["unit"])
    copy_bytes = args.batch * d_sae * 4
    grad_bytes = sum(p.numel() * p.element_size() for p in ours.parameters())
    row = {
        "case": case,
        "d_sae": d_sae,
        "unit_ms": round(unit_time * 1e3, 2),
        **{f"{name}_x": round(min(times[name]) / unit_time, 2) for name in steps},
        "load_1min": [round(load, 2) for load in loads],
    }
    for name, fn in steps.items():
        for sae in (*theirs.values(), ours):  # the step allocates its gradients
            for parameter in sae.parameters():
                parameter.grad = None
        peak = peak_extra_bytes(fn, device)
        row[f"{name}_peak"] = None if peak is None else round((peak - grad_bytes) / copy_bytes, 2)
    return row


STEPS = ("sparsify Adam", "sparsify Adam fused", "ours Adam fused")


def write_markdown(result: dict, path: Path) -> None:
    c = result["config"]
    load = result["load_1min"]
    lines = [
        f"TopK training step (d_in {c['d_in']}, batch {c['batch']}, k {c['k']}), in units of one "
        f"encoder product measured in the same process, best of {c['repeats']}; device "
        f"`{c['device']}` ({result['machine']}); torch {result['torch']}, eai-sparsify "
        f"{result['sparsify']}; 1-min load average {load['min']}–{load['max']} "
        f"(at start {load['start']}). AuxK: {c['dead_fraction']:.0%} of the latents dead. "
        "Peak: memory high-water mark above what the step held before, less one set of "
        "gradients, in copies of one `[B, d_sae]` float32 tensor.",
        "",
        "| case | d_sae | unit ms | " + " | ".join(STEPS) + " | " + " | ".join(
            f"{name} peak" for name in STEPS
        ) + " |",
        "|---|---:|---:|" + "---:|" * (2 * len(STEPS)),
    ]  # fmt: skip
    for row in result["rows"]:
        times = " | ".join(f"{row[f'{name}_x']}×" for name in STEPS)
        peaks = " | ".join(str(row[f"{name}_peak"]) for name in STEPS)
        lines.append(f"| {row['case']} | {row['d_sae']} | {row['unit_ms']} | {times} | {peaks} |")
    atomic_write_text(path, "\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    try:
        import sparsify  # noqa: F401
    except ImportError as error:
        raise SystemExit(
            "eai-sparsify is not importable. Install it outside the project, e.g. `pip install "
            "--target /work/sparsify-pkgs --no-deps eai-sparsify natsort schedulefree`, and run "
            f"with PYTHONPATH=/work/sparsify-pkgs ({error})."
        ) from error
    from importlib.metadata import version

    start_load = os.getloadavg()[0]
    rows = []
    for d_sae in args.d_sae:
        for case in ("no dead", "AuxK"):
            rows.append(measure(args, d_sae, case))
            print(json.dumps(rows[-1]), flush=True)
    loads = [load for row in rows for load in row["load_1min"]]
    config = {
        key: str(value) if isinstance(value, Path) else value for key, value in vars(args).items()
    }
    threads = torch.get_num_threads()
    result = {
        "config": config,
        "machine": f"{platform.machine()}, {threads} torch threads, {os.cpu_count()} CPUs",
        "torch": torch.__version__,
        "sparsify": version("eai-sparsify"),
        "load_1min": {"start": round(start_load, 2), "min": min(loads), "max": max(loads)},
        "rows": rows,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out / "sparsify.json", json.dumps(result, indent=2) + "\n")
    write_markdown(result, args.out / "sparsify.md")
    print((args.out / "sparsify.md").read_text())
    return result


if __name__ == "__main__":
    main()
