"""FastTopKTrainingSAE against sae-lens's TopKTrainingSAE (``sae_parity.TOLERANCES``)."""

import pytest
import torch
from sae_lens import SAE
from sae_lens.saes.sae import TrainStepInput
from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig
from saes.sae_parity import assert_same_step, build_pair, training_pass

from lightning_sae.saes import TRAINING_CLASSES, FastTopKTrainingSAE

D_IN, D_SAE, K = 16, 64, 4  # k_aux = d_in // 2 = 8


def dead_mask(n_dead: int) -> torch.Tensor:
    mask = torch.zeros(D_SAE, dtype=torch.bool)
    mask[torch.randperm(D_SAE, generator=torch.Generator().manual_seed(1))[:n_dead]] = True
    return mask


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("rescale", [True, False])
@pytest.mark.parametrize("n_dead", [None, 0, 3, 40])
def test_step_matches_sae_lens(dtype: torch.dtype, rescale: bool, n_dead: int | None):
    cfg = TopKTrainingSAEConfig(d_in=D_IN, d_sae=D_SAE, k=K, rescale_acts_by_decoder_norm=rescale)
    reference, fast = build_pair(TopKTrainingSAE, FastTopKTrainingSAE, cfg, dtype)
    x = torch.randn(32, D_IN, dtype=dtype)
    dead = None if n_dead is None else dead_mask(n_dead)
    output = assert_same_step(reference, fast, x, dead)
    assert output.feature_acts.layout == torch.sparse_csr
    assert output.feature_acts.values().numel() == 32 * K
    aux = output.losses["auxiliary_reconstruction_loss"]
    assert (aux > 0) == bool(n_dead)


def test_apply_b_dec_to_input_off_and_aux_coefficient():
    cfg = TopKTrainingSAEConfig(
        d_in=D_IN, d_sae=D_SAE, k=K, apply_b_dec_to_input=False, aux_loss_coefficient=0.25
    )
    reference, fast = build_pair(TopKTrainingSAE, FastTopKTrainingSAE, cfg, torch.float64)
    assert_same_step(reference, fast, torch.randn(32, D_IN, dtype=torch.float64), dead_mask(20))


def test_hooked_sae_takes_the_sae_lens_pass():
    cfg = TopKTrainingSAEConfig(d_in=D_IN, d_sae=D_SAE, k=K)
    reference, fast = build_pair(TopKTrainingSAE, FastTopKTrainingSAE, cfg, torch.float32)
    seen = []
    fast.hook_sae_acts_pre.add_hook(lambda tensor, hook: seen.append(tensor.shape))
    output = assert_same_step(reference, fast, torch.randn(8, D_IN))
    assert seen == [(8, D_SAE)]
    assert output.feature_acts.layout == torch.strided


def test_token_grids_take_the_sae_lens_pass():
    cfg = TopKTrainingSAEConfig(d_in=D_IN, d_sae=D_SAE, k=K)
    reference, fast = build_pair(TopKTrainingSAE, FastTopKTrainingSAE, cfg, torch.float64)
    x = torch.randn(2, 8, D_IN, dtype=torch.float64)
    output = assert_same_step(reference, fast, x, dead_mask(20))
    assert output.feature_acts.shape == (2, 8, D_SAE)


def test_retained_graph_runs_backward_twice():
    cfg = TopKTrainingSAEConfig(d_in=D_IN, d_sae=D_SAE, k=K)
    _, fast = build_pair(TopKTrainingSAE, FastTopKTrainingSAE, cfg, torch.float64)
    output = fast.training_forward_pass(
        TrainStepInput(
            sae_in=torch.randn(8, D_IN, dtype=torch.float64),
            coefficients={},
            dead_neuron_mask=dead_mask(20),
            n_training_steps=0,
            is_logging_step=False,
        )
    )
    output.loss.backward(retain_graph=True)
    once = {name: p.grad.clone() for name, p in fast.named_parameters()}
    output.loss.backward()
    for name, parameter in fast.named_parameters():
        torch.testing.assert_close(parameter.grad, 2 * once[name], msg=name)


@pytest.mark.parametrize("architecture", sorted(TRAINING_CLASSES))
def test_training_classes_export_plain_sae_lens(architecture: str, tmp_path):
    """Each class trains sae-lens's own config and exports the built-in inference SAE."""
    from sae_lens.registry import get_sae_training_class

    sae_lens_class, config_class = get_sae_training_class(architecture)
    fast_class = TRAINING_CLASSES[architecture]
    assert issubclass(fast_class, sae_lens_class)
    options = {"k": 4} if "topk" in architecture else {}
    if architecture == "matryoshka_batchtopk":
        options["matryoshka_widths"] = [16, 64]
    cfg = config_class(d_in=D_IN, d_sae=D_SAE, **options)
    reference, fast = build_pair(sae_lens_class, fast_class, cfg, torch.float32)
    training_pass(reference, torch.randn(8, D_IN), coefficients={"l1": 1.0})
    training_pass(fast, torch.randn(8, D_IN), coefficients={"l1": 1.0})
    fast.load_state_dict(reference.state_dict())
    reference.save_inference_model(tmp_path / "reference")
    fast.save_inference_model(tmp_path / "fast")
    expected, actual = (SAE.load_from_disk(tmp_path / name) for name in ("reference", "fast"))
    assert type(actual) is type(expected)
    assert actual.cfg.to_dict() == expected.cfg.to_dict()
    for name, tensor in expected.state_dict().items():
        assert torch.equal(actual.state_dict()[name], tensor), name
