"""What checkpoints record and how they load: the saving class, refusals, 0.1 files."""

import io
from pathlib import Path

import pytest
import torch
from helpers import USER_SUBCLASSES, loader, quiet_trainer
from torch.utils.data import DataLoader

from lightning_sae import BatchTopKSAE, MultiSAEModule, SAEModule, TopKSAE

#: Checkpoints written by lightning-sae 0.1 (commit 3ad234a): a BatchTopK SAE and a 2-hook TopK.
V0_1 = Path(__file__).parents[1] / "fixtures" / "v0_1"
OLD_NAMES = {  # 0.1 state-dict name -> the name inside an SAE's unit now
    "activation_scale": "normalizer.scale",
    "tokens_since_fired": "statistics.tokens_since_fired",
    "feature_density": "statistics.feature_density",
}


def new_name(old: str) -> str:
    return old if old.startswith("sae.") else OLD_NAMES[old]


def test_a_0_1_checkpoint_loads_with_its_state_and_resumes(tmp_path):
    old = torch.load(V0_1 / "batchtopk.ckpt", weights_only=True)["state_dict"]
    module = SAEModule.load_from_checkpoint(V0_1 / "batchtopk.ckpt", weights_only=True)
    assert type(module) is BatchTopKSAE
    state = module.unit.state_dict()
    for name, tensor in old.items():
        assert torch.equal(state[new_name(name)], tensor), name
    assert not module.unit.normalizer.pending  # the checkpoint's scale is kept
    fresh = BatchTopKSAE(**{k: v for k, v in module.hparams.items() if k != "architecture"})
    trainer = quiet_trainer(max_steps=6)
    trainer.fit(fresh, loader(torch.randn(2048, 16), 256), ckpt_path=V0_1 / "batchtopk.ckpt")
    assert trainer.global_step == 6


def test_a_0_1_multi_hook_checkpoint_loads():
    old = torch.load(V0_1 / "multi.ckpt", weights_only=True)["state_dict"]
    module = MultiSAEModule.load_from_checkpoint(V0_1 / "multi.ckpt", weights_only=True)
    for name, tensor in old.items():
        _, key, rest = name.split(".", 2)  # saes.<hook key>.<name in the 0.1 SAE module>
        unit = module.units[key]
        assert torch.equal(unit.state_dict()[new_name(rest)], tensor), name


def test_a_0_1_checkpoint_missing_weights_still_fails_to_load():
    checkpoint = torch.load(V0_1 / "batchtopk.ckpt", weights_only=True)
    del checkpoint["state_dict"]["sae.W_enc"]
    buffer = io.BytesIO()
    torch.save(checkpoint, buffer)
    buffer.seek(0)
    with pytest.raises(RuntimeError, match="W_enc"):
        SAEModule.load_from_checkpoint(buffer, weights_only=True)


def test_loading_through_an_instance_or_an_unrelated_class_is_refused(tmp_path):
    module = TopKSAE(d_in=16, d_sae=32, k=4)
    trainer = quiet_trainer(max_steps=1, default_root_dir=tmp_path)
    trainer.fit(module, loader(torch.randn(256, 16), 256))
    trainer.save_checkpoint(tmp_path / "topk.ckpt")
    with pytest.raises(TypeError, match="cannot be called on an instance"):
        module.load_from_checkpoint(tmp_path / "topk.ckpt")
    with pytest.raises(TypeError, match="cannot be loaded as BatchTopKSAE"):
        BatchTopKSAE.load_from_checkpoint(tmp_path / "topk.ckpt")
    with open(tmp_path / "topk.ckpt", "rb") as handle:  # a file object is read once, rewound
        assert type(SAEModule.load_from_checkpoint(handle)) is TopKSAE


def test_an_unimportable_user_class_falls_back_to_the_library_class(tmp_path):
    module = USER_SUBCLASSES["topk"](d_in=16, d_sae=32, k=4)
    trainer = quiet_trainer(max_steps=1, default_root_dir=tmp_path)
    trainer.fit(module, loader(torch.randn(256, 16), 256))
    path = tmp_path / "mine.ckpt"
    trainer.save_checkpoint(path)
    checkpoint = torch.load(path, weights_only=True)
    checkpoint["lightning_sae_class"] = "a_script_not_imported:MyTopKSAE"
    torch.save(checkpoint, path)
    assert type(SAEModule.load_from_checkpoint(path)) is TopKSAE


def test_a_multi_hook_checkpoint_resumes_only_into_the_same_saes(tmp_path):
    hooks = ["a.b", "c.d"]
    data = DataLoader([{hook: torch.randn(256, 16) for hook in hooks} for _ in range(4)], None)
    module = MultiSAEModule("batchtopk", hooks, d_in=16, d_sae=32, k=4, seed=0)
    trainer = quiet_trainer(max_steps=2, default_root_dir=tmp_path)
    trainer.fit(module, data)
    path = tmp_path / "multi.ckpt"
    trainer.save_checkpoint(path)
    for other in (
        MultiSAEModule("batchtopk", hooks, d_in=16, d_sae=32, k=8),
        MultiSAEModule("matryoshka_batchtopk", hooks, d_in=16, d_sae=32, k=4),
        MultiSAEModule("batchtopk", hooks, d_in=16, d_sae=32, k=4, per_hook={"a.b": {"k": 2}}),
    ):
        with pytest.raises(ValueError, match="differs from the one asked for"):
            quiet_trainer(max_steps=3).fit(other, data, ckpt_path=path)
    same = MultiSAEModule("batchtopk", hooks, d_in=16, d_sae=32, k=4, lr=1e-3)  # lr may change
    quiet_trainer(max_steps=3).fit(same, data, ckpt_path=path)
