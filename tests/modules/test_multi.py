import pytest
import torch
from helpers import D_IN, loader, quiet_trainer
from torch.utils.data import DataLoader, Dataset

from lightning_sae import BatchTopKSAE, MultiSAEModule

HOOKS = ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post"]


class HookDataset(Dataset):
    def __init__(self, activations: dict[str, torch.Tensor]) -> None:
        self.activations = activations

    def __len__(self) -> int:
        return len(next(iter(self.activations.values())))

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {hook: acts[index] for hook, acts in self.activations.items()}


def test_each_sae_trains_exactly_as_it_would_alone(synthetic_train):
    activations = {HOOKS[0]: synthetic_train[:4096], HOOKS[1]: 3.0 * synthetic_train[4096:8192]}
    options = {"d_sae": 64, "k": 3, "lr": 3e-3, "seed": 0, "lr_warm_up_steps": 3}
    multi = MultiSAEModule("batchtopk", HOOKS, d_in=D_IN, per_hook={HOOKS[1]: {"k": 4}}, **options)
    trainer_options = {"max_steps": 6, "gradient_clip_val": 0.5}
    quiet_trainer(**trainer_options).fit(
        multi, DataLoader(HookDataset(activations), batch_size=512)
    )
    for hook, k in zip(HOOKS, (3, 4), strict=True):
        alone = BatchTopKSAE(d_in=D_IN, **(options | {"k": k}))
        quiet_trainer(**trainer_options).fit(alone, loader(activations[hook]))
        together = multi.sae_unit(hook)
        assert together.sae.cfg.k == k
        assert together.normalizer.scale.item() == pytest.approx(alone.activation_scale.item())
        for name, tensor in alone.unit.state_dict().items():
            torch.testing.assert_close(together.state_dict()[name], tensor, msg=name)


def test_logs_per_hook_and_round_trips_a_checkpoint(tmp_path, synthetic_train):
    activations = {hook: synthetic_train[:2048] for hook in HOOKS}
    multi = MultiSAEModule("topk", HOOKS, d_in=D_IN, d_sae=64, k=3)
    trainer = quiet_trainer(max_steps=4, log_every_n_steps=2, default_root_dir=tmp_path)
    trainer.fit(multi, DataLoader(HookDataset(activations), batch_size=512))
    for hook in HOOKS:
        assert trainer.callback_metrics[f"{hook}/train/l0"].item() == pytest.approx(3.0)
    path = tmp_path / "multi.ckpt"
    trainer.save_checkpoint(path)
    restored = MultiSAEModule.load_from_checkpoint(path)
    x = synthetic_train[:8]
    with torch.no_grad():
        for hook in HOOKS:
            assert torch.equal(restored.sae_unit(hook)(x), multi.sae_unit(hook)(x))


def test_bad_configurations():
    with pytest.raises(ValueError, match="distinct"):
        MultiSAEModule("topk", [HOOKS[0], HOOKS[0]], d_in=8, d_sae=32, k=2)
    with pytest.raises(ValueError, match="not in"):
        MultiSAEModule("topk", HOOKS, d_in=8, d_sae=32, k=2, per_hook={"blocks.9": {"k": 3}})
    with pytest.raises(ValueError, match="no width"):
        MultiSAEModule("topk", HOOKS, d_in={HOOKS[0]: 8}, d_sae=32, k=2)
    multi = MultiSAEModule("topk", HOOKS, d_in=8, d_sae=32, k=2)
    with pytest.raises(TypeError, match="expects a dict"):
        multi.training_step(torch.zeros(4, 8), 0)
