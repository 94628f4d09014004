"""What a checkpoint records about the module that wrote it, and how it is checked on load.

A checkpoint names the class that wrote it (so ``SAEModule.load_from_checkpoint`` rebuilds that
class, a user's subclass included) and is refused by a module of another class or with other
SAE-defining settings: resuming must never silently train another SAE than the one asked for.
State dicts of lightning-sae 0.1 (before the SAE moved into its unit) are upgraded on load.
"""

import sys
from typing import Any

import torch
from lightning.pytorch import LightningModule

from lightning_sae.registry import import_class

#: Key under which a checkpoint records the module class that wrote it.
CLASS_PATH_KEY = "lightning_sae_class"
#: Key under which a checkpoint also holds the open feature-density window (``SAEModule``).
DENSITY_WINDOW_KEY = "lightning_sae_density_window"


def saved_class(checkpoint: dict[str, Any]) -> type | None:
    """Return the class a checkpoint records, or ``None`` when it cannot be resolved safely.

    A class in ``lightning_sae`` is imported; any other only if its module is already imported
    (a user's subclass, defined before loading): a checkpoint never makes us import code.
    """
    path = checkpoint.get(CLASS_PATH_KEY)
    if not isinstance(path, str) or ":" not in path:
        return None
    module_name = path.partition(":")[0]
    if module_name.split(".")[0] != "lightning_sae" and module_name not in sys.modules:
        return None
    try:
        return import_class(path)
    except (ImportError, AttributeError, TypeError):
        return None


def check_checkpoint_matches(module: LightningModule, checkpoint: dict[str, Any]) -> None:
    """Raise ``ValueError`` unless ``checkpoint`` was saved by ``module``'s class and settings.

    Compared: the class (or, when the recorded class cannot be resolved, the architecture), and
    the settings that define the SAE(s) (``structural_view``: sizes, ``k``, per-hook overrides...).
    Optimiser settings may change on resume.
    """
    saved = checkpoint.get("hyper_parameters", {})
    cls = saved_class(checkpoint)
    asked_architecture = module.hparams.get("architecture")
    if cls is not None and cls is not type(module):
        raise ValueError(
            f"The checkpoint was saved by {cls.__name__}, not {type(module).__name__}: resume it "
            "with the class that wrote it (on the command line, drop --model or pass the same "
            "one), or start a new run without ckpt_path."
        )
    if cls is None and saved.get("architecture") not in (None, asked_architecture):
        raise ValueError(
            f"The checkpoint trained architecture {saved.get('architecture')!r}, not "
            f"{asked_architecture!r}: resume it with that architecture, or start a new run."
        )
    view = getattr(type(module), "structural_view", None)
    if view is None:
        return
    theirs, ours = view(saved), view(dict(module.hparams))
    changed = {
        name: (theirs.get(name), ours.get(name))
        for name in sorted(theirs.keys() | ours.keys())
        if theirs.get(name) != ours.get(name)
    }
    if changed:
        raise ValueError(
            f"The checkpoint's SAE differs from the one asked for: {changed} (saved, asked). "
            "Resume with the checkpoint's settings, or start a new run without ckpt_path."
        )


#: State-dict names of lightning-sae 0.1 inside one SAE, and where they live now (in its unit).
_RENAMED_STATE = {
    "sae.": "sae.",
    "activation_scale": "normalizer.scale",
    "tokens_since_fired": "statistics.tokens_since_fired",
    "feature_density": "statistics.feature_density",
}
#: Unit state that lightning-sae 0.1 did not keep (an empty density window is correct for it).
_NEW_STATE = ("statistics.window.counts", "statistics.window.tokens")


def upgrade_state_dict(
    state_dict: dict[str, Any], old_prefix: str, new_prefix: str, unit: torch.nn.Module
) -> None:
    """Rename one SAE's lightning-sae 0.1 state (under ``old_prefix``) to its unit's names.

    Only state 0.1 never had is filled in; a key missing from an old checkpoint stays missing,
    so a strict load still reports it.
    """
    renamed = False
    for key in [k for k in state_dict if k.startswith(old_prefix)]:
        name = key[len(old_prefix) :]
        for old, new in _RENAMED_STATE.items():
            if name == old or (old.endswith(".") and name.startswith(old)):
                state_dict[new_prefix + new + name[len(old) :]] = state_dict.pop(key)
                renamed = True
                break
    if renamed:
        current = unit.state_dict()
        for name in _NEW_STATE:
            state_dict.setdefault(new_prefix + name, current[name])
