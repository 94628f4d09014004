"""The ``lightning-sae`` command line, driven through ``main([...])`` with the shipped configs.

Every ``examples/*.yaml`` runs as written (SmolLM2-135M and Shakespeare, offline) with a few
overrides that only shrink the run: layer 0, 64 latents, 128-token batches, 2 steps, 512
calibration tokens. The SmolLM2
conversion is cached once per user (``lightning_sae.data.offline.cache_root``) and shared by every
test.
"""

import importlib
import json
import runpy
import sys
import tomllib
from pathlib import Path

import pytest
import torch
import yaml
from sae_lens import SAE

from lightning_sae.cli import SAECLI, main

EXAMPLES = Path(__file__).parents[1] / "examples"
#: Examples of other set-ups, tested in their own files (multi-hook here, latent-parallel in
#: tests/test_parallel.py).
SET_UPS = ("multi_hook", "topk_latent_parallel")
#: One example per architecture (examples/<architecture>.yaml), besides the set-ups.
CONFIGS = sorted(p for p in EXAMPLES.glob("*.yaml") if p.stem not in SET_UPS)
#: The inference architecture each example's export loads as in plain sae-lens.
EXPORTED_AS = {
    "standard": "standard",
    "gated": "gated",
    "jumprelu": "jumprelu",
    "topk": "topk",
    "batchtopk": "jumprelu",
    "matryoshka_batchtopk": "jumprelu",
    "atm": "standard",
}


def small_run(root: Path, steps: int = 2) -> list[str]:
    """Overrides that keep an example's meaning but make it a seconds-long run under ``root``."""
    return [
        f"--trainer.default_root_dir={root}",
        f"--trainer.max_steps={steps}",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
        "--data.init_args.hook_names=model.layers.0",
        "--data.init_args.context_size=64",
        "--data.init_args.batch_size=128",
        "--data.init_args.shuffle_buffer_tokens=512",
        "--model.init_args.d_sae=64",
        "--model.init_args.lr_warm_up_steps=0",
        "--model.init_args.lr_decay_steps=0",
        # Applies to the last callback, SAELensExport: calibrate BatchTopK on one model chunk.
        "--trainer.callbacks.calibration_tokens=512",
    ]


@pytest.fixture(autouse=True)
def _offline_command_line(monkeypatch: pytest.MonkeyPatch) -> None:
    """No hub retries; ``sys.argv`` as the console script sees it (main() gets its own args)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(sys, "argv", ["lightning-sae"])


def test_every_architecture_has_an_example():
    assert {path.stem for path in CONFIGS} == set(EXPORTED_AS)
    assert {path.stem for path in EXAMPLES.glob("*.yaml")} == {*EXPORTED_AS, *SET_UPS}


@pytest.mark.parametrize(
    "command",
    [lambda: main(["--help"]), lambda: SAECLI(args=["--help"], parser_kwargs={"env_prefix": "X"})],
    ids=["main", "SAECLI with parser_kwargs"],
)
def test_help_names_the_cache_command(capsys, command):
    with pytest.raises(SystemExit) as stopped:
        command()
    assert stopped.value.code == 0
    assert "lightning-sae cache --config CONFIG" in " ".join(capsys.readouterr().out.split())


def test_console_script_points_at_main():
    pyproject = tomllib.loads((EXAMPLES.parent / "pyproject.toml").read_text())
    module, _, function = pyproject["project"]["scripts"]["lightning-sae"].partition(":")
    assert getattr(importlib.import_module(module), function) is main


@pytest.mark.slow
@pytest.mark.parametrize("config", CONFIGS, ids=[path.stem for path in CONFIGS])
def test_example_trains_and_exports(config: Path, tmp_path: Path):
    main(["fit", "--config", str(config), *small_run(tmp_path)])

    export = tmp_path / "sae_lens" / "latest"
    assert export.resolve().name == "step-000002"
    sae = SAE.load_from_disk(str(export))
    assert sae.cfg.architecture() == EXPORTED_AS[config.stem]
    assert (sae.cfg.d_in, sae.cfg.d_sae) == (576, 64)  # d_in linked from the DataModule
    # The exported names are the ones transformer-lens tools attach to and rebuild the model by.
    assert sae.cfg.metadata.hook_name == "blocks.0.hook_resid_post"
    assert sae.cfg.metadata.model_name == "smollm2-135m"
    assert torch.isfinite(sae.W_dec).all()

    (saved,) = tmp_path.glob("lightning_logs/version_0/config.yaml")  # beside the logs
    run = yaml.safe_load(saved.read_text())
    assert run["model"]["init_args"]["d_sae"] == 64
    callbacks = [callback["class_path"] for callback in run["trainer"]["callbacks"]]
    assert "lightning_sae.SAELensExport" in callbacks


@pytest.mark.slow
def test_short_model_name_and_resume_from_checkpoint(tmp_path: Path, capsys):
    args = ["fit", "--config", str(EXAMPLES / "topk.yaml"), "--model", "BatchTopKSAE"]
    main([*args, "--model.init_args.k=8", *small_run(tmp_path)])
    checkpoint = tmp_path / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt"
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    assert state["hyper_parameters"]["architecture"] == "batchtopk"
    assert state["hyper_parameters"]["k"] == 8

    # The checkpoint must agree with what the command asks for: another class or k is refused.
    for contradiction in (["--model", "TopKSAE"], ["--model.init_args.k=16"]):
        with pytest.raises(SystemExit) as exit_info:
            main([*args, *contradiction, *small_run(tmp_path, 3), f"--ckpt_path={checkpoint}"])
        assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert "--ckpt_path holds a lightning_sae.BatchTopKSAE" in error
    assert "'k': (16.0, 8.0)" in error and "Traceback" not in error

    same_k = [*args, "--model.init_args.k=8", *small_run(tmp_path, steps=3)]
    main([*same_k, f"--ckpt_path={checkpoint}"])
    resumed = tmp_path / "lightning_logs" / "version_1" / "checkpoints" / "last.ckpt"
    assert torch.load(resumed, map_location="cpu", weights_only=True)["global_step"] == 3
    cfg = json.loads((tmp_path / "sae_lens" / "latest" / "cfg.json").read_text())
    assert cfg["metadata"]["training_architecture"] == "batchtopk"
    assert (tmp_path / "sae_lens" / "step-000003").is_dir()


@pytest.mark.parametrize(
    ("bad_input", "message"),
    [
        (["--model", "NoSuchSAE"], "NoSuchSAE"),
        (["--model.init_args.kk=3"], "Option 'kk' is not accepted"),
        (["--config", "WRONG_TYPE"], "Parser key \"k\":\n          Expected a <class 'int'>"),
    ],
    ids=["unknown-architecture", "misspelt-argument", "yaml-value-of-wrong-type"],
)
def test_bad_input_is_a_usage_error(bad_input, message, tmp_path, capsys):
    wrong_type = tmp_path / "wrong_type.yaml"
    wrong_type.write_text("model:\n  init_args:\n    k: many\n")
    bad_input = [str(wrong_type) if arg == "WRONG_TYPE" else arg for arg in bad_input]

    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(EXAMPLES / "topk.yaml"), *bad_input])

    assert exit_info.value.code != 0
    error = capsys.readouterr().err
    assert message in error
    assert "Traceback" not in error
    if "NoSuchSAE" in bad_input:
        assert "SAE modules (--model NAME): ATMSAE, BatchTopKSAE," in error


@pytest.mark.slow
def test_invalid_value_found_at_construction_is_a_usage_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(EXAMPLES / "topk.yaml"), *small_run(tmp_path), "--model.k=65"])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert "error: ValueError" in error
    assert "k must satisfy 0 < k <= d_sae (64), got 65" in error
    assert "Traceback" not in error


@pytest.mark.slow
def test_fit_export_load_example(tmp_path, capsys):
    example = runpy.run_path(str(EXAMPLES / "fit_export_load.py"))
    args = ["--steps=2", "--layer=0", "--batch-size=128", "--d-sae=64", f"--out={tmp_path}"]
    example["main"](args)

    printed = capsys.readouterr().out
    assert "sae-lens loaded a topk SAE (576 -> 64)" in printed
    assert "at blocks.0.hook_resid_post, context 128" in printed
    max_difference = float(printed.rsplit(": ", 1)[1])
    assert max_difference < 1e-4
    assert (tmp_path / "sae_lens" / "step-000001").is_dir()  # the mid-run export


@pytest.mark.slow
def test_validate_and_test_report_held_out_metrics(tmp_path: Path, capsys):
    for subcommand in ("validate", "test"):
        main([subcommand, "--config", str(EXAMPLES / "batchtopk.yaml"), *small_run(tmp_path)[:1],
              "--data.init_args.hook_names=model.layers.0", "--data.init_args.context_size=64",
              "--data.init_args.val_tokens=512", "--model.init_args.d_sae=64"])  # fmt: skip
    printed = capsys.readouterr().out
    for name in ("val/l0", "val/explained_variance", "test/l0", "test/nmse"):
        assert name in printed
    assert "32.0" in printed  # BatchTopK's L0 on the held-out tokens is k


@pytest.mark.slow
def test_multi_hook_example_trains_two_hooks_from_one_pass_and_exports_both(tmp_path: Path):
    hooks = ["model.layers.0", "model.layers.1"]
    run = [arg for arg in small_run(tmp_path) if "hook_names" not in arg and "lr_" not in arg]
    main(["fit", "--config", str(EXAMPLES / "multi_hook.yaml"), *run,
          f"--data.init_args.hook_names=[{', '.join(hooks)}]",
          "--model.init_args.sae_options={k: 4, lr: 0.001, seed: 0}"])  # fmt: skip
    step = (tmp_path / "sae_lens" / "latest").resolve()
    assert step.name == "step-000002"
    for hook in hooks:
        sae = SAE.load_from_disk(str(step / hook))  # folders by the DataModule's hook names
        assert sae.cfg.metadata.hook_name == f"blocks.{hook[-1]}.hook_resid_post"
        assert sae.cfg.architecture() == "jumprelu"
        assert (sae.cfg.d_in, sae.cfg.d_sae) == (576, 64)
        assert (step / hook / "sparsity.safetensors").is_file()
