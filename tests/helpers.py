"""Small builders shared by the tests: real sae-lens synthetic data and a quiet CPU Trainer."""

import lightning as L
import torch
from sae_lens.synthetic import ActivationGenerator, FeatureDictionary
from torch.utils.data import DataLoader, TensorDataset

D_IN = 32
N_FEATURES = 48


def build_feature_dictionary(seed: int = 0) -> FeatureDictionary:
    """Ground-truth unit feature vectors ``[N_FEATURES, D_IN]``, nearly orthogonal."""
    return FeatureDictionary(N_FEATURES, D_IN, seed=seed)


def synthetic_activations(
    feature_dictionary: FeatureDictionary, n_tokens: int, seed: int
) -> torch.Tensor:
    """``n_tokens`` activations mixing sparse true features (each fires with p = 0.06)."""
    torch.manual_seed(seed)
    generator = ActivationGenerator(
        N_FEATURES, firing_probabilities=0.06, std_firing_magnitudes=0.2, mean_firing_magnitudes=1.0
    )
    with torch.no_grad():
        return feature_dictionary(generator.sample(n_tokens))


def loader(activations: torch.Tensor, batch_size: int = 512, shuffle: bool = False) -> DataLoader:
    return DataLoader(TensorDataset(activations), batch_size=batch_size, shuffle=shuffle)


def tiny_transformer_lens(n_ctx: int) -> dict:
    """A CLI ``class_path`` entry for a 1-layer transformer-lens model (d_model 16, vocab 64)."""
    cfg = {"n_layers": 1, "d_model": 16, "n_ctx": n_ctx, "d_head": 4, "n_heads": 4}
    cfg |= {"d_vocab": 64, "act_fn": "gelu", "seed": 0}
    return {"class_path": "transformer_lens.HookedTransformer", "init_args": {"cfg": cfg}}


def quiet_trainer(**kwargs) -> L.Trainer:
    """A CPU Trainer without logger, checkpoints, progress bar or summary, unless overridden."""
    options = {
        "accelerator": "cpu",
        "devices": 1,
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "log_every_n_steps": 10,
    }
    options.update(kwargs)
    return L.Trainer(**options)


def _user_subclasses() -> dict[str, type]:
    """A user's own subclass of every registered module class (``class MyTopKSAE(TopKSAE)``).

    Defined at module level so that checkpoints can name them (``helpers:MyTopKSAE``).
    """
    from lightning_sae import available_architectures, get_module_class

    subclasses = {}
    for name in available_architectures():
        parent = get_module_class(name)
        subclasses[name] = type(f"My{parent.__name__}", (parent,), {"__module__": __name__})
    return subclasses


USER_SUBCLASSES = _user_subclasses()
globals().update({cls.__name__: cls for cls in USER_SUBCLASSES.values()})
