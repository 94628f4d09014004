"""The architectures lightning-sae trains: an explicit table, one line per architecture.

A name resolves to the class this table names, whatever subclasses a user writes: subclassing
``TopKSAE`` never changes what ``"topk"`` means. Architectures of your own are added with
:func:`register_architecture`, explicitly, the way sae-lens registers its own.

>>> get_module_class("BatchTopKSAE") is get_module_class("batchtopk")
True
"""

import importlib
from typing import Any

#: Architecture name (sae-lens's training-architecture name) -> module class, as "module:Class".
_ARCHITECTURES: dict[str, str] = {
    "standard": "lightning_sae.modules.standard:StandardSAE",
    "gated": "lightning_sae.modules.gated:GatedSAE",
    "jumprelu": "lightning_sae.modules.jumprelu:JumpReLUSAE",
    "topk": "lightning_sae.modules.topk:TopKSAE",
    "batchtopk": "lightning_sae.modules.topk:BatchTopKSAE",
    "matryoshka_batchtopk": "lightning_sae.modules.topk:MatryoshkaBatchTopKSAE",
    "atm": "lightning_sae.modules.atm:ATMSAE",
}


def normalize_name(name: str) -> str:
    """Return ``name`` as lookups compare it: ``"BatchTopK_SAE"`` and ``"batchtopksae"`` match."""
    return name.lower().replace("_", "").replace("-", "")


def class_path(cls: type) -> str:
    """Return the ``"module:QualName"`` path checkpoints record for a class.

    A class of the public API is recorded under ``lightning_sae`` itself, so that moving it
    between internal files never breaks a checkpoint.
    """
    package = importlib.import_module("lightning_sae")
    if getattr(package, cls.__qualname__, None) is cls:
        return f"lightning_sae:{cls.__qualname__}"
    return f"{cls.__module__}:{cls.__qualname__}"


def import_class(path: str) -> type:
    """Import the class at ``"module:QualName"``."""
    module_name, _, qualname = path.partition(":")
    target: object = importlib.import_module(module_name)
    for part in qualname.split("."):
        target = getattr(target, part)
    if not isinstance(target, type):
        raise TypeError(f"{path} is not a class.")
    return target


def register_architecture(name: str, module_class: type | str) -> None:
    """Make ``name`` resolve to ``module_class``, an ``SAEModule`` subclass or its path.

    Raises:
        ValueError: If ``name`` is already registered to another class.

    """
    path = module_class if isinstance(module_class, str) else class_path(module_class)
    existing = _ARCHITECTURES.get(name)
    if existing is not None and import_class(existing) is not import_class(path):
        raise ValueError(f"Architecture {name!r} is already registered to {existing}.")
    _ARCHITECTURES.setdefault(name, path)


def available_architectures() -> list[str]:
    """Names of every registered architecture, sorted."""
    return sorted(_ARCHITECTURES)


def get_module_class(architecture: str) -> type[Any]:
    """Return the module class registered for an architecture name or its class name.

    Accepts ``"batchtopk"``, ``"BatchTopKSAE"`` or ``"batch_topk"`` alike.

    Raises:
        ValueError: If nothing is registered under that name; the message lists what is.

    """
    key = normalize_name(architecture)
    for name, path in _ARCHITECTURES.items():
        if key in (normalize_name(name), normalize_name(path.rpartition(":")[2])):
            return import_class(path)
    known = ", ".join(
        f"{name!r} ({path.rpartition(':')[2]})" for name, path in sorted(_ARCHITECTURES.items())
    )
    raise ValueError(f"Unknown SAE architecture {architecture!r}. Known architectures: {known}.")
