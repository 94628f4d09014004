"""LMEvaluation against sae-lens's ``run_evals``: the exported SAE, the same model, the same tokens.

The model is a tiny random ``HookedTransformer`` with a real BPE tokenizer (see data/conftest.py);
the SAEs are trained for a few steps by ``Trainer.fit`` from the real ActivationDataModule.
"""

import csv
import math

import lightning as L
import pytest
import torch
from sae_lens import SAE
from sae_lens.evals import EvalConfig, run_evals
from sae_lens.training.activation_scaler import ActivationScaler

from lightning_sae import (
    ActivationDataModule,
    JumpReLUSAE,
    MultiSAEModule,
    StandardSAE,
    TopKSAE,
    export_to_sae_lens,
)
from lightning_sae.evaluation import LMEvaluation, evaluation_sums

HOOK = "blocks.1.hook_resid_post"
N_ROWS, BATCH_ROWS = 6, 2


def make_dm(model, documents, hooks=HOOK) -> ActivationDataModule:
    return ActivationDataModule(
        model=model, hook_names=hooks, dataset=documents, context_size=32, batch_size=128,
        holdout_documents=4, exclude_special_tokens=True,
    )  # fmt: skip


def fit(module, dm, evaluation: LMEvaluation, steps: int = 6, **kwargs) -> L.Trainer:
    trainer = L.Trainer(
        max_steps=steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, callbacks=[evaluation], accelerator="cpu", **kwargs,
    )  # fmt: skip
    trainer.fit(module, datamodule=dm)
    return trainer


class HeldOutRows:
    """Feeds ``run_evals`` the given token rows, ``batch`` rows at a time, in order."""

    def __init__(self, rows: torch.Tensor, batch: int) -> None:
        self.rows, self.store_batch_size_prompts = rows, batch
        self.context_size = rows.shape[1]
        self.reset_input_dataset()

    def get_batch_tokens(self, n: int) -> torch.Tensor:
        out = self.rows[self.position : self.position + n]
        self.position += n
        return out

    def reset_input_dataset(self) -> None:
        self.position = 0


def sae_lens_metrics(sae: SAE, model, rows: torch.Tensor) -> dict[str, float]:
    config = EvalConfig(
        batch_size_prompts=BATCH_ROWS,
        n_eval_reconstruction_batches=len(rows) // BATCH_ROWS,
        n_eval_sparsity_variance_batches=len(rows) // BATCH_ROWS,
        compute_kl=True, compute_ce_loss=True, compute_sparsity_metrics=True,
        compute_variance_metrics=True,
    )  # fmt: skip
    results, _ = run_evals(sae, HeldOutRows(rows, BATCH_ROWS), model, ActivationScaler(), config)
    performance = results["model_performance_preservation"]
    behaviour = results["model_behavior_preservation"]
    return {
        "ce_loss_clean": performance["ce_loss_without_sae"],
        "ce_loss_with_sae": performance["ce_loss_with_sae"],
        "ce_loss_zero_ablated": performance["ce_loss_with_ablation"],
        "ce_loss_recovered": performance["ce_loss_score"],
        "kl_div_with_sae": behaviour["kl_div_with_sae"],
        "kl_div_zero_ablated": behaviour["kl_div_with_ablation"],
        "kl_score": behaviour["kl_div_score"],
        "l0": results["sparsity"]["l0"],
        "explained_variance": results["reconstruction_quality"]["explained_variance"],
    }


@pytest.mark.parametrize("module_cls", [StandardSAE, TopKSAE, JumpReLUSAE])
def test_equals_run_evals_on_the_export(module_cls, model, documents, tmp_path):
    """Tolerance: 1e-4 relative (float32 model; the export folds the activation scale, which can
    flip a latent sitting at its threshold)."""
    dm = make_dm(model, documents)
    kwargs = {"k": 4} if module_cls is TopKSAE else {}
    module = module_cls(d_in=32, d_sae=64, seed=0, **kwargs)
    evaluation = LMEvaluation(every_n_steps=3, n_rows=N_ROWS, batch_rows=BATCH_ROWS)
    fit(module, dm, evaluation)
    assert [entry["step"] for entry in evaluation.history] == [3, 6]
    ours = evaluation.history[-1]["metrics"][HOOK]

    sae = SAE.load_from_disk(export_to_sae_lens(module, tmp_path / "sae"))
    rows = dm.holdout_token_rows(N_ROWS)
    assert len(rows) == N_ROWS and (rows == model.tokenizer.bos_token_id).any()  # BOS excluded
    reference = sae_lens_metrics(sae, model, rows)
    for name, value in reference.items():
        assert ours[name] == pytest.approx(value, rel=1e-4, abs=1e-6), name
    assert ours["delta_lm_loss"] == pytest.approx(
        reference["ce_loss_with_sae"] - reference["ce_loss_clean"], rel=1e-4
    )
    # The SAE changes the model: a test of the splice, not of a no-op.
    assert abs(ours["delta_lm_loss"]) > 1e-3 and ours["kl_div_with_sae"] > 1e-3


def identity_sae(d_in: int) -> StandardSAE:
    """A ReLU SAE that reconstructs exactly: latents ReLU(x) and ReLU(-x), decoded as x."""
    module = StandardSAE(d_in=d_in, d_sae=2 * d_in, normalize_activations=False)
    eye = torch.eye(d_in)
    with torch.no_grad():
        module.sae.W_enc.copy_(torch.cat([eye, -eye], dim=1))
        module.sae.W_dec.copy_(torch.cat([eye, -eye], dim=0))
        module.sae.b_enc.zero_()
        module.sae.b_dec.zero_()
    return module


def test_a_perfect_sae_recovers_everything(model, documents):
    dm = make_dm(model, documents)
    rows = dm.holdout_token_rows(N_ROWS)
    metrics = evaluation_sums(dm.hooked_model, {HOOK: identity_sae(32)}, rows).metrics()[HOOK]
    assert metrics["ce_loss_with_sae"] == pytest.approx(metrics["ce_loss_clean"], abs=1e-5)
    assert metrics["ce_loss_recovered"] == pytest.approx(1.0, abs=1e-4)
    assert metrics["kl_div_with_sae"] == pytest.approx(0.0, abs=1e-6)
    assert metrics["kl_score"] == pytest.approx(1.0, abs=1e-5)
    assert metrics["explained_variance"] == pytest.approx(1.0, abs=1e-6)
    assert metrics["ce_loss_zero_ablated"] != pytest.approx(metrics["ce_loss_clean"], abs=1e-2)


def test_multi_hook_module_logs_per_hook(model, documents):
    """Each SAE is spliced in alone; its figures equal those of the same SAE evaluated alone."""
    hooks = ["blocks.0.hook_resid_post", HOOK]
    dm = make_dm(model, documents, hooks)
    module = MultiSAEModule("topk", hooks, d_in=32, d_sae=64, k=4, seed=0)
    evaluation = LMEvaluation(every_n_steps=None, n_rows=N_ROWS, batch_rows=BATCH_ROWS)
    trainer = fit(module, dm, evaluation, steps=3)
    results = evaluation.history[-1]["metrics"]
    assert set(results) == set(hooks)
    rows = dm.holdout_token_rows(N_ROWS)
    for hook in hooks:
        alone = evaluation_sums(dm.hooked_model, {hook: module.sae_unit(hook)}, rows)
        for name, value in alone.metrics()[hook].items():
            assert results[hook][name] == pytest.approx(value, rel=1e-6), (hook, name)
        logged = trainer.callback_metrics[f"{hook}/eval/ce_loss_recovered"]
        assert float(logged) == pytest.approx(results[hook]["ce_loss_recovered"])
    assert results[hooks[0]]["ce_loss_clean"] == results[hooks[1]]["ce_loss_clean"]
    assert results[hooks[0]]["ce_loss_with_sae"] != results[hooks[1]]["ce_loss_with_sae"]


def test_logs_to_every_logger(model, documents, tmp_path):
    from lightning.pytorch.loggers import CSVLogger

    dm = make_dm(model, documents)
    logger = CSVLogger(tmp_path)
    module = TopKSAE(d_in=32, d_sae=64, k=4, seed=0)
    trainer = L.Trainer(
        max_steps=4, logger=logger, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, accelerator="cpu", log_every_n_steps=2,
        callbacks=[LMEvaluation(every_n_steps=2, n_rows=2, batch_rows=2)],
    )  # fmt: skip
    trainer.fit(module, datamodule=dm)
    logger.save()
    with open(tmp_path / "lightning_logs" / "version_0" / "metrics.csv") as handle:
        rows = [row for row in csv.DictReader(handle) if row["eval/ce_loss_recovered"]]
    assert [row["step"] for row in rows] == ["2", "4"]
    assert all(math.isfinite(float(row["eval/ce_loss_recovered"])) for row in rows)


# ---------------------------------------------------------------------- clear errors at setup
def test_without_tokens_is_an_error_at_setup(model, documents, tmp_path):
    live = make_dm(model, documents)
    live.write_cache(tmp_path / "cache", n_tokens=512)
    cached = ActivationDataModule(cache_dir=tmp_path / "cache", batch_size=128)
    module = TopKSAE(d_in=32, d_sae=64, k=4)
    with pytest.raises(ValueError, match=r"cannot evaluate on this DataModule.*no token ids"):
        fit(module, cached, LMEvaluation(every_n_steps=1000), steps=1)


def test_without_a_datamodule_is_an_error_at_setup(model):
    from torch.utils.data import DataLoader, TensorDataset

    trainer = L.Trainer(
        max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, accelerator="cpu", callbacks=[LMEvaluation()],
    )  # fmt: skip
    loader = DataLoader(TensorDataset(torch.randn(64, 32)), batch_size=32)
    with pytest.raises(ValueError, match="needs a DataModule with a language model"):
        trainer.fit(TopKSAE(d_in=32, d_sae=64, k=4), loader)


def test_bad_arguments():
    with pytest.raises(ValueError, match="n_rows"):
        LMEvaluation(n_rows=0)
    with pytest.raises(ValueError, match="every_n_steps"):
        LMEvaluation(every_n_steps=0)


def test_sharded_saes_are_refused_with_the_fix(tmp_path):
    """LMEvaluation/HTMLReport on an FSDP2-sharded SAE: a clear error, not a DTensor crash."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from lightning_sae.errors import ConfigurationError
    from lightning_sae.evaluation.callback import refuse_sharded

    module = TopKSAE(d_in=8, d_sae=16, k=2)
    refuse_sharded({"h": module}, "LMEvaluation")  # not sharded: accepted
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        fully_shard(module.unit.sae, mesh=init_device_mesh("cpu", (1,)))
        with pytest.raises(ConfigurationError, match=r"LMEvaluation cannot encode.*\['h'\].*DDP"):
            refuse_sharded({"h": module}, "LMEvaluation")
    finally:
        dist.destroy_process_group()


def test_an_empty_share_of_rows_runs_no_forward(tokenizer):
    """A DDP rank holding no held-out row (fewer rows than ranks) sums zeros and reaches the
    all-reduce: a forward on an empty batch crashed a Hugging Face model there (a hang)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from lightning_sae.data.models import load_hooked_model

    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
    )  # fmt: skip
    hooked = load_hooked_model(LlamaForCausalLM(config), ["model.layers.1"], tokenizer=tokenizer)
    sae = TopKSAE(d_in=32, d_sae=64, k=4, seed=0)
    sums = evaluation_sums(hooked, {"model.layers.1": sae}, torch.zeros(0, 16, dtype=torch.long))
    assert not sums.sums["model.layers.1"].any()
    assert all(math.isnan(v) for v in sums.metrics()["model.layers.1"].values())
