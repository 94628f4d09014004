"""Bad inputs across the API, the command line, the DataModule, the cache, exporter and importer.

Each :class:`Case` does one thing a user (or an adversary) might do wrong against a shared
:class:`World` of good files (an activation cache, exports, checkpoints, configs) and states what
must happen: the exception's type, words of its message that name the offending value, words
that name the fix. ``test_bad_inputs.py`` asserts them, and that no file of the world changed;
``survey.py`` runs the same table against any checkout and counts the verdicts.

Everything is tiny (a 2-layer transformer-lens model without tokenizer, 16-wide activations), so
the whole table runs in seconds. Plain functions, no pytest: the survey imports this module too.
"""

import contextlib
import io
import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from helpers import quiet_trainer
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader, TensorDataset
from transformer_lens import HookedTransformer, HookedTransformerConfig

from lightning_sae import (
    ActivationDataModule,
    BatchTopKSAE,
    JumpReLUSAE,
    MatryoshkaBatchTopKSAE,
    MultiSAEModule,
    SAELensExport,
    SAEModule,
    StandardSAE,
    TopKSAE,
    export_to_sae_lens,
    load_from_sae_lens,
)
from lightning_sae.data.store import INDEX, MANIFEST

HOOK = "blocks.0.hook_resid_post"
D_IN, D_SAE, VOCAB = 16, 32, 50


@dataclass
class World:
    """Good files every case starts from; none may change."""

    root: Path
    model: HookedTransformer
    tokens: torch.Tensor
    cache: Path
    export: Path
    topk_export: Path
    checkpoint: Path
    standard_checkpoint: Path
    bad: Path
    config: Path
    batchtopk_config: Path
    activations: torch.Tensor


class CLIExit(Exception):
    """The command line exited: its status and what it printed to stderr."""

    def __init__(self, code: Any, stderr: str) -> None:
        super().__init__(f"exit {code}\n{stderr}")
        self.code = code
        self.stderr = stderr


@dataclass
class Case:
    """One bad input and what must happen."""

    id: str
    act: Callable[[World, Path], Any]
    #: Name of the exception class (or one of its bases) that must be raised.
    error: str
    #: Substrings of the message that name the offending value.
    names: tuple[str, ...]
    #: Substring of the message that names the fix.
    fix: str


# ---------------------------------------------------------------------------------- the world
def tiny_model() -> HookedTransformer:
    cfg = HookedTransformerConfig(
        n_layers=2, d_model=D_IN, n_ctx=32, d_head=4, n_heads=4, d_mlp=32, d_vocab=VOCAB,
        act_fn="gelu", seed=0,
    )  # fmt: skip
    return HookedTransformer(cfg).eval()


def live_data(model: HookedTransformer, dataset: Any, **kwargs: Any) -> ActivationDataModule:
    options = {"hook_names": HOOK, "context_size": 16, "batch_size": 64, "prepend_bos": False}
    options |= {"holdout_documents": 8, "shuffle_buffer_tokens": 256}
    return ActivationDataModule(model=model, dataset=dataset, **options | kwargs)


def cache_data(cache: Path, **kwargs: Any) -> ActivationDataModule:
    return ActivationDataModule(cache_dir=cache, **{"batch_size": 64} | kwargs)


def fit(module: Any, tmp: Path, data: Any = None, ckpt_path: Any = None, **options: Any) -> Any:
    """Fit on ``data`` (a DataModule or tensor of activations) with a quiet CPU trainer."""
    trainer = quiet_trainer(**{"max_steps": 2, "default_root_dir": tmp} | options)
    if isinstance(data, torch.Tensor):
        trainer.fit(module, DataLoader(TensorDataset(data), batch_size=64), ckpt_path=ckpt_path)
    else:
        trainer.fit(module, datamodule=data, ckpt_path=ckpt_path)
    return trainer


def build_world(root: Path) -> World:
    """Write the good files (about a second)."""
    torch.manual_seed(0)
    model = tiny_model()
    tokens = torch.randint(0, VOCAB, (48, 40))
    cache = Path(
        live_data(model, tokens).write_cache(root / "cache", n_tokens=1024, holdout_tokens=128)
    )
    activations = torch.randn(512, D_IN)
    export = export_to_sae_lens(
        StandardSAE(D_IN, D_SAE, seed=0), root / "export", {"hook_name": HOOK}
    )
    topk = TopKSAE(D_IN, D_SAE, k=4, seed=0)
    trainer = fit(topk, root / "runs", activations)
    trainer.save_checkpoint(root / "topk.ckpt")
    topk_export = export_to_sae_lens(topk, root / "topk_export", {"hook_name": HOOK})
    standard = StandardSAE(D_IN, D_SAE, seed=0)
    fit(standard, root / "runs", activations).save_checkpoint(root / "standard.ckpt")
    shutil.rmtree(root / "runs", ignore_errors=True)
    (root / "notes.txt").write_text("not a checkpoint, not an SAE\n")
    (root / "export_link").symlink_to("export", target_is_directory=True)
    bad = root / "bad"
    _write_bad_exports(bad, export, topk_export)
    _write_bad_caches(bad, cache)
    good = (root / "topk.ckpt").read_bytes()
    (bad / "truncated.ckpt").write_bytes(good[: len(good) // 2])
    torch.save({"state_dict": {}, "where": Path("/")}, bad / "foreign.ckpt")  # a non-data object
    config, batchtopk_config = _write_configs(root, cache)
    return World(
        root, model, tokens, cache, export, topk_export, root / "topk.ckpt",
        root / "standard.ckpt", bad, config, batchtopk_config, activations,
    )  # fmt: skip


def _edit_cfg(folder: Path, edit: Callable[[dict[str, Any]], Any]) -> None:
    cfg = json.loads((folder / "cfg.json").read_text())
    edit(cfg)
    (folder / "cfg.json").write_text(json.dumps(cfg))


def _write_bad_exports(bad: Path, export: Path, topk_export: Path) -> None:
    def variant(name: str, source: Path = export) -> Path:
        return Path(shutil.copytree(source, bad / name))

    variant("no_cfg").joinpath("cfg.json").unlink()
    variant("bad_json").joinpath("cfg.json").write_text("{not json")
    variant("list_cfg").joinpath("cfg.json").write_text("[1, 2]")
    _edit_cfg(variant("no_d_sae"), lambda cfg: cfg.pop("d_sae"))
    _edit_cfg(variant("topk_no_k", topk_export), lambda cfg: cfg.pop("k"))
    _edit_cfg(variant("relu6"), lambda cfg: cfg.update(architecture="relu6"))
    _edit_cfg(variant("wide_cfg"), lambda cfg: cfg.update(d_sae=48))
    _edit_cfg(
        variant("normalising"),
        lambda cfg: cfg.update(normalize_activations="expected_average_only_in"),
    )
    variant("corrupt_weights").joinpath("sae_weights.safetensors").write_bytes(b"\x00" * 64)
    weights = load_file(export / "sae_weights.safetensors")
    weights["W_enc"][3, 5] = float("nan")
    save_file(weights, variant("nan_weights") / "sae_weights.safetensors")
    save_file({"sparsity": torch.zeros(16)}, variant("short_sparsity") / "sparsity.safetensors")
    variant("corrupt_sparsity").joinpath("sparsity.safetensors").write_bytes(b"garbage")
    params = {name: np.zeros((D_IN, D_SAE), np.float32) for name in ("W_enc",)}
    params |= {"W_dec": np.zeros((D_SAE, D_IN), np.float32), "b_enc": np.zeros(D_SAE, np.float32)}
    params |= {"b_dec": np.zeros(D_IN, np.float32)}
    np.savez(bad / "no_threshold.npz", **params)
    np.savez(bad / "pickled.npz", W_enc=np.array([{"a": 1}], dtype=object))


def _write_bad_caches(bad: Path, cache: Path) -> None:
    def variant(
        name: str, edit: Callable[[dict[str, Any]], Any] | None = None, file: str = MANIFEST
    ) -> Path:
        folder = Path(shutil.copytree(cache, bad / name))
        if edit is not None:
            content = json.loads((folder / file).read_text())
            edit(content)
            (folder / file).write_text(json.dumps(content))
        return folder

    variant("cache_no_manifest").joinpath(MANIFEST).unlink()
    variant("cache_bad_json").joinpath(MANIFEST).write_text("{")
    variant("cache_v2", lambda m: m.update(version=2))
    variant("cache_escape", lambda i: i["chunks"][0].update(filename="../../notes.txt"), INDEX)
    variant("cache_overstated", lambda m: m.update(n_tokens=999_999))
    variant("cache_no_files", lambda m: m.pop("d_in"))
    variant("cache_corrupt_shard").joinpath("chunk-0-0.bin").write_bytes(b"x" * 9)


CONFIG = """\
trainer:
  max_steps: 2
  logger: false
  enable_checkpointing: false
  enable_progress_bar: false
  enable_model_summary: false
model:
  class_path: lightning_sae.{model}
  init_args:
    d_sae: 32
    k: 4
data:
  class_path: lightning_sae.ActivationDataModule
  init_args:
    cache_dir: {cache}
    batch_size: 64
"""


def _write_configs(root: Path, cache: Path) -> tuple[Path, Path]:
    config = root / "topk.yaml"
    config.write_text(CONFIG.format(model="TopKSAE", cache=cache))
    batchtopk = root / "batchtopk.yaml"
    callbacks = "  callbacks:\n    - class_path: lightning_sae.SAELensExport\n"
    batchtopk.write_text(
        CONFIG.format(model="BatchTopKSAE", cache=cache).replace(
            "trainer:\n", f"trainer:\n{callbacks}"
        )
    )
    return config, batchtopk


# ---------------------------------------------------------------------------------- helpers
def cli(w: World, tmp: Path, *args: str, config: Path | None = None) -> None:
    """Run ``lightning-sae fit`` on the world's config; a usage error raises :class:`CLIExit`."""
    from lightning_sae.cli import main

    stderr = io.StringIO()
    command = ["fit", "--config", str(config or w.config), f"--trainer.default_root_dir={tmp}"]
    try:
        with contextlib.redirect_stderr(stderr):
            main([*command, *args])
    except SystemExit as exit_:
        raise CLIExit(exit_.code, stderr.getvalue()) from None


#: The file a config that runs code creates; its existence means the code ran.
PWNED = "PWNED"


def spec(name: str, class_path: str, **init_args: Any) -> str:
    """``--data.init_args.<name>={"class_path": ..., "init_args": ...}``."""
    value = {"class_path": class_path, "init_args": init_args}
    return f"--data.init_args.{name}={json.dumps(value)}"


def live_cli_data() -> list[str]:
    """Options that turn the world's cache config into a live one (a model and hooks)."""
    return [
        "--data.init_args.cache_dir=null",
        "--data.init_args.model=gpt2",
        f"--data.init_args.hook_names={HOOK}",
    ]


def first_batch(dm: ActivationDataModule) -> Any:
    return next(iter(dm.train_dataloader()))


def nan_module(cls: type[SAEModule] = StandardSAE, **kwargs: Any) -> SAEModule:
    module = cls(D_IN, D_SAE, seed=0, **kwargs)
    with torch.no_grad():
        module.sae.W_enc[0, 0] = float("nan")
    return module


def save_nan_checkpoint(w: World, tmp: Path) -> None:
    """Train, let the weights go NaN, then ask for a checkpoint over the good one."""
    module = TopKSAE(D_IN, D_SAE, k=4, seed=0)
    trainer = fit(module, tmp, w.activations)
    with torch.no_grad():
        module.sae.W_dec[1, 2] = float("inf")
    trainer.save_checkpoint(w.checkpoint)


def with_nan(activations: torch.Tensor, row: int) -> torch.Tensor:
    bad = activations.clone()
    bad[row, 0] = float("nan")
    return bad


def multi(**kwargs: Any) -> MultiSAEModule:
    return MultiSAEModule(
        "topk", [HOOK, "blocks.1.hook_resid_post"], d_in=D_IN, d_sae=D_SAE, k=4, **kwargs
    )


def world_hash(root: Path) -> dict[str, str]:
    """Every file under ``root`` (symlinks by target) and a digest of its bytes."""
    import hashlib

    digests = {}
    for path in sorted(root.rglob("*")):
        key = str(path.relative_to(root))
        if path.is_symlink():
            digests[key] = "-> " + os.readlink(path)
        elif path.is_file():
            digests[key] = hashlib.sha256(path.read_bytes()).hexdigest()
    return digests


# ---------------------------------------------------------------------------------- the table
def _cases() -> list[Case]:
    C = Case
    x = torch.randn(4, D_IN)
    return [
        # ---- API: module construction
        C(
            "d_in-zero",
            lambda w, t: StandardSAE(0, D_SAE),
            "ValueError",
            ("d_in", "got 0"),
            "must be a positive integer",
        ),
        C(
            "d_sae-string",
            lambda w, t: StandardSAE(D_IN, "32"),
            "ValueError",
            ("d_sae", "'32'"),
            "must be a positive integer",
        ),
        C(
            "lr-inf",
            lambda w, t: StandardSAE(D_IN, D_SAE, lr=float("inf")),
            "ValueError",
            ("lr", "inf"),
            "positive finite",
        ),
        C(
            "lr-nan",
            lambda w, t: StandardSAE(D_IN, D_SAE, lr=float("nan")),
            "ValueError",
            ("lr", "nan"),
            "positive",
        ),
        C(
            "beta-one",
            lambda w, t: StandardSAE(D_IN, D_SAE, adam_beta1=1.0),
            "ValueError",
            ("adam_beta1", "1.0"),
            "must be in [0, 1)",
        ),
        C(
            "scheduler-name",
            lambda w, t: StandardSAE(D_IN, D_SAE, lr_scheduler="linear"),
            "ValueError",
            ("'linear'",),
            "'constant' or 'cosine'",
        ),
        C(
            "warm-up-negative",
            lambda w, t: StandardSAE(D_IN, D_SAE, lr_warm_up_steps=-1),
            "ValueError",
            ("lr_warm_up_steps", "-1"),
            ">= 0",
        ),
        C(
            "dead-window-zero",
            lambda w, t: StandardSAE(D_IN, D_SAE, dead_window_tokens=0),
            "ValueError",
            ("dead_window_tokens", "0"),
            "positive integer",
        ),
        C(
            "scale-negative",
            lambda w, t: StandardSAE(D_IN, D_SAE, activation_scale=-1.0),
            "ValueError",
            ("activation_scale", "-1.0"),
            "positive finite",
        ),
        C(
            "scale-inf",
            lambda w, t: StandardSAE(D_IN, D_SAE, activation_scale=float("inf")),
            "ValueError",
            ("activation_scale", "inf"),
            "positive finite",
        ),
        C(
            "misspelt-argument",
            lambda w, t: StandardSAE(D_IN, D_SAE, l1_coeficient=1.0),
            "TypeError",
            ("l1_coeficient",),
            "help(StandardSAE)",
        ),
        C(
            "unknown-architecture",
            lambda w, t: SAEModule(architecture="relu6", d_in=D_IN, d_sae=D_SAE),
            "ValueError",
            ("'relu6'",),
            "Known architectures",
        ),
        C(
            "k-zero",
            lambda w, t: TopKSAE(D_IN, D_SAE, k=0),
            "ValueError",
            ("got 0",),
            "0 < k <= d_sae (32)",
        ),
        C(
            "k-above-d_sae",
            lambda w, t: TopKSAE(D_IN, D_SAE, k=64),
            "ValueError",
            ("got 64",),
            "0 < k <= d_sae (32)",
        ),
        C(
            "k-fraction-topk",
            lambda w, t: TopKSAE(D_IN, D_SAE, k=2.5),
            "ValueError",
            ("2.5",),
            "BatchTopKSAE takes floats",
        ),
        C(
            "jumprelu-bandwidth",
            lambda w, t: JumpReLUSAE(D_IN, D_SAE, jumprelu_bandwidth=0),
            "ValueError",
            ("jumprelu_bandwidth", "0"),
            "must be positive",
        ),
        C(
            "matryoshka-widths",
            lambda w, t: MatryoshkaBatchTopKSAE(D_IN, D_SAE, k=4, matryoshka_widths=[8, 16]),
            "ValueError",
            ("[8, 16]",),
            "must end at d_sae (32)",
        ),
        C(
            "multi-unknown-hook",
            lambda w, t: multi(per_hook={"blocks.9.hook_resid_post": {"k": 2}}),
            "ValueError",
            ("blocks.9.hook_resid_post",),
            "not in",
        ),
        C(
            "multi-duplicate-hooks",
            lambda w, t: MultiSAEModule("topk", [HOOK, HOOK], d_in=D_IN, d_sae=D_SAE),
            "ValueError",
            (HOOK,),
            "non-empty and distinct",
        ),
        # ---- API: using a module
        C(
            "forward-wrong-width",
            lambda w, t: StandardSAE(D_IN, D_SAE)(torch.randn(4, 24)),
            "ValueError",
            ("(4, 24)", "[..., 16]"),
            "pass activations of the width",
        ),
        C(
            "forward-integers",
            lambda w, t: StandardSAE(D_IN, D_SAE)(torch.ones(4, D_IN, dtype=torch.long)),
            "TypeError",
            ("torch.int64",),
            "float tensor",
        ),
        C(
            "decode-wrong-width",
            lambda w, t: StandardSAE(D_IN, D_SAE).decode(torch.randn(4, D_IN)),
            "ValueError",
            ("(4, 16)", "[..., 32]"),
            "pass latents of the width",
        ),
        C(
            "multi-forward-wrong-width",
            lambda w, t: multi()({HOOK: x, "blocks.1.hook_resid_post": torch.randn(4, 8)}),
            "ValueError",
            ("(4, 8)",),
            "pass activations of the width",
        ),
        C(
            "train-integer-batch",
            lambda w, t: fit(StandardSAE(D_IN, D_SAE), t, torch.ones(256, D_IN, dtype=torch.long)),
            "TypeError",
            ("torch.int64",),
            "float tensor",
        ),
        C(
            "train-wrong-width",
            lambda w, t: fit(StandardSAE(D_IN, D_SAE), t, torch.randn(256, 24)),
            "ValueError",
            ("(64, 24)", "[batch, 16]"),
            "set d_in",
        ),
        C(
            "train-nan-batch",
            lambda w, t: fit(
                TopKSAE(D_IN, D_SAE, k=4), t, with_nan(w.activations, 70), max_steps=4
            ),
            "FloatingPointError",
            ("global step 1", "NaN or inf"),
            "Check the activation source",
        ),
        C(
            "train-zero-first-batch",
            lambda w, t: fit(StandardSAE(D_IN, D_SAE), t, torch.zeros(256, D_IN)),
            "FloatingPointError",
            ("mean activation norm 0.0",),
            "activation_scale=<value>",
        ),
        C(
            "train-huge-activations",
            lambda w, t: fit(
                StandardSAE(D_IN, D_SAE, normalize_activations=False), t, w.activations * 1e25
            ),
            "FloatingPointError",
            ("global step 0",),
            "Lower lr",
        ),
        C(
            "train-huge-lr",
            lambda w, t: fit(TopKSAE(D_IN, D_SAE, k=4, lr=1e30), t, w.activations, max_steps=4),
            "FloatingPointError",
            ("global step 1",),
            "Lower lr",
        ),
        C(
            "cosine-without-max-steps",
            lambda w, t: fit(
                StandardSAE(D_IN, D_SAE, lr_scheduler="cosine"),
                t,
                w.activations,
                max_steps=-1,
                max_epochs=1,
            ),
            "ValueError",
            ("cosine",),
            "set Trainer(max_steps=...)",
        ),
        C(
            "warm-up-beyond-run",
            lambda w, t: fit(
                StandardSAE(D_IN, D_SAE, lr_warm_up_steps=5), t, w.activations, max_steps=2
            ),
            "ValueError",
            ("(5 + 0)", "2 steps"),
            "raise max_steps",
        ),
        C(
            "save-nan-checkpoint",
            save_nan_checkpoint,
            "FloatingPointError",
            ("W_dec",),
            "resume from an earlier checkpoint",
        ),
        C(
            "export-nan-weights-over-good",
            lambda w, t: export_to_sae_lens(nan_module(), w.export, {"hook_name": HOOK}),
            "FloatingPointError",
            ("W_enc",),
            "Lower lr",
        ),
        # ---- API: checkpoints
        C(
            "load-not-a-checkpoint",
            lambda w, t: SAEModule.load_from_checkpoint(w.root / "notes.txt"),
            "ValueError",
            ("notes.txt",),
            "Pass a .ckpt",
        ),
        C(
            "load-missing-checkpoint",
            lambda w, t: SAEModule.load_from_checkpoint(w.root / "nope.ckpt"),
            "FileNotFoundError",
            ("nope.ckpt",),
            "pass the path of a .ckpt",
        ),
        C(
            "load-folder-as-checkpoint",
            lambda w, t: SAEModule.load_from_checkpoint(w.cache),
            "FileNotFoundError",
            ("cache", "a folder"),
            "pass the path of a .ckpt",
        ),
        C(
            "load-truncated-checkpoint",
            lambda w, t: SAEModule.load_from_checkpoint(w.bad / "truncated.ckpt"),
            "ValueError",
            ("truncated.ckpt",),
            "Pass a .ckpt",
        ),
        C(
            "load-checkpoint-with-objects",
            lambda w, t: SAEModule.load_from_checkpoint(w.bad / "foreign.ckpt"),
            "ValueError",
            ("foreign.ckpt", "PosixPath"),
            "only if you trust the file, load it with weights_only=False",
        ),
        C(
            "load-as-other-class",
            lambda w, t: TopKSAE.load_from_checkpoint(w.standard_checkpoint),
            "TypeError",
            ("StandardSAE", "TopKSAE"),
            "Use StandardSAE.load_from_checkpoint",
        ),
        C(
            "resume-other-class",
            lambda w, t: fit(
                StandardSAE(D_IN, D_SAE), t, w.activations, ckpt_path=w.checkpoint, max_steps=3
            ),
            "ValueError",
            ("TopKSAE", "StandardSAE"),
            "resume it with the class that wrote it",
        ),
        C(
            "resume-other-k",
            lambda w, t: fit(
                TopKSAE(D_IN, D_SAE, k=8), t, w.activations, ckpt_path=w.checkpoint, max_steps=3
            ),
            "ValueError",
            ("'k': (4, 8)",),
            "Resume with the checkpoint's settings",
        ),
        C(
            "resume-not-a-checkpoint",
            lambda w, t: fit(
                StandardSAE(D_IN, D_SAE), t, w.activations, ckpt_path=w.root / "notes.txt"
            ),
            "ValueError",
            ("notes.txt",),
            "Pass a .ckpt",
        ),
        C(
            "resume-truncated",
            lambda w, t: fit(
                TopKSAE(D_IN, D_SAE, k=4), t, w.activations, ckpt_path=w.bad / "truncated.ckpt"
            ),
            "ValueError",
            ("truncated.ckpt",),
            "Pass a .ckpt",
        ),
        # ---- exporter
        C(
            "export-to-a-file",
            lambda w, t: export_to_sae_lens(StandardSAE(D_IN, D_SAE), w.root / "notes.txt"),
            "FileExistsError",
            ("notes.txt", "is a file"),
            "give a folder path",
        ),
        C(
            "export-over-other-files",
            lambda w, t: export_to_sae_lens(StandardSAE(D_IN, D_SAE), w.cache),
            "FileExistsError",
            ("chunk-0-0.bin",),
            "overwrite=True",
        ),
        C(
            "export-to-a-symlink",
            lambda w, t: export_to_sae_lens(StandardSAE(D_IN, D_SAE), w.root / "export_link"),
            "FileExistsError",
            ("export_link", "symlink"),
            "export to the folder it points to",
        ),
        C(
            "export-unknown-metadata",
            lambda w, t: export_to_sae_lens(StandardSAE(D_IN, D_SAE), t / "e", {"hookname": HOOK}),
            "ValueError",
            ("'hookname'",),
            "Valid keys",
        ),
        C(
            "export-metadata-not-json",
            lambda w, t: export_to_sae_lens(
                StandardSAE(D_IN, D_SAE), t / "e", {"hook_name": object()}
            ),
            "ValueError",
            ("object",),
            "JSON values only",
        ),
        C(
            "export-batchtopk-uncalibrated",
            lambda w, t: export_to_sae_lens(BatchTopKSAE(D_IN, D_SAE, k=4), t / "e"),
            "ValueError",
            ("BatchTopK",),
            "calibration_activations=",
        ),
        C(
            "export-calibration-wrong-width",
            lambda w, t: export_to_sae_lens(
                BatchTopKSAE(D_IN, D_SAE, k=4), t / "e", calibration_activations=torch.randn(64, 8)
            ),
            "ValueError",
            ("(64, 8)",),
            "[n, 16] (d_in)",
        ),
        C(
            "export-calibration-nan",
            lambda w, t: export_to_sae_lens(
                BatchTopKSAE(D_IN, D_SAE, k=4),
                t / "e",
                calibration_activations=with_nan(w.activations, 3),
            ),
            "ValueError",
            ("NaN",),
            "finite held-out activations",
        ),
        C(
            "export-calibration-empty",
            lambda w, t: export_to_sae_lens(
                BatchTopKSAE(D_IN, D_SAE, k=4),
                t / "e",
                calibration_activations=torch.empty(0, D_IN),
            ),
            "ValueError",
            ("0 calibration tokens",),
            "give at least 1/k tokens",
        ),
        C(
            "export-multi-without-hook",
            lambda w, t: export_to_sae_lens(multi(), t / "e"),
            "ValueError",
            ("MultiSAEModule",),
            "pass hook_name=<one of",
        ),
        C(
            "export-multi-unknown-hook",
            lambda w, t: export_to_sae_lens(multi(), t / "e", hook_name="blocks.7.hook_z"),
            "KeyError",
            ("blocks.7.hook_z",),
            "hooks: [",
        ),
        C(
            "export-callback-every-zero",
            lambda w, t: SAELensExport(t, every_n_steps=0),
            "ValueError",
            ("every_n_steps", "0"),
            "positive",
        ),
        C(
            "export-callback-too-few-holdout",
            lambda w, t: fit(
                BatchTopKSAE(D_IN, D_SAE, k=4),
                t,
                cache_data(w.cache),
                callbacks=[SAELensExport(t / "e")],
            ),
            "ValueError",
            ("16384",),
            "lower it",
        ),
        # ---- importer
        C(
            "import-missing",
            lambda w, t: load_from_sae_lens(w.root / "nothing"),
            "FileNotFoundError",
            ("nothing",),
            "No sae-lens SAE at",
        ),
        C(
            "import-a-file",
            lambda w, t: load_from_sae_lens(w.root / "notes.txt"),
            "ValueError",
            ("notes.txt", "is a file"),
            "give the sae-lens folder",
        ),
        C(
            "import-no-cfg",
            lambda w, t: load_from_sae_lens(w.bad / "no_cfg"),
            "FileNotFoundError",
            ("no_cfg/cfg.json",),
            "is missing",
        ),
        C(
            "import-bad-json",
            lambda w, t: load_from_sae_lens(w.bad / "bad_json"),
            "ValueError",
            ("bad_json/cfg.json", "not valid JSON"),
            "not valid JSON",
        ),
        C(
            "import-cfg-not-object",
            lambda w, t: load_from_sae_lens(w.bad / "list_cfg"),
            "ValueError",
            ("list_cfg/cfg.json", "list"),
            "must hold a JSON object",
        ),
        C(
            "import-cfg-without-d_sae",
            lambda w, t: load_from_sae_lens(w.bad / "no_d_sae"),
            "ValueError",
            ("no_d_sae/cfg.json", "['d_sae']"),
            "export the SAE again",
        ),
        C(
            "import-topk-without-k",
            lambda w, t: load_from_sae_lens(w.bad / "topk_no_k"),
            "ValueError",
            ("topk_no_k/cfg.json", "['k']"),
            "export the SAE again",
        ),
        C(
            "import-unknown-architecture",
            lambda w, t: load_from_sae_lens(w.bad / "relu6"),
            "ValueError",
            ("'relu6'",),
            "Supported:",
        ),
        C(
            "import-cfg-weights-disagree",
            lambda w, t: load_from_sae_lens(w.bad / "wide_cfg"),
            "ValueError",
            ("wide_cfg",),
            "do not match",
        ),
        C(
            "import-normalising-sae",
            lambda w, t: load_from_sae_lens(w.bad / "normalising"),
            "ValueError",
            ("expected_average_only_in",),
            "only folded SAEs",
        ),
        C(
            "import-corrupt-weights",
            lambda w, t: load_from_sae_lens(w.bad / "corrupt_weights"),
            "ValueError",
            ("corrupt_weights/sae_weights.safetensors",),
            "export or download it again",
        ),
        C(
            "import-nan-weights",
            lambda w, t: load_from_sae_lens(w.bad / "nan_weights"),
            "ValueError",
            ("nan_weights", "['W_enc']"),
            "export it again",
        ),
        C(
            "import-short-sparsity",
            lambda w, t: load_from_sae_lens(w.bad / "short_sparsity"),
            "ValueError",
            ("sparsity.safetensors", "(16,)"),
            "delete it or export",
        ),
        C(
            "import-corrupt-sparsity",
            lambda w, t: load_from_sae_lens(w.bad / "corrupt_sparsity"),
            "ValueError",
            ("corrupt_sparsity/sparsity.safetensors",),
            "delete it or export",
        ),
        C(
            "import-d_sae-override",
            lambda w, t: load_from_sae_lens(w.export, d_sae=64),
            "ValueError",
            ("d_sae=32", "d_sae=64"),
            "drop the argument",
        ),
        C(
            "import-pickled-npz",
            lambda w, t: load_from_sae_lens(w.bad / "pickled.npz"),
            "ValueError",
            ("pickled.npz",),
            "Gemma Scope params.npz with arrays",
        ),
        C(
            "import-npz-without-threshold",
            lambda w, t: load_from_sae_lens(w.bad / "no_threshold.npz"),
            "ValueError",
            ("no_threshold.npz", "threshold"),
            "Gemma Scope params.npz with arrays",
        ),
        # ---- activation cache
        C(
            "cache-missing",
            lambda w, t: cache_data(w.root / "no_cache"),
            "FileNotFoundError",
            ("no_cache",),
            "write_cache(path, n_tokens)",
        ),
        C(
            "cache-without-manifest",
            lambda w, t: cache_data(w.bad / "cache_no_manifest"),
            "FileNotFoundError",
            ("cache_no_manifest", "lightning_sae.json"),
            "write_cache(path, n_tokens)",
        ),
        C(
            "cache-manifest-not-json",
            lambda w, t: cache_data(w.bad / "cache_bad_json"),
            "ValueError",
            ("cache_bad_json/lightning_sae.json", "not valid JSON"),
            "rewrite it",
        ),
        C(
            "cache-other-version",
            lambda w, t: cache_data(w.bad / "cache_v2"),
            "ValueError",
            ("version=2",),
            "rewrite the store",
        ),
        C(
            "cache-manifest-without-files",
            lambda w, t: cache_data(w.bad / "cache_no_files"),
            "ValueError",
            ("cache_no_files/lightning_sae.json", "'d_in'"),
            "rewrite it",
        ),
        C(
            "cache-file-outside-folder",
            lambda w, t: first_batch(cache_data(w.bad / "cache_escape", shuffle=False)),
            "ValueError",
            ("'../../notes.txt'",),
            "rewrite it",
        ),
        C(
            "cache-overstated-tokens",
            lambda w, t: first_batch(cache_data(w.bad / "cache_overstated", shuffle=False)),
            "ValueError",
            ("999999",),
            "rewrite it",
        ),
        C(
            "cache-corrupt-shard",
            lambda w, t: first_batch(cache_data(w.bad / "cache_corrupt_shard", shuffle=False)),
            "ValueError",
            ("chunk-0-0.bin",),
            "rewrite the store",
        ),
        C(
            "cache-other-model",
            lambda w, t: cache_data(w.cache, model="gpt2"),
            "ValueError",
            ("'gpt2'",),
            "pass the model it was written with",
        ),
        C(
            "cache-other-hook",
            lambda w, t: cache_data(w.cache, hook_names="blocks.1.hook_resid_post"),
            "ValueError",
            ("blocks.1.hook_resid_post",),
            "Ask for those",
        ),
        C(
            "cache-and-dataset",
            lambda w, t: cache_data(w.cache, dataset=["text"]),
            "ValueError",
            ("dataset", "cache_dir"),
            "not both",
        ),
        C(
            "cache-write-over-existing",
            lambda w, t: live_data(w.model, w.tokens).write_cache(w.cache, n_tokens=256),
            "FileExistsError",
            ("cache",),
            "append=True",
        ),
        C(
            "cache-write-no-tokens",
            lambda w, t: live_data(w.model, w.tokens).write_cache(t / "c", n_tokens=0),
            "ValueError",
            ("n_tokens", "0"),
            "must be a positive integer",
        ),
        C(
            "cache-calibration-beyond-holdout",
            lambda w, t: cache_data(w.cache).sample_activations(16_384),
            "ValueError",
            ("128 tokens", "16384"),
            "larger holdout_tokens",
        ),
        # ---- DataModule (live)
        C(
            "dm-batch-size-zero",
            lambda w, t: live_data(w.model, w.tokens, batch_size=0),
            "ValueError",
            ("batch_size", "0"),
            "positive integer",
        ),
        C(
            "dm-negative-holdout",
            lambda w, t: live_data(w.model, w.tokens, holdout_documents=-1),
            "ValueError",
            ("holdout_documents", "-1"),
            ">= 0",
        ),
        C(
            "dm-no-hooks",
            lambda w, t: ActivationDataModule(model=w.model, dataset=w.tokens, prepend_bos=False),
            "ValueError",
            ("hook_names",),
            "Pass hook_names",
        ),
        C(
            "dm-no-model",
            lambda w, t: ActivationDataModule(hook_names=HOOK, dataset=w.tokens),
            "ValueError",
            ("model=",),
            "Pass model= and dataset=",
        ),
        C(
            "dm-unknown-hook",
            lambda w, t: live_data(w.model, w.tokens, hook_names="blocks.0.hook_resid_psot"),
            "ValueError",
            ("'blocks.0.hook_resid_psot'",),
            "Did you mean",
        ),
        C(
            "dm-context-above-model",
            lambda w, t: live_data(w.model, w.tokens, context_size=64),
            "ValueError",
            ("context_size=64", "32"),
            "lower context_size",
        ),
        C(
            "dm-bos-without-tokenizer",
            lambda w, t: live_data(w.model, w.tokens, prepend_bos=True),
            "ValueError",
            ("prepend_bos=True",),
            "pass prepend_bos=False",
        ),
        C(
            "dm-float-tensor-dataset",
            lambda w, t: live_data(w.model, torch.randn(4, 8)),
            "ValueError",
            ("torch.float32",),
            "integer token ids",
        ),
        C(
            "dm-dataset-of-wrong-type",
            lambda w, t: live_data(w.model, 42),
            "TypeError",
            ("int",),
            "pass a dataset name or path",
        ),
        C(
            "dm-empty-dataset",
            lambda w, t: live_data(w.model, []),
            "ValueError",
            ("empty",),
            "Pass more documents",
        ),
        C(
            "dm-missing-column",
            lambda w, t: live_data(w.model, [{"content": [1, 2]}] * 12),
            "ValueError",
            ("['content']",),
            "dataset_column=<name>",
        ),
        C(
            "dm-text-without-tokenizer",
            lambda w, t: first_batch(live_data(w.model, ["some text"] * 12)),
            "ValueError",
            ("holds text",),
            "pass tokenizer=",
        ),
        C(
            "dm-token-ids-beyond-vocabulary",
            lambda w, t: first_batch(live_data(w.model, torch.randint(0, 1000, (20, 40)))),
            "ValueError",
            ("vocabulary of 50 ids",),
            "Pass text",
        ),
        C(
            "dm-negative-token-ids",
            lambda w, t: first_batch(live_data(w.model, -torch.ones(20, 40, dtype=torch.long))),
            "ValueError",
            ("Token id -1",),
            "Pass text",
        ),
        C(
            "dm-too-little-data",
            lambda w, t: first_batch(live_data(w.model, torch.ones(12, 2, dtype=torch.long))),
            "ValueError",
            ("no complete 16-token row",),
            "more data",
        ),
        C(
            "dm-model-class-name",
            lambda w, t: live_data(w.model, w.tokens, model_class_name="GPT2"),
            "ValueError",
            ("'GPT2'",),
            "must be one of",
        ),
        C(
            "dm-model-dtype",
            lambda w, t: ActivationDataModule(
                model="gpt2", hook_names=HOOK, dataset=w.tokens, model_dtype="float99"
            ),
            "ValueError",
            ("float99",),
            "Must be one of",
        ),
        C(
            "dm-unknown-hook-for-metadata",
            lambda w, t: cache_data(w.cache).sae_metadata("blocks.5.hook_z"),
            "ValueError",
            ("'blocks.5.hook_z'",),
            "is not one of",
        ),
        C(
            "dm-fit-without-max-steps",
            lambda w, t: fit(TopKSAE(D_IN, D_SAE, k=4), t, cache_data(w.cache), max_steps=-1),
            "ValueError",
            ("max_steps=-1", "endless"),
            "Set Trainer(max_steps=N)",
        ),
        # ---- command line (a usage error: exit status 2, the message, no traceback)
        C(
            "cli-unknown-model",
            lambda w, t: cli(w, t, "--model", "NoSuchSAE"),
            "CLIExit",
            ("exit 2", "NoSuchSAE"),
            "SAE modules (--model NAME)",
        ),
        C(
            "cli-misspelt-option",
            lambda w, t: cli(w, t, "--model.init_args.kk=3"),
            "CLIExit",
            ("exit 2", "'kk'"),
            "not accepted",
        ),
        C(
            "cli-wrong-type",
            lambda w, t: cli(w, t, "--model.init_args.k=many"),
            "CLIExit",
            ("exit 2", "many"),
            "Expected a <class 'int'>",
        ),
        C(
            "cli-k-above-d_sae",
            lambda w, t: cli(w, t, "--model.init_args.k=64"),
            "CLIExit",
            ("exit 2", "got 64"),
            "0 < k <= d_sae",
        ),
        C(
            "cli-missing-cache",
            lambda w, t: cli(w, t, f"--data.init_args.cache_dir={w.root / 'no_cache'}"),
            "CLIExit",
            ("exit 2", "no_cache"),
            "write_cache(path, n_tokens)",
        ),
        C(
            "cli-ckpt-missing",
            lambda w, t: cli(w, t, f"--ckpt_path={w.root / 'nope.ckpt'}"),
            "CLIExit",
            ("exit 2", "nope.ckpt"),
            "pass the path of a .ckpt",
        ),
        C(
            "cli-ckpt-not-a-checkpoint",
            lambda w, t: cli(w, t, f"--ckpt_path={w.root / 'notes.txt'}"),
            "CLIExit",
            ("exit 2", "notes.txt"),
            "Pass a .ckpt",
        ),
        C(
            "cli-ckpt-truncated",
            lambda w, t: cli(w, t, f"--ckpt_path={w.bad / 'truncated.ckpt'}"),
            "CLIExit",
            ("exit 2", "truncated.ckpt"),
            "Pass a .ckpt",
        ),
        C(
            "cli-no-max-steps",
            lambda w, t: cli(w, t, "--trainer.max_steps=-1"),
            "CLIExit",
            ("exit 2", "max_steps=-1"),
            "--trainer.max_steps N",
        ),
        C(
            "cli-cosine-without-length",
            lambda w, t: cli(
                w,
                t,
                "--trainer.max_steps=-1",
                "--trainer.max_time=00:00:01:00",
                "--model.init_args.lr_scheduler=cosine",
            ),
            "CLIExit",
            ("exit 2", "cosine"),
            "set Trainer(max_steps=...)",
        ),
        C(
            "cli-decay-beyond-run",
            lambda w, t: cli(w, t, "--model.init_args.lr_decay_steps=5"),
            "CLIExit",
            ("exit 2", "(0 + 5)", "2 steps"),
            "raise max_steps",
        ),
        C(
            "cli-calibration-beyond-holdout",
            lambda w, t: cli(w, t, config=w.batchtopk_config),
            "CLIExit",
            ("exit 2", "16384"),
            "--trainer.callbacks.calibration_tokens",
        ),
        C(
            "cli-dataset-runs-a-command",
            lambda w, t: cli(
                w, t, *live_cli_data(), spec("dataset", "os.system", command=f"touch {t / PWNED}")
            ),
            "CLIExit",
            ("exit 2", "'os.system'"),
            "Give data as a dataset name",
        ),
        C(
            "cli-tokenizer-runs-code",
            lambda w, t: cli(
                w, t, spec("tokenizer", "builtins.exec", source=f"open({str(t / PWNED)!r}, 'w')")
            ),
            "CLIExit",
            ("exit 2", "'builtins.exec'"),
            "Give data as a dataset name",
        ),
        C(
            "cli-class-in-any-position",
            lambda w, t: cli(
                w,
                t,
                "--model=MultiSAEModule",
                "--model.init_args.architecture=topk",
                "--model.init_args.sae_options="
                + json.dumps(
                    {
                        "k": {
                            "class_path": "subprocess.Popen",
                            "init_args": {"args": ["touch", str(t / PWNED)]},
                        }
                    }
                ),
            ),
            "CLIExit",
            ("exit 2", "'subprocess.Popen'"),
            "Lightning components",
        ),
    ]


CASES = _cases()
