"""Chunks of activations, the unit every activation source yields, and how they become batches.

A :class:`Chunk` is a mixing-buffer's worth of activations whose size is known before it is
computed: resuming a stream counts the chunks it skips and computes none of them.
"""

import hashlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

Batch = Tensor | dict[str, Tensor]


@dataclass
class Chunk:
    """Activations ``{hook: [n_tokens, d_in]}`` computed on demand."""

    #: Activations the chunk yields; known without computing them (resume skips by it).
    n_tokens: int
    #: Computes ``{hook: [n_tokens, d_in]}``, already permuted.
    load: Callable[[], dict[str, Tensor]]


def permuted(acts: dict[str, Tensor], key: tuple[int, ...] | None, seed: int) -> dict[str, Tensor]:
    """Permute every hook's rows by the same permutation, seeded by ``(seed, *key)``."""
    if key is None:
        return acts
    n = next(iter(acts.values())).shape[0]
    # A stable digest, not hash(): resuming must give the same order on any Python version.
    digest = hashlib.blake2b(repr((seed, *key)).encode(), digest_size=8).digest()
    generator = torch.Generator().manual_seed(int.from_bytes(digest, "little") % 2**63)
    order = torch.randperm(n, generator=generator)
    return {h: a[order.to(a.device)] for h, a in acts.items()}


def batches(
    chunks: Iterator[Chunk], batch_size: int, start_batch: int = 0
) -> Iterator[dict[str, Tensor]]:
    """Cut ``chunks`` into batches of ``batch_size`` activations, from batch ``start_batch`` on.

    Skipped chunks are counted, never computed; training streams are endless, so no batch is
    partial.
    """
    skip = start_batch * batch_size
    rest: dict[str, Tensor] | None = None
    for chunk in chunks:
        if chunk.n_tokens <= skip:
            skip -= chunk.n_tokens
            continue
        acts = {h: a[skip:] for h, a in chunk.load().items()}
        skip = 0
        if rest is not None:
            acts = {h: torch.cat([rest[h], a]) for h, a in acts.items()}
        n_available = next(iter(acts.values())).shape[0]
        n_full = n_available // batch_size * batch_size
        for start in range(0, n_full, batch_size):
            yield {h: a[start : start + batch_size] for h, a in acts.items()}
        rest = {h: a[n_full:] for h, a in acts.items()}


def take(chunks: Iterator[Chunk], n_tokens: int) -> dict[str, Tensor] | None:
    """Return the first ``n_tokens`` activations of ``chunks`` (fewer if they run out), on CPU.

    Chunks after those that hold ``n_tokens`` are not computed; ``None`` when there are none.
    """
    parts: list[dict[str, Tensor]] = []
    held = 0
    for chunk in chunks:
        if held >= n_tokens:
            break
        parts.append(chunk.load())
        held += next(iter(parts[-1].values())).shape[0]
    if not parts:
        return None
    return {h: torch.cat([p[h] for p in parts])[:n_tokens].cpu() for h in parts[0]}
