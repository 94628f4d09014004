"""Every architecture trains under Trainer.fit, and as well as sae-lens's own SAETrainer."""

import copy
import itertools

import lightning as L
import pytest
import torch
from helpers import D_IN, loader, quiet_trainer
from sae_lens.config import SAETrainerConfig
from sae_lens.registry import get_sae_training_class
from sae_lens.synthetic import mean_correlation_coefficient
from sae_lens.training.sae_trainer import SAETrainer

from lightning_sae import (
    BatchTopKSAE,
    GatedSAE,
    JumpReLUSAE,
    MatryoshkaBatchTopKSAE,
    SAEModule,
    StandardSAE,
    TopKSAE,
)
from lightning_sae.metrics import ExplainedVariance

D_SAE = 64
ARCHITECTURES = {
    "standard": (StandardSAE, {"l1_coefficient": 0.3}),
    "gated": (GatedSAE, {"l1_coefficient": 0.3}),
    "jumprelu": (JumpReLUSAE, {"l0_coefficient": 0.05}),
    "topk": (TopKSAE, {"k": 3}),
    "batchtopk": (BatchTopKSAE, {"k": 3}),
    "matryoshka_batchtopk": (MatryoshkaBatchTopKSAE, {"k": 3, "matryoshka_widths": [16, 32, 64]}),
}


def build(name: str, **overrides) -> SAEModule:
    cls, kwargs = ARCHITECTURES[name]
    return cls(d_in=D_IN, d_sae=D_SAE, seed=0, **(kwargs | overrides))


class LossRecorder(L.Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(outputs["loss"]))


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_trains_and_loss_falls(name, synthetic_train):
    recorder = LossRecorder()
    module = build(name, lr=3e-3)
    quiet_trainer(max_steps=60, callbacks=[recorder]).fit(
        module, loader(synthetic_train, batch_size=256, shuffle=True)
    )
    first, last = recorder.losses[:5], recorder.losses[-5:]
    assert sum(last) < 0.7 * sum(first), recorder.losses
    assert module.sae.cfg.architecture() == name


def heldout_explained_variance(module: SAEModule, activations: torch.Tensor) -> float:
    metric = ExplainedVariance(D_IN)
    with torch.no_grad():
        metric.update(activations, module(activations))
    return metric.compute().item()


def sae_explained_variance(sae, activations: torch.Tensor) -> float:
    metric = ExplainedVariance(D_IN)
    with torch.no_grad():
        metric.update(activations, sae.decode(sae.encode(activations)))
    return metric.compute().item()


@pytest.mark.slow
@pytest.mark.parametrize("name", ARCHITECTURES)
def test_as_good_as_sae_lens_trainer(name, feature_dictionary, synthetic_train, synthetic_heldout):
    """Same initial weights, hyper-parameters, batches and steps: our MCC and EV >= sae-lens's."""
    steps, batch_size, lr = 400, 512, 3e-3
    dead_window_steps = 200
    data = synthetic_train[: (32_768 // batch_size) * batch_size]

    # JumpReLU in the mode that trains as sae-lens does (thresholds at the optimiser's rate).
    same_as_sae_lens = {"jumprelu_threshold_lr_scale": 1.0} if name == "jumprelu" else {}
    module = build(
        name,
        lr=lr,
        normalize_activations=False,  # synthetic data; sae-lens's runner is set to "none" too
        dead_window_tokens=dead_window_steps * batch_size,
        **same_as_sae_lens,
    )
    # sae-lens's own training class (not our fast one), with identical initial weights.
    reference_cls, _ = get_sae_training_class(module.sae.cfg.architecture())
    reference = reference_cls(copy.deepcopy(module.sae.cfg))
    ours = module.sae.state_dict()  # our training state beyond sae-lens's is left out
    reference.load_state_dict({name: ours[name] for name in reference.state_dict()})

    quiet_trainer(max_steps=steps, gradient_clip_val=1.0).fit(
        module, loader(data, batch_size=batch_size)
    )

    batches = itertools.cycle(data.split(batch_size))
    SAETrainer(
        cfg=SAETrainerConfig(
            total_training_samples=steps * batch_size,
            train_batch_size_samples=batch_size,
            lr=lr,
            lr_end=lr,
            dead_feature_window=dead_window_steps,
        ),
        sae=reference,
        data_provider=batches,
    ).fit()

    true_features = feature_dictionary.feature_vectors.detach()
    ours_mcc = mean_correlation_coefficient(module.sae.W_dec.detach(), true_features)
    theirs_mcc = mean_correlation_coefficient(reference.W_dec.detach(), true_features)
    ours_ev = heldout_explained_variance(module, synthetic_heldout)
    theirs_ev = sae_explained_variance(reference, synthetic_heldout)
    print(
        f"{name}: MCC ours {ours_mcc:.4f} sae-lens {theirs_mcc:.4f}; "
        f"EV ours {ours_ev:.4f} sae-lens {theirs_ev:.4f}"
    )
    assert ours_mcc >= theirs_mcc - 0.01
    assert ours_ev >= theirs_ev - 0.01
    assert ours_mcc > 0.5 and ours_ev > 0.5  # both actually learned the features


@pytest.mark.parametrize(
    ("build_module", "message"),
    [
        (lambda: TopKSAE(d_in=8, d_sae=32, k=0), "0 < k <= d_sae"),
        (lambda: TopKSAE(d_in=8, d_sae=32, k=33), "0 < k <= d_sae"),
        (lambda: TopKSAE(d_in=8, d_sae=32, k=2.5), "integer k"),
        (lambda: BatchTopKSAE(d_in=8, d_sae=32, k=-1.0), "0 < k <= d_sae"),
        (lambda: BatchTopKSAE(d_in=8, d_sae=32, topk_threshold_lr=0.0), "topk_threshold_lr"),
        (
            lambda: MatryoshkaBatchTopKSAE(d_in=8, d_sae=32, k=2, matryoshka_widths=[16, 8, 32]),
            "strictly increasing",
        ),
        (
            lambda: MatryoshkaBatchTopKSAE(d_in=8, d_sae=32, k=2, matryoshka_widths=[8, 16]),
            "must end at d_sae",
        ),
        (lambda: MatryoshkaBatchTopKSAE(d_in=8, d_sae=32, matryoshka_widths=[]), "non-empty"),
        (lambda: StandardSAE(d_in=8, d_sae=32, l1_coefficient=-1.0), "l1_coefficient"),
        (lambda: JumpReLUSAE(d_in=8, d_sae=32, jumprelu_bandwidth=0.0), "jumprelu_bandwidth"),
        (
            lambda: JumpReLUSAE(d_in=8, d_sae=32, jumprelu_sparsity_loss_mode="quadratic"),
            "target_l0",
        ),
    ],
)
def test_architecture_arguments_are_validated(build_module, message):
    with pytest.raises(ValueError, match=message):
        build_module()


def test_defaults_alone_build_every_architecture():
    for cls, _ in ARCHITECTURES.values():
        module = cls(d_in=16, d_sae=256)
        assert module.sae.cfg.d_sae == 256
    assert MatryoshkaBatchTopKSAE(d_in=16, d_sae=256).sae.cfg.matryoshka_widths == [
        32,
        64,
        128,
        256,
    ]
