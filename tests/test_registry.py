"""The architecture registry: subclasses never change what a name resolves to."""

import json

import pytest
import torch
from helpers import USER_SUBCLASSES, loader, quiet_trainer

from lightning_sae import (
    SAEModule,
    available_architectures,
    export_to_sae_lens,
    get_module_class,
    load_from_sae_lens,
    register_architecture,
)

LIBRARY = {name: get_module_class(name) for name in available_architectures()}
ARGS = {"d_in": 16, "d_sae": 32, "seed": 0}
EXTRA = {"topk": {"k": 4}, "batchtopk": {"k": 4}, "matryoshka_batchtopk": {"k": 4}}


def test_every_architecture_is_registered():
    assert set(LIBRARY) == {
        "standard", "gated", "jumprelu", "topk", "batchtopk", "matryoshka_batchtopk", "atm",
    }  # fmt: skip
    assert all(cls.__module__.startswith("lightning_sae.modules.") for cls in LIBRARY.values())


@pytest.mark.parametrize("name", sorted(LIBRARY))
def test_names_resolve_to_the_library_class_after_user_subclasses(name, tmp_path):
    mine = USER_SUBCLASSES[name]  # defined in helpers, before this test module ran
    library = LIBRARY[name]
    assert issubclass(mine, library) and mine is not library
    assert get_module_class(name) is library
    assert get_module_class(library.__name__) is library
    kwargs = ARGS | EXTRA.get(name, {})
    assert type(SAEModule(architecture=name, **kwargs)) is library
    # A subclass may still say which architecture it trains.
    assert type(mine(architecture=name, **kwargs)) is mine
    path = export_to_sae_lens(
        mine(**kwargs), tmp_path / "sae", calibration_activations=torch.randn(256, 16)
    )
    exported_as = json.loads((path / "cfg.json").read_text())["architecture"]
    assert type(load_from_sae_lens(path)) is LIBRARY[exported_as]  # never the user's subclass


@pytest.mark.parametrize("name", sorted(LIBRARY))
def test_a_subclass_round_trips_through_its_own_checkpoint(name, tmp_path):
    mine = USER_SUBCLASSES[name]
    module = mine(**(ARGS | EXTRA.get(name, {})))
    trainer = quiet_trainer(max_steps=2, default_root_dir=tmp_path)
    trainer.fit(module, loader(torch.randn(512, 16), batch_size=256))
    path = tmp_path / "mine.ckpt"
    trainer.save_checkpoint(path)
    x = torch.randn(8, 16)
    for loader_cls in (mine, SAEModule):  # the base reads the class the checkpoint recorded
        restored = loader_cls.load_from_checkpoint(path)
        assert type(restored) is mine
        with torch.no_grad():
            torch.testing.assert_close(restored(x), module(x))
    with pytest.raises(TypeError, match="cannot be loaded as"):
        LIBRARY["topk" if name == "gated" else "gated"].load_from_checkpoint(path)


def test_registering_is_explicit_and_never_silently_replaces():
    register_architecture("standard", LIBRARY["standard"])  # the same class again: fine
    with pytest.raises(ValueError, match="already registered"):
        register_architecture("standard", USER_SUBCLASSES["standard"])
    with pytest.raises(ValueError, match="Known architectures"):
        get_module_class("no_such_sae")
