"""One training step per architecture: sae-lens's training class against ours, in one process.

For each architecture and ``d_sae``: the unit (one encoder product ``[B, d_in] @ [d_in, d_sae]``
with its bias, what any exact step must compute), sae-lens's step (its ``TrainingSAE``'s
``training_forward_pass`` + backward + its trainer's default ``Adam``) and ours (our training
class from ``lightning_sae.saes.TRAINING_CLASSES`` + ``Adam(fused=True)``), on the same weights
and batch. Times are the best of ``--repeats`` rounds taken in turn (unit, sae-lens, ours), so a
busy machine slows all three alike; quote the ratios, with the load average recorded beside them.
Peak memory is the step's high-water mark above the memory held before it, less one set of
gradients, in copies of one ``[B, d_sae]`` float32 tensor (CPU: process RSS; CUDA: allocator).

Ours is the training class our module for the architecture trains (``SAEModule.sae_classes``:
``jumprelu`` is ``AdaptiveJumpReLUTrainingSAE`` at its sae-lens defaults). Rows: ``topk``,
``batchtopk``, ``matryoshka_batchtopk`` (widths d/8, d/4, d/2, d) without and with AuxK
(``--dead-fraction`` of the latents dead); ``standard`` and ``gated`` with biases set for a
trained-like ``L0 ≈ k`` and at initialisation (half the latents active); ``jumprelu`` with its
thresholds set for ``L0 ≈ k`` and at initialisation (sae-lens's initial threshold). Also Adam's
step over the TopK parameters (default for-loop, ``foreach=True``, ``fused=True``) and, for
``standard``/``gated``/``jumprelu``, our step with the sparse path forced on and off by density
(the crossover behind their density limits). Last, ``MultiSAEModule`` over 4 hooks
(``--multi-architecture`` SAEs, one batch per hook) in a real ``Trainer.fit``: a step's wall time
(training step, backward, Adam, Lightning's loop and logging) in units of 4 encoder products.

    python benchmarks/bench_step.py                  # d_in 512, batch 4096, k 32, d_sae 8192 32768
    python benchmarks/bench_step.py --device cuda
    python benchmarks/bench_step.py --quick          # tiny sizes, seconds (smoke test)
    python benchmarks/bench_step.py --threads 1      # steadier on a shared, busy machine
    python benchmarks/bench_step.py --threads 1 --architectures jumprelu topk  # those rows only

Writes ``benchmarks/results/step.json`` and ``step.md`` (``--out`` to change the folder),
atomically. Rows, Adam and crossover figures of a run replace those of the same architecture,
case and ``d_sae`` already there; the others stay (each row keeps its own load averages), unless
the sizes (``--d-in``, ``--batch``, ``--k``, ...) differ from the file's: then it starts afresh.
"""

import argparse
import ctypes
import gc
import json
import os
import platform
import time
from collections.abc import Callable
from operator import itemgetter
from pathlib import Path

import lightning as L
import sae_lens
import torch
from lightning.pytorch.callbacks import Callback
from sae_lens.registry import get_sae_training_class
from sae_lens.saes.sae import TrainingSAE, TrainStepInput

from lightning_sae import MultiSAEModule
from lightning_sae.io import atomic_write_text
from lightning_sae.registry import get_module_class

RESULTS = Path(__file__).parent / "results"
TOPK_FAMILY = ("topk", "batchtopk", "matryoshka_batchtopk")
ARCHITECTURES = ("standard", "jumprelu", "gated", *TOPK_FAMILY)
#: Settings that make figures comparable: a run merges into a result file only if they match.
SIZES = ("device", "d_in", "batch", "k", "dead_fraction", "repeats", "threads")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--d-in", type=int, default=512)
    parser.add_argument("--d-sae", type=int, nargs="+", default=[8192, 32768])
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--dead-fraction", type=float, default=0.25)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--architectures", nargs="+", default=list(ARCHITECTURES), choices=ARCHITECTURES,
        help="rows to measure (the others already in the result files stay)",
    )  # fmt: skip
    parser.add_argument("--multi-architecture", default="topk", help="MultiSAEModule row's SAEs")
    parser.add_argument("--hooks", type=int, default=4, help="MultiSAEModule row's hooks")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, one repeat")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.d_in, args.d_sae, args.batch, args.k, args.repeats = 32, [256], 128, 4, 1
    return args


class Clock:
    """Wall time of a callable on the benchmark's device (CUDA: synchronised)."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def __call__(self, fn: Callable[[], object]) -> float:
        if self.cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - start


def _rss_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def peak_extra_bytes(fn: Callable[[], object], device: torch.device) -> int | None:
    """High-water mark of memory during ``fn`` above the memory held before it."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        before = _rss_bytes("VmRSS:")
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    except OSError:
        return None
    fn()
    return _rss_bytes("VmHWM:") - before


def ours_classes(architecture: str) -> tuple[type[TrainingSAE], type]:
    """The training SAE class (and its config class) our module for ``architecture`` trains."""
    return get_module_class(architecture).sae_classes()


def build_config(architecture: str, args: argparse.Namespace, d_sae: int, config_class=None):
    """sae-lens's training config of ``architecture`` (or ``config_class``, ours) for a row."""
    config_class = config_class or get_sae_training_class(architecture)[1]
    options: dict[str, object] = {"d_in": args.d_in, "d_sae": d_sae, "device": args.device}
    if architecture in TOPK_FAMILY:
        options["k"] = args.k
    if architecture == "matryoshka_batchtopk":
        options["matryoshka_widths"] = [d_sae // 8, d_sae // 4, d_sae // 2, d_sae]
    return config_class(**options)


@torch.no_grad()
def set_density(sae: TrainingSAE, x: torch.Tensor, active: float) -> None:
    """Make a fraction ``active`` of the latents fire on ``x``.

    Shifts the (gate) encoder bias; JumpReLU: sets every threshold to that quantile instead.
    """
    bias = sae.b_gate if hasattr(sae, "b_gate") else sae.b_enc
    pre = (x - sae.b_dec) @ sae.W_enc + bias
    sample = pre.flatten()[torch.randint(pre.numel(), (1_000_000,), device=pre.device)]
    quantile = torch.quantile(sample, 1.0 - active)
    if hasattr(sae, "threshold"):
        sae.threshold.fill_(quantile.clamp_min(0.0))
    else:
        bias -= quantile


def step_input_for(x: torch.Tensor, dead: torch.Tensor | None = None) -> TrainStepInput:
    """A training step's input: penalty coefficients 1 (``l1``, JumpReLU's ``l0``)."""
    return TrainStepInput(
        sae_in=x,
        coefficients={"l1": 1.0, "l0": 1.0},
        dead_neuron_mask=dead,
        n_training_steps=0,
        is_logging_step=False,
    )


def make_step(
    sae: TrainingSAE, optimizer: torch.optim.Optimizer, step_input: TrainStepInput
) -> Callable[[], None]:
    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        # Like Lightning: the step's outputs are gone (metrics taken) before the backward pass.
        loss = sae.training_forward_pass(step_input).loss
        loss.backward()
        optimizer.step()

    return step


def measure_row(
    architecture: str, label: str, args: argparse.Namespace, d_sae: int, active: float | None
) -> dict:
    device = torch.device(args.device)
    torch.manual_seed(0)
    sae_lens_class, _ = get_sae_training_class(architecture)
    theirs = sae_lens_class(build_config(architecture, args, d_sae))
    x = torch.randn(args.batch, args.d_in, device=device)
    if active is not None:
        set_density(theirs, x, active)
    ours_class, ours_config = ours_classes(architecture)
    ours = ours_class(build_config(architecture, args, d_sae, ours_config)).to(device)
    ours.load_state_dict(theirs.state_dict())
    dead = None
    if label.endswith("AuxK"):
        dead = torch.rand(d_sae, device=device) < args.dead_fraction
    step_input = step_input_for(x, dead)
    lr = 1e-6  # the weights (and so the density) barely move over the timed steps
    steps = {
        "sae_lens": make_step(theirs, torch.optim.Adam(theirs.parameters(), lr=lr), step_input),
        "ours": make_step(ours, torch.optim.Adam(ours.parameters(), lr=lr, fused=True), step_input),
    }

    def unit() -> None:
        torch.addmm(ours.b_enc if hasattr(ours, "b_enc") else ours.b_gate, x, ours.W_enc)

    clock = Clock(device)
    for fn in (unit, *steps.values()):  # warm-up: Adam state, first-call costs
        fn()
    times: dict[str, list[float]] = {"unit": [], "sae_lens": [], "ours": []}
    loads = [os.getloadavg()[0]]
    for _ in range(args.repeats):
        times["unit"].append(clock(unit))
        for name, fn in steps.items():
            times[name].append(clock(fn))
        loads.append(os.getloadavg()[0])
    copy_bytes = args.batch * d_sae * 4
    grad_bytes = sum(p.numel() * p.element_size() for p in ours.parameters())
    best = {name: min(values) for name, values in times.items()}
    row = {
        "architecture": architecture,
        "case": label,
        "d_sae": d_sae,
        "unit_ms": round(best["unit"] * 1e3, 2),
        "sae_lens_x": round(best["sae_lens"] / best["unit"], 2),
        "ours_x": round(best["ours"] / best["unit"], 2),
        "speed_up": round(best["sae_lens"] / best["ours"], 2),
        "load_1min": [round(load, 2) for load in loads],
    }
    for name, fn in steps.items():
        for sae in (theirs, ours):  # the step allocates its gradients: none held before it
            for parameter in sae.parameters():
                parameter.grad = None
        peak = peak_extra_bytes(fn, device)
        row[f"{name}_peak_copies"] = (
            None if peak is None else round((peak - grad_bytes) / copy_bytes, 2)
        )
    with torch.no_grad():
        output = ours.training_forward_pass(step_input)
        acts = output.feature_acts
        nonzero = (
            (acts.values() != 0).sum() if acts.layout == torch.sparse_csr else (acts != 0).sum()
        )
        row["l0"] = round(float(nonzero) / args.batch, 1)
    return row


def measure_adam(args: argparse.Namespace, d_sae: int) -> dict:
    """One Adam step over TopK-sized parameters, in units of the encoder product."""
    device = torch.device(args.device)
    shapes = [(args.d_in, d_sae), (d_sae, args.d_in), (d_sae,), (args.d_in,)]
    clock = Clock(device)
    x = torch.randn(args.batch, args.d_in, device=device)
    W_enc = torch.randn(args.d_in, d_sae, device=device)
    variants = {"default": {}, "foreach": {"foreach": True}, "fused": {"fused": True}}
    optimizers = {}
    for name, options in variants.items():
        params = [torch.nn.Parameter(torch.randn(shape, device=device)) for shape in shapes]
        for param in params:
            param.grad = torch.randn_like(param)
        optimizers[name] = torch.optim.Adam(params, lr=1e-6, **options)
        optimizers[name].step()
    times: dict[str, list[float]] = {name: [] for name in ("unit", *variants)}
    loads = [os.getloadavg()[0]]
    for _ in range(max(args.repeats, 3)):
        times["unit"].append(clock(lambda: x @ W_enc))
        for name, optimizer in optimizers.items():
            times[name].append(clock(optimizer.step))
        loads.append(os.getloadavg()[0])
    unit = min(times["unit"])
    ratios = {name: round(min(times[name]) / unit, 3) for name in variants}
    return {"d_sae": d_sae, **ratios, "load_1min": [round(load, 2) for load in loads]}


CROSSOVER = ("standard", "gated", "jumprelu")
#: Densities of the crossover rows; JumpReLU's (~0.17 of its band) needs a row past it.
CROSSOVER_DENSITIES = {"jumprelu": (0.02, 0.05, 0.1, 0.2, 0.3)}


def measure_crossover(architecture: str, args: argparse.Namespace, d_sae: int) -> list[dict]:
    """Our step with the sparse path forced on and off, over densities (sets the class limit)."""
    device = torch.device(args.device)
    torch.manual_seed(0)
    sae_class, config_class = ours_classes(architecture)
    sae = sae_class(build_config(architecture, args, d_sae, config_class)).to(device)
    x = torch.randn(args.batch, args.d_in, device=device)
    step = make_step(
        sae, torch.optim.Adam(sae.parameters(), lr=1e-6, fused=True), step_input_for(x)
    )
    bias = sae.b_gate if architecture == "gated" else sae.b_enc
    clock = Clock(device)
    rows = []
    for density in CROSSOVER_DENSITIES.get(architecture, (0.02, 0.05, 0.1, 0.2)):
        set_density(sae, x, density)
        if architecture == "jumprelu":  # its limit is on the band π > θ − ε: that fraction
            with torch.no_grad():
                sae.threshold.add_(sae.bandwidth)
        times: dict[str, list[float]] = {"unit": [], "sparse": [], "dense": []}
        loads = [os.getloadavg()[0]]
        for _ in range(args.repeats):
            times["unit"].append(clock(lambda: torch.addmm(bias, x, sae.W_enc)))
            for name, limit in (("sparse", 1.0), ("dense", 0.0)):
                sae.sparse_density_limit = limit  # type: ignore[attr-defined]
                step()  # warm-up of this path
                times[name].append(clock(step))
            loads.append(os.getloadavg()[0])
        unit = min(times["unit"])
        rows.append(
            {
                "architecture": architecture,
                "d_sae": d_sae,
                "density": density,
                "sparse_x": round(min(times["sparse"]) / unit, 2),
                "dense_x": round(min(times["dense"]) / unit, 2),
                "load_1min": [round(load, 2) for load in loads],
            }
        )
    return rows


class StepTimes(Callback):
    """Wall time of each training batch inside ``Trainer.fit``, then of ``unit`` (interleaved).

    A batch's time covers the training step, backward, Adam and Lightning's own work around them.
    """

    def __init__(self, unit: Callable[[], object], clock: Clock) -> None:
        self.unit, self.clock = unit, clock
        self.times: dict[str, list[float]] = {"step": [], "unit": []}
        self.loads: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.times["step"].append(time.perf_counter() - self.start)
        self.times["unit"].append(self.clock(self.unit))
        self.loads.append(os.getloadavg()[0])


def measure_multi(args: argparse.Namespace, d_sae: int) -> dict:
    """``MultiSAEModule`` over ``--hooks`` hooks in ``Trainer.fit``, per step, vs the products."""
    device = torch.device(args.device)
    torch.manual_seed(0)
    hooks = [f"blocks.{index}.hook_resid_post" for index in range(args.hooks)]
    options = {"k": args.k} if args.multi_architecture in TOPK_FAMILY else {}
    module = MultiSAEModule(args.multi_architecture, hooks, d_in=args.d_in, d_sae=d_sae, **options)
    batch = {hook: torch.randn(args.batch, args.d_in, device=device) for hook in hooks}
    steps = args.repeats + 1  # the first step pays Adam's state and the normaliser's estimate
    loader = torch.utils.data.DataLoader([batch] * steps, batch_size=None)

    def units() -> None:  # one encoder product per hook
        for (_, unit), x in zip(module._units(), batch.values(), strict=True):
            torch.addmm(unit.sae.b_enc, x, unit.sae.W_enc)

    timer = StepTimes(units, Clock(device))
    trainer = L.Trainer(
        accelerator=device.type, devices=1, max_steps=steps, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        callbacks=[timer],
    )  # fmt: skip
    trainer.fit(module, train_dataloaders=loader)
    step, unit = (min(timer.times[name][1:]) for name in ("step", "unit"))
    return {
        "architecture": args.multi_architecture,
        "case": f"MultiSAEModule, {args.hooks} hooks",
        "d_sae": d_sae,
        "unit_ms": round(unit / args.hooks * 1e3, 2),
        "sae_lens_x": None,
        "ours_x": round(step / unit, 2),
        "speed_up": None,
        "load_1min": [round(load, 2) for load in timer.loads],
        "sae_lens_peak_copies": None,
        "ours_peak_copies": None,
        "l0": None,
    }


def load_range(row: dict) -> str:
    """A row's 1-minute load average range ("–" for rows written before loads were kept)."""
    loads = row.get("load_1min")
    return f"{min(loads)}–{max(loads)}" if loads else "–"


def render_markdown(result: dict) -> str:
    """The result as the markdown of ``step.md``."""
    c = result["config"]
    lines = [
        f"Training step, in units of one encoder product (`[{c['batch']}, {c['d_in']}] @ "
        f"[{c['d_in']}, d_sae]`), best of {c['repeats']}; device `{c['device']}` "
        f"({result['machine']}); torch {result['torch']}, sae-lens {result['sae_lens']}; "
        f"1-min load average {result['load_1min']['min']}–{result['load_1min']['max']} "
        f"(load: each row's range; rows may come from separate runs).",
        "Peak: the step's memory high-water mark above what it held before, less one set of "
        f"gradients, in copies of one `[B, d_sae]` float32 tensor. AuxK: "
        f"{c['dead_fraction']:.0%} of the latents dead. L0: ours, active latents per token. "
        f"MultiSAEModule: one `Trainer.fit` step over {c['hooks']} hooks, in units of "
        f"{c['hooks']} encoder products (unit ms: one).",
        "",
        "| architecture | case | d_sae | L0 | unit ms | sae-lens | ours | speed-up "
        "| sae-lens peak | ours peak | load |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]

    def cell(value: object, unit: str = "") -> str:
        return "–" if value is None else f"{value}{unit}"

    for row in result["rows"]:
        lines.append(
            f"| {row['architecture']} | {row['case']} | {row['d_sae']} | {cell(row['l0'])} "
            f"| {row['unit_ms']} | {cell(row['sae_lens_x'], '×')} | {row['ours_x']}× "
            f"| {cell(row['speed_up'], '×')} | {cell(row['sae_lens_peak_copies'])} "
            f"| {cell(row['ours_peak_copies'])} "
            f"| {load_range(row)} |"
        )
    lines += [
        "",
        "Adam step over TopK parameters, in units of the encoder product:",
        "",
        "| d_sae | default | foreach | fused | load |",
        "|---:|---:|---:|---:|---:|",
    ]
    for row in result["adam"]:
        lines.append(
            f"| {row['d_sae']} | {row['default']} | {row['foreach']} | {row['fused']} "
            f"| {load_range(row)} |"
        )
    lines += [
        "",
        "Ours with the sparse path forced on/off, by active fraction (JumpReLU: the fraction of "
        "entries in its threshold band, π > θ − ε):",
        "",
        "| architecture | d_sae | density | sparse | dense | load |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for row in result["crossover"]:
        lines.append(
            f"| {row['architecture']} | {row['d_sae']} | {row['density']} | {row['sparse_x']}× "
            f"| {row['dense_x']}× | {load_range(row)} |"
        )
    return "\n".join(lines) + "\n"


def cases(architecture: str, args: argparse.Namespace) -> list[tuple[str, float | None]]:
    """Row labels and active fractions (None: as built; ``L0≈k`` is set in ``main``)."""
    if architecture in TOPK_FAMILY:
        return [("no dead", None), ("AuxK", None)]
    if architecture == "jumprelu":  # init: sae-lens's initial threshold (about half fire)
        return [("L0≈k", None), ("init", None)]
    return [("L0≈k", None), ("init", 0.5)]


def merge(new: list[dict], old: list[dict], key: Callable[[dict], tuple]) -> list[dict]:
    """``old`` with each entry replaced by ``new``'s of the same ``key``, then ``new``'s others."""
    fresh = {key(entry): entry for entry in new}
    merged = [fresh.pop(key(entry), entry) for entry in old]
    return merged + list(fresh.values())


def row_order(row: dict) -> tuple[int, bool]:
    """Rows by ``d_sae``, the MultiSAEModule row last (a stable sort keeps the rest in order)."""
    return row["d_sae"], row["case"].startswith("MultiSAEModule")


def previous_result(args: argparse.Namespace) -> dict | None:
    """The result file already in ``--out`` if its sizes match this run's, else None."""
    path = args.out / "step.json"
    if not path.exists():
        return None
    old = json.loads(path.read_text())
    if any(old["config"].get(name) != getattr(args, name) for name in SIZES):
        print(f"{path}: other sizes ({', '.join(SIZES)}); writing this run's rows only")
        return None
    for row in old["crossover"]:  # files before the d_sae field: measured at the first d_sae
        row.setdefault("d_sae", old["config"]["d_sae"][0])
    return old


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    rows = []
    for d_sae in args.d_sae:
        for architecture in args.architectures:
            for label, active in cases(architecture, args):
                if label == "L0≈k":
                    active = args.k / d_sae
                rows.append(measure_row(architecture, label, args, d_sae, active))
                print(json.dumps(rows[-1]), flush=True)
        rows.append(measure_multi(args, d_sae))
        print(json.dumps(rows[-1]), flush=True)
    adam = [measure_adam(args, d_sae) for d_sae in args.d_sae]
    crossover = [
        row
        for architecture in CROSSOVER
        if architecture in args.architectures
        for row in measure_crossover(architecture, args, args.d_sae[0])
    ]
    old = previous_result(args) or {"rows": [], "adam": [], "crossover": []}
    rows = sorted(
        merge(rows, old["rows"], itemgetter("architecture", "case", "d_sae")), key=row_order
    )
    adam = sorted(merge(adam, old["adam"], itemgetter("d_sae")), key=itemgetter("d_sae"))
    crossover = merge(crossover, old["crossover"], itemgetter("architecture", "d_sae", "density"))
    loads = [load for row in rows for load in row["load_1min"]]
    config = {
        key: str(value) if isinstance(value, Path) else value for key, value in vars(args).items()
    }
    config["d_sae"] = sorted({row["d_sae"] for row in rows})
    config["architectures"] = [
        name for name in ARCHITECTURES if any(row["architecture"] == name for row in rows)
    ]
    result = {
        "config": config,
        "machine": (
            f"{platform.machine()}, {torch.get_num_threads()} torch threads, {os.cpu_count()} CPUs"
        ),
        "torch": torch.__version__,
        "sae_lens": sae_lens.__version__,
        "load_1min": {"min": min(loads), "max": max(loads)},
        "rows": rows,
        "adam": adam,
        "crossover": crossover,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out / "step.json", json.dumps(result, indent=2) + "\n")
    markdown = render_markdown(result)
    atomic_write_text(args.out / "step.md", markdown)
    print(markdown)
    return result


if __name__ == "__main__":
    main()
