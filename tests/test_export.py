"""sae-lens export and import: every architecture loads in plain sae-lens and matches the module.

Tolerances: exported and module latents are compared with ``rtol=1e-4, atol=1e-5`` (float32, the
fold of the activation scale and decoder norms reorders products); at most 0.1 % of entries may
differ beyond that, latents at their firing boundary (gate, threshold or top-k tie) that the fold's
rounding flips. Decoding the same latents must agree on every entry.
"""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import loader, quiet_trainer
from lightning import LightningDataModule
from sae_lens import SAE
from safetensors.torch import load_file, save_file

from lightning_sae import SAEModule, export_to_sae_lens, load_from_sae_lens
from lightning_sae.data import ExportData
from lightning_sae.export import SAE_LENS_METADATA_KEYS, calibrate_batchtopk_threshold
from lightning_sae.metrics import log10_feature_density

D_SAE = 128
K = 8
STEPS = 30
HOOK = "blocks.0.hook_resid_post"
ARCHITECTURES = [
    "standard",
    "gated",
    "jumprelu",
    "topk",
    "batchtopk",
    "matryoshka_batchtopk",
    "atm",
]
BATCHTOPK = {"batchtopk", "matryoshka_batchtopk"}
#: Architectures whose latents are ``hidden_pre * ‖W_dec‖``: folding the activation scale divides
#: them by it (sae-lens's BatchTopK fold divides its threshold for the same reason).
DECODER_NORM_SCALED = {"topk", *BATCHTOPK}
RTOL, ATOL, MAX_FLIPPED = 1e-4, 1e-5, 1e-3


def build_module(architecture: str) -> SAEModule:
    extra = {"k": K} if "topk" in architecture else {}
    # A short density window, so feature_density is published during the run.
    return SAEModule(
        architecture=architecture, d_in=32, d_sae=D_SAE, seed=0, dead_window_tokens=2048, **extra
    )


@pytest.fixture(scope="module")
def trained(synthetic_train: torch.Tensor) -> dict[str, SAEModule]:
    modules = {}
    for architecture in ARCHITECTURES:
        module = build_module(architecture)
        # Only the first STEPS * 256 tokens are trained on; the rest calibrates.
        quiet_trainer(max_steps=STEPS).fit(module, loader(synthetic_train, batch_size=256))
        modules[architecture] = module.eval()
    return modules


@pytest.fixture(scope="module")
def calibration(synthetic_train: torch.Tensor) -> torch.Tensor:
    """16,384 tokens the short run never reached (it reads STEPS * 256 tokens)."""
    return synthetic_train[-16_384:]


@pytest.fixture(scope="module")
def evaluation(synthetic_heldout: torch.Tensor) -> torch.Tensor:
    return synthetic_heldout


@pytest.fixture(scope="module")
def exports(
    trained: dict[str, SAEModule],
    calibration: torch.Tensor,
    tmp_path_factory: pytest.TempPathFactory,
) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("exports")
    return {
        name: export_to_sae_lens(
            module,
            root / name,
            {"model_name": "tiny", "hook_name": HOOK, "context_size": 16},
            calibration_activations=calibration,
        )
        for name, module in trained.items()
    }


def exported_threshold(path: Path) -> float:
    return float(load_file(path / "sae_weights.safetensors")["threshold"][0])


def expected_latents(
    architecture: str, module: SAEModule, x: torch.Tensor, path: Path
) -> torch.Tensor:
    """The module's inference latents in the exported SAE's units."""
    scale = module.activation_scale
    with torch.no_grad():
        if architecture in BATCHTOPK:  # JumpReLU semantics with the calibrated threshold
            _, hidden_pre = module.sae.encode_with_hidden_pre(x * scale)
            pre = hidden_pre / scale
            return pre.relu() * (pre > exported_threshold(path))
        latents = module.encode(x)
    return latents / scale if architecture in DECODER_NORM_SCALED else latents


def assert_latents_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    flipped = ~torch.isclose(actual, expected, rtol=RTOL, atol=ATOL)
    assert flipped.float().mean() <= MAX_FLIPPED, f"{int(flipped.sum())} latents differ"


PLAIN_SAE_LENS = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    import torch
    from safetensors.torch import load_file, save_file
    from sae_lens import SAE

    root = Path(sys.argv[1])
    x = load_file(root / "x.safetensors")["x"]
    outputs = {}
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        sae = SAE.load_from_disk(folder)
        with torch.no_grad():
            latents = sae.encode(x)
            outputs[folder.name + ".latents"] = latents
            outputs[folder.name + ".decoded"] = sae.decode(latents)
            outputs[folder.name + ".architecture." + sae.cfg.architecture()] = torch.zeros(1)
    assert "lightning_sae" not in sys.modules, "the check must run without lightning_sae"
    save_file(outputs, root / "outputs.safetensors")
    """
)


def test_plain_sae_lens_loads_every_export_and_matches_the_module(
    trained: dict[str, SAEModule], exports: dict[str, Path], evaluation: torch.Tensor
) -> None:
    root = next(iter(exports.values())).parent
    x = evaluation[:1024].contiguous()
    save_file({"x": x}, root / "x.safetensors")
    # One fresh interpreter for all architectures; cwd elsewhere so the repo is not importable.
    subprocess.run(
        [sys.executable, "-c", PLAIN_SAE_LENS, str(root)], check=True, cwd=root, timeout=120
    )
    outputs = load_file(root / "outputs.safetensors")
    for name, module in trained.items():
        inference = "jumprelu" if name in BATCHTOPK else "standard" if name == "atm" else name
        assert f"{name}.architecture.{inference}" in outputs
        latents = outputs[f"{name}.latents"]
        assert_latents_close(latents, expected_latents(name, module, x, exports[name]))
        module_units = latents * module.activation_scale if name in DECODER_NORM_SCALED else latents
        with torch.no_grad():
            expected_decoded = module.decode(module_units)
        torch.testing.assert_close(
            outputs[f"{name}.decoded"], expected_decoded, rtol=RTOL, atol=ATOL
        )


@pytest.mark.parametrize("architecture", sorted(BATCHTOPK))
def test_batchtopk_calibrated_threshold_matches_k_and_training_active_sets(
    architecture: str,
    trained: dict[str, SAEModule],
    exports: dict[str, Path],
    evaluation: torch.Tensor,
) -> None:
    module, sae = trained[architecture], SAE.load_from_disk(exports[architecture])
    batch = evaluation[:1024]
    with torch.no_grad():
        held_out_l0 = (sae.encode(evaluation) > 0).float().sum(-1).mean().item()
        exported, training = sae.encode(batch) > 0, module.encode(batch) > 0
    assert abs(held_out_l0 / K - 1) <= 0.05, held_out_l0
    jaccard = (exported & training).sum() / (exported | training).sum()
    assert jaccard >= 0.95, float(jaccard)
    # sae-lens's EMA (what an uncalibrated export would use) fires far more than k latents.
    ema = float(module.sae.topk_threshold / module.activation_scale)
    assert ema < exported_threshold(exports[architecture]) / 2


def test_calibration_is_exact_on_its_own_set(
    trained: dict[str, SAEModule], calibration: torch.Tensor
) -> None:
    sae = trained["batchtopk"].sae
    x = calibration * trained["batchtopk"].activation_scale
    threshold = calibrate_batchtopk_threshold(sae, x, chunk_size=1000)  # several chunks
    with torch.no_grad():
        _, pre = sae.encode_with_hidden_pre(x)
    assert int((pre > threshold).sum()) == int(K * len(x))
    assert isinstance(sae.activation_fn, torch.nn.Module) and sae.activation_fn.k == K


def test_cfg_json_and_sparsity(trained: dict[str, SAEModule], exports: dict[str, Path]) -> None:
    for name, path in exports.items():
        cfg = json.loads((path / "cfg.json").read_text())
        assert cfg["normalize_activations"] == "none"
        assert cfg["d_in"] == 32 and cfg["d_sae"] == D_SAE
        meta = cfg["metadata"]
        assert meta["sae_lens_version"] and meta["training_architecture"] == name
        assert (meta["model_name"], meta["hook_name"], meta["context_size"]) == ("tiny", HOOK, 16)
        sparsity = load_file(path / "sparsity.safetensors")["sparsity"]
        assert sparsity.dtype == torch.float32
        torch.testing.assert_close(sparsity, log10_feature_density(trained[name].feature_density))
        assert sorted(p.name for p in path.parent.iterdir() if p.name.startswith(".")) == []


def test_export_leaves_the_module_untouched(
    trained: dict[str, SAEModule], calibration: torch.Tensor, tmp_path: Path
) -> None:
    module = trained["batchtopk"]
    before = {name: t.clone() for name, t in module.state_dict().items()}
    export_to_sae_lens(
        module, tmp_path / "sae", calibration_activations=[calibration[:2048], calibration[2048:]]
    )
    for name, tensor in module.state_dict().items():
        assert torch.equal(tensor, before[name]), name


class MetadataDataModule(LightningDataModule):
    """A user's own DataModule implementing the exporter's ExportData protocol."""

    def __init__(self, activations: torch.Tensor) -> None:
        super().__init__()
        self.hook_names = [HOOK]
        self.activations = activations
        self.requested: list[tuple[int, str | None]] = []

    def train_dataloader(self):
        return loader(self.activations, batch_size=256)

    def sae_metadata(self, hook_name: str | None = None) -> dict:
        return {
            "model_name": "tiny-model",
            "model_class_name": "HookedTransformer",
            "hook_name": HOOK,
            "hook_head_index": None,
            "context_size": 16,
            "prepend_bos": True,
            "dataset_path": "synthetic",
            "exclude_special_tokens": False,
        }

    def sample_activations(self, n_tokens: int, hook_name: str | None = None) -> torch.Tensor:
        self.requested.append((n_tokens, hook_name))
        return self.activations[-n_tokens:]


def test_metadata_and_calibration_from_the_datamodule(
    synthetic_train: torch.Tensor, tmp_path: Path
) -> None:
    datamodule = MetadataDataModule(synthetic_train[:4096])
    module = build_module("batchtopk")
    quiet_trainer(max_steps=5).fit(module, datamodule=datamodule)
    assert isinstance(datamodule, ExportData)
    path = export_to_sae_lens(module, tmp_path / "sae", calibration_tokens=2048)
    assert datamodule.requested == [(2048, None)]  # one SAE: the data's own hook
    assert SAE.load_from_disk(path).cfg.metadata.hook_name == HOOK
    meta = json.loads((path / "cfg.json").read_text())["metadata"]
    assert meta["model_name"] == "tiny-model" and meta["prepend_bos"] is True
    # Explicit metadata wins, and a multi-hook DataModule samples the exported SAE's hook.
    other = {"dataset_path": "override", "hook_name": "blocks.1.hook_resid_post"}
    path = export_to_sae_lens(module, tmp_path / "other", other, calibration_tokens=1024)
    meta = json.loads((path / "cfg.json").read_text())["metadata"]
    assert (meta["dataset_path"], meta["hook_name"]) == ("override", "blocks.1.hook_resid_post")
    assert datamodule.requested[-1] == (1024, "blocks.1.hook_resid_post")


def test_unknown_metadata_key_is_rejected(trained: dict[str, SAEModule], tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"hook_nme.*Valid keys") as error:
        export_to_sae_lens(trained["standard"], tmp_path / "sae", {"hook_nme": HOOK})
    assert "hook_name" in str(error.value) and set(SAE_LENS_METADATA_KEYS) >= {"hook_name"}
    assert not any(tmp_path.iterdir())


def test_batchtopk_without_calibration_data_fails_clearly(
    trained: dict[str, SAEModule], tmp_path: Path
) -> None:
    module = build_module("batchtopk")  # not attached to a trainer
    with pytest.raises(ValueError, match="calibration_activations"):
        export_to_sae_lens(module, tmp_path / "sae")
    with pytest.raises(ValueError, match=r"\[n, 32\]"):
        export_to_sae_lens(module, tmp_path / "sae", calibration_activations=torch.zeros(10, 3))
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_round_trip_export_import_export(
    architecture: str, exports: dict[str, Path], tmp_path: Path
) -> None:
    first = exports[architecture]
    module = load_from_sae_lens(first)
    again = export_to_sae_lens(module, tmp_path / "again")
    assert (again / "sparsity.safetensors").read_bytes() == (
        first / "sparsity.safetensors"
    ).read_bytes()
    cfg, cfg_again = (json.loads((p / "cfg.json").read_text()) for p in (first, again))
    if architecture != cfg["architecture"]:  # a training-only architecture
        # The re-export records the module that wrote it: a JumpReLUSAE or StandardSAE.
        assert cfg_again["metadata"].pop("training_architecture") == cfg["architecture"]
        cfg["metadata"].pop("training_architecture")
        cfg["metadata"].pop("training_architecture_details")
        cfg_again["metadata"].pop("training_architecture_details")
    assert cfg_again == cfg
    weights, weights_again = (load_file(p / "sae_weights.safetensors") for p in (first, again))
    assert weights.keys() == weights_again.keys()
    for name, tensor in weights.items():
        if architecture == "topk":
            # sae-lens re-normalises the (already unit) decoder rows on every save: 1 ulp.
            torch.testing.assert_close(weights_again[name], tensor, rtol=2.5e-7, atol=0)
        else:
            assert torch.equal(weights_again[name], tensor), name
    if architecture != "topk":
        assert (again / "sae_weights.safetensors").read_bytes() == (
            first / "sae_weights.safetensors"
        ).read_bytes()


def test_import_picks_the_module_and_fine_tunes(
    exports: dict[str, Path], synthetic_train: torch.Tensor
) -> None:
    expected = {"standard": "StandardSAE", "gated": "GatedSAE", "jumprelu": "JumpReLUSAE"}
    expected |= {"topk": "TopKSAE", "batchtopk": "JumpReLUSAE", "atm": "StandardSAE"}
    for name, class_name in expected.items():
        module = load_from_sae_lens(exports[name], lr=1e-4)
        assert type(module).__name__ == class_name
        assert float(module.activation_scale) == 1.0 and module.hparams.lr == 1e-4
    topk = load_from_sae_lens(exports["topk"])
    assert topk.hparams.k == K
    from_object = load_from_sae_lens(SAE.load_from_disk(exports["jumprelu"]))
    for name, tensor in load_from_sae_lens(exports["jumprelu"]).sae.state_dict().items():
        assert torch.equal(from_object.sae.state_dict()[name], tensor)
    quiet_trainer(max_steps=3).fit(from_object, loader(synthetic_train[:768], batch_size=256))


def test_gemma_scope_params_npz(tmp_path: Path) -> None:
    generator = np.random.default_rng(0)
    params = {
        "W_enc": generator.normal(size=(16, 64)).astype(np.float32),
        "W_dec": generator.normal(size=(64, 16)).astype(np.float32),
        "b_enc": generator.normal(size=64).astype(np.float32),
        "b_dec": generator.normal(size=16).astype(np.float32),
        "threshold": np.abs(generator.normal(size=64)).astype(np.float32),
    }
    np.savez(tmp_path / "params.npz", **params)
    module = load_from_sae_lens(tmp_path)  # the folder holding params.npz
    assert type(module).__name__ == "JumpReLUSAE" and not module.hparams.apply_b_dec_to_input
    x = torch.randn(8, 16)
    pre = x @ torch.from_numpy(params["W_enc"]) + torch.from_numpy(params["b_enc"])
    expected = pre.relu() * (pre > torch.from_numpy(params["threshold"]))
    with torch.no_grad():
        torch.testing.assert_close(module.encode(x), expected)
    np.savez(tmp_path / "pickled.npz", W_enc=np.array([{"a": 1}], dtype=object))
    with pytest.raises(ValueError, match=r"pickled\.npz"):
        load_from_sae_lens(tmp_path / "pickled.npz")


def test_bad_inputs_fail_clearly_and_write_nothing(
    trained: dict[str, SAEModule], exports: dict[str, Path], tmp_path: Path
) -> None:
    module = trained["standard"]
    a_file = tmp_path / "file"
    a_file.write_text("keep me")
    with pytest.raises(FileExistsError, match="is a file"):
        export_to_sae_lens(module, a_file)
    assert a_file.read_text() == "keep me"
    with pytest.raises(ValueError, match="is a file"):
        load_from_sae_lens(a_file)

    link = tmp_path / "link"
    link.symlink_to(exports["standard"], target_is_directory=True)
    with pytest.raises(FileExistsError, match="symlink"):
        export_to_sae_lens(module, link)
    link.unlink()

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        export_to_sae_lens(module, foreign)
    assert (foreign / "notes.txt").exists()
    export_to_sae_lens(module, foreign, overwrite=True)
    assert not (foreign / "notes.txt").exists() and (foreign / "cfg.json").exists()

    with pytest.raises(ValueError, match=f"{exports['standard']}.*d_in=32 but d_in=64"):
        load_from_sae_lens(exports["standard"], d_in=64)

    unknown = tmp_path / "unknown"
    export_to_sae_lens(module, unknown)
    cfg = json.loads((unknown / "cfg.json").read_text())
    (unknown / "cfg.json").write_text(json.dumps(cfg | {"architecture": "mystery"}))
    with pytest.raises(ValueError, match=r"unknown/cfg.json has architecture 'mystery'"):
        load_from_sae_lens(unknown)

    unfolded = tmp_path / "unfolded"
    export_to_sae_lens(module, unfolded)
    cfg = json.loads((unfolded / "cfg.json").read_text())
    cfg["normalize_activations"] = "layer_norm"
    (unfolded / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"unfolded normalises activations at run time"):
        load_from_sae_lens(unfolded)

    corrupt = tmp_path / "corrupt"
    export_to_sae_lens(module, corrupt)
    (corrupt / "sae_weights.safetensors").write_bytes(b"\x00garbage")
    with pytest.raises(ValueError, match=r"corrupt/sae_weights\.safetensors is not a readable"):
        load_from_sae_lens(corrupt)
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]
    assert leftovers == []


def test_interrupted_export_keeps_the_previous_one(
    trained: dict[str, SAEModule], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = export_to_sae_lens(trained["standard"], tmp_path / "sae")
    before = {p.name: p.read_bytes() for p in path.iterdir()}

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("lightning_sae.export.writer.save_file", crash)  # dies after cfg/weights
    with pytest.raises(OSError, match="disk full"):
        export_to_sae_lens(trained["gated"], path)
    assert {p.name: p.read_bytes() for p in path.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["sae"]


def test_export_splices_into_hooked_sae_transformer_and_run_evals(exports: dict[str, Path]) -> None:
    from datasets import Dataset
    from sae_lens import HookedSAETransformer
    from sae_lens.evals import EvalConfig, run_evals
    from sae_lens.training.activation_scaler import ActivationScaler
    from sae_lens.training.activations_store import ActivationsStore
    from transformer_lens import HookedTransformerConfig

    config = HookedTransformerConfig(
        n_layers=1,
        d_model=32,
        n_ctx=16,
        d_head=8,
        n_heads=4,
        d_vocab=64,
        act_fn="relu",
        d_mlp=64,
        seed=0,
    )
    model = HookedSAETransformer(config)
    sae = SAE.load_from_disk(exports["batchtopk"])
    tokens = torch.randint(1, 64, (32, 16), generator=torch.Generator().manual_seed(0))
    clean = model(tokens[:2])
    model.add_sae(sae)
    _, cache = model.run_with_cache(tokens[:2])
    assert f"{HOOK}.hook_sae_acts_post" in cache
    model.reset_saes()
    torch.testing.assert_close(model(tokens[:2]), clean)

    store = ActivationsStore(
        model=model,
        dataset=Dataset.from_dict({"tokens": tokens.tolist()}),
        streaming=False,
        hook_name=HOOK,
        hook_head_index=None,
        context_size=16,
        d_in=32,
        n_batches_in_buffer=2,
        total_training_tokens=512,
        store_batch_size_prompts=8,
        train_batch_size_tokens=64,
        prepend_bos=False,
        normalize_activations="none",
        device=torch.device("cpu"),
        dtype="float32",
    )
    eval_config = EvalConfig(
        batch_size_prompts=8,
        n_eval_reconstruction_batches=1,
        compute_kl=True,
        compute_ce_loss=True,
        n_eval_sparsity_variance_batches=1,
        compute_sparsity_metrics=True,
        compute_variance_metrics=True,
    )
    metrics, _ = run_evals(
        sae, store, model, ActivationScaler(), eval_config, exclude_special_tokens=False
    )
    assert np.isfinite(metrics["model_performance_preservation"]["ce_loss_with_sae"])
    assert metrics["sparsity"]["l0"] > 0
