"""What a checkpoint records about the module that wrote it, and how it is checked on load.

A checkpoint names the class that wrote it (so ``SAEModule.load_from_checkpoint`` rebuilds that
class, a user's subclass included) and is refused by a module of another class or with other
SAE-defining settings: resuming must never silently train another SAE than the one asked for.
State dicts of lightning-sae 0.1 (before the SAE moved into its unit) are upgraded on load.
"""

from typing import Any

import torch
from lightning.pytorch import LightningModule

from lightning_sae.registry import class_path

#: Key under which a checkpoint records the module class that wrote it.
CLASS_PATH_KEY = "lightning_sae_class"


def check_checkpoint_matches(module: LightningModule, checkpoint: dict[str, Any]) -> None:
    """Raise ``ValueError`` unless ``checkpoint`` was saved by ``module``'s class and settings.

    Compared: the class, and the hyper-parameters that define the SAE
    (``structural_hparams`` of an SAE module: sizes, ``k``, ...). Optimiser settings may change.
    """
    saved_path = checkpoint.get(CLASS_PATH_KEY)
    if saved_path is not None and saved_path != class_path(type(module)):
        raise ValueError(
            f"The checkpoint was saved by {saved_path.rpartition(':')[2]}, not "
            f"{type(module).__name__}: resume it with the class that wrote it (on the command "
            "line, drop --model or pass the same one), or start a new run without ckpt_path."
        )
    structural = getattr(module, "structural_hparams", ())
    saved = checkpoint.get("hyper_parameters", {})
    changed = {
        name: (saved[name], module.hparams[name])
        for name in structural
        if name in saved and name in module.hparams and saved[name] != module.hparams[name]
    }
    if changed:
        raise ValueError(
            f"The checkpoint's SAE differs from the one asked for: {changed} (saved, asked). "
            "Resume with the checkpoint's settings, or start a new run without ckpt_path."
        )


#: State-dict names of lightning-sae 0.1, before the SAE moved into its unit.
_RENAMED_STATE = {
    "sae.": "unit.sae.",
    "activation_scale": "unit.normalizer.scale",
    "tokens_since_fired": "unit.statistics.tokens_since_fired",
    "feature_density": "unit.statistics.feature_density",
}


def upgrade_state_dict(state_dict: dict[str, Any], prefix: str, module: torch.nn.Module) -> None:
    """Rename a lightning-sae 0.1 state dict in place and fill the state it did not have yet."""
    renamed = False
    for key in [k for k in state_dict if k.startswith(prefix)]:
        name = key[len(prefix) :]
        for old, new in _RENAMED_STATE.items():
            if name == old or (old.endswith(".") and name.startswith(old)):
                state_dict[prefix + new + name[len(old) :]] = state_dict.pop(key)
                renamed = True
                break
    if renamed:
        for name, value in module.state_dict().items():
            state_dict.setdefault(prefix + name, value)
