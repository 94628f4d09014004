"""Hyper-parameter rules shared by several architectures (one place for each rule)."""

from collections.abc import Mapping
from typing import Any


def check_positive(name: str, value: Any) -> None:
    """Raise ``ValueError`` unless ``value`` is a positive number."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
        raise ValueError(f"{name} must be positive, got {value!r}.")


def check_positive_ints(values: Mapping[str, Any], allow_none: bool = False) -> None:
    """Raise ``ValueError`` naming each value that is not a positive int (``None`` if allowed)."""
    for name, value in values.items():
        if value is None and allow_none:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            expected = "a positive integer or None" if allow_none else "a positive integer"
            raise ValueError(f"{name} must be {expected}, got {value!r}.")


def check_k(k: Any, d_sae: int, integer: bool) -> None:
    """Raise ``ValueError`` unless ``0 < k <= d_sae`` (and whole, for per-token top-k)."""
    if isinstance(k, bool) or not isinstance(k, int | float) or not 0 < k <= d_sae:
        raise ValueError(
            f"k must satisfy 0 < k <= d_sae ({d_sae}), got {k!r}: k is the number of active "
            "latents per token."
        )
    if integer and isinstance(k, float) and not k.is_integer():
        raise ValueError(f"TopKSAE needs an integer k, got {k!r}; BatchTopKSAE takes floats.")
