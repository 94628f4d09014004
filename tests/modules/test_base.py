import math

import lightning as L
import pytest
import torch
from helpers import D_IN, loader, quiet_trainer
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_sae import (
    BatchTopKSAE,
    JumpReLUSAE,
    SAEModule,
    StandardSAE,
    TopKSAE,
    export_to_sae_lens,
)
from lightning_sae.modules import SAEUnit


class LossRecorder(L.Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []
        self.lrs: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(outputs["loss"]))
        self.lrs.append(trainer.optimizers[0].param_groups[0]["lr"])


def test_construct_by_architecture_name():
    module = SAEModule(architecture="BatchTopKSAE", d_in=8, d_sae=32, k=4)
    assert type(module) is BatchTopKSAE
    assert type(SAEModule(architecture="topk", d_in=8, d_sae=32, k=4)) is TopKSAE


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: SAEModule(architecture="relu6", d_in=8, d_sae=32), "Unknown SAE architecture"),
        (lambda: SAEModule(d_in=8, d_sae=32), "abstract"),
        (lambda: StandardSAE(d_in=0, d_sae=32), "d_in must be a positive integer"),
        (lambda: StandardSAE(d_in=8, d_sae=-4), "d_sae must be a positive integer"),
        (lambda: StandardSAE(d_in=8, d_sae=32, lr=0.0), "lr must be a positive finite number"),
        (lambda: StandardSAE(d_in=8, d_sae=32, lr=math.inf), "lr must be a positive finite"),
        (lambda: StandardSAE(d_in=8, d_sae=32, adam_beta2=1.0), "adam_beta2"),
        (lambda: StandardSAE(d_in=8, d_sae=32, l1_coeficient=1.0), "unexpected arguments"),
        (lambda: StandardSAE(d_in=8, d_sae=32, lr_scheduler="linear"), "lr_scheduler"),
        (lambda: StandardSAE(d_in=8, d_sae=32, activation_scale=-1.0), "activation_scale"),
        (lambda: TopKSAE(d_in=8, d_sae=32, architecture="gated"), "does not match"),
    ],
)
def test_bad_arguments_fail_at_construction(build, message):
    with pytest.raises((ValueError, TypeError), match=message):
        build()


def test_nan_batch_stops_the_fit_naming_the_step_and_no_checkpoint_keeps_it(
    tmp_path, synthetic_train
):
    # The check is sync-free: the bad step's update happens (its weights go NaN), then the next
    # read of the device-side record stops the fit. The guarantee moves to what is written: the
    # checkpoint of the NaN state is refused, the last good one stays.
    module = BatchTopKSAE(d_in=D_IN, d_sae=64, k=4)
    x = synthetic_train[:4096].clone()
    x[3 * 512 + 7, 3] = float("inf")  # inside the fourth batch: global step 3
    checkpoints = ModelCheckpoint(tmp_path, every_n_train_steps=1, save_top_k=-1, save_last=True)
    trainer = quiet_trainer(max_steps=8, enable_checkpointing=True, callbacks=[checkpoints])
    with pytest.raises(FloatingPointError, match="batch of global step 3 held NaN or inf"):
        trainer.fit(module, loader(x))
    assert sorted(p.name for p in tmp_path.glob("*.ckpt")) == [
        "epoch=0-step=1.ckpt",
        "epoch=0-step=2.ckpt",
        "epoch=0-step=3.ckpt",
        "last.ckpt",
    ]
    last = torch.load(tmp_path / "last.ckpt", weights_only=True)
    assert last["global_step"] == 3
    assert all(torch.isfinite(t).all() for t in last["state_dict"].values())


def test_nan_batch_is_read_on_the_next_logging_step_only(monkeypatch, synthetic_train):
    reads = []
    check = SAEUnit.raise_if_not_finite
    monkeypatch.setattr(
        SAEUnit,
        "raise_if_not_finite",
        lambda self, **kwargs: reads.append(kwargs) or check(self, **kwargs),
    )
    x = synthetic_train[:8192].clone()
    x[3 * 512, 0] = float("nan")  # step 3
    with pytest.raises(FloatingPointError, match="batch of global step 3 held NaN"):
        quiet_trainer(max_steps=16, log_every_n_steps=5).fit(TopKSAE(D_IN, 64, k=4), loader(x))
    # One read (a sync) on logging step 4, none on steps 0-3.
    assert reads == [{"collective": True, "weights": False}]


@pytest.mark.parametrize(
    ("build", "scale", "message"),
    [
        # Huge finite activations overflow the squared error in float32.
        (lambda: StandardSAE(D_IN, 64, normalize_activations=False), 1e25, "global step 0"),
        # A learning rate that blows the weights up: finite first loss, NaN after the update.
        (lambda: TopKSAE(D_IN, 64, k=4, lr=1e30), 1.0, "global step 1"),
    ],
    ids=["huge-activations", "huge-lr"],
)
def test_diverging_training_stops_the_fit_and_is_never_exported(
    tmp_path, synthetic_train, build, scale, message
):
    module = build()
    with pytest.raises(FloatingPointError, match=f"loss went NaN or inf at {message}"):
        quiet_trainer(max_steps=5).fit(module, loader(synthetic_train[:2560] * scale))
    with pytest.raises(FloatingPointError, match="loss went NaN or inf"):
        export_to_sae_lens(module, tmp_path / "sae", {"hook_name": "blocks.0.hook_resid_pre"})
    assert not (tmp_path / "sae").exists()


def test_a_restored_checkpoint_clears_the_record(tmp_path, synthetic_train):
    module = TopKSAE(D_IN, 64, k=4)
    trainer = quiet_trainer(max_steps=2)
    trainer.fit(module, loader(synthetic_train[:1024]))
    trainer.save_checkpoint(tmp_path / "good.ckpt")
    x = synthetic_train[:2048].clone()
    x[512, 0] = float("nan")
    with pytest.raises(FloatingPointError):
        quiet_trainer(max_steps=4).fit(module, loader(x))
    # The same module object resumes from the good checkpoint and trains on.
    quiet_trainer(max_steps=4).fit(
        module, loader(synthetic_train[:2048]), ckpt_path=tmp_path / "good.ckpt"
    )
    assert all(torch.isfinite(p).all() for p in module.parameters())


def test_activation_scale_is_estimated_applied_and_checkpointed(tmp_path, synthetic_train):
    x = synthetic_train[:2048] * 7.0
    module = StandardSAE(d_in=D_IN, d_sae=64)
    trainer = quiet_trainer(max_steps=3, enable_checkpointing=True, default_root_dir=tmp_path)
    trainer.fit(module, loader(x))
    expected = math.sqrt(D_IN) / x[:512].norm(dim=-1).mean().item()
    assert module.activation_scale.item() == pytest.approx(expected, rel=1e-5)
    # module(x) is in the input's units: the scale is undone.
    with torch.no_grad():
        manual = module.sae.decode(module.sae.encode(x[:8] * module.activation_scale))
        assert torch.allclose(module(x[:8]), manual / module.activation_scale, atol=1e-5)

    path = tmp_path / "sae.ckpt"
    trainer.save_checkpoint(path)
    for loader_cls in (StandardSAE, SAEModule):
        restored = loader_cls.load_from_checkpoint(path)
        assert type(restored) is StandardSAE
        assert restored.activation_scale.item() == module.activation_scale.item()
        with torch.no_grad():
            assert torch.equal(restored(x[:8]), module(x[:8]))
    # Resuming keeps the checkpoint's scale even though the new data has another norm.
    resumed = StandardSAE(d_in=D_IN, d_sae=64)
    quiet_trainer(max_steps=4).fit(resumed, loader(x / 7.0), ckpt_path=path)
    assert resumed.activation_scale.item() == module.activation_scale.item()


def test_checkpoint_round_trip_keeps_class_and_hyperparameters(tmp_path, synthetic_train):
    module = BatchTopKSAE(d_in=D_IN, d_sae=64, k=3.5, lr=1e-3, dead_window_tokens=1024)
    trainer = quiet_trainer(max_steps=3, enable_checkpointing=True, default_root_dir=tmp_path)
    trainer.fit(module, loader(synthetic_train[:2048]))
    module.sae.cfg.metadata.model_name = "gpt2"  # e.g. carried over from an imported release
    path = tmp_path / "batchtopk.ckpt"
    trainer.save_checkpoint(path)
    restored = SAEModule.load_from_checkpoint(path)
    assert restored.sae.cfg.metadata.model_name == "gpt2"
    assert type(restored) is BatchTopKSAE
    assert restored.hparams.k == 3.5 and restored.hparams.lr == 1e-3
    assert restored.sae.cfg.k == 3.5
    state, restored_state = module.state_dict(), restored.state_dict()
    assert state.keys() == restored_state.keys()
    assert all(torch.equal(state[name], restored_state[name]) for name in state)
    assert restored.sae.topk_threshold.dtype == torch.float64
    assert restored.sae.topk_threshold.item() > 0


def test_lr_schedule_steps_per_optimisation_step(synthetic_train):
    recorder = LossRecorder()
    module = TopKSAE(d_in=D_IN, d_sae=64, k=4, lr=1e-3, lr_warm_up_steps=4, lr_decay_steps=4)
    quiet_trainer(max_steps=12, callbacks=[recorder]).fit(module, loader(synthetic_train[:8192]))
    # lr seen after step n (the scheduler has stepped n + 1 times).
    expected = [1e-3 * m for m in (0.5, 0.75, 1, 1, 1, 1, 1, 1, 0.75, 0.5, 0.25, 0)]
    assert recorder.lrs == pytest.approx(expected)


def test_dead_latents_are_counted_in_tokens(synthetic_train):
    module = TopKSAE(d_in=D_IN, d_sae=64, k=4, dead_window_tokens=1536)
    with torch.no_grad():
        module.sae.W_enc[:, 5] = 0.0
        module.sae.b_enc[5] = -100.0  # latent 5 can never win a top-k slot
    quiet_trainer(max_steps=4).fit(module, loader(synthetic_train[:4096]))
    assert module.tokens_since_fired[5].item() == 4 * 512
    assert module.dead_latent_mask[5]
    assert (module.tokens_since_fired < 4 * 512).sum() > 0


@pytest.mark.parametrize("precision", ["bf16-mixed", "bf16-true"])
def test_bf16_keeps_thresholds_in_full_precision(precision, synthetic_train):
    for module in (
        BatchTopKSAE(d_in=D_IN, d_sae=64, k=4),
        JumpReLUSAE(d_in=D_IN, d_sae=64),
    ):
        quiet_trainer(max_steps=5, precision=precision).fit(module, loader(synthetic_train[:4096]))
        if isinstance(module, BatchTopKSAE):
            assert module.sae.topk_threshold.dtype == torch.float64
            assert module.sae.topk_threshold.item() > 0
        else:
            assert module.sae.threshold.dtype == torch.float32
        assert module.activation_scale.dtype == torch.float32
        statistics = module.unit.statistics
        assert statistics.l0.tokens.dtype == torch.float64  # metric states stay exact
        assert statistics.reconstruction["explained_variance"].sum_x.dtype == torch.float64
        assert statistics.window.counts.dtype == torch.float64
        assert module.val_metrics["val/l0"].tokens.dtype == torch.float64
        expected = torch.bfloat16 if precision == "bf16-true" else torch.float32
        assert module.sae.W_enc.dtype == expected
        assert module.sae.cfg.dtype == str(expected).removeprefix("torch.")


def test_metrics_and_density_histogram_reach_tensorboard(tmp_path, synthetic_train):
    from lightning.pytorch.loggers import TensorBoardLogger
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    module = TopKSAE(d_in=D_IN, d_sae=64, k=4, dead_window_tokens=2048)
    logger = TensorBoardLogger(tmp_path, name="run")
    trainer = quiet_trainer(
        max_steps=8, logger=logger, log_every_n_steps=2, limit_val_batches=2, val_check_interval=4
    )
    trainer.fit(module, loader(synthetic_train[:8192]), loader(synthetic_train[-1024:]))
    events = EventAccumulator(logger.log_dir, size_guidance={"histograms": 0}).Reload()
    scalars = set(events.Tags()["scalars"])
    for name in ("train/l0", "train/explained_variance", "train/nmse", "train/dead_latent_rate"):
        assert name in scalars
    for name in ("val/l0", "val/explained_variance", "val/nmse"):
        assert name in scalars
    assert events.Scalars("train/l0")[-1].value == pytest.approx(4.0)
    assert "train/feature_density_log10" in events.Tags()["histograms"]
    # Two windows of 2048 tokens closed; the buffer holds the last one's density.
    assert module.feature_density.sum().item() == pytest.approx(4.0)


def test_a_checkpoint_can_monitor_the_loss_between_logging_steps(tmp_path, synthetic_train):
    """``train/loss`` is logged every step, so a ``ModelCheckpoint`` off the logging schedule
    finds it (after a validation Lightning raises on a missing monitor); the loss terms are
    logged on logging steps only."""
    checkpoints = ModelCheckpoint(tmp_path, monitor="train/loss", every_n_train_steps=3)
    trainer = quiet_trainer(
        max_steps=6,
        log_every_n_steps=5,
        limit_val_batches=1,
        val_check_interval=2,
        enable_checkpointing=True,
        callbacks=[checkpoints],
    )
    module = TopKSAE(D_IN, 64, k=4)
    trainer.fit(module, loader(synthetic_train[:4096]), loader(synthetic_train[-512:]))
    assert [p.name for p in tmp_path.glob("*.ckpt")] and checkpoints.best_model_score is not None
    assert {"train/loss", "train/mse_loss"} <= set(trainer.callback_metrics)


def test_a_short_fit_publishes_its_own_density(synthetic_train):
    module = TopKSAE(d_in=D_IN, d_sae=64, k=4)  # window of 10M tokens never closes here
    module.feature_density.fill_(0.5)  # e.g. an imported release's density
    quiet_trainer(max_steps=3).fit(module, loader(synthetic_train[:2048]))
    assert 3.0 < module.feature_density.sum().item() <= 4.0  # this run's L0, not 0.5 * 64


def test_gradient_accumulation_computes_window_metrics_once_per_step(synthetic_train):
    calls = []
    module = TopKSAE(d_in=D_IN, d_sae=64, k=4)
    statistics = module.unit.statistics
    original = statistics.values_to_log

    def record(step, log_every_n_steps):
        values = original(step, log_every_n_steps)
        if values:
            calls.append(step)
        return values

    statistics.values_to_log = record
    trainer = quiet_trainer(max_steps=4, accumulate_grad_batches=2, log_every_n_steps=2)
    trainer.fit(module, loader(synthetic_train[:8192], batch_size=256))
    assert calls == [1, 3]


def test_resuming_to_a_longer_run_follows_the_new_schedule(tmp_path, synthetic_train):
    module = TopKSAE(d_in=D_IN, d_sae=64, k=4, lr=1e-3, lr_decay_steps=2)
    trainer = quiet_trainer(max_steps=4, enable_checkpointing=True, default_root_dir=tmp_path)
    trainer.fit(module, loader(synthetic_train[:8192]))
    trainer.save_checkpoint(tmp_path / "short.ckpt")
    recorder = LossRecorder()
    resumed = TopKSAE(d_in=D_IN, d_sae=64, k=4, lr=1e-3, lr_decay_steps=2)
    quiet_trainer(max_steps=8, callbacks=[recorder]).fit(
        resumed, loader(synthetic_train[:8192]), ckpt_path=tmp_path / "short.ckpt"
    )
    assert recorder.lrs == pytest.approx([1e-3, 1e-3, 5e-4, 0.0])  # steps 4-7 of the 8-step run
